"""The `hollow-export` command: parses options and calls one library function per command.

In:  the command line. Out: that function's result, printed in a line or a table. Defaults that
belong to the data (plan fraction, the bundle's samples and steps, the base model of a bundle,
file names) live in the library, not here.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .bench.quality import DEFAULTS as QUALITY  # stdlib-only at import (numpy, torch imported where used)
from .errors import HollowError
from .models.registry import BENCH_ARCHS
from .options import (BETA, COUNT, DEPTH, NON_NEGATIVE, POSITIVE, SEED, SHARE, SIDE, TIMED_STEPS, model_options,
                      overwrite_option, plan_kwargs, plan_options, variant_option)


class Group(click.Group):
    """Turns the tool's own errors into a one-line message and exit code 1 (no traceback).

    Exit codes: 0 done; 1 an error found while running (HollowError, or an operating-system error
    such as a read-only folder, as a last resort); 2 a command line click rejects while parsing
    (unknown option, a value outside its range), click's convention, so scripts can tell a wrong
    command line from a failed run.
    """

    def invoke(self, ctx):
        quiet_known_noise()
        try:
            return super().invoke(ctx)
        except HollowError as err:
            raise click.ClickException(str(err)) from err
        except OSError as err:  # last resort: a library call the tool did not wrap
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(f"{where}{err.strerror or err}; check that the path exists and that you "
                                       "can read or write it, then run again") from err


NOISE = {  # logger -> start of one message that is noise for this tool's users
    # optimum and optimum-onnx both install the `optimum` package; diffusers says so at import
    "diffusers.utils.import_utils": "Multiple distributions found for package optimum.",
    # load_lora_weights on the pipeline looks for text-encoder keys; our LoRA is the U-Net's only
    "diffusers.loaders.lora_base": "No LoRA keys associated to CLIPTextModel",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Drop exactly the library messages in NOISE (other messages of those loggers still pass)."""
    for name, prefix in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Hollowed Net: memory-light on-device LoRA personalization of Stable Diffusion."""


@main.command()
@model_options
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (for scripts).")
def plan(model, arch, variant, fraction, depth, rank, alpha, targets, blocks, resolution, as_json):
    """Show what is hollowed and kept, parameter counts, LoRA size and buffer shape."""
    from .hollow.plan import plan_for_model, plan_table
    p = plan_for_model(model, arch, variant, **plan_kwargs(fraction, depth, rank, alpha, targets, blocks, resolution))
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else plan_table(p))


@main.command()
@model_options
@plan_options
@click.option("--images", required=True, type=click.Path(), help="Folder with 3-10 photos of the subject.")
@click.option("--instance-prompt", required=True, help='Prompt naming the subject, e.g. "a sks dog".')
@click.option("--class-prompt", required=True, help='Prompt naming its class, e.g. "a dog".')
@click.option("--method", type=click.Choice(["hollowed", "lora"]), default="hollowed", show_default=True,
              help="hollowed: the paper's method; lora: plain LoRA on the full U-Net (for comparison).")
@click.option("--steps", type=COUNT, default=1000, show_default=True, help="Training steps.")
@click.option("--samples", type=COUNT, default=200, show_default=True, help="Buffered samples (timesteps x photos).")
@click.option("--lr", type=POSITIVE, default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--batch-size", type=COUNT, default=1, show_default=True, help="Samples per training step.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of every random draw.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/personalized", show_default=True,
              help="Folder for the LoRA file, buffer and record.json (new or empty).")
@overwrite_option("personalize output")
def personalize(model, arch, variant, fraction, depth, rank, alpha, targets, blocks, resolution, images,
                instance_prompt, class_prompt, method, steps, samples, lr, batch_size, seed, device, out, overwrite):
    """Host reference trainer: collection (precompute buffer) then LoRA fine-tuning."""
    from .train.trainer import TrainSettings, personalize_from_options
    settings = TrainSettings(method=method, steps=steps, samples=samples, lr=lr, batch_size=batch_size,
                             seed=seed, device=device)
    record = personalize_from_options(Path(images), instance_prompt, class_prompt, Path(out), settings, model, arch,
                                      variant, overwrite,
                                      **plan_kwargs(fraction, depth, rank, alpha, targets, blocks, resolution))
    click.echo(f"{method}: fixed-batch loss {record['fixed_batch_loss_before']:.5f} -> "
               f"{record['fixed_batch_loss_after']:.5f}; peak memory {record['peak_memory_bytes'] / 2**20:.0f} MiB "
               f"({record['peak_memory_kind']}); LoRA written to {Path(out) / record['lora_file']}")


@main.command()
@model_options
@click.option("--lora", "lora_dir", required=True, type=click.Path(),
              help="Output folder of personalize or merge (the ORT engine needs a merge folder).")
@click.option("--prompt", required=True, multiple=True, help="Prompt (repeat for several: a contact sheet too).")
@click.option("--engine", type=click.Choice(["torch", "ort"]), default="torch", show_default=True,
              help="torch: diffusers + PyTorch; ort: the merged ONNX graphs with ONNX Runtime alone.")
@click.option("--inference", type=click.Choice(["dual", "single"]), default="dual", show_default=True,
              help="dual: precompute (class prompt) + kept layers with LoRA, the paper's; single: one U-Net pass.")
@click.option("--class-prompt", default=None, help="Override the class prompt recorded with the LoRA (torch).")
@click.option("--steps", type=COUNT, default=25, show_default=True,
              help="Denoising steps (PNDM evaluates the U-Net once more: its first step twice).")
@click.option("--guidance", type=NON_NEGATIVE, default=7.5, show_default=True,
              help="Classifier-free guidance scale (1: no guidance).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--out", type=click.Path(dir_okay=False), default="runs/image.png", show_default=True,
              help="PNG path; with several prompts, _N is added per prompt and _sheet for the contact sheet.")
@click.option("--overwrite", is_flag=True, help="Replace existing images at those paths.")
def generate(model, arch, variant, lora_dir, prompt, engine, inference, class_prompt, steps, guidance, seed, out,
             overwrite):
    """Generate images with the personalized model, dual or single path.

    With --engine ort the model comes from the merged folder: --model, --arch and --variant are refused there."""
    from .inference.generate import generate_files
    if engine == "ort" and (model or arch or variant):
        raise click.UsageError("--model/--arch/--variant choose the torch engine's base model; with --engine ort "
                               "the merged folder holds the model: drop them")
    generate_files(Path(lora_dir), list(prompt), Path(out), engine, inference, steps, guidance, seed, class_prompt,
                   model, arch, log=click.echo, variant=variant, overwrite=overwrite)


@main.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(), help="The bundle the phone trained.")
@click.option("--lora", "lora_file", required=True, type=click.Path(dir_okay=False),
              help="lora.safetensors from the phone (with its lora.json beside it).")
@click.option("--model", type=click.Path(), default=None,
              help="Base model folder (default: the one the bundle was built from).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/merged", show_default=True,
              help="Folder for the merged models (new or empty; never inside an input).")
@overwrite_option("merge output")
@variant_option("the one the bundle was built with")
def merge(bundle_dir, lora_file, model, out, overwrite, variant):
    """Merge the returned LoRA: diffusers LoRA file, single-path (optimum layout) and dual-path ONNX."""
    from .merge import merge_bundle
    record = merge_bundle(Path(bundle_dir), Path(lora_file), Path(out), model, variant, overwrite)
    click.echo(f"merged into {out}: {record['lora_file']}, single/ (optimum ONNX layout), dual/")


@main.command()
@click.option("--generated", required=True, type=click.Path(), help="Folder of generated images.")
@click.option("--reference", required=True, type=click.Path(), help="Folder of real photos of the subject.")
@click.option("--prompts", required=True, type=click.Path(),
              help="JSON {image file: prompt}, or text with one prompt per line (natural file-name order).")
@click.option("--judge", type=click.Choice(["dreambooth", "toy"]), default="dreambooth", show_default=True,
              help="dreambooth: DINO, CLIP-I, CLIP-T (needs --clip and --dino); toy: the toy world's judge "
                   "(models/toy-judge), for subjects of `demo-photos --subject-seed`.")
@click.option("--clip", "clip_path", type=click.Path(), default=None, help="Local CLIP model folder (dreambooth).")
@click.option("--dino", "dino_path", type=click.Path(), default=None,
              help="Local DINO ViT-S/16 (or DINOv2) folder (dreambooth).")
@click.option("--out", type=click.Path(dir_okay=False), default="runs/metrics.json", show_default=True,
              help="JSON file for the metrics.")
def evaluate(generated, reference, prompts, judge, clip_path, dino_path, out):
    """DINO, CLIP-I and CLIP-T as in the DreamBooth protocol, or their toy-judge analogues (--judge toy)."""
    from .evaluate import write_result
    if judge == "toy":
        if clip_path or dino_path:
            raise click.UsageError("--clip/--dino are the DreamBooth judge's models; with --judge toy drop them")
        from .toy.evaluate import evaluate_toy, toy_metrics_table
        result = evaluate_toy(Path(generated), Path(reference), Path(prompts))
        write_result(result, Path(out))
        click.echo(toy_metrics_table(result))
        return
    if not clip_path or not dino_path:
        raise click.UsageError("the DreamBooth judge needs --clip and --dino model folders "
                               "(or use --judge toy for toy-world subjects)")
    from .evaluate import evaluate as run, metrics_table
    result = run(Path(generated), Path(reference), Path(prompts), Path(clip_path), Path(dino_path))
    write_result(result, Path(out))
    click.echo(metrics_table(result))


@main.command()
@model_options
@plan_options
@click.option("--instance-prompt", default="a sks dog", show_default=True, help="Prompt naming the subject.")
@click.option("--class-prompt", default="a dog", show_default=True, help="Prompt naming its class.")
@click.option("--lr", type=POSITIVE, default=1e-4, show_default=True, help="AdamW learning rate on the phone.")
@click.option("--beta1", type=BETA, default=0.9, show_default=True, help="AdamW beta1.")
@click.option("--beta2", type=BETA, default=0.999, show_default=True, help="AdamW beta2.")
@click.option("--eps", type=POSITIVE, default=1e-8, show_default=True, help="AdamW epsilon.")
@click.option("--weight-decay", type=NON_NEGATIVE, default=1e-2, show_default=True,
              help="AdamW decoupled weight decay.")
@click.option("--steps", type=COUNT, default=1000, show_default=True, help="Default training steps for the phone.")
@click.option("--samples", type=COUNT, default=200, show_default=True, help="Default buffered samples.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the LoRA initialisation.")
@click.option("--frozen-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Storage of the frozen base weights in the bundle (fp16: half the bytes, computed in fp32).")
@click.option("--recompute-levels", type=click.IntRange(min=1), default=None,
              help="Recompute kept units in the backward only at the N highest resolutions: faster steps, more "
                   "memory (sd21 512 px on 2 cores, N=2: 3.89 GB peak at 10.9 s a step; every unit: 3.34 GB at "
                   "12.1 s). Default: every unit.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bundle", show_default=True,
              help="Bundle folder (new or empty).")
@overwrite_option("bundle")
def build(model, arch, variant, fraction, depth, rank, alpha, targets, blocks, resolution, instance_prompt,
          class_prompt, lr, beta1, beta2, eps, weight_decay, steps, samples, seed, frozen_dtype, recompute_levels, out,
          overwrite):
    """Write the on-device bundle: precompute graph, ORT training artifacts, manifest."""
    from .export.build import BuildSettings, build_bundle
    dtype = {"fp32": "float32", "fp16": "float16"}[frozen_dtype]
    settings = BuildSettings(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, steps=steps,
                             samples=samples, seed=seed, frozen_dtype=dtype, recompute_levels=recompute_levels)
    manifest, p = build_bundle(Path(out), instance_prompt, class_prompt, settings, model, arch, variant, overwrite,
                               **plan_kwargs(fraction, depth, rank, alpha, targets, blocks, resolution))
    size = sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"bundle {out}: depth {p.depth} ({p.hollowed_fraction:.1%} hollowed), LoRA rank {p.lora.rank} "
               f"({p.lora_params:,} params), {len(manifest['files'])} files, {size / 2**20:.1f} MiB, "
               f"built in {manifest['build_seconds']} s")


@main.group()
def device():
    """What the phone does, run here with ONNX Runtime alone: collect, train, export."""


@device.command("collect")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(), help="Bundle folder from `build`.")
@click.option("--images", required=True, type=click.Path(), help="Folder with 3-10 photos of the subject.")
@click.option("--buffer", "buffer_path", default="runs/buffer.bin", show_default=True, type=click.Path(dir_okay=False),
              help="Buffer file to write (a partly written one is resumed).")
@click.option("--samples", type=COUNT, default=None, help="Samples to buffer (default: the bundle's, 200).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the noise, timesteps and latents.")
@click.option("--fp16", is_flag=True, help="Store noise and hidden states in float16 (half the buffer).")
def device_collect(bundle_dir, images, buffer_path, samples, seed, fp16):
    """Encode the photos, draw noise and timesteps, buffer the precompute graph's hidden states."""
    from .device.collect import collect
    header = collect(Path(bundle_dir), Path(images), Path(buffer_path), samples, seed,
                     "float16" if fp16 else "float32")
    click.echo(f"buffer {buffer_path}: {header.capacity} samples, {header.record_bytes} bytes each ({header.dtype})")


