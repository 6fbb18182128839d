"""Loading the Stable Diffusion pipeline: a local diffusers folder or a registry architecture.

In:  a local diffusers folder (`--model PATH`, optionally saved as a weight
     `--variant` such as fp16) or an architecture name from the registry
     (`tiny`, `sd15`, `sd21`, the BK-SDM family; `mid` for benchmarks), or a
     bundle's model identity (`pipeline_for`).
Out: diffusers objects (a `StableDiffusionPipeline`, or just its
     `UNet2DConditionModel`, always fp32), loaded through the normal
     `from_pretrained` code path with `local_files_only=True`; the scheduler's
     config alone (`scheduler_config`, no weights read) to check its
     prediction type before any work. A folder that cannot be loaded is one
     ModelError naming the folder and the missing file.

`tiny-toy` is the embedded default: the tiny SD-shaped pipeline pretrained on
the toy world (`tools/pretrain_toy.py`), shipped in `models/tiny-toy/` as a
diffusers folder, hash-checked and loaded like any user's model. `tiny` is the
same architecture with random weights: made from the configs in `models/tiny/`
with a fixed seed, saved once in diffusers layout under the cache folder and
then loaded the same way (so are `tiny-bk-small`/`tiny-bk-tiny`); tests use it. `sd15`/`sd21`/`bk-sdm-*` are the real
architectures with random weights (memory and FLOPs do not depend on weight
values), built in memory for planning and benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from .registry import (BENCH_ARCHS, DEFAULT_ARCH, KNOWN_ARCHS, MATERIALIZED, SEED, SHIPPED, ModelError,
                       arch_config, check_arch, check_variant, config_digest, shipped_folder)


def cache_dir() -> Path:
    """Folder for materialised models; `HOLLOW_EXPORT_CACHE` overrides it."""
    return Path(os.environ.get("HOLLOW_EXPORT_CACHE", Path.home() / ".cache" / "hollow-export"))


def _clip_byte_tokenizer(folder: Path, words: tuple[str, ...] = ()):
    """A real CLIPTokenizer over the 256 byte symbols: tiny but honest.

    Without `words` it has no merges (every character is a token). With `words` (lower-case, no spaces) it
    gets BPE merges that make each of them one whole token, as a real CLIP vocabulary does for common words;
    every other text still falls back to characters. Written to `folder` (vocab.json, merges.txt).
    """
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = _whole_word_merges(words)  # their tokens follow the specials: byte and special ids stay put
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab += list(dict.fromkeys(a + b for a, b in merges))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if split:  # checks _bpe_pieces' model of CLIP's BPE against the real tokenizer
        raise ModelError(f"tokenizer merges left {split} in pieces")
    return tokenizer


def _bpe_pieces(word: str, ranks: dict) -> list[str]:
    """`word` split by byte-pair merges of rank `ranks` (lowest rank first), CLIP's end-of-word marker on."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _whole_word_merges(words) -> list[tuple[str, str]]:
    """Merges, in rank order, under which each of `words` is one token: for each word, merge its first
    two pieces (as the merges so far leave it) until one is left. A new merge has the highest rank, so it
    never changes how an earlier word is split."""
    merges: list[tuple[str, str]] = []
    ranks: dict = {}
    for word in words:
        while len(pieces := _bpe_pieces(word, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
    return merges


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
    arch = check_arch(arch or DEFAULT_ARCH, KNOWN_ARCHS)
    if arch in SHIPPED:
        return arch, shipped_folder(arch)
    return arch, (materialize(arch) if arch in MATERIALIZED else None)


WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
SAVED_BY = "; pass the folder that `save_pretrained` wrote"


def check_model_folder(folder: Path, variant: str | None, parts=("unet", "vae", "text_encoder")) -> None:
    """Raise ModelError naming the folder and the first missing file, before diffusers fails on it.

    `folder` is a pipeline folder (parts in sub-folders) or, for the U-Net alone, a U-Net folder.
    """
    check_variant(variant)
    for part in parts:
        alone = part == "unet" and not (folder / "unet").is_dir() and (folder / "config.json").exists()
        rel = "" if alone else f"{part}/"
        sub = folder / rel
        if not (sub / "config.json").exists():
            raise ModelError(f"{folder}: missing {rel}config.json{SAVED_BY}")
        plain = WEIGHT_STEMS[part]
        stem = plain + (f".{variant}" if variant else "")
        names = {p.name for p in sub.iterdir()}
        if any(stem + suffix in names for suffix in WEIGHT_SUFFIXES):
            continue
        hint = SAVED_BY
        if variant is None and any(n.startswith(plain + ".fp16.") for n in names):
            hint = "; it holds only the fp16 variant: add --variant fp16"
        elif variant is not None and any(plain + suffix in names for suffix in WEIGHT_SUFFIXES):
            hint = f"; it holds no {variant} variant: leave out --variant"
        raise ModelError(f"{folder}: missing {rel}{stem}.safetensors (the {part} weights){hint}")


def scheduler_config(model: str | None, arch: str | None) -> dict:
    """The scheduler's config, read without loading any weights (to check it before any work)."""
    name, folder = resolve(model, arch)
    if folder is None or name in MATERIALIZED:
        return arch_config(name, "scheduler")
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        raise ModelError(f"{folder}: missing scheduler/scheduler_config.json{SAVED_BY}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path} is not readable JSON ({err}); restore it from the original model") from err


PREDICTION_TYPES = ("epsilon", "v_prediction")  # the training targets device/collect.py and Training.kt compute


def check_prediction_type(config: dict) -> None:
    """Refuse, before any work, a model whose training target the device runtime cannot compute."""
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ModelError(
            f"the model's scheduler has prediction_type {kind!r}; only epsilon (noise) and v_prediction "
            "(velocity) models can be fine-tuned: use such a model (its scheduler_config.json says which)")


def _from_pretrained(cls, folder: Path, variant: str | None, **kwargs):
    """`cls.from_pretrained` with local files only, fp32, every failure one ModelError naming the folder."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars would bury the tool's output
    try:
        loaded = cls.from_pretrained(folder, local_files_only=True, variant=variant, **kwargs)
        # fp32 after loading (an fp16 variant is upcast): passing torch_dtype would reach transformers'
        # CLIPTextModel, which warns that the name is deprecated
        return loaded.to(dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{folder} could not be loaded: {first}") from err
    finally:
        diffusers_logging.enable_progress_bar()


def _plain_registry(name: str, variant: str | None) -> None:
    """The registry's pipelines are saved plain: a `--variant` with one of them is a ModelError, not ignored."""
    if name != "local" and variant is not None:
        raise ModelError(f"--variant {variant} applies to a --model folder; {name} is a registry architecture "
                         "saved without variants: leave out --variant")


def load_pipeline(model: str | None = None, arch: str | None = None, variant: str | None = None):
    """A `StableDiffusionPipeline` (fp32, CPU, eval mode) from a folder (its weight `variant`, if saved
    as one) or an architecture name."""
    from diffusers import StableDiffusionPipeline

    name, folder = resolve(model, arch)
    _plain_registry(name, variant)
    if folder is not None:
        check_model_folder(folder, variant)
        pipe = _from_pretrained(StableDiffusionPipeline, folder, variant, safety_checker=None,
                                requires_safety_checker=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            parts = _random_parts(name, Path(tmp) / "tokenizer")
            pipe = StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unet(model: str | None = None, arch: str | None = None, meta: bool = False, variant: str | None = None):
    """Only the U-Net. `meta=True` builds it without memory (for shapes and parameter counts)."""
    from diffusers import UNet2DConditionModel

    name, folder = resolve(model, arch)
    _plain_registry(name, variant)
    check_variant(variant)
    if folder is not None and not meta:
        check_model_folder(folder, variant, parts=("unet",))
        sub = "unet" if (folder / "unet").exists() else None
        return _from_pretrained(UNet2DConditionModel, folder, variant, subfolder=sub).eval()
    if folder is not None:
        cfg_path = folder / "unet" / "config.json" if (folder / "unet").exists() else folder / "config.json"
        config = json.loads(cfg_path.read_text())
    else:
        config = arch_config(name, "unet")
    torch.manual_seed(SEED)
    with torch.device("meta") if meta else nullcontext():
        return UNet2DConditionModel.from_config(config).eval()


def model_identity(model: str | None, arch: str | None, variant: str | None = None) -> dict:
    """What a manifest or record says about where the weights came from (a local folder's variant too)."""
    name, folder = resolve(model, arch)
    out = {"source": name, "path": str(folder) if folder else None,
           "seed": SEED if name not in ("local",) + SHIPPED else None}
    if name == "local" and variant is not None:
        out["variant"] = variant
    return out


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


def pipeline_for(identity: dict, model: str | None = None, variant: str | None = None):
    """The base pipeline a bundle was built from (its manifest's `model`, in its recorded weight
    variant unless `variant` is given), or `model` (in `variant`) when given."""
    if model is not None:
        return load_pipeline(model=model, variant=variant)
    source = identity.get("source", DEFAULT_ARCH)
    if source == "local":
        return load_pipeline(model=identity["path"], variant=variant or identity.get("variant"))
    if source.startswith(BENCH_SOURCE):
        return bench_pipeline(source[len(BENCH_SOURCE):])
    return load_pipeline(arch=source)
