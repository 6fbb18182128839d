"""`bench memory`: the paper's Table 1 (and beyond-paper rows) on any architecture.

In:  an architecture (`tiny`, `mid`, `sd15`, `sd21`), a device (cpu or cuda), resolution, LoRA
     rank, hollow fraction or depth, the cases to run.
Out: `memory_table(...)` -> a JSON-serialisable result (settings, one row per case: params, held
     and peak memory, FLOPs, fidelity against the fp32 reference), written with its PNG;
     `memory_text(result)` renders the printed table. Each case is measured in a fresh process
     (`child_case`); how: `measure.METHOD`.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .. import store
from ..hollow.lora import lora_parameters
from ..hollow.plan import LoraSpec, lora_param_count, select_lora_targets
from ..models.load import load_unet
from ..rss import peak_rss_bytes, reset_peak_rss, rss_bytes
from .cases import (TOKENS, BenchError, Case, all_cases, bench_plan, build_case, make_optimizer, pick_cases,
                    run_step, step_inputs_for)
from .flops import case_flops, dual_path_flops
from .measure import GB, METHOD, available_bytes, check_device, default_threads, run_child, settings_block
from .report import _flops_unit, _fmt_bytes, _fmt_params, _fmt_ratio, _pyplot, earlier_result, format_table, \
    save_figure, settings_text, write_outputs


def child_case(spec: dict) -> dict:
    """In the child: build one case, hold only its modules, measure its step memory and losses."""
    import torch
    torch.set_num_threads(spec["threads"])

    device = spec["device"]
    case = Case(**spec["case"])
    cuda = device.startswith("cuda")
    baseline = rss_bytes()
    started = time.time()
    unet = load_unet(arch=spec["arch"])
    if cuda:
        unet.to(device)
    plan = bench_plan(unet, **spec["plan"])
    items = step_inputs_for(spec["arch"], plan, spec["steps"], spec["seed"])
    if cuda:
        items = [{k: v.to(device) for k, v in item.items()} for item in items]
    net, trainable = build_case(unet, plan, case, device, items)
    del unet
    base_params = sum(p.numel() for n, p in net.named_parameters() if ".lora_" not in n)
    lora_params = sum(p.numel() for p in lora_parameters(net).values())
    save = spec.get("save")
    if save and case.kind in ("lora", "hollowed"):
        store.save_tensors(Path(save) / f"{case.name}.initial.safetensors",
                           {k: v.detach().float().cpu() for k, v in lora_parameters(net).items()})
    optimizer = make_optimizer(case, trainable, spec["lr"])
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated()
    held_rss = rss_bytes()
    load_seconds = time.time() - started

    losses, times, output = [], [], None
    peak_method = None
    for i, item in enumerate(items):
        if i == 1:  # after the warm step (optimizer state now exists)
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                peak_method = "torch.cuda.max_memory_allocated after one warm step"
            else:
                peak_method = ("VmHWM reset after one warm step (clear_refs), minus baseline RSS"
                               if reset_peak_rss() else "ru_maxrss over the whole child (no VmHWM reset)")
        t0 = time.time()
        loss, output = run_step(net, case, item, optimizer, device)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        if loss is not None:
            losses.append(loss)
    if cuda:
        peak, peak_abs = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated()
        held_case, base = held, 0
    else:
        peak_abs = peak_rss_bytes()
        peak, held_case, base = peak_abs - baseline, held_rss - baseline, baseline
    if save:
        if case.kind in ("lora", "hollowed"):
            store.save_tensors(Path(save) / f"{case.name}.final.safetensors",
                               {k: v.detach().float().cpu() for k, v in lora_parameters(net).items()})
        elif output is not None:
            store.save_tensors(Path(save) / f"{case.name}.output.safetensors", {"out": output.float().cpu()})
    return {
        "case": case.name,
        "base_params": base_params,
        "lora_params": lora_params,
        "trainable_params": sum(p.numel() for p in trainable),
        "baseline_rss_bytes": base,
        "held_bytes": held_case,
        "held_rss_bytes": held_rss,
        "peak_bytes": peak,
        "peak_abs_bytes": peak_abs,
        "peak_method": peak_method if len(items) > 1 else "single step: peak over load and step",
        "losses": losses,
        "step_seconds": times,
        "load_seconds": load_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def _loss_part(result: dict, reference: dict) -> dict:
    """The loss part of a row's fidelity: its losses against its reference's, largest relative difference."""
    pairs = list(zip(result["losses"], reference["losses"]))
    return {"loss_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs),
            "losses": result["losses"], "reference_losses": reference["losses"]}


def _fidelity(save: Path, case: Case, result: dict, reference: dict) -> dict:
    import torch
    out = {"reference": case.reference}
    if result.get("losses") and reference.get("losses"):
        out.update(_loss_part(result, reference))
    if case.kind in ("lora", "hollowed"):
        paths = [save / f"{n}.{w}.safetensors" for n in (case.name, case.reference) for w in ("initial", "final")]
        if all(p.exists() for p in paths):
            vi, vf, ri, rf = (store.load_tensors(p) for p in paths)
            dv = torch.cat([(vf[k] - vi[k]).flatten() for k in sorted(vf)])
            dr = torch.cat([(rf[k] - ri[k]).flatten() for k in sorted(rf)])
            out["update_rel_diff"] = float((dv - dr).norm() / dr.norm().clamp_min(1e-30))
    else:
        a, b = save / f"{case.name}.output.safetensors", save / f"{case.reference}.output.safetensors"
        if a.exists() and b.exists():
            va, vb = store.load_tensors(a)["out"], store.load_tensors(b)["out"]
            out["output_rel_diff"] = float((va - vb).norm() / vb.norm().clamp_min(1e-30))
    return out


def _full_ft_estimate(plan, results: dict) -> int:
    """Bytes full fine-tuning needs: weights, grads, two AdamW moments, plus the LoRA cases' activations
    (or, not measured yet, as many bytes as the weights)."""
    params = plan.unet_params * 4
    acts = [r["peak_bytes"] - r["held_bytes"] for n, r in results.items() if n.startswith("lora_r") and "peak_bytes" in r]
    return 4 * params + (max(acts) if acts else params)


MERGE_KEYS = ("arch", "device", "resolution", "rank", "depth", "steps")
FULL_FT_MARGIN = 1.5e9  # left free for the other processes on the machine


def memory_table(arch: str = "tiny", device: str = "cpu", resolution: int | None = None, rank: int = 128,
                 fraction: float | None = 0.4, depth: int | None = None, steps: int = 3,
                 cases: list[str] | None = None, measure: bool = True, out: Path | None = None,
                 threads: int | None = None, timeout: float | None = None, lr: float = 1e-4,
                 merge: bool = False, log=print) -> dict:
    """The paper's Table 1 (and the beyond-paper rows) on `arch`: params, peak memory, FLOPs per step.

    `merge=True` adds this run's cases to the result already in `out` for the same settings (arch,
    device, resolution, rank, depth, steps): its other rows are kept, the cases run now replace theirs.
    The rows of an interrupted run (its `.partial.json`) are kept the same way, with the loss part of
    their fidelity only.
    """
    check_device(device)
    if steps < 2:
        raise BenchError("--steps must be at least 2 (one warm step, then measured steps)")
    if device == "cpu" and measure and not reset_peak_rss():
        log("note: cannot reset the peak RSS counter here; peaks include the model build")
    threads = default_threads(threads)
    unet_meta = load_unet(arch=arch, meta=True)
    plan = bench_plan(unet_meta, rank, fraction, depth, resolution)
    plan_args = {"rank": rank, "fraction": None, "depth": plan.depth, "resolution": plan.resolution}
    chosen = pick_cases(rank, cases)
    settings = settings_block(arch=arch, device=device, resolution=plan.resolution, rank=rank,
                              depth=plan.depth, max_depth=plan.max_depth,
                              hollowed_fraction=plan.hollowed_fraction, dtype="fp32 (rows say otherwise)",
                              batch=1, tokens=TOKENS, cross_attention_dim=plan.encoder_shape[1],
                              steps=steps, lr=lr, threads=threads,
                              unet_params=plan.unet_params, kept_params=plan.kept_params,
                              precompute_params=plan.precompute_params, lora_params_plan=plan.lora_params,
                              buffer_shape=plan.buffer_shape, buffer_bytes_fp32=plan.buffer_bytes_fp32)
    stem = f"memory_{arch}_{device}_{plan.resolution}px_r{rank}_k{plan.depth}"
    old = _merge_base(Path(out), stem, settings) if merge and out is not None else None
    if old is not None:  # the dates of every run whose rows this result keeps
        settings["merged_from"] = old["settings"].get("merged_from", []) + [old["settings"]["date"]]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hollow-bench-save-") as save_dir:
        save = Path(save_dir)
        referenced = {c.reference for c in chosen if c.reference}
        order = [c for c in chosen if c.kind != "full_ft"] + [c for c in chosen if c.kind == "full_ft"]
        for case in order:
            row = {"case": case.name, "label": case.label, "kind": case.kind, "group": case.group,
                   "dtype": case.dtype, "checkpoint": case.checkpoint, "buffer_dtype": case.buffer_dtype,
                   "rank": case.rank}
            row["base_params_analytic"] = {"hollowed": plan.kept_params, "collection": plan.precompute_params
                                           }.get(case.kind, plan.unet_params)
            log(f"[{case.name}] FLOPs on meta ...")
            row["flops"] = case_flops(arch, plan_args, case)
            if case.kind == "lora":
                row["lora_params_analytic"] = lora_param_count(
                    unet_meta, select_lora_targets(unet_meta, LoraSpec(rank=case.rank)), case.rank)
            elif case.kind == "hollowed":
                row["lora_params_analytic"] = lora_param_count(unet_meta, plan.lora_targets, case.rank)
            if measure:
                if case.kind == "full_ft" and device == "cpu":
                    need, have = _full_ft_estimate(plan, results), available_bytes()
                    row["full_ft_estimate_bytes"] = need
                    if need + FULL_FT_MARGIN > have:
                        row["error"] = (f"not run: needs about {need / GB:.1f} GB (weights, grads, two AdamW "
                                        f"moments, activations) + {FULL_FT_MARGIN / GB:.1f} GB margin, "
                                        f"{have / GB:.1f} GB available")
                        log(f"[{case.name}] {row['error']}")
                        results[case.name] = row
                        continue
                log(f"[{case.name}] measuring in a fresh process ...")
                spec = {"job": "case", "case": asdict(case), "arch": arch, "device": device, "plan": plan_args,
                        "steps": steps, "seed": 0, "threads": threads, "lr": lr,
                        "save": str(save) if (case.reference or case.name in referenced) else None}
                child = run_child(spec, timeout)
                row.update({k: v for k, v in child.items() if k != "case"})
                if "error" in child:
                    log(f"[{case.name}] failed: {child['error']}")
                else:
                    log(f"[{case.name}] peak {child['peak_bytes'] / GB:.3f} GB, held {child['held_bytes'] / GB:.3f} "
                        f"GB, {child['wall_seconds']:.0f} s")
            results[case.name] = row
            if out is not None:  # what is measured so far, and what --merge keeps, survives an interrupted run
                so_far = [r for r in (old or {}).get("rows", []) if r["case"] not in results] + list(results.values())
                store.write_json(Path(out) / f"{stem}.partial.json",
                                 {"kind": "memory", "partial": True, "settings": settings, "rows": so_far})
        for case in chosen:
            row = results[case.name]
            if case.reference and case.reference in results and "peak_bytes" in row \
                    and "peak_bytes" in results[case.reference]:
                row["fidelity"] = _fidelity(save, case, row, results[case.reference])
    rows = [results[c.name] for c in chosen]
    if old is not None:
        kept = {r["case"]: r for r in old["rows"] if r["case"] not in results}
        order = [c.name for c in all_cases(rank)]
        rows = sorted(list(kept.values()) + rows, key=lambda r: order.index(r["case"]) if r["case"] in order else 99)
        _loss_fidelity(rows, {c.name: c.reference for c in all_cases(rank)})
        log(f"merged with {len(kept)} row(s) measured on {old['settings']['date']}")
    _add_ratios(rows)
    result = {"kind": "memory", "settings": settings, "rows": rows,
              "dual_path_flops": dual_path_flops(arch, plan_args),
              "method": METHOD,
              "notes": _memory_notes(rows, device, settings)}
    if out is not None:
        write_outputs(result, Path(out), stem, plot_memory)
        (Path(out) / f"{stem}.partial.json").unlink(missing_ok=True)
    return result


def _merge_base(out: Path, stem: str, settings: dict) -> dict | None:
    """The rows `--merge` keeps: the finished result in `out`, overlaid by the rows of an interrupted
    run (its `.partial.json`), both measured with this run's settings; None when there is neither."""
    base = earlier_result(out / f"{stem}.json", settings, MERGE_KEYS)
    partial = earlier_result(out / f"{stem}.partial.json", settings, MERGE_KEYS)
    if base is None or partial is None:
        return base or partial
    newer = {r["case"] for r in partial["rows"]}
    dates = base["settings"].get("merged_from", []) + [base["settings"]["date"]] + \
        partial["settings"].get("merged_from", [])
    return {**base, "settings": {**partial["settings"], "merged_from": list(dict.fromkeys(dates))},
            "rows": [r for r in base["rows"] if r["case"] not in newer] + partial["rows"]}


