"""ONNX Runtime sessions without torch: the one inference-session factory and the training API.

In:  an ONNX graph path (and optionally a thread count).
Out: `inference_session(path)` -> an `onnxruntime.InferenceSession` on the CPU provider, quiet;
     `training_api()` -> `onnxruntime.training.api` entered without its PyTorch front-ends.
Every ORT session of the project (device collect, the ORT inference engine, `bench ort`) is made here.
"""

from __future__ import annotations

import os
from pathlib import Path


def training_api():
    """`onnxruntime.training.api` (CheckpointState, Module, Optimizer) without importing torch.

    The `onnxruntime.training` package __init__ imports its PyTorch front-ends (ORTModule, amp,
    optim), though the on-device API is plain C++ bindings. A phone has no torch, so neither does
    this runtime: the package is entered through a bare module holding only its path.
    """
    import importlib
    import sys
    import types

    import onnxruntime

    if "onnxruntime.training" not in sys.modules:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
        sys.modules["onnxruntime.training"] = package
    onnxruntime.set_default_logger_severity(3)  # session creation warns about every unused constant
    return importlib.import_module("onnxruntime.training.api")


def session_options(threads: int | None = None):
    """Quiet CPU session options; `threads` sets the intra-op thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def inference_session(path: Path, threads: int | None = None):
    """An ONNX Runtime inference session on the CPU provider."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
