"""The DreamBooth subject-fidelity and prompt-fidelity metrics (DINO, CLIP-I, CLIP-T).

In:  a folder of generated images, a folder of real reference photos of the
     subject, a prompts file (which prompt made each generated image), and
     two local model folders: a CLIP model (e.g. openai/clip-vit-base-patch32)
     and a DINO ViT (facebook/dino-vits16, the protocol's ViT-S/16; a DINOv2
     folder also works), each saved by `save_pretrained` with its processor.
Out: a dict {"dino", "clip_i", "clip_t", "n_generated", "n_reference",
     "settings", "per_image"}, a small aligned text table of it
     (`metrics_table`) and, on request, the same dict written atomically as
     JSON (`write_result`).

Definitions (DreamBooth, Ruiz et al. 2023, as used by the Hollowed Net paper):
  DINO   mean cosine similarity between the DINO embeddings (CLS token of the
         last layer, `last_hidden_state[:, 0]`) of generated and real images,
         averaged over ALL (generated, reference) pairs.
  CLIP-I the same with CLIP image embeddings (`get_image_features`).
  CLIP-T mean cosine similarity between the CLIP image embedding of each
         generated image and the CLIP text embedding (`get_text_features`) of
         the prompt that made it.

Prompts file (the format is picked by the file's suffix):
  *.json  a JSON object {generated image file name: prompt}; it must name
          every generated image and nothing else.
  other   a text file, one prompt per line (blank lines ignored), applied to
          the generated images in natural sorted file-name order (digit runs
          compare as numbers, so image_2.png comes before image_10.png, as
          `hollow-export generate` numbers them); the number of prompts must
          equal the number of generated images.

Models are loaded from local folders only (`local_files_only=True`); a folder
of the wrong kind or missing its processor files is refused with a message
naming the file and the fix. Embeddings are computed under `torch.no_grad`, in
batches, with a tqdm progress bar; cosines are taken in float64.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import store
from .errors import HollowError
from .photos import SUFFIXES as IMAGE_SUFFIXES

DINO_MODEL_TYPES = ("vit", "dinov2")
CLIP_MODEL_TYPES = ("clip",)
DEFAULT_BATCH_SIZE = 16
PROTOCOL = "DreamBooth (Ruiz et al. 2023): DINO/CLIP-I mean over all generated x reference pairs; CLIP-T mean over generated images"


class EvaluateError(HollowError, ValueError):
    """Images, prompts or model folders the evaluator cannot use (message names the problem and the fix)."""


# ---------------------------------------------------------------- metric math

def _as_matrix(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    m = np.asarray(x, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise EvaluateError(f"{name} must be a non-empty [rows, dim] matrix (got shape {tuple(m.shape)})")
    if not np.all(np.isfinite(m)):
        raise EvaluateError(f"{name} holds NaN or infinite values")
    return m


def _unit_rows(m: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise EvaluateError(f"{name} has an all-zero row; its cosine similarity is undefined")
    return m / norms


def cosine_matrix(a, b) -> np.ndarray:
    """[N, M] float64 cosine similarities between every row of `a` [N, D] and every row of `b` [M, D]."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise EvaluateError(f"embedding sizes differ: a has dim {a.shape[1]}, b has dim {b.shape[1]}")
    return _unit_rows(a, "a") @ _unit_rows(b, "b").T


def pairwise_mean_cosine(a, b) -> float:
    """Mean cosine similarity over all N*M pairs (row of `a` [N, D], row of `b` [M, D])."""
    return float(cosine_matrix(a, b).mean())


