"""The Hollowed/plain-LoRA peak ratio against image size: the floor under issue 13's 0.65 goal.

In:  an architecture (random weights), image sides, LoRA rank, hollow depth or fraction, steps, threads.
Out: per side one `ort.ort_bench` run of the rows `all_fp32` and `lora_all` (every lever: the bundle `build`
     writes and the plain-LoRA bundle, side by side, each in a fresh torch-free process) reduced to both
     whole-process peaks, their difference, their ratio, and the ratio of what each must hold whatever the
     activations, the floor: (W_h + S_h + R) / (W_l + S_l + R), where W = the bundle's `frozen_weights.bin`
     bytes (every kept weight is read in every step), S = 16 bytes per LoRA parameter (the parameter, its
     gradient buffer and AdamW's two moments, all held by ORT's training API) and R = the measuring process
     before it imports ONNX Runtime. A smaller image shrinks the activations, 4x per halving of the side,
     and nothing else. While the rest (activations, the sessions' graphs) is alike on both sides, as at sd21
     where the hollowed layers work at 8x8 latents, the measured ratio stays above the floor and falls
     towards it; at tiny, whose hollowed layers hold a larger share of the activations, it can fall below.
     The result as JSON (every run's rows included), a text table and a PNG; the sides already measured
     are kept in `<stem>.partial.json` and a rerun with the same settings resumes after them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import store
from ..bundle import FROZEN_WEIGHTS
from .cases import BenchError, bench_plan
from .measure import GB, default_threads, settings_block
from .ort import ort_bench
from .report import _pyplot, format_table, save_figure, settings_text, write_outputs

ROWS = ("all_fp32", "lora_all")
STATE_BYTES = 16  # per LoRA parameter: fp32 parameter, gradient buffer, AdamW's first and second moments
RESUME_KEYS = ("arch", "rank", "depth", "steps", "threads", "onnxruntime")


def floor_side(side: int, run: dict, lora_hollowed: int, lora_full: int) -> dict:
    """One side's figures from its `ort_bench` result `run`."""
    by = {r["name"]: r for r in run["rows"]}
    failed = [f"{n}: {by[n]['error']}" for n in ROWS if "error" in by[n]]
    if failed:
        raise BenchError(f"{side} px: " + "; ".join(failed))
    hollowed, lora = by["all_fp32"], by["lora_all"]
    runtime = min(hollowed["baseline_rss_bytes"], lora["baseline_rss_bytes"])
    floor_h = hollowed["files_bytes"][FROZEN_WEIGHTS] + STATE_BYTES * lora_hollowed + runtime
    floor_l = lora["files_bytes"][FROZEN_WEIGHTS] + STATE_BYTES * lora_full + runtime
    return {"resolution": side, "hollowed_peak_bytes": hollowed["peak_rss_bytes"],
            "lora_peak_bytes": lora["peak_rss_bytes"],
            "saved_bytes": lora["peak_rss_bytes"] - hollowed["peak_rss_bytes"],
            "ratio": hollowed["peak_rss_bytes"] / lora["peak_rss_bytes"],
            "floor_hollowed_bytes": floor_h, "floor_lora_bytes": floor_l, "floor_ratio": floor_h / floor_l,
            "hollowed_step_seconds": hollowed["median_step_seconds"],
            "lora_step_seconds": lora["median_step_seconds"], "rows": run["rows"]}


def _resumed(partial: Path | None, settings: dict, log) -> dict:
    """The sides a `<stem>.partial.json` of the same settings holds, by side."""
    if partial is None or not partial.exists():
        return {}
    found = json.loads(partial.read_text())
    if not all(found["settings"].get(k) == settings[k] for k in RESUME_KEYS):
        log(f"{partial} was measured with other settings: measuring every side again")
        return {}
    log(f"resuming: {', '.join(f'{s} px' for s in found['sides'])} kept from {partial}")
    return found["sides"]