@device.command("train")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
              help="Bundle folder from `build`.")
@click.option("--buffer", "buffer_path", default="runs/buffer.bin", show_default=True, type=click.Path(dir_okay=False),
              help="Buffer file from `device collect`.")
@click.option("--run", "run_dir", default="runs/train", show_default=True, type=click.Path(file_okay=False),
              help="Folder for checkpoints and progress.json; run again to resume.")
@click.option("--steps", type=COUNT, default=None, help="Total steps (default: the bundle's, 1000).")
@click.option("--max-minutes", type=POSITIVE, default=None, help="Stop (with a checkpoint) after this long.")
@click.option("--checkpoint-every", type=COUNT, default=50, show_default=True,
              help="Save a checkpoint every N steps (and at the end or on --max-minutes).")
@click.option("--lr", type=POSITIVE, default=None, help="Override the bundle's learning rate.")
def device_train(bundle_dir, buffer_path, run_dir, steps, max_minutes, checkpoint_every, lr):
    """Train LoRA over the buffer with ORT's training API; resumable after any interruption."""
    from .device.train import TrainConfig, train
    progress = train(Path(bundle_dir), Path(buffer_path), Path(run_dir),
                     TrainConfig(steps=steps, checkpoint_every=checkpoint_every, max_minutes=max_minutes, lr=lr))
    losses = progress["losses"]
    head = sum(losses[:10]) / max(len(losses[:10]), 1)
    tail = sum(losses[-10:]) / max(len(losses[-10:]), 1)
    state = "finished" if progress["finished"] else "paused (run again to resume)"
    click.echo(f"{state} at step {progress['step']}: mean loss first 10 {head:.5f}, last 10 {tail:.5f}; "
               f"peak RSS {progress['peak_rss_bytes'] / 2**20:.0f} MiB; checkpoint {progress['checkpoint']}")