def paired_cosine(a, b) -> np.ndarray:
    """[N] float64 cosine similarity of row i of `a` with row i of `b` (both [N, D])."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape:
        raise EvaluateError(f"paired rows need equal shapes (a {a.shape}, b {b.shape})")
    return np.sum(_unit_rows(a, "a") * _unit_rows(b, "b"), axis=1)


def paired_mean_cosine(a, b) -> float:
    """Mean over i of cos(a[i], b[i]), for `a` and `b` both [N, D]."""
    return float(paired_cosine(a, b).mean())


# ---------------------------------------------------------------- images and prompts

def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)], name


def list_images(folder: Path, what: str = "image") -> list[Path]:
    """The image files directly in `folder` (natural sorted by name); refuses a missing, empty or unreadable set."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluateError(f"{what} folder {folder} does not exist (or is not a folder)")
    paths = sorted((p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not paths:
        raise EvaluateError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "point it at the folder with the image files")
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as err:  # PIL raises many types for bad files
            raise EvaluateError(f"{p} is not a readable image ({err}); replace or remove it") from err
    return paths


def load_image(path: Path):
    """`path` as an RGB PIL image (fully decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:
        raise EvaluateError(f"{path} is not a readable image ({err}); replace or remove it") from err


def read_prompts(prompts_file: Path, images: list[Path]) -> list[str]:
    """The prompt of each image in `images`, from a JSON {file name: prompt} or a one-prompt-per-line text file."""
    prompts_file = Path(prompts_file)
    if not prompts_file.is_file():
        raise EvaluateError(f"prompts file {prompts_file} does not exist")
    text = prompts_file.read_text(encoding="utf-8")
    names = [p.name for p in images]
    if prompts_file.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvaluateError(f"{prompts_file} is not valid JSON ({err})") from err
        if not isinstance(mapping, dict):
            raise EvaluateError(f"{prompts_file} must hold a JSON object {{image file name: prompt}}")
        missing = [n for n in names if n not in mapping]
        extra = sorted(set(mapping) - set(names))
        if missing or extra:
            raise EvaluateError(
                f"prompt count mismatch: {prompts_file} has {len(mapping)} prompts for {len(names)} generated "
                f"images (no prompt for: {', '.join(missing[:5]) or '-'}; no such image: {', '.join(extra[:5]) or '-'}); "
                "give exactly one prompt per generated image file name")
        bad = [n for n in names if not isinstance(mapping[n], str) or not mapping[n].strip()]
        if bad:
            raise EvaluateError(f"{prompts_file}: the prompt for {', '.join(bad[:5])} is not a non-empty string")
        return [mapping[n] for n in names]
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) != len(names):
        raise EvaluateError(
            f"prompt count mismatch: {prompts_file} has {len(prompts)} prompts (one per non-blank line) for "
            f"{len(names)} generated images; give one line per image, in file-name order "
            f"({names[0]} ... {names[-1]}), or use a .json file mapping file name -> prompt")
    return prompts


# ---------------------------------------------------------------- models

def _model_type(folder: Path, expected: tuple[str, ...], role: str) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluateError(f"{role} model folder {folder} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        raise EvaluateError(f"{folder} has no config.json, so it is not a transformers model folder; pass the "
                            f"folder that `save_pretrained` wrote for the {role} model")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise EvaluateError(f"{config} is not a valid model config ({err})") from err
    if model_type not in expected:
        raise EvaluateError(f"{folder} is a {model_type!r} model, not a {role} model (model_type must be one of "
                            f"{', '.join(expected)}); pass the {role} model folder")
    return model_type


def _require_file(folder: Path, name: str, role: str, fix: str) -> None:
    if not (Path(folder) / name).is_file():
        raise EvaluateError(f"{role} folder {folder} is missing {name}; {fix}")


def _from_pretrained(cls, folder: Path, role: str, **kwargs):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise EvaluateError(f"cannot load the {role} from {folder} ({err}); pass a complete "
                            "`save_pretrained` folder") from err


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_clip(clip_path: Path, device: str | None = None):
    """(CLIPModel in eval mode, CLIPImageProcessor, CLIP tokenizer) from a local folder."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPTokenizerFast

    clip_path = Path(clip_path)
    _model_type(clip_path, CLIP_MODEL_TYPES, "CLIP")
    _require_file(clip_path, "preprocessor_config.json", "CLIP",
                  "save the image processor beside the model (CLIPProcessor.from_pretrained(<hub id>)"
                  ".save_pretrained(folder)) or copy the full model snapshot")
    if (clip_path / "vocab.json").is_file() and (clip_path / "merges.txt").is_file():
        tok_cls = CLIPTokenizer
    elif (clip_path / "tokenizer.json").is_file():
        tok_cls = CLIPTokenizerFast
    else:
        raise EvaluateError(f"CLIP folder {clip_path} is missing its tokenizer (vocab.json + merges.txt, or "
                            "tokenizer.json); save it beside the model (CLIPProcessor.from_pretrained(<hub id>)"
                            ".save_pretrained(folder)) or copy the full model snapshot")
    model = _from_pretrained(CLIPModel, clip_path, "CLIP model").to(_device(device)).eval()
    image_processor = _from_pretrained(CLIPImageProcessor, clip_path, "CLIP image processor")
    tokenizer = _from_pretrained(tok_cls, clip_path, "CLIP tokenizer")
    return model, image_processor, tokenizer


def load_dino(dino_path: Path, device: str | None = None):
    """(DINO ViTModel or Dinov2Model in eval mode, its image processor, model_type) from a local folder."""
    from transformers import AutoImageProcessor, Dinov2Model, ViTModel

    dino_path = Path(dino_path)
    model_type = _model_type(dino_path, DINO_MODEL_TYPES, "DINO")
    _require_file(dino_path, "preprocessor_config.json", "DINO",
                  "save the image processor beside the model (AutoImageProcessor.from_pretrained(<hub id>)"
                  ".save_pretrained(folder)) or copy the full model snapshot")
    if model_type == "vit":  # the CLS token of the last layer is used; the pooler head is not part of DINO
        model = _from_pretrained(ViTModel, dino_path, "DINO model", add_pooling_layer=False)
    else:
        model = _from_pretrained(Dinov2Model, dino_path, "DINO model")
    processor = _from_pretrained(AutoImageProcessor, dino_path, "DINO image processor")
    return model.to(_device(device)).eval(), processor, model_type


# ---------------------------------------------------------------- embeddings

def _batches(items: list, batch_size: int, desc: str, progress: bool):
    if batch_size < 1:
        raise EvaluateError(f"batch size must be at least 1 (got {batch_size})")
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) <= 1):
        yield items[start:start + batch_size]


