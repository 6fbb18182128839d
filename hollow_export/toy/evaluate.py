"""`evaluate --judge toy`: the DreamBooth metrics' analogues, read by the toy world's judge.

In:  a folder of generated images, a folder of reference photos of the subject and a prompts file
     (the same inputs and formats as `hollow_export.evaluate`), or the images and prompts directly
     (`judge_scores`, used by `bench quality`); the judge folder (default `models/toy-judge`,
     hash-checked on load).
Out: a dict {"subject_object", "subject_image", "subject_colour", "subject_in_context", "prompt_class",
     "prompt_context",
     "prompt_probability", counts, "judge", "settings", "per_image"}, a small text table
     (`toy_metrics_table`); `hollow_export.evaluate.write_result` writes it as JSON atomically.

Definitions (the toy judge standing in for DINO / CLIP-I / CLIP-T, which cannot be downloaded here):
  subject_object      mean cosine between the judge's `object` embeddings (trained only on class,
                      colour and pattern: the DINO analogue) of generated and reference images, over
                      ALL (generated, reference) pairs.
  subject_image       the same with the judge's pooled whole-`image` features (CLIP-I analogue).
  subject_colour      share of generated images whose object-colour read-out (argmax) is the subject's:
                      the colour the judge reads on most reference photos. "The subject appears", read
                      off a head the judge keeps on blurry samples (its pattern read-out does not: on
                      generated images stripes blur into "dotted" and dots into "plain").
  subject_in_context  share of the images whose prompt names a context in which the judge reads both
                      the subject's colour and that context: the subject in the asked (novel) context.
  prompt_class        share of generated images whose class read-out (argmax) is the class their
                      prompt names (over the images whose prompt names one).
  prompt_context      the same for the context ("on the beach", "at night", ...).
  prompt_probability  the judge's mean probability of what each prompt names (class and context):
                      `Judge.prompt_fidelity`, a soft CLIP-T analogue.
Images are centre-cropped to a square and resized to the world's 128 px before the judge reads them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..evaluate import EvaluateError, list_images, load_image, read_prompts
from . import world

PROTOCOL = ("toy judge (models/toy-judge): subject_* mean cosine over all generated x reference pairs; "
            "prompt_class/prompt_context argmax read-out accuracy against the prompt; prompt_probability "
            "mean judge probability of the prompt's class and context")


def load_judge(folder: Path | None = None):
    """The toy judge from `folder` (default models/toy-judge), its weights checked against config.json."""
    from .judge import JUDGE_DIR, Judge

    folder = Path(folder) if folder is not None else JUDGE_DIR
    if not (folder / "config.json").is_file() or not (folder / "judge.safetensors").is_file():
        raise EvaluateError(f"{folder} holds no toy judge (config.json + judge.safetensors); rebuild it with "
                            "`python -m hollow_export.toy.judge` or pass the judge folder")
    try:
        return Judge.load(folder)
    except (ValueError, KeyError) as err:
        raise EvaluateError(f"the toy judge in {folder} cannot be used: {err}") from err


def judge_identity(judge) -> dict:
    """Which judge made the numbers: its weights' sha256 and the accuracy its config records."""
    config = judge.config
    return {"name": "toy-judge", "sha256": config.get("sha256"), "steps_done": config.get("steps_done"),
            "accuracy_fresh_renders_1000": config.get("accuracy_fresh_renders_1000"),
            "accuracy_subject_photos": config.get("accuracy_subject_photos")}


