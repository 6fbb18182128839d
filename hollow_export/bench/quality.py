"""`bench quality`: does personalization teach the subject? Toy-world subjects, four methods, the toy judge.

In:  a base pipeline (`--model PATH`, `--arch`, or the embedded default), toy-world subject seeds,
     sampling seeds, the methods, the plan fraction (and an optional fraction sweep of the Hollowed Net
     on the host), the training knobs (steps, lr, rank, buffered samples) and the sampling knobs.
Out: `quality(...)` -> a result (settings, the judge's identity, one cell per method x subject x seed,
     per-method mean and std over the cells), written into `out` as `<stem>.json`, `<stem>.png` (a bar
     chart of the table) and `<stem>_sheet.png` (a contact sheet: each subject's reference photos, then
     one row per method of samples for its novel-context prompts, `none` being the "before");
     `quality_text(result)` renders the table.

Per subject: its photos (`toy.world.save_subject_photos`), instance and class prompts ("a sks ball",
"a ball"). Methods, each through the library calls of its CLI commands:
  none             the base model, no fine-tuning, sampled with the instance prompt;
  lora             plain LoRA on the host (`personalize --method lora`);
  hollowed_host    the Hollowed Net on the host (`personalize --method hollowed`);
  hollowed_device  the device path: `build` -> `device collect` -> `device train` -> `device export`
                   (ONNX Runtime, torch-free runtime) -> `merge` -> `generate --engine ort --inference dual`.
Training is seeded with 0 (once per subject and method); `--seeds` are the sampling seeds. Prompts: the
instance prompt in each of the subject's NOVEL contexts (never in its photos), `per_prompt` samples each
(sampling seeds seed*1000 + i). Scores (`toy.evaluate.judge_scores`): subject fidelity against the
subject's photos (`subject_object`, DINO analogue; `subject_image`, CLIP-I analogue; `subject_colour`: the
judge reads the subject's colour, i.e. the subject appears; `subject_in_context`: it reads the subject's colour
and the asked novel context in the same sample, the issue's first goal) and prompt fidelity
(`prompt_context`: the judge reads the asked novel context; `prompt_class`: it reads the class).
Intermediate folders (photos, LoRAs, bundles, buffers, merged models) live in a work folder: a
temporary one removed at the end, or `workdir` (kept, for inspection).
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from pathlib import Path

from .cases import BenchError  # numpy and torch are imported where used: the CLI reads DEFAULTS at start
from .measure import default_threads, settings_block
from .report import _pyplot, format_table, save_figure, settings_text, write_outputs

METHODS = ("none", "lora", "hollowed_host", "hollowed_device")
METRICS = ("subject_object", "subject_image", "subject_colour", "subject_in_context", "prompt_context",
           "prompt_class")
LABELS = {"none": "no fine-tuning", "lora": "plain LoRA (host)", "hollowed_host": "Hollowed Net (host)",
          "hollowed_device": "Hollowed Net (device path, ORT)"}
# Defaults measured for the embedded tiny pipeline on 2 CPU cores (see the README's measured section).
# measured on tiny-toy, subject 0: 150 steps at lr 1e-3, rank 4 left the samples as before; 800 steps at
# lr 2e-3, rank 8, 100 buffered samples put the subject's stripes into them (hollowed host, 60-290 s by load)
DEFAULTS = dict(steps=800, lr=2e-3, rank=8, samples=100, fraction=0.4, photos=5, per_prompt=2,
                denoise_steps=20, guidance=4.0)


def _sweep_name(fraction: float) -> str:
    return f"hollowed_host@{fraction:g}"


def _check(subjects, seeds, methods, sweep, fraction) -> None:
    if not subjects:
        raise BenchError("--subjects is empty; give toy-world subject seeds, e.g. --subjects 0,1,2")
    if not seeds:
        raise BenchError("--seeds is empty; give sampling seeds, e.g. --seeds 0")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BenchError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    for f in [fraction, *sweep]:
        if not (0 <= f <= 1):
            raise BenchError(f"fraction {f} is not between 0 and 1 (a share of U-Net parameters, e.g. 0.4)")
    if any(s < 0 for s in [*subjects, *seeds]):
        raise BenchError("subject and sampling seeds must be 0 or more")


# ------------------------------------------------------------------------------------------------ sampling

def base_image(pipe, prompt: str, steps: int, guidance: float, seed: int):
    """One image of the base model (no LoRA): the plain U-Net in the shared sampling loop."""
    import torch

    from ..inference.generate import denoise, initial_latents, noise_fn, to_image
    from ..models.prompts import encode_prompt

    with torch.no_grad():
        cond = noise_fn(pipe, None, "dual", encode_prompt(pipe, prompt), None)
        uncond = noise_fn(pipe, None, "dual", encode_prompt(pipe, ""), None)
        side = pipe.unet.config.sample_size
        latents = initial_latents((1, pipe.unet.config.in_channels, side, side), seed)
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        latents = denoise(lambda x, t: cond(x, torch.as_tensor(t).reshape(1)),
                          lambda x, t: uncond(x, torch.as_tensor(t).reshape(1)),
                          scheduler, latents, steps, guidance, "base")
        return to_image(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)


def _sampler(method: str, pipe, folder: Path | None, steps: int, guidance: float):
    """prompt, seed -> PIL image for one trained method."""
    from ..inference.generate import generate, generate_ort

    if method == "none":
        return lambda prompt, seed: base_image(pipe, prompt, steps, guidance, seed)
    if method == "hollowed_device":
        return lambda prompt, seed: generate_ort(folder, prompt, "dual", steps, guidance, seed)
    return lambda prompt, seed: generate(pipe, folder, prompt, "dual", steps, guidance, seed)


# ------------------------------------------------------------------------------------------------ training

def _personalize(method: str, photos: Path, sub, out: Path, knobs: dict, fraction: float, model, arch, variant):
    """`personalize --method lora|hollowed` as a library call; returns (LoRA folder, record)."""
    from ..train.trainer import TrainSettings, personalize_from_options

    settings = TrainSettings(method=method, steps=knobs["steps"], samples=knobs["samples"], lr=knobs["lr"], seed=0)
    record = personalize_from_options(photos, sub.instance_prompt, sub.class_prompt, out, settings, model, arch,
                                      variant, fraction=fraction, depth=None, rank=knobs["rank"], alpha=None,
                                      targets="attn", blocks="", resolution=None)
    hollow = method == "hollowed"  # a plain-LoRA record carries a plan too, but nothing is hollowed
    return out, {"hollowed_fraction": record["plan"].get("hollowed_fraction") if hollow else None,
                 "depth": record["plan"].get("depth") if hollow else None,
                 "loss_before": record["fixed_batch_loss_before"], "loss_after": record["fixed_batch_loss_after"]}


def _device_path(photos: Path, sub, work: Path, knobs: dict, fraction: float, model, arch, variant):
    """build -> device collect -> device train -> device export -> merge; returns (merged folder, record)."""
    import numpy as np

    from ..device.collect import collect
    from ..device.export import LORA_EXPORT, export_lora
    from ..device.train import TrainConfig, train
    from ..export.build import BuildSettings, build_bundle
    from ..merge import merge_bundle

    settings = BuildSettings(lr=knobs["lr"], steps=knobs["steps"], samples=knobs["samples"], seed=0)
    _, plan = build_bundle(work / "bundle", sub.instance_prompt, sub.class_prompt, settings, model, arch, variant,
                           fraction=fraction, depth=None, rank=knobs["rank"], alpha=None, targets="attn",
                           blocks="", resolution=None)
    collect(work / "bundle", photos, work / "buffer.bin", knobs["samples"], seed=0)
    progress = train(work / "bundle", work / "buffer.bin", work / "train",
                     TrainConfig(steps=knobs["steps"], checkpoint_every=knobs["steps"], lr=knobs["lr"]))
    export_lora(work / "bundle", work / "train", work / "lora")
    with warnings.catch_warnings():  # the ONNX exporter's tracer notes: expected, and no help here
        warnings.simplefilter("ignore")
        merge_bundle(work / "bundle", work / "lora" / LORA_EXPORT, work / "merged", model, variant)
    losses = progress["losses"]
    return work / "merged", {"hollowed_fraction": plan.hollowed_fraction, "depth": plan.depth,
                             "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:]))}


# ------------------------------------------------------------------------------------------------ the bench

def _stats(cells: list[dict]) -> dict:
    import numpy as np

    out = {}
    for metric in METRICS:
        values = [c[metric] for c in cells if c.get(metric) is not None]
        out[metric] = {"mean": float(np.mean(values)) if values else None,
                       "std": float(np.std(values)) if values else None, "n": len(values)}
    return out


def quality(subjects=(0, 1, 2), seeds=(0,), methods=METHODS, sweep=(), model: str | None = None,
            arch: str | None = None, variant: str | None = None, steps: int = DEFAULTS["steps"],
            lr: float = DEFAULTS["lr"], rank: int = DEFAULTS["rank"], samples: int = DEFAULTS["samples"],
            fraction: float = DEFAULTS["fraction"], photos: int = DEFAULTS["photos"],
            per_prompt: int = DEFAULTS["per_prompt"], denoise_steps: int = DEFAULTS["denoise_steps"],
            guidance: float = DEFAULTS["guidance"], out: Path | None = None, workdir: Path | None = None,
            threads: int | None = None, log=print) -> dict:
    """Everything in the module docstring; returns the result (written into `out` when given)."""
    import torch

    from ..models.load import load_pipeline, model_identity
    from ..toy import world
    from ..toy.evaluate import judge_identity, judge_scores, load_judge

    subjects, seeds, methods, sweep = list(subjects), list(seeds), list(methods), list(sweep)
    _check(subjects, seeds, methods, sweep, fraction)
    threads = default_threads(threads)
    torch.set_num_threads(threads)
    judge = load_judge()
    identity = model_identity(model, arch, variant)
    pipe = load_pipeline(model, arch, variant)
    if pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) != world.RESOLUTION:
        log(f"note: the model's images are not {world.RESOLUTION} px; the judge reads them resized")
    knobs = {"steps": steps, "lr": lr, "rank": rank, "samples": samples}
    runs = [(m, fraction) for m in methods]
    runs += [(_sweep_name(f), f) for f in sweep if not ("hollowed_host" in methods and f == fraction)]
    settings = settings_block(model=identity, subjects=subjects, seeds=seeds, methods=[r[0] for r in runs],
                              fraction=fraction, sweep=sweep, steps=steps, lr=lr, rank=rank, samples=samples,
                              training_seed=0, photos=photos, per_prompt=per_prompt, denoise_steps=denoise_steps,
                              guidance=guidance, inference_path="dual", threads=threads)
    log("bench quality:\n" + settings_text({k: v for k, v in settings.items() if k != "model"})
        + f"\n  model: {identity['source']} {identity['path'] or ''}")

    cells, records, sheet_rows = [], {}, []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="hollow-quality-") as scratch:
        root = Path(workdir) if workdir is not None else Path(scratch)
        for s in subjects:
            sub = world.subject(s)
            prompts = [world.instance_prompt(sub.cls, c) for c in sub.novel_contexts]
            base = root / f"subject{s}"
            photo_dir = base / "photos"
            if photo_dir.exists():
                raise BenchError(f"{photo_dir} exists: --workdir must be a new or empty folder")
            world.save_subject_photos(s, photo_dir, photos)
            references = world.subject_photos(s, photos)
            log(f"[subject {s}] {sub.description}; photos in {', '.join(sub.photo_contexts)}; "
                f"novel: {', '.join(sub.novel_contexts)}")
            block = {"subject": s, "description": sub.description, "references": references, "rows": [],
                     "novel": list(sub.novel_contexts)}
            for name, frac in runs:
                method = "hollowed_host" if name.startswith("hollowed_host") else name
                t0 = time.time()
                folder, record = None, {}
                if method in ("lora", "hollowed_host"):
                    folder, record = _personalize("lora" if method == "lora" else "hollowed", photo_dir, sub,
                                                  base / name.replace("@", "_"), knobs, frac, model, arch, variant)
                elif method == "hollowed_device":
                    folder, record = _device_path(photo_dir, sub, base / name, knobs, frac, model, arch, variant)
                train_seconds = time.time() - t0
                sample = _sampler(method, pipe, folder, denoise_steps, guidance)
                for seed in seeds:
                    t1 = time.time()
                    images, texts = [], []
                    for prompt in prompts:
                        for i in range(per_prompt):
                            images.append(sample(prompt, seed * 1000 + i))
                            texts.append(prompt)
                    scores = judge_scores(judge, images, references, texts)
                    cells.append({"method": name, "subject": s, "seed": seed, "fraction": frac,
                                  **{k: scores[k] for k in (*METRICS, "prompt_probability", "subject_look")},
                                  "per_image": scores["per_image"], "train_seconds": train_seconds,
                                  "sample_seconds": time.time() - t1})
                    if seed == seeds[0]:
                        block["rows"].append((name, images[::per_prompt]))
                records.setdefault(name, []).append({"subject": s, **record, "train_seconds": train_seconds})
                c = cells[-1]
                log(f"[subject {s}] {name}: subject_object {c['subject_object']:.3f}, subject_image "
                    f"{c['subject_image']:.3f}, subject_colour {c['subject_colour']:.2f}, "
                    f"subject_in_context {_fmt(c['subject_in_context'])}, prompt_context {_fmt(c['prompt_context'])}, "
                    f"prompt_class {_fmt(c['prompt_class'])} (train {train_seconds:.0f} s)")
            sheet_rows.append(block)
    names = [r[0] for r in runs]
    table = {name: {"label": LABELS.get(name, f"Hollowed Net (host), fraction {name.split('@')[-1]}"),
                    "fraction": dict(runs)[name], **_stats([c for c in cells if c["method"] == name]),
                    "training": records.get(name, [])} for name in names}
    result = {"kind": "quality", "settings": settings, "judge": judge_identity(judge), "methods": names,
              "table": table, "cells": cells, "seconds": time.time() - started,
              "method": __doc__.split("\n\n", 1)[1].strip()}
    if out is not None:
        out = Path(out)
        stem = f"quality_{_model_tag(identity)}_r{rank}_f{fraction:g}"
        sheet = out / f"{stem}_sheet.png"
        out.mkdir(parents=True, exist_ok=True)
        _save_sheet(sheet_rows, sheet)
        write_outputs(result, out, stem, plot_quality, extra={"sheet": str(sheet)})
    return result


def _model_tag(identity: dict) -> str:
    if identity["source"] == "local":
        return Path(identity["path"]).name or "model"
    return identity["source"]


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def quality_text(result: dict) -> str:
    import numpy as np

    s = result["settings"]
    head = ["method", *METRICS, "hollowed", "train s"]
    rows = []
    for name in result["methods"]:
        row = result["table"][name]
        cells = [f"{_fmt(row[m]['mean'])} ± {_fmt(row[m]['std'])}" for m in METRICS]
        fractions = [r.get("hollowed_fraction") for r in row["training"] if r.get("hollowed_fraction") is not None]
        secs = [r["train_seconds"] for r in row["training"]]
        rows.append([name, *cells, f"{fractions[0]:.1%}" if fractions else "-",
                     f"{np.mean(secs):.0f}" if secs and name != "none" else "-"])
    judge = result["judge"]
    return "\n".join([
        f"bench quality: subjects {s['subjects']}, sampling seeds {s['seeds']}, {s['steps']} steps, lr {s['lr']}, "
        f"rank {s['rank']}, {s['samples']} samples; judge {str(judge['sha256'])[:12]} "
        f"(fresh-render accuracy {judge['accuracy_fresh_renders_1000']})",
        "mean ± std over subjects x seeds; subject_* vs the subject's photos, prompt_* on its novel contexts",
        "", format_table(head, rows)])


# ------------------------------------------------------------------------------------------------ pictures

def _label(image, text: str, width: int = 190):
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width + image.width, image.height), "white")
    canvas.paste(image, (width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(text.split("\n")):
        draw.text((6, 6 + 14 * i), line, fill="black")
    return canvas


def _save_sheet(blocks: list[dict], path: Path) -> None:
    """Per subject: its reference photos, then per method a row of one sample per novel-context prompt."""
    from PIL import Image

    from ..inference.generate import _save_png, contact_sheet

    strips = []
    for block in blocks:
        refs = [Image.fromarray(r) for r in block["references"]]
        strips.append(_label(contact_sheet(refs, len(refs)), f"subject {block['subject']}\n{block['description']}"
                             "\nreference photos\n\nbelow, one column per\nnovel context:\n"
                             + ", ".join(block["novel"])))
        for name, images in block["rows"]:
            strips.append(_label(contact_sheet(images, len(images)), name))
    width = max(s.width for s in strips)
    sheet = Image.new("RGB", (width, sum(s.height for s in strips)), "white")
    y = 0
    for strip in strips:
        sheet.paste(strip, (0, y))
        y += strip.height
    _save_png(sheet, path)


def plot_quality(result: dict, path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    names = result["methods"]
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(METRICS), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        row = result["table"][name]
        means = [row[m]["mean"] if row[m]["mean"] is not None else float("nan") for m in METRICS]
        stds = [row[m]["std"] or 0.0 for m in METRICS]
        ax.bar(np.arange(len(METRICS)) + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=name)
    ax.set_xticks(np.arange(len(METRICS)), METRICS)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_ylabel("toy judge score (mean ± std over subjects x seeds)")
    ax.legend(fontsize=8)
    s = result["settings"]
    save_figure(fig, path, f"personalization quality: subjects {s['subjects']}, {s['steps']} steps, rank {s['rank']}, "
                           f"fraction {s['fraction']} ({s['date'][:10]})")