@device.command("export")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
              help="The bundle the run trained.")
@click.option("--checkpoint", required=True, type=click.Path(), help="A checkpoint file, or the --run folder.")
@click.option("--out", default="runs/lora", show_default=True, type=click.Path(file_okay=False),
              help="Folder for lora.safetensors and lora.json (new or empty; never inside an input).")
@overwrite_option("LoRA export")
def device_export(bundle_dir, checkpoint, out, overwrite):
    """Write the trained LoRA (tensors only, full-U-Net names, with its hash): what the phone sends back."""
    from .device.export import export_lora
    record = export_lora(Path(bundle_dir), Path(checkpoint), Path(out), overwrite)
    click.echo(f"wrote {Path(out) / record['file']} ({record['tensors']} tensors, sha256 {record['sha256'][:16]}...)")


@main.group()
def bench():
    """Local benchmarks: the paper's Table 1, the hollow-depth sweep, the on-device engine (JSON + PNG)."""


def _bench_done(result, text):
    click.echo(text(result))
    click.echo(f"wrote {result['files']['json']} and {result['files']['png']}")


def _names(csv):
    return [n.strip() for n in csv.split(",") if n.strip()] or None


@bench.command("memory")
@click.option("--arch", type=click.Choice(BENCH_ARCHS), default="tiny", show_default=True,
              help="mid: SD1.5's layout with block_out_channels 128/256/512/512 (bench only).")
