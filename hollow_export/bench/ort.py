"""`bench ort`: ORT training bundles (Hollowed Net, plain LoRA) and ORT U-Net inference, row by row.

In:  an architecture, resolution, rank, fraction or depth, steps, and the rows to measure (`ROWS`: the
     three engines as `build` writes and `device train` runs them, or the issue-13 lever ablation
     `ABLATION`: every engine lever alone and all together, plain LoRA and inference beside them).
Out: `ort_bench(...)` -> a result (one row per name: build time and peak, bundle and checkpoint bytes,
     RSS loaded, whole-process and step peaks, median step, loss and LoRA-update difference against
     the baseline of its kind; ratios), written with its PNG; `ort_text(result)` renders it. Each
     folder is built once in its own child process (rows with the same build share it) and every
     row is measured in a fresh torch-free one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import bundle as fmt
from .. import store
from ..rss import max_rss_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from .cases import TOKENS, BenchError, bench_plan
from .measure import GB, default_threads, run_child, settings_block
from .report import _fmt_bytes, _pyplot, earlier_result, format_table, save_figure, settings_text, write_outputs

# build levers (export.ort_training.EngineLevers, fields of BuildSettings) and session settings (as a
# manifest's `training_session` names them, bundle.training_session: the bundle's own)
LEVERS_OFF = {"attention_chunk": None, "recompute_attention": False, "recompute_units": False,
              "frozen_external": False, "frozen_dtype": "float32", "unknown_batch": False}
ALL_FP32 = {"attention_chunk": 512, "recompute_attention": True, "recompute_units": True, "frozen_external": True,
            "frozen_dtype": "float32", "unknown_batch": True}
ALL_FP16 = {**ALL_FP32, "frozen_dtype": "float16"}
ORT_DEFAULT = {"enable_cpu_mem_arena": True, "enable_mem_pattern": True, "config_entries": {}, "eval_session": True}
TRAINING_SESSION = fmt.training_session()
STATIC_BATCH_SESSION = fmt.training_session(unknown_batch=False)  # the bundle's session for a static-batch graph
# frozen weights as initializers need ConstantFolding and NchwcTransformer off, or ORT copies them at load
TRANSFORMERS_OFF = {**ORT_DEFAULT, "config_entries": TRAINING_SESSION["config_entries"]}


@dataclass(frozen=True)
class Row:
    """One measured row: which folder (kind + build levers; None = BuildSettings' defaults) and how it is run."""

    kind: str  # hollowed | lora | inference
    label: str
    build: dict | None = None
    session: dict = field(default_factory=lambda: dict(ORT_DEFAULT))  # eval_session: the Module also creates it
    baseline: str | None = None  # the row its loss / LoRA update / output is compared with

    def build_key(self) -> tuple:
        return (self.kind, None if self.build is None else tuple(sorted(self.build.items())))


ROWS = {
    # the three engines as `build` writes them today and `device train` runs them
    "hollowed": Row("hollowed", "Hollowed Net training (bundle as built, device session)", None, TRAINING_SESSION),
    "lora": Row("lora", "plain LoRA training (full U-Net, same levers)", None, TRAINING_SESSION),
    "inference": Row("inference", "U-Net inference (InferenceSession, ORT defaults)"),
    # the issue-13 ablation
    "baseline": Row("hollowed", "Hollowed, no lever, ORT default session + eval session", LEVERS_OFF),
    "session": Row("hollowed", "+ the bundle's session settings (CPU arena off, no eval session)", LEVERS_OFF,
                   STATIC_BATCH_SESSION, "baseline"),
    "unknown_batch": Row("hollowed", "+ unknown batch dimension (each activation freed at its last use; arena on)",
                         {**LEVERS_OFF, "unknown_batch": True}, baseline="baseline"),
    "recompute": Row("hollowed", "+ softmax recomputed in the backward", {**LEVERS_OFF, "recompute_attention": True},
                     baseline="baseline"),
    "recompute_chunk": Row("hollowed", "+ recompute + query-chunked attention (512)",
                           {**LEVERS_OFF, "recompute_attention": True, "attention_chunk": 512}, baseline="baseline"),
    "recompute_units": Row("hollowed", "+ each unit's activations recomputed in the backward",
                           {**LEVERS_OFF, "recompute_units": True}, baseline="baseline"),
    "frozen_external": Row("hollowed", "+ frozen weights in one external file, LoRA-only checkpoint (folding, "
                           "NCHWc off)", {**LEVERS_OFF, "frozen_external": True}, TRANSFORMERS_OFF, "baseline"),
    "frozen_fp16": Row("hollowed", "+ frozen weights fp16 in the external file (folding, NCHWc off)",
                       {**LEVERS_OFF, "frozen_external": True, "frozen_dtype": "float16"}, TRANSFORMERS_OFF,
                       "baseline"),
    "all_fp32": Row("hollowed", "all levers, fp32 frozen", ALL_FP32, TRAINING_SESSION, "baseline"),
    "all_fp16": Row("hollowed", "all levers, fp16 frozen", ALL_FP16, TRAINING_SESSION, "baseline"),
    "all_fp16_arena_off": Row("hollowed", "all levers, fp16 frozen, CPU arena off", ALL_FP16,
                              {**TRAINING_SESSION, "enable_cpu_mem_arena": False}, "baseline"),
    "all_but_units": Row("hollowed", "all levers but unit recompute, fp32 frozen",
                         {**ALL_FP32, "recompute_units": False}, TRAINING_SESSION, "baseline"),
    "all_top2_units": Row("hollowed", "all levers, units recomputed at the 2 highest resolutions only, fp32 frozen",
                          {**ALL_FP32, "recompute_levels": 2}, TRAINING_SESSION, "baseline"),
    "all_whole_units": Row("hollowed", "all levers, unit copies recompute every activation (no kept boundaries: "
                           "self-attention and resnet outputs recomputed too), fp32 frozen",
                           {**ALL_FP32, "unit_boundaries": False}, TRAINING_SESSION, "baseline"),
    "all_chunk1024": Row("hollowed", "all levers, attention chunks of 1024 query tokens, fp32 frozen",
                         {**ALL_FP32, "attention_chunk": 1024}, TRAINING_SESSION, "baseline"),
    "all_unchunked": Row("hollowed", "all levers, attention not chunked, fp32 frozen",
                         {**ALL_FP32, "attention_chunk": None}, TRAINING_SESSION, "baseline"),
    "all_but_batch": Row("hollowed", "all levers but the unknown batch (static shapes, arena off), fp32 frozen",
                         {**ALL_FP32, "unknown_batch": False}, STATIC_BATCH_SESSION, "baseline"),
    "lora_baseline": Row("lora", "plain LoRA, no lever, ORT default session + eval session", LEVERS_OFF),
    "lora_all": Row("lora", "plain LoRA, all levers, fp32 frozen", ALL_FP32, TRAINING_SESSION, "lora_baseline"),
    "lora_all_fp16": Row("lora", "plain LoRA, all levers, fp16 frozen", ALL_FP16, TRAINING_SESSION,
                         "lora_baseline"),
    "inference_default": Row("inference", "U-Net inference, ORT default session"),
    "inference_best": Row("inference", "U-Net inference, CPU arena off",
                          session={**ORT_DEFAULT, "enable_cpu_mem_arena": False}, baseline="inference_default"),
    "inference_lean": Row("inference", "U-Net inference, CPU arena and memory pattern off",
                          session={**ORT_DEFAULT, "enable_cpu_mem_arena": False, "enable_mem_pattern": False},
                          baseline="inference_default"),
    "inference_bundle_session": Row("inference", "U-Net inference, the static-batch bundle's session (arena, "
                                    "folding, NCHWc off)", session=STATIC_BATCH_SESSION, baseline="inference_default"),
    "inference_unknown_batch": Row("inference", "U-Net inference, unknown batch dimension (batch_dim.py), ORT "
                                   "default session", {"unknown_batch": True}, baseline="inference_default"),
    "inference_unknown_batch_session": Row("inference", "U-Net inference, unknown batch dimension, the bundle's "
                                           "session (arena on, folding, NCHWc and planner reuse off)",
                                           {"unknown_batch": True}, TRAINING_SESSION, "inference_default"),
}
DEFAULT_ROWS = ("hollowed", "lora", "inference")
ABLATION = ("baseline", "session", "recompute", "recompute_chunk", "recompute_units", "frozen_external",
            "frozen_fp16", "unknown_batch", "all_but_units", "all_whole_units", "all_but_batch", "all_fp32", "all_fp16",
            "lora_baseline", "lora_all", "lora_all_fp16", "inference_default", "inference_best", "inference_lean",
            "inference_bundle_session", "inference_unknown_batch", "inference_unknown_batch_session")
INFERENCE_ROWS = ("inference", "inference_default", "inference_best", "inference_lean", "inference_bundle_session",
                  "inference_unknown_batch", "inference_unknown_batch_session")


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
    settings = BuildSettings(**(spec.get("build") or {}))
    if kind == "hollowed":
        pipe = bench_pipeline(spec["arch"])
        plan = bench_plan(pipe.unet, **spec["plan"])
        build(pipe, plan, out, "a sks dog", "a dog", settings, {"source": BENCH_SOURCE + spec["arch"]},
              release=True)
    else:
        unet = load_unet(arch=spec["arch"])
        plan = bench_plan(unet, **spec["plan"])
        out.mkdir(parents=True, exist_ok=True)
        if kind == "lora":
            plain_lora_artifacts(unet, plan, out, settings)
        else:
            export_inference(FullUNet(unet), full_unet_args(plan, with_target=False), out / "unet.onnx",
                             list(FULL_UNET_INPUTS), ["out_sample"], None)
            if (spec.get("build") or {}).get("unknown_batch"):
                _unknown_batch_in_place(out / "unet.onnx", list(FULL_UNET_INPUTS))
    return {"build_seconds": time.time() - started, "build_peak_rss_bytes": peak_rss_bytes(),
            **folder_bytes(out)}


def _unknown_batch_in_place(path: Path, inputs: list[str]) -> None:
    import onnx

    from ..export.batch_dim import unknown_batch
    model = onnx.load(str(path), load_external_data=False)  # the weights stay in their data file
    unknown_batch(model, inputs)
    onnx.save(model, str(path))


def folder_bytes(folder: Path) -> dict:
    """Bytes on disk of the whole folder and of its checkpoint (`checkpoint` plus its `.data`, if any)."""
    files = {f.name: f.stat().st_size for f in folder.rglob("*") if f.is_file()}
    checkpoint = [n for n in files if n == fmt.CHECKPOINT or n.startswith(fmt.CHECKPOINT + ".")]
    return {"disk_bytes": sum(files.values()), "files_bytes": files,
            "checkpoint_bytes": sum(files[n] for n in checkpoint) if checkpoint else None}


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


def _lora(state) -> dict:
    import numpy as np
    return {name: np.array(p.data, dtype=np.float32) for name, p in state.parameters if p.requires_grad}


def child_ort_measure(spec: dict) -> dict:
    """In the child (no torch): ORT training steps or inference runs; load, whole and step peaks, step time."""
    import numpy as np

    from ..device.ort_session import inference_session, training_api, training_module, training_options
    baseline = rss_bytes()
    folder = Path(spec["folder"])
    times, out = [], None
    started = time.time()
    if spec["kind"] in ("hollowed", "lora"):
        api = training_api()
        state = api.CheckpointState.load_checkpoint(str(folder / fmt.CHECKPOINT))
        module, optimizer = training_module(folder, state, spec["session"], spec["threads"])
        optimizer.set_learning_rate(1e-4)
        module.train()
        names = module.input_names()
        run = _training_step(module, optimizer)
    else:
        options = training_options(spec["session"], spec["threads"])  # the device's factory, the row's settings
        session = inference_session(folder / "unet.onnx", options=options)
        names = [i.name for i in session.get_inputs()]

        def run(inputs):
            return session.run(None, dict(zip(names, inputs)))[0]
    load_seconds = time.time() - started
    held = rss_bytes()
    load_peak = peak_rss_bytes()
    can_reset = reset_peak_rss()  # from here VmHWM is the steps' peak
    results = []
    for i in range(spec["steps"]):
        inputs = _ort_inputs(names, spec["shapes"], i)
        t0 = time.time()
        out = run(inputs)
        times.append(time.time() - t0)
        results.append(float(out) if spec["kind"] != "inference" else None)
    step_peak = peak_rss_bytes() if can_reset else None
    measured = times[1:] if len(times) > 1 else times
    row = {"baseline_rss_bytes": baseline, "held_rss_bytes": held, "load_peak_rss_bytes": load_peak,
           "step_peak_rss_bytes": step_peak,
           "peak_rss_bytes": max(load_peak, peak_rss_bytes()),  # VmHWM over this image's whole life
           "ru_maxrss_bytes": max_rss_bytes(),
           "median_step_seconds": float(np.median(measured)), "step_seconds": times,
           "load_seconds": load_seconds, "torch_loaded": sys.modules.get("torch") is not None, "inputs": names}
    if spec["kind"] != "inference":
        row["losses"] = results
    if spec.get("dump"):  # after every peak is read: LoRA after the steps and as the checkpoint holds it
        if spec["kind"] == "inference":
            np.savez(spec["dump"], output=out)
        else:
            initial = api.CheckpointState.load_checkpoint(str(folder / fmt.CHECKPOINT))
            np.savez(spec["dump"], **{"after/" + k: v for k, v in _lora(state).items()},
                     **{"before/" + k: v for k, v in _lora(initial).items()})
    return row


def _training_step(module, optimizer):
    def run(inputs):
        loss = module(*inputs)
        optimizer.step()
        module.lazy_reset_grad()
        return loss
    return run


def compare(dump, reference) -> dict:
    """Relative differences of one row's dump against its baseline's, as `bench memory` takes them.

    Training: the LoRA update (after - before, all tensors as one vector) ||d_row - d_ref|| / ||d_ref||;
    inference: the output, ||out_row - out_ref|| / ||out_ref||.
    """
    import numpy as np
    a, b = np.load(dump), np.load(reference)
    if "output" in a.files:
        ref = b["output"].astype(np.float64)
        return {"output_rel_diff": float(np.linalg.norm(a["output"] - ref) / np.linalg.norm(ref))}
    names = sorted(k[len("after/"):] for k in a.files if k.startswith("after/"))
    if names != sorted(k[len("after/"):] for k in b.files if k.startswith("after/")):
        return {"lora_update_rel_diff": None, "note": "LoRA names differ from the baseline's"}
    diff = norm = 0.0
    for n in names:
        da = a["after/" + n].astype(np.float64) - a["before/" + n]
        db = b["after/" + n].astype(np.float64) - b["before/" + n]
        diff, norm = diff + float(np.square(da - db).sum()), norm + float(np.square(db).sum())
    return {"lora_update_rel_diff": (diff / norm) ** 0.5 if norm else None, "lora_tensors": len(names)}


def loss_diff(row: dict, reference: dict) -> float | None:
    """max over steps of |loss_row - loss_ref| / |loss_ref|."""
    a, b = row.get("losses"), reference.get("losses")
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _check_rows(rows) -> tuple:
    rows = tuple(rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise BenchError(f"unknown --rows {', '.join(unknown) or '(none)'}; choose from {', '.join(ROWS)} "
                         f"or 'ablation'")
    return rows


def _measure_rows(names, case: dict, timeout, workdir, partial, log, rounds: int = 1) -> dict:
    """Build each distinct folder once (rows grouped by build), measure every row in a fresh process and
    compare it with its baseline; {name: row}. `case`: arch, plan (bench_plan's arguments), shapes, steps,
    threads; `partial`: (path, settings) to save the rows measured so far, or None. `rounds` > 1: every
    folder is built first and kept, then the rows are measured round-robin (A B C, A B C, ...), so a slow
    spell of the machine falls on every row alike; a row's step time is the median of its rounds' medians,
    its peaks the highest of its rounds'."""
    order = sorted(names, key=lambda n: [ROWS[m].build_key() for m in names].index(ROWS[n].build_key()))
    measured = {}
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hollow-ort-", dir=workdir) as tmp:
        builds, dumps = {}, {}
        if rounds > 1:  # every folder first, kept: no build runs between two measures
            for name in order:
                key = ROWS[name].build_key()
                if key not in builds:
                    builds[key] = _build_folder(name, ROWS[name], case, Path(tmp) / f"build{len(builds)}",
                                                timeout, log)
        for r in range(rounds):
            for name in order:
                spec = ROWS[name]
                key = spec.build_key()
                if key not in builds:
                    for done in builds.values():  # one build on disk at a time: the rows sharing it are done
                        shutil.rmtree(done["folder"], ignore_errors=True)
                    builds[key] = _build_folder(name, spec, case, Path(tmp) / f"build{len(builds)}", timeout, log)
                built = builds[key]
                if r == 0:
                    measured[name] = {"name": name, "kind": spec.kind, "label": spec.label, "build": spec.build,
                                      "session": spec.session, "baseline": spec.baseline,
                                      **{k: v for k, v in built.items() if k != "folder"}}
                    if "error" in built:
                        measured[name]["error"] = "build: " + built["error"]
                        log(f"[{name}] {measured[name]['error']}")
                row = measured[name]
                if "error" in row:
                    continue
                log(f"[{name}] measuring in a fresh process" + (f" (round {r + 1} of {rounds})" if rounds > 1 else "")
                    + " ...")
                dumps[name] = Path(tmp) / f"{name}.npz"
                got = run_child({"job": "ort_measure", "kind": spec.kind, "folder": built["folder"],
                                 "steps": case["steps"], "shapes": case["shapes"], "threads": case["threads"],
                                 "session": spec.session, "dump": str(dumps[name])}, timeout)
                if "error" in got:
                    row["error"] = "measure: " + got["error"]
                    log(f"[{name}] {row['error']}")
                else:
                    _add_round(row, got, rounds)
                    log(f"[{name}] peak RSS {got['peak_rss_bytes'] / GB:.3f} GB (steps "
                        f"{_fmt_bytes(got['step_peak_rss_bytes'])}), median step {got['median_step_seconds']:.3f} s")
                if partial is not None:  # what is measured so far survives an interrupted run
                    store.write_json(partial[0], {"kind": "ort", "partial": True, "settings": partial[1],
                                                  "rows": list(measured.values())})
        for name, row in measured.items():
            ref = measured.get(row["baseline"] or "")
            if ref is not None and "error" not in row and "error" not in ref:
                row["loss_rel_diff"] = loss_diff(row, ref)
                row.update(compare(dumps[name], dumps[ref["name"]]))
    return measured


def _build_folder(name: str, spec: Row, case: dict, folder: Path, timeout, log) -> dict:
    """One row's folder, built in a fresh process; the child's result (+ "folder")."""
    log(f"[{name}] building {spec.kind} {spec.build or 'defaults'} in a fresh process ...")
    built = run_child({"job": "ort_build", "kind": spec.kind, "arch": case["arch"], "plan": case["plan"],
                       "out": str(folder), "threads": case["threads"], "build": spec.build}, timeout)
    built["folder"] = str(folder)
    if "error" not in built:
        log(f"[{name}] built in {built['build_seconds']:.0f} s, peak RSS "
            f"{built['build_peak_rss_bytes'] / GB:.2f} GB, {built['disk_bytes'] / GB:.3f} GB on disk")
    return built


ROUND_KEYS = ("median_step_seconds", "step_peak_rss_bytes", "peak_rss_bytes", "load_peak_rss_bytes")


def _add_round(row: dict, got: dict, rounds: int) -> None:
    """Fold one measurement into `row`: the first as it is; with several rounds, each round's step time and
    peaks are listed under "rounds", the step time is their median and each peak their highest."""
    import numpy as np

    if rounds == 1:
        row.update(got)
        return
    row.setdefault("rounds", []).append({k: got[k] for k in ROUND_KEYS if got.get(k) is not None})
    row.update(got)  # the latest round's details (step times, losses); the round keys are then summarized
    done = row["rounds"]
    row["median_step_seconds"] = float(np.median([d["median_step_seconds"] for d in done]))
    for k in ROUND_KEYS[1:]:
        if all(k in d for d in done):
            row[k] = max(d[k] for d in done)


def ort_bench(arch: str = "tiny", resolution: int | None = None, rank: int = 128, fraction: float | None = 0.4,
              depth: int | None = None, steps: int = 5, threads: int | None = None, out: Path | None = None,
              workdir: Path | None = None, timeout: float | None = None, kinds: tuple = DEFAULT_ROWS,
              merge: bool = False, rounds: int = 1, log=print) -> dict:
    """Measure the rows `kinds` (names from `ROWS`; `ABLATION` is the lever ablation), each in a fresh process.

    `merge=True` adds these rows to the result already in `out` for the same settings (rows measured
    again replace the old ones; differences are only taken against a baseline measured in the same run).
    `rounds` > 1 measures the rows round-robin that many times, every folder kept on disk (`_measure_rows`).
    """
    if rounds < 1:
        raise BenchError(f"--rounds must be at least 1 (got {rounds})")
    if steps < 2:
        raise BenchError("--steps must be at least 2 (the first run is a warm-up, not timed in the median)")
    names = _check_rows(dict.fromkeys(n for k in kinds for n in (ABLATION if k == "ablation" else (k,))))
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
                              depth=plan.depth, hollowed_fraction=plan.hollowed_fraction, dtype="fp32 compute",
                              batch=1, tokens=TOKENS, steps=steps, threads=threads, unet_params=plan.unet_params,
                              kept_params=plan.kept_params, lora_params_hollowed=plan.lora_params,
                              rounds=rounds)
    stem = f"ort_{arch}_{plan.resolution}px_r{rank}_k{plan.depth}" + (
        "" if set(names) <= set(DEFAULT_ROWS) else "_ablation")
    old = earlier_result(Path(out) / f"{stem}.json", settings, MERGE_KEYS) if merge and out is not None else None
    partial = None if out is None else (Path(out) / f"{stem}.partial.json", settings)
    case = {"arch": arch, "plan": plan_args, "shapes": shapes, "steps": steps, "threads": threads}
    measured = _measure_rows(names, case, timeout, workdir, partial, log, rounds)
    rows = [measured[n] for n in names]
    if old is not None:
        kept = [r for r in old["rows"] if r["name"] not in measured]
        rows = sorted(kept + rows, key=lambda r: list(ROWS).index(r["name"]))
        by = {r["name"]: r for r in rows}
        for row in rows:  # a row and its baseline from different runs: the losses still compare (same inputs)
            if row.get("baseline") in by and row.get("losses") and row.get("loss_rel_diff") is None:
                row["loss_rel_diff"] = loss_diff(row, by[row["baseline"]])
        settings["merged_from"] = old["settings"].get("merged_from", []) + [old["settings"]["date"]]
        log(f"merged with {len(kept)} row(s) measured on {old['settings']['date']}")
    result = {"kind": "ort", "settings": settings, "rows": rows, "ratios": ratios({r["name"]: r for r in rows}),
              "method": "each distinct folder built once in its own subprocess (export.build.build with the row's "
                        "BuildSettings levers / export.lora_baseline.plain_lora_artifacts / "
                        "export.onnx.export_inference); every row then measured in a fresh torch-free subprocess "
                        "with the row's session settings: whole peak = that child's VmHWM over its whole life "
                        "(checkpoint load and session creation included), load peak = VmHWM once the sessions "
                        "exist, step peak = VmHWM over the steps after resetting it (clear_refs 5); held = RSS "
                        "after the sessions are created; median over steps 2..N (step 1 is a warm-up; with "
                        "rounds > 1 the rows are measured round-robin, step time the median of the rounds' "
                        "medians, peaks the highest of the rounds'); inputs "
                        "random with the same seed in every row, so losses compare across rows of a kind; LoRA "
                        "update = LoRA after the steps minus the checkpoint's, compared with the baseline row's; "
                        "bundle bytes = every file of the folder, checkpoint bytes = checkpoint (+ .data)"}
    if out is not None:
        write_outputs(result, Path(out), stem, plot_ort)
        (Path(out) / f"{stem}.partial.json").unlink(missing_ok=True)
    return result


MERGE_KEYS = ("arch", "resolution", "rank", "depth", "steps", "threads", "onnxruntime")


def _peak(row):
    return row.get("peak_rss_bytes") if "error" not in row else None


def ratios(by: dict) -> dict:
    """Peak and step-time ratios between rows (only those both measured)."""
    best = [by[n] for n in INFERENCE_ROWS if n in by and _peak(by[n])]
    if best:
        by = {**by, "inference_best_measured": min(best, key=_peak)}
    pairs = [("hollowed", "lora"), ("hollowed", "inference"), ("lora", "inference"),
             ("all_fp32", "inference_default"), ("all_fp32", "inference_best_measured"),
             ("all_fp16", "inference_best_measured"), ("all_fp32", "lora_all"), ("all_fp16", "lora_all_fp16"),
             ("baseline", "lora_baseline"), ("baseline", "inference_default"), ("all_fp32", "baseline"),
             ("all_fp16", "baseline"), ("all_fp32", "all_but_units"), ("all_fp32", "all_but_batch")]
    out = {}
    for a, b in pairs:
        if a in by and b in by and _peak(by[a]) and _peak(by[b]):
            ra, rb = by[a], by[b]
            out[f"{a}/{b}"] = {"peak_rss": ra["peak_rss_bytes"] / rb["peak_rss_bytes"],
                               "peak_rss_over_baseline": (ra["peak_rss_bytes"] - ra["baseline_rss_bytes"])
                               / (rb["peak_rss_bytes"] - rb["baseline_rss_bytes"]),
                               "median_step_time": ra["median_step_seconds"] / rb["median_step_seconds"]}
            if b == "inference_best_measured":
                out[f"{a}/{b}"]["inference_row"] = rb["name"]
    return out


def _fmt_rel(x) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.1e}")