def as_world_image(image) -> np.ndarray:
    """A PIL image or array -> uint8 [128, 128, 3], centre-cropped to a square first."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != world.RESOLUTION:
        image = image.resize((world.RESOLUTION, world.RESOLUTION), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _mean_or_none(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def judge_scores(judge, generated: list, references: list, prompts: list[str]) -> dict:
    """The five metrics of the module docstring for images (PIL or uint8 arrays) and their prompts,
    plus the per-image values."""
    if not generated or not references:
        raise EvaluateError("the toy judge needs at least one generated image and one reference photo")
    if len(prompts) != len(generated):
        raise EvaluateError(f"{len(prompts)} prompts for {len(generated)} generated images; give one per image")
    gen = np.stack([as_world_image(i) for i in generated])
    ref = np.stack([as_world_image(i) for i in references])
    cos = {kind: judge.embed(gen, kind).astype(np.float64) @ judge.embed(ref, kind).astype(np.float64).T
           for kind in ("object", "image")}
    predicted = judge.predict(gen)
    look = subject_look(judge.predict(ref))
    wanted = [world.parse_prompt(p) for p in prompts]
    hits = {k: [float(p[k] == w[k]) for p, w in zip(predicted, wanted) if w[k]] for k in ("cls", "context")}
    soft = judge.prompt_fidelity(gen, prompts)["score"]
    return {
        "subject_object": float(cos["object"].mean()),
        "subject_image": float(cos["image"].mean()),
        "subject_colour": float(np.mean([p["colour"] == look[0] for p in predicted])),
        "subject_in_context": _mean_or_none([float(p["colour"] == look[0] and p["context"] == w["context"])
                                             for p, w in zip(predicted, wanted) if w["context"]]),
        "subject_look": {"colour": look[0], "pattern": look[1]},
        "prompt_class": _mean_or_none(hits["cls"]),
        "prompt_context": _mean_or_none(hits["context"]),
        "prompt_probability": None if math.isnan(soft) else float(soft),
        "n_generated": len(gen),
        "n_reference": len(ref),
        "n_prompts_naming_class": len(hits["cls"]),
        "n_prompts_naming_context": len(hits["context"]),
        "per_image": [{"prompt": text, "subject_object": float(cos["object"][i].mean()),
                       "subject_image": float(cos["image"][i].mean()), "read_class": predicted[i]["cls"],
                       "read_colour": predicted[i]["colour"], "read_pattern": predicted[i]["pattern"],
                       "read_context": predicted[i]["context"]} for i, text in enumerate(prompts)],
    }


def subject_look(reads: list[dict]) -> tuple[str, str]:
    """The (colour, pattern) the judge reads on most reference photos (ties: the first photo's order)."""
    looks = [(r["colour"], r["pattern"]) for r in reads]
    return max(dict.fromkeys(looks), key=looks.count)


def evaluate_toy(generated_dir, reference_dir, prompts_file, judge_dir: Path | None = None) -> dict:
    """`hollow-export evaluate --judge toy`: the toy judge's metrics of the generated images against the
    reference photos and their prompts."""
    generated = list_images(Path(generated_dir), "generated image")
    reference = list_images(Path(reference_dir), "reference image")
    prompts = read_prompts(Path(prompts_file), generated)
    judge = load_judge(judge_dir)
    result = judge_scores(judge, [load_image(p) for p in generated], [load_image(p) for p in reference], prompts)
    for row, path in zip(result["per_image"], generated):
        row["file"] = path.name
    result["judge"] = judge_identity(judge)
    result["settings"] = {"protocol": PROTOCOL, "generated_dir": str(generated_dir),
                          "reference_dir": str(reference_dir), "prompts_file": str(prompts_file),
                          "prompts_format": "json" if Path(prompts_file).suffix.lower() == ".json" else "lines",
                          "judge_dir": str(judge_dir) if judge_dir else "models/toy-judge",
                          "image_side": world.RESOLUTION}
    return result


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def toy_metrics_table(result: dict) -> str:
    """A small aligned text table: each metric, its value, what it averages over and its real analogue."""
    n, m = result["n_generated"], result["n_reference"]
    rows = [("metric", "value", "averaged over", "stands for"),
            ("subject_object", _fmt(result["subject_object"]), f"{n} x {m} generated/reference pairs", "DINO"),
            ("subject_image", _fmt(result["subject_image"]), f"{n} x {m} generated/reference pairs", "CLIP-I"),
            ("subject_colour", _fmt(result["subject_colour"]), f"{n} generated images (the subject's colour: "
             f"{result['subject_look']['colour']})", "-"),
            ("subject_in_context", _fmt(result["subject_in_context"]), f"{result['n_prompts_naming_context']} "
             "images whose prompt names a context", "-"),
            ("prompt_class", _fmt(result["prompt_class"]), f"{result['n_prompts_naming_class']} images "
             "whose prompt names a class", "CLIP-T"),
            ("prompt_context", _fmt(result["prompt_context"]), f"{result['n_prompts_naming_context']} images "
             "whose prompt names a context", "CLIP-T"),
            ("prompt_probability", _fmt(result["prompt_probability"]), f"{n} generated images", "CLIP-T")]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    judge = result.get("judge", {})
    if judge:
        acc = judge.get("accuracy_fresh_renders_1000") or {}
        lines.append(f"judge sha256 {str(judge.get('sha256'))[:16]}...; its accuracy on fresh renders: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    return "\n".join(lines)