@click.option("--device", default="cpu", show_default=True, help="cpu (peak RSS per fresh process) or cuda.")
@click.option("--resolution", type=SIDE, default=None, help="Image side in px (default: the arch's).")
@click.option("--rank", type=COUNT, default=128, show_default=True, help="LoRA rank.")
@click.option("--fraction", type=SHARE, default=0.4, show_default=True, help="Target hollowed parameter share.")
@click.option("--depth", type=DEPTH, default=None, help="Hollow depth k (overrides --fraction).")
@click.option("--steps", type=TIMED_STEPS, default=3, show_default=True, help="Steps per case: 1 warm, then measured.")
@click.option("--cases", default="", help="Comma-separated case names (default: all, paper and beyond-paper).")
@click.option("--no-measure", is_flag=True, help="FLOPs and parameter counts only (no processes).")
@click.option("--merge", is_flag=True, help="Add these cases to the result already in --out (same settings; an interrupted "
              "run's .partial.json rows too).")
@click.option("--threads", type=COUNT, default=None, help="Torch threads per case process (default: torch's).")
@click.option("--timeout", type=POSITIVE, default=None, help="Seconds per case process.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
              help="Folder for the result JSON and PNG.")
def bench_memory(arch, device, resolution, rank, fraction, depth, steps, cases, no_measure, merge, threads,
                 timeout, out):
    """The paper's Table 1: params, peak memory and FLOPs per step, each case in a fresh process."""
    from .bench.memory import memory_table, memory_text
    result = memory_table(arch=arch, device=device, resolution=resolution, rank=rank, fraction=fraction,
                          depth=depth, steps=steps, cases=_names(cases), measure=not no_measure,
                          out=Path(out), threads=threads, timeout=timeout, merge=merge)
    _bench_done(result, memory_text)