def _loss_fidelity(rows: list[dict], references: dict) -> None:
    """Merged rows without a fidelity (an interrupted run computes none; a row whose reference was measured
    in another run cannot have one) get the loss part against their reference's losses; the LoRA-update
    part needs both rows' tensors from one run."""
    by = {r["case"]: r for r in rows}
    for row in rows:
        ref = by.get(references.get(row["case"]) or "")
        if "fidelity" in row or ref is None or not row.get("losses") or not ref.get("losses"):
            continue
        row["fidelity"] = {"reference": ref["case"], **_loss_part(row, ref),
                           "note": "merged: loss only (the two rows come from different runs)"}


def _add_ratios(rows: list[dict]) -> None:
    by = {r["case"]: r for r in rows}
    inf = by.get("inference", {})
    for r in rows:
        if inf.get("peak_bytes") and r.get("peak_bytes") is not None:
            r["peak_vs_inference"] = r["peak_bytes"] / inf["peak_bytes"]
        same = by.get("inference" if r["dtype"] == "fp32" else f"inference_{r['dtype']}", {})
        if same.get("peak_bytes") and r.get("peak_bytes") is not None:
            r["peak_vs_inference_same_dtype"] = r["peak_bytes"] / same["peak_bytes"]
            r["peak_minus_inference_same_dtype_bytes"] = r["peak_bytes"] - same["peak_bytes"]
        if inf.get("flops"):
            r["flops_vs_inference"] = r["flops"]["step"] / inf["flops"]["step"]