def ort_text(result: dict) -> str:
    s = result["settings"]
    rows = []
    for r in result["rows"]:
        rows.append([r.get("name", r["kind"]), f"{r['build_seconds']:.0f}" if "build_seconds" in r else "-",
                     _fmt_bytes(r.get("build_peak_rss_bytes")), _fmt_bytes(r.get("disk_bytes")),
                     _fmt_bytes(r.get("checkpoint_bytes")), _fmt_bytes(r.get("held_rss_bytes")),
                     _fmt_bytes(r.get("peak_rss_bytes")), _fmt_bytes(r.get("step_peak_rss_bytes")),
                     "-" if "median_step_seconds" not in r else f"{r['median_step_seconds']:.3f}",
                     _fmt_rel(r.get("loss_rel_diff")),
                     _fmt_rel(r.get("lora_update_rel_diff", r.get("output_rel_diff"))), r.get("error", "")])
    head = ["row", "build s", "build peak GB", "bundle GB", "ckpt GB", "RSS loaded GB", "peak GB", "step peak GB",
            "median step s", "loss diff", "update/output diff", "error"]
    ratio_rows = [[k, f"{v['peak_rss']:.2f}x", f"{v['peak_rss_over_baseline']:.2f}x", f"{v['median_step_time']:.2f}x"]
                  for k, v in result["ratios"].items()]
    labels = [f"  {r.get('name', r['kind'])}: {r['label']}" for r in result["rows"]]
    return "\n".join([f"bench ort: {s['arch']}, {s['resolution']} px, LoRA r={s['rank']}, depth {s['depth']} "
                      f"({s['hollowed_fraction']:.1%} hollowed), ORT {s['onnxruntime']}", settings_text(s), "",
                      *labels, "", format_table(head, rows), "",
                      format_table(["ratio", "peak RSS", "peak RSS over baseline", "median step time"], ratio_rows)])


def plot_ort(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["rows"] if "peak_rss_bytes" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(10, 1.1 * len(rows) + 4), 4))
    names = [r.get("name", r["kind"]) for r in rows]
    a.bar(names, [r["peak_rss_bytes"] / GB for r in rows], label="whole-process peak")
    a.bar(names, [(r.get("step_peak_rss_bytes") or 0) / GB for r in rows], alpha=0.7, label="step peak")
    a.bar(names, [r["held_rss_bytes"] / GB for r in rows], alpha=0.6, label="RSS after load")
    a.set_ylabel("GB")
    a.legend(fontsize=8)
    b.bar(names, [r["median_step_seconds"] for r in rows])
    b.set_ylabel("median step / run (s)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    s = result["settings"]
    save_figure(fig, path, f"ORT {s['onnxruntime']}: {s['arch']} {s['resolution']}px r={s['rank']} depth {s['depth']} "
                           f"({s['date'][:10]})")