def floor_bench(arch: str = "tiny", resolutions: tuple = (64, 128, 256, 512), rank: int = 128,
                fraction: float | None = 0.4, depth: int | None = None, steps: int = 4, threads: int | None = None,
                out: Path | None = None, workdir: Path | None = None, timeout: float | None = None,
                log=print) -> dict:
    """Measure `ROWS` at every side in `resolutions` (one `ort_bench` run each) and the floor (module doc)."""
    if not resolutions:
        raise BenchError("--resolutions: give at least one image side, e.g. 64,128,256,512")
    import onnxruntime

    from ..hollow.plan import LoraSpec, lora_param_count, select_lora_targets
    from ..models.load import load_unet
    threads = default_threads(threads)
    unet_meta = load_unet(arch=arch, meta=True)
    plan = bench_plan(unet_meta, rank, fraction, depth, None)
    for side in resolutions:  # every side checked before the first is measured
        bench_plan(unet_meta, rank, None, plan.depth, side)
    lora_full = lora_param_count(unet_meta, select_lora_targets(unet_meta, LoraSpec(rank=rank)), rank)
    settings = settings_block(arch=arch, resolutions=list(resolutions), rank=rank, depth=plan.depth,
                              hollowed_fraction=plan.hollowed_fraction, steps=steps, threads=threads,
                              onnxruntime=onnxruntime.__version__, lora_params_hollowed=plan.lora_params,
                              lora_params_full=lora_full, rows=list(ROWS))
    stem = f"ort_floor_{arch}_r{rank}_k{plan.depth}"
    partial = None if out is None else Path(out) / f"{stem}.partial.json"
    sides = _resumed(partial, settings, log)
    for side in resolutions:
        if str(side) in sides:
            continue
        log(f"[{side} px] {', '.join(ROWS)} ...")
        run = ort_bench(arch=arch, resolution=side, rank=rank, fraction=None, depth=plan.depth, steps=steps,
                        threads=threads, workdir=workdir, timeout=timeout, kinds=ROWS, log=log)
        sides[str(side)] = floor_side(side, run, plan.lora_params, lora_full)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            store.write_json(partial, {"settings": settings, "sides": sides})
    result = {"kind": "ort_floor", "settings": settings, "sides": [sides[str(s)] for s in resolutions],
              "method": "one `bench ort --rows all_fp32,lora_all` run per side (see its method); floor = "
                        "(frozen_weights.bin bytes + 16 B per LoRA parameter + the measuring process's RSS before "
                        "ONNX Runtime is imported), Hollowed over plain LoRA"}
    if out is not None:
        write_outputs(result, Path(out), stem, plot_floor)
        partial.unlink(missing_ok=True)
    return result


def floor_text(result: dict) -> str:
    s = result["settings"]
    rows = [[f"{d['resolution']} px", f"{d['hollowed_peak_bytes'] / GB:.3f}", f"{d['lora_peak_bytes'] / GB:.3f}",
             f"{d['saved_bytes'] / GB:.3f}", f"{d['ratio']:.3f}", f"{d['floor_ratio']:.3f}",
             f"{d['hollowed_step_seconds']:.2f} / {d['lora_step_seconds']:.2f}"] for d in result["sides"]]
    head = ["image", "Hollowed peak GB", "plain LoRA peak GB", "LoRA - Hollowed GB", "Hollowed / LoRA",
            "floor (W+S+R)", "median step s (H / L)"]
    return "\n".join([f"bench floor: {s['arch']}, LoRA r={s['rank']}, depth {s['depth']} "
                      f"({s['hollowed_fraction']:.1%} hollowed), rows {', '.join(s['rows'])}", settings_text(s), "",
                      format_table(head, rows)])


def plot_floor(result: dict, path: Path) -> None:
    plt = _pyplot()
    sides = result["sides"]
    x = [d["resolution"] for d in sides]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [d["lora_peak_bytes"] / GB for d in sides], "o-", label="plain LoRA, every lever")
    a.plot(x, [d["hollowed_peak_bytes"] / GB for d in sides], "o-", label="Hollowed Net, every lever")
    a.plot(x, [d["floor_lora_bytes"] / GB for d in sides], "--", color="C0", label="LoRA: weights + state + runtime")
    a.plot(x, [d["floor_hollowed_bytes"] / GB for d in sides], "--", color="C1",
           label="Hollowed: weights + state + runtime")
    a.set_ylabel("whole-process peak RSS (GB)")
    b.plot(x, [d["ratio"] for d in sides], "o-", color="C2", label="measured")
    b.plot(x, [d["floor_ratio"] for d in sides], "--", color="C2", label="floor: weights + state + runtime")
    b.set_ylabel("Hollowed / plain-LoRA peak")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(s) for s in x])
        ax.set_xlabel("image side (px)")
        ax.legend(fontsize=8)
    s = result["settings"]
    save_figure(fig, path, f"ORT {s['onnxruntime']}: {s['arch']} r={s['rank']} depth {s['depth']} "
                           f"({s['hollowed_fraction']:.1%} hollowed), {s['date'][:10]}")
