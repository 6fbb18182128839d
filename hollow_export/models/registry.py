"""The one architecture registry: names, their diffusers configs, and the fixed seed of random weights.

In:  an architecture name (`tiny`, `sd15`, `sd21`, or the bench-only `mid`) and a pipeline part
     (`unet`, `vae`, `text_encoder`, `scheduler`).
Out: the part's JSON config (from the repository's `models/` folder), a digest of the configs.

`ARCHS` are what a user builds from (`--arch`); `BENCH_ARCHS` adds `mid`, SD1.5's layout with
block_out_channels 128/256/512/512, a mid-size U-Net for benchmarks only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import HollowError

MODELS_DIR = Path(__file__).resolve().parent.parent.parent / "models"
ARCHS = ("tiny", "sd15", "sd21")
BENCH_ARCHS = ("tiny", "mid", "sd15", "sd21")
DEFAULT_ARCH = "tiny"
SEED = 0
PARTS = ("unet", "vae", "text_encoder", "scheduler")
# bench-only architectures: (the config folder they start from, overrides of its U-Net config)
DERIVED = {"mid": ("sd15", {"block_out_channels": [128, 256, 512, 512]})}


class ModelError(HollowError):
    """A model folder or architecture name the tool cannot use (message names the fix)."""


def check_arch(arch: str, allowed: tuple[str, ...] = BENCH_ARCHS) -> str:
    """`arch`, or a ModelError naming the choices."""
    if arch not in allowed:
        raise ModelError(f"unknown --arch {arch!r}; choose one of {', '.join(allowed)}")
    return arch


def arch_config(arch: str, part: str) -> dict:
    """The JSON config of one pipeline part (`unet`, `vae`, `text_encoder`, `scheduler`)."""
    check_arch(arch)
    base, overrides = DERIVED.get(arch, (arch, {}))
    config = json.loads((MODELS_DIR / base / f"{part}.json").read_text())
    return {**config, **overrides} if part == "unet" else config


def config_digest(arch: str) -> str:
    """Short digest of `arch`'s configs and seed: names its cached random-weight folder."""
    h = hashlib.sha256(f"seed={SEED}".encode())
    for part in PARTS:
        h.update((MODELS_DIR / arch / f"{part}.json").read_bytes())
    return h.hexdigest()[:12]
