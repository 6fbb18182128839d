"""How the benchmarks measure: fresh child processes, their settings block, the device check.

In:  a job spec (a JSON-serialisable dict naming the job: `case`, `ort_build`, `ort_measure`).
Out: `run_child(spec)` -> the child's result dict (or an `error`), run in a fresh interpreter
     (`python -m hollow_export.bench.child`); `settings_block(...)` (versions, machine, date);
     `METHOD`, how every number is measured, written into every result. Process memory itself
     is read by `hollow_export.rss`, the one place for it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cases import BenchError

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "TOKENIZERS_PARALLELISM": "false"}
GB = 1e9
METHOD = """- Memory, CPU: every case runs in a FRESH subprocess (`python -m hollow_export.bench.child ...`)
  that imports torch, records its baseline RSS, builds the full random U-Net, keeps only what the
  case holds (e.g. the Hollowed Net case keeps the kept modules and deletes the U-Net; the
  collection case keeps only the precompute path), runs `gc`, records the RSS it holds, runs one
  warm step, resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), runs the
  measured steps and reads `VmHWM`. Reported peak = VmHWM - baseline RSS (the bytes the case adds
  to a Python+torch process, comparable to a GPU allocator peak); the absolute VmHWM and the RSS
  after load are reported beside it. Children run with `MALLOC_MMAP_THRESHOLD_=1048576` so freed
  tensors go back to the OS and the RSS follows the live bytes.
- Memory, CUDA: the same children, with `torch.cuda.max_memory_allocated` reset after the warm
  step (`memory_allocated` after load is the held figure).
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one step (forward, plus backward for the
  training cases; the optimizer adds no counted FLOPs), on the meta device (exact shapes, no
  memory, any size; real CPU tensors for `tiny`, same counts). Attention is counted on SDPA's math
  path (2 bmm forward, 4 backward): algorithmic FLOPs, without the score recomputation that fused
  attention kernels add in the backward. The backward counts what autograd really computes: frozen
  weights get no weight gradients (the paper's training FLOPs are 3x forward for every row).
- Low-precision rows (bf16/fp16 frozen weights, LoRA and its AdamW state fp32): on CUDA the case
  computes natively in that dtype; on CPU (whose fp16/bf16 convolutions run ~300x slower than fp32
  here) the frozen weights are STORED in that dtype and each layer computes in fp32 over an upcast
  copy (`store_frozen_weights`), so the row is exactly an fp32 step over rounded weights. Each row
  reports its loss and LoRA-update difference against the fp32 case, measured in the same run.
- ORT: each distinct folder (bundle with the row's build levers, plain-LoRA artifacts, inference
  graph) is built once in its own subprocess, then every row is measured in a fresh torch-free
  subprocess (ONNX Runtime + numpy, like the phone) with the row's session settings: RSS after load,
  whole-process peak (VmHWM over the child's life, loading included), step peak (VmHWM reset after
  load), median step time; loss and LoRA-update differences against the baseline row of its kind."""


def default_threads(threads: int | None) -> int:
    """`threads`, or this machine's cores (at most 16)."""
    return threads or max(1, min(os.cpu_count() or 1, 16))


def available_bytes() -> int:
    import psutil
    return psutil.virtual_memory().available


def run_child(spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh interpreter; returns its result dict (or an `error`)."""
    with tempfile.TemporaryDirectory(prefix="hollow-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, **CHILD_ENV}
        started = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "hollow_export.bench.child", str(spec_path),
                                   str(out_path)], env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "wall_seconds": time.time() - started}
        if proc.returncode != 0 or not out_path.exists():
            if proc.returncode in (-9, 137):
                why = "killed (SIGKILL: out of memory?)"
            else:
                tail = (proc.stderr or "").strip().splitlines()[-3:]
                why = f"exit {proc.returncode}: " + " | ".join(tail)
            return {"error": why, "wall_seconds": time.time() - started}
        result = json.loads(out_path.read_text())
        result["wall_seconds"] = time.time() - started
        return result


def settings_block(**settings) -> dict:
    import torch
    return {**settings, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{_total_ram() / 2**30:.0f} GiB RAM, {platform.node()}",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _total_ram() -> int:
    import psutil
    return psutil.virtual_memory().total


def check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise BenchError(f"--device must be cpu or cuda (got {device!r})")
    import torch
    if not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
