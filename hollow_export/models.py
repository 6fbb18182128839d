"""Where the Stable Diffusion pipeline comes from.

In:  a local diffusers folder (`--model PATH`) or an architecture name from
     `models/` (`tiny`, `sd15`, `sd21`).
Out: diffusers objects (a `StableDiffusionPipeline`, or just its
     `UNet2DConditionModel`), loaded through the normal `from_pretrained`
     code path with `local_files_only=True`.

`tiny` is the embedded default: a complete SD-shaped pipeline made from the
configs in `models/tiny/` with a fixed seed, saved once in diffusers layout
under the cache folder and then loaded like any user's model. `sd15`/`sd21`
are the real architectures with random weights (memory and FLOPs do not
depend on weight values), built in memory for planning and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from .errors import HollowError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ARCHS = ("tiny", "sd15", "sd21")
SEED = 0


class ModelError(HollowError):
    """A model folder or architecture name the tool cannot use (message names the fix)."""


def cache_dir() -> Path:
    """Folder for materialised models; `HOLLOW_EXPORT_CACHE` overrides it."""
    return Path(os.environ.get("HOLLOW_EXPORT_CACHE", Path.home() / ".cache" / "hollow-export"))


def arch_config(arch: str, part: str) -> dict:
    """The JSON config of one pipeline part (`unet`, `vae`, `text_encoder`, `scheduler`)."""
    if arch not in ARCHS:
        raise ModelError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return json.loads((MODELS_DIR / arch / f"{part}.json").read_text())


def _clip_byte_tokenizer(folder: Path):
    """A real CLIPTokenizer over the 256 byte symbols (no merges): tiny but honest."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


def _random_parts(arch: str, tokenizer_folder: Path, device: str = "cpu"):
    """U-Net, VAE, text encoder, tokenizer and scheduler of `arch`, random weights, fixed seed."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(arch_config(arch, "unet"))
        vae = AutoencoderKL.from_config(arch_config(arch, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch_config(arch, "text_encoder")))
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=_clip_byte_tokenizer(tokenizer_folder),
        scheduler=PNDMScheduler.from_config(arch_config(arch, "scheduler")),
    )


def _config_digest(arch: str) -> str:
    h = hashlib.sha256(f"seed={SEED}".encode())
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        h.update((MODELS_DIR / arch / f"{part}.json").read_bytes())
    return h.hexdigest()[:12]


def materialize(arch: str = "tiny") -> Path:
    """Save `arch` with random weights in diffusers layout (once; atomic) and return its folder."""
    from diffusers import StableDiffusionPipeline

    target = cache_dir() / f"{arch}-{_config_digest(arch)}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=target.parent))
    try:
        parts = _random_parts(arch, tmp / "tokenizer")
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(model: str | None, arch: str | None) -> tuple[str, Path | None]:
    """Pick the model source: (`arch` name or "local", folder or None for in-memory random)."""
    if model is not None and arch is not None:
        raise ModelError("give either --model PATH or --arch NAME, not both")
    if model is not None:
        folder = Path(model)
        if not (folder / "model_index.json").exists() and not (folder / "unet" / "config.json").exists():
            raise ModelError(
                f"{folder} is not a diffusers Stable Diffusion folder (no model_index.json or "
                "unet/config.json); pass the folder that `save_pretrained` wrote"
            )
        return "local", folder
    arch = arch or "tiny"
    if arch not in ARCHS:
        raise ModelError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch, (materialize("tiny") if arch == "tiny" else None)


def load_pipeline(model: str | None = None, arch: str | None = None):
    """A `StableDiffusionPipeline` (fp32, CPU, eval mode) from a folder or an architecture name."""
    from diffusers import StableDiffusionPipeline

    name, folder = resolve(model, arch)
    if folder is not None:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    else:
        with tempfile.TemporaryDirectory() as tmp:
            parts = _random_parts(name, Path(tmp) / "tokenizer")
            pipe = StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unet(model: str | None = None, arch: str | None = None, meta: bool = False):
    """Only the U-Net. `meta=True` builds it without memory (for shapes and parameter counts)."""
    from diffusers import UNet2DConditionModel

    name, folder = resolve(model, arch)
    if folder is not None and not meta:
        sub = "unet" if (folder / "unet").exists() else None
        return UNet2DConditionModel.from_pretrained(folder, subfolder=sub, local_files_only=True).eval()
    if folder is not None:
        cfg_path = folder / "unet" / "config.json" if (folder / "unet").exists() else folder / "config.json"
        config = json.loads(cfg_path.read_text())
    else:
        config = arch_config(name, "unet")
    torch.manual_seed(SEED)
    with torch.device("meta") if meta else nullcontext():
        return UNet2DConditionModel.from_config(config).eval()


def model_identity(model: str | None, arch: str | None) -> dict:
    """What a manifest or record says about where the weights came from."""
    name, folder = resolve(model, arch)
    return {"source": name, "path": str(folder) if folder else None, "seed": SEED if name != "local" else None}
