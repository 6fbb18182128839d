"""Qualcomm AI Hub: compile and profile a bundle's inference graphs on a real phone in the cloud.

In:  a bundle folder (its `vae_encoder.onnx` and `precompute.onnx`, shapes from its manifest),
     optionally a merged U-Net ONNX (`merge`'s `single/unet/model.onnx`, or any .onnx), a device
     name ("Samsung Galaxy S24 (Family)"), a target runtime (qnn_context_binary | onnx | tflite)
     and a `qai_hub` client (the real `qai_hub.Client()` unless one is passed in).
Out: `profile_bundle(...)` -> a result dict, one row per graph: compile and profile job ids and
     URLs, status, estimated inference time (ms), inference peak-memory range (MB), first-load
     time, compute units (layers per NPU/GPU/CPU); `profile_text(result)` renders the table and
     the JSON is written with `store.write_json`.

Only the client object talks to the network: it is the one thing tests replace. Each graph is
compiled with fixed batch-1 input specs (`submit_compile_job(..., input_specs, options=
"--target_runtime ...")`) and the compiled model is profiled with `submit_inference_job(...,
profile=True)` (qai-hub 0.56's replacement of the deprecated `submit_profile_job`). Graphs with
external weights are staged as the folder AI Hub accepts (one .onnx plus one .data file).
Without an API token the real client fails before any upload; that becomes an `AIHubError`
saying how to configure it.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from . import bundle as fmt
from . import store
from .errors import HollowError

TARGET_RUNTIMES = ("qnn_context_binary", "onnx", "tflite")
CONFIGURE_HELP = (
    "Qualcomm AI Hub is not configured on this machine ({why}). Get an API token at "
    "https://aihub.qualcomm.com (Settings -> API token), then run\n"
    "  qai-hub configure --api_token YOUR_TOKEN\n"
    "(it writes ~/.qai_hub/client.ini; QAIHUB_CLIENT_INI can point to another file) and run this "
    "command again. It needs network access to app.aihub.qualcomm.com."
)


class AIHubError(HollowError):
    """AI Hub is not configured or not reachable, or a setting it cannot serve (message names the fix)."""


def _clean(err: Exception) -> str:
    """The client's message on one line, without its box drawing."""
    return " ".join(str(err).translate({ord(c): " " for c in "┌┐└┘─│|"}).split())


def default_client():
    """The real `qai_hub.Client()`, checked for a configured API token (no network call)."""
    import qai_hub
    client = qai_hub.Client()
    try:
        client.config  # reads ~/.qai_hub/client.ini (or $QAIHUB_CLIENT_INI); raises without it
    except Exception as err:  # qai_hub.client.UserError / APIException: a missing or incomplete file
        why = _clean(err).split(" Please request access")[0][:300]  # the client's sign-up text follows
        raise AIHubError(CONFIGURE_HELP.format(why=why)) from err
    return client


def _call(what: str, fn, *args, **kwargs):
    """One client call; its failures (network, auth, rate limits, rejected models) become AIHubError."""
    try:
        return fn(*args, **kwargs)
    except HollowError:
        raise
    except Exception as err:  # the client raises requests, qai_hub.client.Error and APIException types
        text = _clean(err)[:400]
        hint = ""
        if any(k in text.lower() for k in ("token", "auth", "401", "403", "configuration")):
            hint = " Check the API token: qai-hub configure --api_token YOUR_TOKEN."
        elif any(k in text.lower() for k in ("connect", "resolve", "timed out", "timeout", "network")):
            hint = " AI Hub is not reachable from here: run this on a machine with internet access."
        raise AIHubError(f"AI Hub {what} failed ({type(err).__name__}: {text}).{hint}") from err


# ---------------------------------------------------------------- graphs and their input specs

