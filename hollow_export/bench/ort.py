"""`bench ort`: ORT training of the Hollowed Net bundle vs a plain-LoRA bundle vs ORT U-Net inference.

In:  an architecture, resolution, rank, fraction or depth, steps, engines.
Out: `ort_bench(...)` -> a result (one row per engine: build time and peak, disk, RSS loaded,
     peak RSS, median step; ratios), written with its PNG; `ort_text(result)` renders it. Each
     folder is built in its own child process and measured in a fresh torch-free one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..rss import max_rss_bytes, peak_rss_bytes, rss_bytes
from .cases import TOKENS, BenchError, bench_plan
from .measure import GB, default_threads, run_child, settings_block
from .report import _fmt_bytes, _pyplot, format_table, save_figure, settings_text, write_outputs


def child_ort_build(spec: dict) -> dict:
    """In the child: write one ORT folder (hollowed bundle, plain-LoRA artifacts or U-Net inference graph)."""
    import torch
    torch.set_num_threads(spec["threads"])
    from ..export.build import BuildSettings, build
    from ..export.lora_baseline import FULL_UNET_INPUTS, FullUNet, full_unet_args, plain_lora_artifacts
    from ..export.onnx import export_inference
    from ..models.load import BENCH_SOURCE, bench_pipeline, load_unet

    started = time.time()
    out = Path(spec["out"])
    kind = spec["kind"]
    if kind == "hollowed":
        pipe = bench_pipeline(spec["arch"])
        plan = bench_plan(pipe.unet, **spec["plan"])
        build(pipe, plan, out, "a sks dog", "a dog", BuildSettings(), {"source": BENCH_SOURCE + spec["arch"]})
    else:
        unet = load_unet(arch=spec["arch"])
        plan = bench_plan(unet, **spec["plan"])
        out.mkdir(parents=True, exist_ok=True)
        if kind == "lora":
            plain_lora_artifacts(unet, plan, out, BuildSettings())
        else:
            export_inference(FullUNet(unet), full_unet_args(plan, with_target=False), out / "unet.onnx",
                             list(FULL_UNET_INPUTS), ["out_sample"], None)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"build_seconds": time.time() - started, "build_peak_rss_bytes": peak_rss_bytes(), "disk_bytes": size}


def _ort_inputs(names: list[str], shapes: dict, seed: int):
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        if name == "timestep":
            out.append(np.array([int(rng.integers(0, 1000))], dtype=np.int64))
        else:
            out.append(rng.standard_normal([1, *shapes[name]]).astype(np.float32))
    return out


def child_ort_measure(spec: dict) -> dict:
    """In the child (no torch): ORT training steps or inference runs; RSS and median step time."""
    import numpy as np

    from .. import bundle as fmt
    from ..device.ort_session import inference_session, session_options, training_api
    baseline = rss_bytes()
    folder = Path(spec["folder"])
    options = session_options(spec["threads"])
    times = []
    started = time.time()
    if spec["kind"] in ("hollowed", "lora"):
        api = training_api()
        state = api.CheckpointState.load_checkpoint(str(folder / fmt.CHECKPOINT))
        module = api.Module(str(folder / fmt.TRAINING_MODEL), state, str(folder / fmt.EVAL_MODEL),
                            session_options=options)
        optimizer = api.Optimizer(str(folder / fmt.OPTIMIZER_MODEL), module)
        optimizer.set_learning_rate(1e-4)
        module.train()
        names = module.input_names()
        load_seconds = time.time() - started
        held = rss_bytes()
        losses = []
        for i in range(spec["steps"]):
            inputs = _ort_inputs(names, spec["shapes"], i)
            t0 = time.time()
            losses.append(float(module(*inputs)))
            optimizer.step()
            module.lazy_reset_grad()
            times.append(time.time() - t0)
        extra = {"losses": losses, "inputs": names}
    else:
        session = inference_session(folder / "unet.onnx", spec["threads"])
        names = [i.name for i in session.get_inputs()]
        load_seconds = time.time() - started
        held = rss_bytes()
        for i in range(spec["steps"]):
            feed = dict(zip(names, _ort_inputs(names, spec["shapes"], i)))
            t0 = time.time()
            session.run(None, feed)
            times.append(time.time() - t0)
        extra = {"inputs": names}
    measured = times[1:] if len(times) > 1 else times
    return {"baseline_rss_bytes": baseline, "held_rss_bytes": held,
            "peak_rss_bytes": peak_rss_bytes(),  # VmHWM: this image only
            "ru_maxrss_bytes": max_rss_bytes(),
            "median_step_seconds": float(np.median(measured)), "step_seconds": times,
            "load_seconds": load_seconds, "torch_loaded": sys.modules.get("torch") is not None, **extra}


def ort_bench(arch: str = "tiny", resolution: int | None = None, rank: int = 128, fraction: float | None = 0.4,
              depth: int | None = None, steps: int = 5, threads: int | None = None, out: Path | None = None,
              workdir: Path | None = None, timeout: float | None = None, kinds: tuple = ("hollowed", "lora",
                                                                                          "inference"),
              log=print) -> dict:
    """ORT training steps of the Hollowed Net bundle vs a plain-LoRA bundle vs ORT U-Net inference."""
    if steps < 2:
        raise BenchError("--steps must be at least 2 (the first run is a warm-up, not timed in the median)")
    from ..models.load import load_unet
    threads = default_threads(threads)
    unet_meta = load_unet(arch=arch, meta=True)
    plan = bench_plan(unet_meta, rank, fraction, depth, resolution)
    plan_args = {"rank": rank, "fraction": None, "depth": plan.depth, "resolution": plan.resolution}
    shapes = {"sample": plan.latent_shape, "target": plan.latent_shape, "encoder_hidden_states": plan.encoder_shape,
              "hidden": plan.buffer_shape}
    import onnxruntime
    settings = settings_block(arch=arch, device="cpu (ONNX Runtime CPUExecutionProvider)",
                              onnxruntime=onnxruntime.__version__, resolution=plan.resolution, rank=rank,
                              depth=plan.depth, hollowed_fraction=plan.hollowed_fraction, dtype="fp32", batch=1,
                              tokens=TOKENS, steps=steps, threads=threads, unet_params=plan.unet_params,
                              kept_params=plan.kept_params, lora_params_hollowed=plan.lora_params)
    labels = {"hollowed": "Hollowed Net training (bundle)", "lora": "plain LoRA training (full U-Net)",
              "inference": "U-Net inference (InferenceSession)"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hollow-ort-", dir=workdir) as tmp:
        for kind in kinds:
            row = {"kind": kind, "label": labels[kind]}
            folder = Path(tmp) / kind
            log(f"[{kind}] building in a fresh process ...")
            built = run_child({"job": "ort_build", "kind": kind, "arch": arch, "plan": plan_args, "out": str(folder),
                               "threads": threads}, timeout)
            row.update(built)
            if "error" not in built:
                log(f"[{kind}] built in {built['build_seconds']:.0f} s, peak RSS {built['build_peak_rss_bytes'] / GB:.2f}"
                    f" GB, {built['disk_bytes'] / GB:.2f} GB on disk; measuring in a fresh process ...")
                measured = run_child({"job": "ort_measure", "kind": kind, "folder": str(folder), "steps": steps,
                                      "shapes": shapes, "threads": threads}, timeout)
                if "error" in measured:
                    row["error"] = "measure: " + measured["error"]
                else:
                    row.update(measured)
                    log(f"[{kind}] peak RSS {measured['peak_rss_bytes'] / GB:.3f} GB, median step "
                        f"{measured['median_step_seconds']:.3f} s")
            else:
                row["error"] = "build: " + built["error"]
                log(f"[{kind}] {row['error']}")
            shutil.rmtree(folder, ignore_errors=True)
            rows.append(row)
    by = {r["kind"]: r for r in rows}
    ratios = {}
    for a, b in (("hollowed", "lora"), ("hollowed", "inference"), ("lora", "inference")):
        if "peak_rss_bytes" in by.get(a, {}) and "peak_rss_bytes" in by.get(b, {}):
            ratios[f"{a}/{b}"] = {"peak_rss": by[a]["peak_rss_bytes"] / by[b]["peak_rss_bytes"],
                                  "peak_rss_over_baseline": (by[a]["peak_rss_bytes"] - by[a]["baseline_rss_bytes"])
                                  / (by[b]["peak_rss_bytes"] - by[b]["baseline_rss_bytes"]),
                                  "median_step_time": by[a]["median_step_seconds"] / by[b]["median_step_seconds"]}
    result = {"kind": "ort", "settings": settings, "rows": rows, "ratios": ratios,
              "method": "each bundle built in its own subprocess (export.build.build / "
                        "export.lora_baseline.plain_lora_artifacts / export.onnx.export_inference), then measured in a fresh torch-free subprocess: peak RSS = "
                        "that child's VmHWM over its whole life (session creation included; getrusage's "
                        "ru_maxrss is recorded too but on Linux it keeps the pre-exec parent's peak, so it "
                        "cannot go below the launching Python's RSS), held = RSS after the sessions are "
                        "created, median over steps 2..N (step 1 is a warm-up); random inputs"}
    if out is not None:
        write_outputs(result, Path(out), f"ort_{arch}_{plan.resolution}px_r{rank}_k{plan.depth}", plot_ort)
    return result


def ort_text(result: dict) -> str:
    s = result["settings"]
    rows = []
    for r in result["rows"]:
        rows.append([r["kind"], f"{r['build_seconds']:.0f}" if "build_seconds" in r else "-",
                     _fmt_bytes(r.get("build_peak_rss_bytes")), _fmt_bytes(r.get("disk_bytes")),
                     _fmt_bytes(r.get("held_rss_bytes")), _fmt_bytes(r.get("peak_rss_bytes")),
                     "-" if "median_step_seconds" not in r else f"{r['median_step_seconds']:.3f}",
                     r.get("error", "")])
    head = ["engine", "build s", "build peak GB", "disk GB", "RSS loaded GB", "peak RSS GB", "median step s", "error"]
    ratio_rows = [[k, f"{v['peak_rss']:.2f}x", f"{v['peak_rss_over_baseline']:.2f}x", f"{v['median_step_time']:.2f}x"]
                  for k, v in result["ratios"].items()]
    return "\n".join([f"bench ort: {s['arch']}, {s['resolution']} px, LoRA r={s['rank']}, depth {s['depth']} "
                      f"({s['hollowed_fraction']:.1%} hollowed), ORT {s['onnxruntime']}", settings_text(s), "",
                      format_table(head, rows), "",
                      format_table(["ratio", "peak RSS", "peak RSS over baseline", "median step time"], ratio_rows)])


def plot_ort(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["rows"] if "peak_rss_bytes" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["kind"] for r in rows]
    a.bar(names, [r["peak_rss_bytes"] / GB for r in rows], label="peak RSS")
    a.bar(names, [r["held_rss_bytes"] / GB for r in rows], alpha=0.6, label="RSS after load")
    a.set_ylabel("GB")
    a.legend(fontsize=8)
    b.bar(names, [r["median_step_seconds"] for r in rows])
    b.set_ylabel("median step / run (s)")
    s = result["settings"]
    fig.suptitle(f"ORT {s['onnxruntime']}: {s['arch']} {s['resolution']}px r={s['rank']} depth {s['depth']} "
                 f"({s['date'][:10]})")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
