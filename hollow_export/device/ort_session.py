"""ONNX Runtime sessions without torch: the one session-options factory, inference sessions, the training API.

In:  an ONNX graph path (and optionally a thread count); for training, a bundle.
Out: `session_options(...)` -> the one `onnxruntime.SessionOptions` factory (quiet, CPU arena,
     memory pattern, config entries); `inference_session(path)` -> an `onnxruntime.InferenceSession`
     on the CPU provider; `training_module(folder, state, settings)` -> (Module, Optimizer) opened with
     `training_session` settings (a bundle's, bundle.py: CPU arena as named, ConstantFolding and
     NchwcTransformer off, no eval session unless asked); `training_options(settings)` -> those
     settings as SessionOptions (for graphs without a manifest, e.g. the bench's plain-LoRA
     baseline: `training_options(bundle.training_session())`); `training_api()` -> `onnxruntime.training.api` entered
     without its PyTorch front-ends; `onnxruntime_module()` -> `onnxruntime` imported without loading torch.
Every ORT session of the project (device collect/train, the ORT inference engine, `bench ort`) is made here.
"""

from __future__ import annotations

import os
from pathlib import Path


def onnxruntime_module():
    """`onnxruntime`, imported without loading torch when this process has not loaded it already.

    The onnxruntime-training wheel checks its build at import by importing its PyTorch front-end
    (`onnxruntime.training.ortmodule`), so a plain `import onnxruntime` loads torch wherever torch is
    installed: 0.24 GB of RSS in a process that never uses it (`device train` at sd21 512 px peaked
    at 3.98 GB with it, 3.74 GB without). The phone has no torch; neither has this runtime: torch is
    held off while ORT is imported (the check takes the ImportError as "no ORTModule"), then released,
    so a later `import torch` in the same process still works.
    """
    import sys

    if "onnxruntime" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # a None entry makes `import torch` raise ImportError
        try:
            import onnxruntime  # noqa: F401
        finally:
            del sys.modules["torch"]
    import onnxruntime
    return onnxruntime


def training_api():
    """`onnxruntime.training.api` (CheckpointState, Module, Optimizer) without importing torch.

    The `onnxruntime.training` package __init__ imports its PyTorch front-ends (ORTModule, amp,
    optim), though the on-device API is plain C++ bindings. A phone has no torch, so neither does
    this runtime: ORT is imported with torch held off (`onnxruntime_module`) and the training package
    is entered through a bare module holding only its path.
    """
    import importlib
    import sys
    import types

    onnxruntime = onnxruntime_module()

    if "onnxruntime.training" not in sys.modules:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
        sys.modules["onnxruntime.training"] = package
    onnxruntime.set_default_logger_severity(3)  # session creation warns about every unused constant
    return importlib.import_module("onnxruntime.training.api")


def session_options(threads: int | None = None, cpu_arena: bool = True, mem_pattern: bool = True,
                    config: dict | None = None, mem_reuse: bool = True):
    """Quiet CPU session options; `threads` sets the intra-op thread count, `config` session-config entries.

    The Java twins (ORT 1.19.2 `OrtSession.SessionOptions`): `setIntraOpNumThreads`,
    `setCPUArenaAllocator`, `setMemoryPatternOptimization`, `addConfigEntry`.
    """
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = cpu_arena
    options.enable_mem_pattern = mem_pattern
    options.enable_mem_reuse = mem_reuse  # Python-only: no Java (nor C API) twin, see bundle.training_session
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def training_options(settings: dict, threads: int | None = None):
    """Session options from a manifest's `training_session` settings (bundle.training_session)."""
    return session_options(threads, cpu_arena=settings["enable_cpu_mem_arena"],
                           mem_pattern=settings["enable_mem_pattern"], config=settings["config_entries"],
                           mem_reuse=settings.get("enable_mem_reuse", True))


def training_module(folder: Path, state, settings: dict, threads: int | None = None):
    """(Module, Optimizer) of the training graphs in `folder` over checkpoint `state`, opened with the
    `training_session` settings (a bundle's: `bundle.training_session`; the bench passes each row's).

    The eval graph is only loaded when the settings ask for it (`eval_session`), since an eval session
    holds its own copy of the frozen weights.
    """
    from ..bundle import EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL

    api = training_api()
    folder = Path(folder)
    module = api.Module(str(folder / TRAINING_MODEL), state,
                        str(folder / EVAL_MODEL) if settings["eval_session"] else None,
                        session_options=training_options(settings, threads))
    return module, api.Optimizer(str(folder / OPTIMIZER_MODEL), module)


def inference_session(path: Path, threads: int | None = None, options=None):
    """An ONNX Runtime inference session on the CPU provider (`options`: default `session_options(threads)`)."""
    ort = onnxruntime_module()
    options = session_options(threads) if options is None else options
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