def _pixels(processor, paths: list[Path], device: torch.device) -> torch.Tensor:
    inputs = processor(images=[load_image(p) for p in paths], return_tensors="pt")
    return inputs["pixel_values"].to(device)


@torch.no_grad()
def dino_embeddings(model, processor, images: list[Path], batch_size: int = DEFAULT_BATCH_SIZE,
                    progress: bool = True) -> np.ndarray:
    """[N, D] float64: the last layer's CLS token (`last_hidden_state[:, 0]`) of each image."""
    device = next(model.parameters()).device
    out = [model(pixel_values=_pixels(processor, chunk, device)).last_hidden_state[:, 0].double().cpu()
           for chunk in _batches(list(images), batch_size, "DINO embeddings", progress)]
    return torch.cat(out).numpy()


@torch.no_grad()
def clip_image_embeddings(model, processor, images: list[Path], batch_size: int = DEFAULT_BATCH_SIZE,
                          progress: bool = True) -> np.ndarray:
    """[N, D] float64: `CLIPModel.get_image_features` of each image (projected, not normalized)."""
    device = next(model.parameters()).device
    out = [model.get_image_features(pixel_values=_pixels(processor, chunk, device)).double().cpu()
           for chunk in _batches(list(images), batch_size, "CLIP image embeddings", progress)]
    return torch.cat(out).numpy()


@torch.no_grad()
def clip_text_embeddings(model, tokenizer, prompts: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
                         progress: bool = True) -> np.ndarray:
    """[N, D] float64: `CLIPModel.get_text_features` of each prompt (padded per batch, truncated to 77 tokens)."""
    device = next(model.parameters()).device
    max_len = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    out = []
    for chunk in _batches(list(prompts), batch_size, "CLIP text embeddings", progress):
        tokens = tokenizer(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                           attention_mask=tokens["attention_mask"].to(device)).double().cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------- top level

def evaluate(generated_dir, reference_dir, prompts_file, clip_path, dino_path,
             batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None, progress: bool = True) -> dict:
    """DINO, CLIP-I and CLIP-T of the generated images against the reference photos and their prompts."""
    generated = list_images(Path(generated_dir), "generated image")
    reference = list_images(Path(reference_dir), "reference image")
    prompts = read_prompts(Path(prompts_file), generated)

    dino_model, dino_processor, dino_type = load_dino(Path(dino_path), device)
    dino_gen = dino_embeddings(dino_model, dino_processor, generated, batch_size, progress)
    dino_ref = dino_embeddings(dino_model, dino_processor, reference, batch_size, progress)
    del dino_model

    clip_model, clip_processor, tokenizer = load_clip(Path(clip_path), device)
    clip_gen = clip_image_embeddings(clip_model, clip_processor, generated, batch_size, progress)
    clip_ref = clip_image_embeddings(clip_model, clip_processor, reference, batch_size, progress)
    clip_txt = clip_text_embeddings(clip_model, tokenizer, prompts, batch_size, progress)

    dino_pairs, clip_pairs = cosine_matrix(dino_gen, dino_ref), cosine_matrix(clip_gen, clip_ref)
    clip_t = paired_cosine(clip_gen, clip_txt)
    return {
        "dino": float(dino_pairs.mean()),
        "clip_i": float(clip_pairs.mean()),
        "clip_t": float(clip_t.mean()),
        "n_generated": len(generated),
        "n_reference": len(reference),
        "settings": {
            "protocol": PROTOCOL,
            "generated_dir": str(generated_dir),
            "reference_dir": str(reference_dir),
            "prompts_file": str(prompts_file),
            "prompts_format": "json" if Path(prompts_file).suffix.lower() == ".json" else "lines",
            "clip_path": str(clip_path),
            "dino_path": str(dino_path),
            "dino_model_type": dino_type,
            "dino_feature": "last_hidden_state[:, 0] (CLS token)",
            "clip_image_feature": "get_image_features",
            "clip_text_feature": "get_text_features",
            "batch_size": batch_size,
            "device": str(_device(device)),
        },
        "per_image": [
            {"file": p.name, "prompt": text, "dino": float(dino_pairs[i].mean()),
             "clip_i": float(clip_pairs[i].mean()), "clip_t": float(clip_t[i])}
            for i, (p, text) in enumerate(zip(generated, prompts))
        ],
    }


def metrics_table(result: dict) -> str:
    """A small aligned text table of the three metrics and what each averages over."""
    n, m = result["n_generated"], result["n_reference"]
    rows = [("metric", "value", "averaged over"),
            ("DINO", f"{result['dino']:.4f}", f"{n} x {m} generated/reference pairs"),
            ("CLIP-I", f"{result['clip_i']:.4f}", f"{n} x {m} generated/reference pairs"),
            ("CLIP-T", f"{result['clip_t']:.4f}", f"{n} generated images and their prompts")]
    widths = [max(len(r[c]) for r in rows) for c in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}" for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def write_result(result: dict, path) -> Path:
    """Write `result` as JSON atomically (never half-written); returns the path."""
    path = Path(path)
    store.write_json(path, result)
    return path
