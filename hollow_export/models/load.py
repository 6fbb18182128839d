"""Loading the Stable Diffusion pipeline: a local diffusers folder or a registry architecture.

In:  a local diffusers folder (`--model PATH`) or an architecture name from
     the registry (`tiny`, `sd15`, `sd21`; `mid` for benchmarks), or a bundle's
     model identity (`pipeline_for`).
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

import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from .registry import BENCH_ARCHS, DEFAULT_ARCH, SEED, ModelError, arch_config, check_arch, config_digest

def cache_dir() -> Path:
    """Folder for materialised models; `HOLLOW_EXPORT_CACHE` overrides it."""
    return Path(os.environ.get("HOLLOW_EXPORT_CACHE", Path.home() / ".cache" / "hollow-export"))


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


def materialize(arch: str = "tiny") -> Path:
    """Save `arch` with random weights in diffusers layout (once; atomic) and return its folder."""
    from diffusers import StableDiffusionPipeline

    target = cache_dir() / f"{arch}-{config_digest(arch)}"
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
    arch = check_arch(arch or DEFAULT_ARCH, BENCH_ARCHS)
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


def bench_pipeline(arch: str):
    """A pipeline whose U-Net is `arch`'s; for non-tiny archs the VAE, tokenizer and scheduler are the
    tiny default's and the text encoder is a 2-layer CLIP of the U-Net's cross-attention width: only
    the U-Net graphs are measured, so the rest only has to have the right shapes."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    check_arch(arch, BENCH_ARCHS)
    if arch == "tiny":
        return load_pipeline(arch="tiny")
    tiny = load_pipeline(arch="tiny")
    unet = load_unet(arch=arch)
    width = unet.config.cross_attention_dim
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(**{**arch_config("tiny", "text_encoder"), "hidden_size": width,
                                           "intermediate_size": width, "num_attention_heads": 8,
                                           "projection_dim": width})).eval()
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=text, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BENCH_SOURCE = "bench:"


def pipeline_for(identity: dict, model: str | None = None):
    """The base pipeline a bundle was built from (its manifest's `model`), or `model` when given."""
    if model is not None:
        return load_pipeline(model=model)
    source = identity.get("source", DEFAULT_ARCH)
    if source == "local":
        return load_pipeline(model=identity["path"])
    if source.startswith(BENCH_SOURCE):
        return bench_pipeline(source[len(BENCH_SOURCE):])
    return load_pipeline(arch=source)