@bench.command("sweep")
@click.option("--arch", type=click.Choice(BENCH_ARCHS), default="tiny", show_default=True,
              help="Architecture (random weights).")
@click.option("--steps", type=COUNT, default=200, show_default=True, help="Training steps per depth (loss, tiny only).")
@click.option("--rank", type=COUNT, default=None, help="LoRA rank (default: 4 on tiny, 128 otherwise).")
@click.option("--resolution", type=SIDE, default=None, help="Image side in px (default: the arch's).")
@click.option("--samples", type=COUNT, default=200, show_default=True, help="Buffered samples for the loss runs.")
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True, help="AdamW learning rate of the loss runs.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--no-measure", is_flag=True, help="Analytic memory only (no processes).")
@click.option("--threads", type=COUNT, default=None, help="Torch threads per process (default: torch's).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
              help="Folder for the result JSON and PNG.")
def bench_sweep(arch, steps, rank, resolution, samples, lr, device, no_measure, threads, out):
    """Every hollow depth: hollowed share, training peak, FLOPs and (tiny) the loss (the paper's Figure 5)."""
    from .bench.sweep import sweep, sweep_text
    result = sweep(arch=arch, steps=steps, rank=rank, resolution=resolution, measure=not no_measure,
                   device=device, samples=samples, lr=lr, out=Path(out), threads=threads)
    _bench_done(result, sweep_text)


@bench.command("ort")
@click.option("--arch", type=click.Choice(BENCH_ARCHS), default="tiny", show_default=True,
              help="Architecture (random weights).")
@click.option("--resolution", type=SIDE, default=None, help="Image side in px (default: the arch's).")
@click.option("--rank", type=COUNT, default=128, show_default=True, help="LoRA rank.")
@click.option("--fraction", type=SHARE, default=0.4, show_default=True, help="Target hollowed parameter share.")
@click.option("--depth", type=DEPTH, default=None, help="Hollow depth k (overrides --fraction).")
@click.option("--steps", type=TIMED_STEPS, default=5, show_default=True,
              help="ORT steps per engine (first is warm-up).")
@click.option("--rows", "--engines", "engines", default="hollowed,lora,inference", show_default=True,
              help="Rows (bench/ort.py ROWS), or 'ablation': every engine lever alone and together.")
