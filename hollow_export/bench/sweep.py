"""`bench sweep`: every hollow depth, its hollowed share, training peak, FLOPs and (tiny) loss.

In:  an architecture, steps and rank, whether to measure in child processes.
Out: `sweep(...)` -> a result (references: inference and plain LoRA; one row per depth), written
     with its PNG (the paper's Figure 5); `sweep_text(result)` renders the table.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from ..models.load import load_unet
from .cases import TOKENS, Case, bench_plan
from .flops import case_flops
from .measure import GB, check_device, default_threads, run_child, settings_block
from .report import _fmt_bytes, _pyplot, format_table, save_figure, settings_text, write_outputs


def _sweep_losses(depths: list[int], rank: int, resolution: int | None, steps: int, samples: int, lr: float,
                  seed: int, log=print) -> dict:
    """Tiny default only: fine-tune each depth (and plain LoRA) `steps` steps on the same synthetic samples."""
    import copy

    import torch

    from ..demo import subject_photos
    from ..hollow import lora as lora_mod
    from ..hollow.plan import LoraSpec, make_plan, select_lora_targets
    from ..hollow.split import HollowedNet, PrecomputeNet
    from ..models.load import load_pipeline
    from ..models.prompts import encode_prompt
    from ..train.trainer import (TrainSettings, collect, draw_samples, encode_images,
                              fine_tune, fixed_batch_loss, load_images)

    pipe = load_pipeline(arch="tiny")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subject_photos(Path(tmp), 5, size=128, seed=seed)
        plan0 = make_plan(pipe.unet, depth=0, lora=LoraSpec(rank=rank), resolution=resolution)
        generator = torch.Generator().manual_seed(seed)
        latents = encode_images(pipe, load_images(Path(tmp), plan0.resolution), generator)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    base = draw_samples(latents, samples, scheduler, generator)
    instance, klass = encode_prompt(pipe, "a sks ball"), encode_prompt(pipe, "a ball")
    settings = TrainSettings(steps=steps, samples=samples, lr=lr, seed=seed)
    for depth in ["lora", *depths]:
        unet = copy.deepcopy(pipe.unet)
        data = dict(base)
        if depth == "lora":
            spec = LoraSpec(rank=rank)
            net = lora_mod.inject(unet, spec, select_lora_targets(unet, spec), seed=seed)
            method = "lora"
        else:
            plan = make_plan(unet, depth=depth, lora=LoraSpec(rank=rank), resolution=resolution)
            data["hidden"] = collect(PrecomputeNet(unet, plan), data, klass)
            net = lora_mod.inject(HollowedNet(unet, plan), plan.lora, plan.lora_targets, seed=seed)
            method = "hollowed"
        before = fixed_batch_loss(net, method, data, instance, "cpu", settings.eval_samples)
        losses = fine_tune(net, method, data, instance, settings)
        after = fixed_batch_loss(net, method, data, instance, "cpu", settings.eval_samples)
        tail = losses[-min(10, len(losses)):]
        out[depth] = {"fixed_batch_loss_before": before, "fixed_batch_loss_after": after,
                      "mean_loss_last10": sum(tail) / len(tail), "losses": losses}
        log(f"[loss depth {depth}] fixed-batch loss {before:.5f} -> {after:.5f}")
    return out


def sweep(arch: str = "tiny", steps: int = 100, rank: int | None = None, resolution: int | None = None,
          measure: bool = True, device: str = "cpu", samples: int = 200, lr: float = 1e-3, seed: int = 0,
          depths: list[int] | None = None, out: Path | None = None, threads: int | None = None,
          timeout: float | None = None, log=print) -> dict:
    """Every hollow depth 0..max: hollowed share, training peak memory, FLOPs, and (tiny) the loss."""
    check_device(device)
    rank = rank or (4 if arch == "tiny" else 128)
    threads = default_threads(threads)
    unet_meta = load_unet(arch=arch, meta=True)
    plan0 = bench_plan(unet_meta, rank, None, 0, resolution)
    depths = list(range(plan0.max_depth + 1)) if depths is None else depths
    settings = settings_block(arch=arch, device=device, resolution=plan0.resolution, rank=rank,
                              max_depth=plan0.max_depth, dtype="fp32", batch=1, tokens=TOKENS,
                              loss_steps=steps if arch == "tiny" else None, samples=samples, lr=lr, seed=seed,
                              threads=threads, unet_params=plan0.unet_params, measured=measure)
    rows = []

    def measured(case: Case, plan_args: dict) -> dict:
        if not measure:
            return {}
        spec = {"job": "case", "case": asdict(case), "arch": arch, "device": device, "plan": plan_args,
                "steps": 2, "seed": seed, "threads": threads, "lr": lr, "save": None}
        child = run_child(spec, timeout)
        if "error" in child:
            log(f"[{case.name} {plan_args}] failed: {child['error']}")
        return {k: child.get(k) for k in ("peak_bytes", "held_bytes", "peak_abs_bytes", "error") if k in child}

    refs = {}
    for case in (Case("inference", "inference", "inference"), Case(f"lora_r{rank}", "lora", "LoRA", rank=rank)):
        args = {"rank": rank, "fraction": None, "depth": 0, "resolution": plan0.resolution}
        log(f"[reference {case.name}] ...")
        refs[case.kind] = {"case": case.name, "flops": case_flops(arch, args, case), **measured(case, args)}
    for depth in depths:
        plan = bench_plan(unet_meta, rank, None, depth, resolution)
        args = {"rank": rank, "fraction": None, "depth": depth, "resolution": plan.resolution}
        case = Case("hollowed", "hollowed", "Hollowed Net", rank=rank)
        log(f"[depth {depth}] {plan.hollowed_fraction:.1%} hollowed ...")
        analytic = plan.kept_params * 4 + plan.lora_params * 4 * 4 + plan.buffer_bytes_fp32
        rows.append({"depth": depth, "hollowed_fraction": plan.hollowed_fraction, "kept_params": plan.kept_params,
                     "lora_params": plan.lora_params, "buffer_shape": plan.buffer_shape,
                     "analytic_state_bytes": analytic, "flops": case_flops(arch, args, case),
                     **measured(case, args)})
    if arch == "tiny" and steps > 0:
        losses = _sweep_losses(depths, rank, resolution, steps, samples, lr, seed, log)
        for row in rows:
            row["loss"] = losses[row["depth"]]
        refs["lora"]["loss"] = losses["lora"]
    result = {"kind": "sweep", "settings": settings, "references": refs, "rows": rows,
              "method": "per depth: the Hollowed Net training case of `bench memory` (fresh process, one warm step, "
                        "then the measured step); analytic_state_bytes = kept weights + LoRA (weights, grads, "
                        "two AdamW moments) + one buffered hidden state; FLOPs on meta; loss: host trainer "
                        "(train.trainer.fine_tune) on synthetic photos (demo.subject_photos), fixed seed"}
    if out is not None:
        write_outputs(result, Path(out), f"sweep_{arch}_{device}_{plan0.resolution}px_r{rank}", plot_sweep)
    return result


def sweep_text(result: dict) -> str:
    s = result["settings"]
    refs = result["references"]
    rows = []
    for name, ref in (("inference", refs["inference"]), ("plain LoRA", refs["lora"])):
        loss = ref.get("loss", {}).get("fixed_batch_loss_after")
        rows.append([name, "-", _fmt_bytes(ref.get("peak_bytes")), "-", f"{ref['flops']['step'] / 1e9:.3f}",
                     "-" if loss is None else f"{loss:.5f}"])
    for r in result["rows"]:
        loss = r.get("loss", {}).get("fixed_batch_loss_after")
        rows.append([f"depth {r['depth']}", f"{r['hollowed_fraction']:.1%}", _fmt_bytes(r.get("peak_bytes")),
                     _fmt_bytes(r["analytic_state_bytes"]), f"{r['flops']['step'] / 1e9:.3f}",
                     "-" if loss is None else f"{loss:.5f}"])
    head = ["row", "hollowed", "peak GB", "analytic GB", "step GFLOPs",
            f"loss after {s.get('loss_steps')} steps" if s.get("loss_steps") else "loss"]
    return "\n".join([f"bench sweep: {s['arch']} on {s['device']}, {s['resolution']} px, LoRA r={s['rank']}",
                      settings_text(s), "", format_table(head, rows)])


def plot_sweep(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows, refs = result["rows"], result["references"]
    x = [100 * r["hollowed_fraction"] for r in rows]
    has_loss = any("loss" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if has_loss else 2, figsize=(15 if has_loss else 10, 4))
    a = axes[0]
    if any(r.get("peak_bytes") is not None for r in rows):
        a.plot(x, [(r.get("peak_bytes") or float("nan")) / GB for r in rows], "o-", label="Hollowed Net (measured)")
    a.plot(x, [r["analytic_state_bytes"] / GB for r in rows], "s--", label="kept weights + LoRA state (analytic)")
    for name, ref, ls in (("inference", refs["inference"], ":"), ("plain LoRA", refs["lora"], "-.")):
        if ref.get("peak_bytes"):
            a.axhline(ref["peak_bytes"] / GB, color="gray", ls=ls, label=f"{name} (measured)")
    a.set_ylabel("training peak memory (GB)")
    a.legend(fontsize=8)
    b = axes[1]
    b.plot(x, [r["flops"]["step"] / 1e9 for r in rows], "o-", label="Hollowed Net step")
    b.axhline(refs["lora"]["flops"]["step"] / 1e9, color="gray", ls="-.", label="plain LoRA step")
    b.axhline(refs["inference"]["flops"]["step"] / 1e9, color="gray", ls=":", label="inference")
    b.set_ylabel("GFLOPs per step")
    b.legend(fontsize=8)
    if has_loss:
        c = axes[2]
        c.plot(x, [r["loss"]["fixed_batch_loss_after"] for r in rows], "o-", label="after fine-tuning")
        c.plot(x, [r["loss"]["fixed_batch_loss_before"] for r in rows], "x:", label="before")
        c.axhline(refs["lora"]["loss"]["fixed_batch_loss_after"], color="gray", ls="-.", label="plain LoRA after")
        c.set_ylabel(f"fixed-batch loss after {result['settings']['loss_steps']} steps")
        c.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("hollowed share of U-Net parameters (%)")
    s = result["settings"]
    save_figure(fig, path, f"hollow-depth sweep: {s['arch']} {s['resolution']}px r={s['rank']} ({s['device']}, "
                           f"torch {s['torch']}, {s['date'][:10]})")