def _onnx_inputs(path: Path) -> list[tuple[str, str, list]]:
    """(name, numpy dtype name, dims with None for dynamic) of a graph's real inputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append((value.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
    return out


def input_specs(path: Path, known: dict[str, list[int]]) -> dict:
    """AI Hub input specs (batch 1, every dim fixed): known shapes by name, else static dims, dynamic -> 1."""
    specs = {}
    for name, dtype, dims in _onnx_inputs(path):
        shape = known.get(name) or [1 if d is None else d for d in dims]
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise AIHubError(f"{path.name} input {name} has shape {dims}, which does not fit the bundle's {shape}")
        specs[name] = (tuple(int(s) for s in shape), dtype)
    return specs


def graphs_of(bundle_dir: Path, merged_unet: Path | None = None) -> list[dict]:
    """The graphs to profile, each with its file and batch-1 input specs (from the manifest's plan)."""
    bundle_dir = Path(bundle_dir)
    manifest = fmt.open_bundle(bundle_dir)
    plan = manifest["plan"]
    side = manifest["hyper"]["resolution"]
    latent = [1, *plan["latent_shape"]]
    context = [1, *plan["encoder_shape"]]
    known = {"image": [1, 3, side, side], "sample": latent, "timestep": [1], "encoder_hidden_states": context}
    graphs = [
        {"graph": "vae_encoder", "path": bundle_dir / fmt.VAE_ENCODER},
        {"graph": "precompute", "path": bundle_dir / fmt.PRECOMPUTE},
    ]
    if merged_unet is not None:
        path = Path(merged_unet)
        if path.is_dir():
            found = sorted(path.glob("*.onnx")) or sorted(path.glob("unet/*.onnx")) \
                or sorted(path.glob("single/unet/*.onnx"))
            if len(found) != 1:
                raise AIHubError(f"--merged-unet {path}: expected one .onnx file in it (or in unet/ or "
                                 f"single/unet/), found {len(found)}")
            path = found[0]
        if not path.exists():
            raise AIHubError(f"--merged-unet {path} does not exist; pass the U-Net .onnx that `merge` wrote")
        graphs.append({"graph": "merged_unet", "path": path})
    for g in graphs:
        g["input_specs"] = input_specs(g["path"], known)
        g["bytes"] = sum(f.stat().st_size for f in _graph_files(g["path"]))
    return graphs


def _external_locations(path: Path) -> set[str]:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            locations |= {e.value for e in init.external_data if e.key == "location"}
    return locations


def _graph_files(path: Path) -> list[Path]:
    return [path] + [path.parent / loc for loc in sorted(_external_locations(path))]


def stage_model(path: Path, scratch: Path) -> Path:
    """What to upload: the .onnx itself, or (external weights) a folder with one .onnx and one .data file."""
    import onnx
    locations = _external_locations(path)
    if not locations:
        return path
    folder = scratch / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    if len(locations) == 1 and next(iter(locations)).endswith(".data"):
        for f in _graph_files(path):
            shutil.copy2(f, folder / f.name)
        return folder
    model = onnx.load(str(path))  # several files or another suffix: re-save as <stem>.data
    onnx.save_model(model, str(folder / f"{path.stem}.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{path.stem}.data", size_threshold=1024)
    return folder


# ---------------------------------------------------------------- jobs

def _status(job, timeout) -> tuple[bool, str]:
    status = _call("job wait", job.wait, timeout) if timeout is not None else _call("job wait", job.wait)
    ok = bool(getattr(status, "success", False))
    state = getattr(status, "code", None) or str(getattr(status, "state", "")) or ("SUCCESS" if ok else "FAILED")
    message = getattr(status, "message", None)
    return ok, state + (f": {message}" if message and not ok else "")


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize_profile(profile: dict) -> dict:
    """The numbers AI Hub's own summary prints: time (ms), peak memory range (MB), compute units."""
    summary = profile.get("execution_summary", {}) or {}
    detail = profile.get("execution_detail", []) or []
    t = _number(summary.get("estimated_inference_time"))
    peak_range = summary.get("inference_memory_peak_range")
    if isinstance(peak_range, (list, tuple)) and len(peak_range) == 2 and all(_number(v) is not None
                                                                               for v in peak_range):
        low, high = peak_range
    else:
        low = high = _number(summary.get("estimated_inference_peak_memory"))
    load = _number(summary.get("first_load_time"))
    units = Counter(layer.get("compute_unit", "?") for layer in detail)
    return {
        "estimated_inference_ms": None if t is None else t / 1000,  # AI Hub reports microseconds
        "peak_memory_mb_range": None if low is None else [low / 2**20, high / 2**20],
        "first_load_ms": None if load is None else load / 1000,
        "compute_units": dict(units),
        "layers": len(detail),
    }


def profile_bundle(bundle_dir: Path, device: str = "Samsung Galaxy S24 (Family)",
                   target_runtime: str = "qnn_context_binary", merged_unet: Path | None = None,
                   client=None, out: Path | None = None, timeout: float | None = None, log=print) -> dict:
    """Compile and profile the bundle's inference graphs (and a merged U-Net) on an AI Hub device."""
    if target_runtime not in TARGET_RUNTIMES:
        raise AIHubError(f"--target-runtime must be one of {', '.join(TARGET_RUNTIMES)} (got {target_runtime!r})")
    graphs = graphs_of(Path(bundle_dir), merged_unet)
    client = client if client is not None else default_client()
    import qai_hub

    found = _call("device lookup", client.get_devices, name=device)
    if not found:
        raise AIHubError(f"AI Hub has no device named {device!r}; list them with `qai-hub list-devices` "
                         "and pass the exact name (e.g. \"Samsung Galaxy S24 (Family)\")")
    target = qai_hub.Device(name=device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hollow-aihub-") as scratch:
        for g in graphs:
            row = {"graph": g["graph"], "file": str(g["path"]), "bytes": g["bytes"],
                   "input_specs": {k: [list(v[0]), v[1]] for k, v in g["input_specs"].items()}}
            log(f"[{g['graph']}] compile for {device} ({target_runtime}) ...")
            source = stage_model(g["path"], Path(scratch))
            compile_job = _call("compile submission", client.submit_compile_job, model=str(source), device=target,
                                name=f"hollow-export {g['graph']}", input_specs=g["input_specs"],
                                options=f"--target_runtime {target_runtime}")
            row["compile_job"] = {"id": getattr(compile_job, "job_id", None), "url": getattr(compile_job, "url", None)}
            ok, state = _status(compile_job, timeout)
            row["compile_status"] = state
            model = _call("compiled model download", compile_job.get_target_model) if ok else None
            if model is None:
                row["status"] = f"compile failed: {state}"
                log(f"[{g['graph']}] {row['status']}")
                rows.append(row)
                continue
            log(f"[{g['graph']}] profile on {device} ...")
            profile_job = _call("profile submission", client.submit_inference_job, model=model, device=target,
                                name=f"hollow-export {g['graph']} profile", profile=True)
            row["profile_job"] = {"id": getattr(profile_job, "job_id", None), "url": getattr(profile_job, "url", None)}
            ok, state = _status(profile_job, timeout)
            row["profile_status"] = state
            if not ok:
                row["status"] = f"profile failed: {state}"
                rows.append(row)
                continue
            profile = _call("profile download", profile_job.download_profile)
            row.update(summarize_profile(profile or {}))
            row["status"] = "ok"
            rows.append(row)
    result = {"kind": "aihub_profile", "settings": {
        "bundle": str(bundle_dir), "device": device, "target_runtime": target_runtime,
        "merged_unet": str(merged_unet) if merged_unet else None, "qai_hub": str(qai_hub.__version__),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}, "rows": rows}
    if out is not None:
        out = Path(out)
        store.write_json(out / "aihub_profile.json", result)
        result["files"] = {"json": str(out / "aihub_profile.json")}
    return result


def profile_text(result: dict) -> str:
    from .bench.report import format_table
    s = result["settings"]
    rows = []
    for r in result["rows"]:
        rng = r.get("peak_memory_mb_range")
        units = r.get("compute_units") or {}
        rows.append([r["graph"], f"{r['bytes'] / 2**20:.1f}",
                     "-" if r.get("estimated_inference_ms") is None else f"{r['estimated_inference_ms']:.2f}",
                     "-" if rng is None else f"{rng[0]:.1f}-{rng[1]:.1f}",
                     "-" if r.get("first_load_ms") is None else f"{r['first_load_ms']:.0f}",
                     ", ".join(f"{k} ({v})" for k, v in sorted(units.items())) or "-",
                     r["status"], (r.get("profile_job") or r.get("compile_job") or {}).get("url") or ""])
    head = ["graph", "file MB", "est. inference ms", "peak memory MB", "first load ms", "compute units",
            "status", "job"]
    return "\n".join([f"AI Hub profile: {s['device']}, target runtime {s['target_runtime']}, qai-hub {s['qai_hub']}, "
                      f"{s['date']}", format_table(head, rows)])