@click.option("--threads", type=COUNT, default=None, help="ORT threads per process (default: ORT's).")
@click.option("--timeout", type=POSITIVE, default=None, help="Seconds per build/measure process.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where the temporary bundles go.")
@click.option("--merge", is_flag=True, help="Add these rows to the result already in --out (same settings).")
@click.option("--rounds", type=COUNT, default=1, show_default=True,
              help="Measure the rows round-robin this many times (every bundle kept on disk meanwhile): step "
                   "times that a slow spell of the machine would skew, compared fairly.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
              help="Folder for the result JSON and PNG.")
def bench_ort(arch, resolution, rank, fraction, depth, steps, engines, threads, timeout, workdir, merge, rounds,
              out):
    """ORT training of the Hollowed Net bundle vs a plain-LoRA bundle vs ORT inference, side by side."""
    from .bench.ort import ort_bench, ort_text
    result = ort_bench(arch=arch, resolution=resolution, rank=rank, fraction=fraction, depth=depth,
                       steps=steps, threads=threads, out=Path(out), workdir=workdir, timeout=timeout,
                       kinds=tuple(_names(engines) or ()), merge=merge, rounds=rounds)
    _bench_done(result, ort_text)


@bench.command("floor")
@click.option("--arch", type=click.Choice(BENCH_ARCHS), default="tiny", show_default=True,
              help="Architecture (random weights).")
@click.option("--resolutions", default="64,128,256,512", show_default=True,
              help="Image sides in px, comma-separated: one `bench ort` run per side.")
@click.option("--rank", type=COUNT, default=128, show_default=True, help="LoRA rank.")
@click.option("--fraction", type=SHARE, default=0.4, show_default=True, help="Target hollowed parameter share.")
@click.option("--depth", type=DEPTH, default=None, help="Hollow depth k (overrides --fraction).")
@click.option("--steps", type=TIMED_STEPS, default=4, show_default=True,
              help="ORT steps per row (first is warm-up).")
@click.option("--threads", type=COUNT, default=None, help="ORT threads per process (default: ORT's).")
@click.option("--timeout", type=POSITIVE, default=None, help="Seconds per build/measure process.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where the temporary bundles go.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
              help="Folder for the result JSON and PNG.")
def bench_floor(arch, resolutions, rank, fraction, depth, steps, threads, timeout, workdir, out):
    """Hollowed/plain-LoRA ORT peak ratio against image size, and its floor with no activation held."""
    from .bench.ort_floor import floor_bench, floor_text
    sides = _numbers(resolutions, int, "image sides in px")
    if any(side < 8 for side in sides):
        raise click.BadParameter(f"{resolutions!r}: every image side must be at least 8 px",
                                 param_hint="'--resolutions'")
    result = floor_bench(arch=arch, resolutions=tuple(sides), rank=rank, fraction=fraction, depth=depth,
                         steps=steps, threads=threads, out=Path(out), workdir=workdir, timeout=timeout)
    _bench_done(result, floor_text)


def _numbers(csv: str, kind, what: str) -> list:
    try:
        return [kind(n) for n in (_names(csv) or [])]
    except ValueError:
        raise click.BadParameter(f"{csv!r} is not a comma-separated list of {what}")


@bench.command("quality")
@model_options
@click.option("--subjects", default="0,1,2", show_default=True,
              help="Toy-world subject seeds to personalize (demo-photos --subject-seed N).")
@click.option("--seeds", default="0", show_default=True, help="Sampling seeds (each adds a cell per subject).")
@click.option("--methods", default=",".join(("none", "lora", "hollowed_host", "hollowed_device")), show_default=True,
              help="none, lora (plain LoRA, host), hollowed_host, hollowed_device (build -> device -> merge).")
@click.option("--fraction", type=SHARE, default=QUALITY["fraction"], show_default=True,
              help="Target hollowed parameter share.")
@click.option("--sweep", default="", help="Extra fractions for the Hollowed Net on the host, e.g. 0.2,0.4,0.6.")
@click.option("--steps", type=COUNT, default=QUALITY["steps"], show_default=True, help="Training steps per method.")
@click.option("--lr", type=POSITIVE, default=QUALITY["lr"], show_default=True, help="AdamW learning rate.")
@click.option("--rank", type=COUNT, default=QUALITY["rank"], show_default=True, help="LoRA rank.")
@click.option("--samples", type=COUNT, default=QUALITY["samples"], show_default=True,
              help="Buffered samples (timesteps x photos).")