def _memory_notes(rows: list[dict], device: str, settings: dict) -> list[str]:
    notes = []
    for r in rows:
        if r["buffer_dtype"] == "fp16" and r["kind"] == "hollowed":
            n, b = 200, settings["buffer_bytes_fp32"]
            notes.append(f"{r['case']}: one step holds one buffered state, so its peak cannot move; the buffer of "
                         f"{n} samples shrinks from {n * b / 1e6:.0f} MB to {n * b / 2e6:.0f} MB (hidden states only; "
                         "the device runtime streams it from disk)")
        if r["kind"] == "hollowed" and r.get("peak_vs_inference_same_dtype") is not None:
            d = r["peak_minus_inference_same_dtype_bytes"]
            notes.append(f"{r['case']}: training peak {'below' if d <= 0 else 'above'} {r['dtype']} inference "
                         f"by {abs(d) / GB:.3f} GB ({r['peak_vs_inference_same_dtype'] - 1:+.1%})")
        if r.get("error"):
            notes.append(f"{r['case']}: {r['error']}")
    if device == "cpu":
        notes.append("CPU peaks are process RSS (allocator and kernel workspaces included), not a GPU "
                     "allocator's tensor bytes; ratios are the comparable part")
    return notes


def memory_text(result: dict) -> str:
    scale, unit = _flops_unit(result["rows"])
    rows = []
    for r in result["rows"]:
        fid = r.get("fidelity", {})
        diff = []
        if "loss_rel_diff" in fid:
            diff.append(f"loss {fid['loss_rel_diff']:.1e}")
        if "update_rel_diff" in fid:
            diff.append(f"upd {fid['update_rel_diff']:.1e}")
        if "output_rel_diff" in fid:
            diff.append(f"out {fid['output_rel_diff']:.1e}")
        rows.append([r["case"], r["dtype"], _fmt_params(r.get("base_params", r.get("base_params_analytic"))),
                     _fmt_params(r.get("trainable_params", r.get("base_params_analytic")) if r["kind"] == "full_ft"
                                 else r.get("lora_params", r.get("lora_params_analytic", 0))),
                     _fmt_bytes(r.get("held_bytes")), _fmt_bytes(r.get("peak_bytes")),
                     _fmt_ratio(r.get("peak_vs_inference")), _fmt_ratio(r.get("peak_vs_inference_same_dtype")),
                     f"{r['flops']['forward'] / scale:.4f}", f"{r['flops']['step'] / scale:.4f}",
                     _fmt_ratio(r.get("flops_vs_inference")),
                     ", ".join(diff) or ("FAILED" if r.get("error") else "")])
    head = ["case", "dtype", "base params", "LoRA/train", "held GB", "peak GB", "vs inf", "vs inf(dtype)",
            f"fwd {unit}", f"step {unit}", "FLOPs vs inf", "diff vs fp32 ref"]
    s = result["settings"]
    inference_flops = next((r["flops"]["step"] for r in result["rows"] if r["case"] == "inference"), 0)
    text = [f"bench memory: {s['arch']} on {s['device']}, {s['resolution']} px, LoRA r={s['rank']}, depth "
            f"{s['depth']} ({s['hollowed_fraction']:.1%} hollowed)", settings_text(s), "",
            format_table(head, rows), "",
            f"dual-path inference FLOPs per denoising evaluation: {result['dual_path_flops'] / scale:.4f} {unit} "
            f"(full U-Net inference: {inference_flops / scale:.4f})"]
    text += ["notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(text)


def plot_memory(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["rows"] if r.get("peak_bytes") is not None or r.get("flops")]
    names = [r["case"] for r in rows]
    colors = ["tab:blue" if r["group"] == "paper" else "tab:orange" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2))
    peaks = [(r.get("peak_bytes") or 0) / GB for r in rows]
    a.barh(names, peaks, color=colors)
    inf = next((r for r in rows if r["case"] == "inference" and r.get("peak_bytes")), None)
    if inf:
        a.axvline(inf["peak_bytes"] / GB, color="k", ls="--", lw=1, label="inference fp32")
        a.legend(loc="upper right", fontsize=8)
    for i, r in enumerate(rows):
        if r.get("error"):
            a.text(0, i, "  not measured", va="center", fontsize=8)
        elif r.get("peak_bytes") is not None:
            ratio = r.get("peak_vs_inference_same_dtype")
            a.text(r["peak_bytes"] / GB, i, f" {r['peak_bytes'] / GB:.2f}" + (f" ({ratio:.2f}x)" if ratio else ""),
                   va="center", fontsize=8)
    a.set_xlabel("peak memory per step (GB); (x) = vs inference at the same precision")
    a.set_xlim(0, max(peaks + [0.001]) * 1.3)
    a.invert_yaxis()
    scale, unit = _flops_unit(rows)
    b.barh(names, [r["flops"]["step"] / scale for r in rows], color=colors)
    b.set_xlabel(f"FLOPs per step ({unit}; training: forward + backward)")
    b.invert_yaxis()
    s = result["settings"]
    save_figure(fig, path, f"{s['arch']} {s['device']} {s['resolution']}px r={s['rank']} depth {s['depth']} "
                           f"({s['hollowed_fraction']:.0%} hollowed), torch {s['torch']}, {s['date'][:10]}")
