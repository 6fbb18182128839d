"""The one architecture registry: names, their diffusers configs, and the fixed seed of random weights.

In:  an architecture name (`ARCHS`, or the bench-only `mid`) and a pipeline part
     (`unet`, `vae`, `text_encoder`, `scheduler`).
Out: the part's JSON config (from the repository's `models/` folder, which a regular install ships inside
     the package), a digest of the configs.

`ARCHS` are what a user builds from (`--arch`). `SHIPPED` ones are pretrained pipelines whose weights
live in the repository (`models/tiny-toy`: the tiny architecture trained on the toy world by
`tools/pretrain_toy.py`, the embedded default), checked against their `SHA256SUMS` on load. `MATERIALIZED` ones are complete small pipelines
saved once and loaded like a user's folder (`tiny-bk-*`: BK-SDM-shaped U-Nets, no mid block, one
layer per block; `-tiny` also drops the innermost stage); the others are published architectures
with random weights, built in memory (`bk-sdm-*`: the U-Net configs of Nota-NetsPresso/BK-SDM
`src/unet_config/`). `BENCH_ARCHS` adds `mid`, SD1.5's layout with block_out_channels
128/256/512/512, a mid-size U-Net for benchmarks only. `VARIANTS` are the diffusers weight-file
variants a `--model` folder may be saved as (`diffusion_pytorch_model.<variant>.safetensors`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import HollowError


def _models_dir() -> Path:
    """The `models/` folder: inside the package where a regular install put it (pyproject's package-dir
    ships it as `hollow_export/shipped_models`), else the repository's own (a checkout, an editable install)."""
    package = Path(__file__).resolve().parent.parent
    shipped = package / "shipped_models"
    return shipped if shipped.is_dir() else package.parent / "models"


MODELS_DIR = _models_dir()
MATERIALIZED = ("tiny", "tiny-bk-small", "tiny-bk-tiny")
SHIPPED = ("tiny-toy",)
ARCHS = SHIPPED + MATERIALIZED + ("sd15", "sd21", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny")
BENCH_ARCHS = ("tiny", "mid", "sd15", "sd21")
KNOWN_ARCHS = tuple(dict.fromkeys(ARCHS + BENCH_ARCHS))  # every name a config exists for
VARIANTS = ("fp16",)
DEFAULT_ARCH = "tiny-toy"
SEED = 0
PARTS = ("unet", "vae", "text_encoder", "scheduler")
SHIPPED_CONFIGS = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                   "scheduler": "scheduler/scheduler_config.json"}
# bench-only architectures: (the config folder they start from, overrides of its U-Net config)
DERIVED = {"mid": ("sd15", {"block_out_channels": [128, 256, 512, 512]})}


class ModelError(HollowError):
    """A model folder or architecture name the tool cannot use (message names the fix)."""


def check_arch(arch: str, allowed: tuple[str, ...] = KNOWN_ARCHS) -> str:
    """`arch`, or a ModelError naming the choices."""
    if arch not in allowed:
        raise ModelError(f"unknown --arch {arch!r}; choose one of {', '.join(allowed)}")
    return arch


def arch_config(arch: str, part: str) -> dict:
    """The JSON config of one pipeline part (`unet`, `vae`, `text_encoder`, `scheduler`)."""
    check_arch(arch)
    if arch in SHIPPED:
        return json.loads((MODELS_DIR / arch / SHIPPED_CONFIGS[part]).read_text())
    base, overrides = DERIVED.get(arch, (arch, {}))
    config = json.loads((MODELS_DIR / base / f"{part}.json").read_text())
    return {**config, **overrides} if part == "unet" else config


def check_variant(variant: str | None) -> str | None:
    """`variant` (None: the plain weight files), or a ModelError naming the choices."""
    if variant is not None and variant not in VARIANTS:
        raise ModelError(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)} (or leave it out)")
    return variant


def shipped_folder(arch: str) -> Path:
    """The repository folder of a SHIPPED pipeline, after checking every file against its SHA256SUMS."""
    folder = MODELS_DIR / arch
    sums = folder / "SHA256SUMS"
    fix = f"restore it (git checkout -- models/{arch}) or retrain it with tools/pretrain_toy.py"
    if not sums.exists():
        raise ModelError(f"{folder}: missing SHA256SUMS; {fix}")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name
        if not path.exists():
            raise ModelError(f"{path}: missing; {fix}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ModelError(f"{path}: sha256 differs from models/{arch}/SHA256SUMS; {fix}")
    return folder


def config_digest(arch: str) -> str:
    """Short digest of `arch`'s configs and seed: names its cached random-weight folder."""
    h = hashlib.sha256(f"seed={SEED}".encode())
    for part in PARTS:
        h.update((MODELS_DIR / arch / f"{part}.json").read_bytes())
    return h.hexdigest()[:12]