@click.option("--photos", type=click.IntRange(3, 20), default=QUALITY["photos"], show_default=True,
              help="Reference photos per subject.")
@click.option("--per-prompt", type=COUNT, default=QUALITY["per_prompt"], show_default=True,
              help="Samples per novel-context prompt.")
@click.option("--denoise-steps", type=COUNT, default=QUALITY["denoise_steps"], show_default=True,
              help="Sampling steps (PNDM).")
@click.option("--guidance", type=NON_NEGATIVE, default=QUALITY["guidance"], show_default=True,
              help="Classifier-free guidance.")
@click.option("--threads", type=COUNT, default=None, help="Torch threads (default: this machine's cores).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the intermediate folders (photos, LoRAs, bundles, merged models) here (new or empty).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
              help="Folder for the result JSON, the bar chart and the contact sheet.")
def bench_quality(model, arch, variant, subjects, seeds, methods, fraction, sweep, steps, lr, rank, samples, photos,
                  per_prompt, denoise_steps, guidance, threads, workdir, out):
    """Personalization quality on toy-world subjects: none / plain LoRA / Hollowed Net host / device path, toy judge."""
    from .bench.quality import quality, quality_text
    result = quality(_numbers(subjects, int, "subject seeds"), _numbers(seeds, int, "seeds"),
                     _names(methods) or [], _numbers(sweep, float, "fractions"), model, arch, variant, steps=steps,
                     lr=lr, rank=rank, samples=samples, fraction=fraction, photos=photos, per_prompt=per_prompt,
                     denoise_steps=denoise_steps, guidance=guidance, out=Path(out),
                     workdir=Path(workdir) if workdir else None, threads=threads, log=click.echo)
    click.echo(quality_text(result))
    click.echo(f"wrote {result['files']['json']}, {result['files']['png']} and {result['files']['sheet']}")


@main.command("profile")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(), help="Bundle folder from `build`.")
@click.option("--device", "device_name", default="Samsung Galaxy S24 (Family)", show_default=True,
              help="AI Hub device name (`qai-hub list-devices`).")
@click.option("--target-runtime", type=click.Choice(["qnn_context_binary", "onnx", "tflite"]),
              default="qnn_context_binary", show_default=True, help="AI Hub target runtime to compile for.")
@click.option("--merged-unet", type=click.Path(), default=None,
              help="Also profile the merged U-Net: `merge`'s output folder or a U-Net .onnx.")
@click.option("--timeout", type=POSITIVE, default=None, help="Seconds to wait for each AI Hub job.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/aihub", show_default=True,
              help="Folder for aihub_profile.json.")
def profile_cmd(bundle_dir, device_name, target_runtime, merged_unet, timeout, out):
    """Qualcomm AI Hub compile + profile jobs for the bundle's inference graphs and the merged U-Net."""
    from .aihub import profile_bundle, profile_text
    result = profile_bundle(Path(bundle_dir), device_name, target_runtime,
                            Path(merged_unet) if merged_unet else None, out=Path(out), timeout=timeout,
                            log=click.echo)
    click.echo(profile_text(result))
    click.echo(f"wrote {result['files']['json']}")


@main.command("demo-photos")
@click.option("--out", type=click.Path(file_okay=False), default="runs/photos", show_default=True,
              help="Folder for the photos (new or empty).")
@click.option("--count", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="How many photos (4-6 is what a user gives DreamBooth).")
@click.option("--subject-seed", type=SEED, default=None,
              help="Photos of toy-world subject N (models/tiny-toy's world) instead of the made-up ball; "
                   "its prompts are printed.")
@overwrite_option("demo-photos folder")
def demo_photos(out, count, subject_seed, overwrite):
    """Write synthetic subject photos for a smoke run (no real data can be downloaded here)."""
    from .demo import subject_lines, write_subject_photos, write_world_photos
    if subject_seed is None:
        paths = write_subject_photos(Path(out), count, overwrite)
    else:
        paths = write_world_photos(Path(out), subject_seed, count, overwrite)
        click.echo("\n".join(subject_lines(subject_seed)))
    click.echo(f"wrote {len(paths)} photos to {out}")


if __name__ == "__main__":
    sys.exit(main())
