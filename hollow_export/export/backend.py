"""The interface between the bundle build and an on-device training engine.

In:  a trainable net (LoRA injected, returning the loss), example inputs and their names, an
     output folder and the optimizer settings.
Out: the engine's training files in that folder, and the (trainable, frozen) parameter names as
     its checkpoint holds them. ONNX Runtime's training artifacts (`ort_training.py`) are the one
     engine today; a second engine implements `TrainingBackend` and is added to `BACKENDS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn

from ..hollow.lora import AdamWSettings


class TrainingBackend(Protocol):
    """Writes one trainable graph with its optimizer and initial weights for an on-device engine."""

    name: str

    def write_artifacts(self, net: nn.Module, args: tuple, input_names: list[str], out: Path,
                        optimizer: AdamWSettings) -> tuple[list[str], list[str]]:
        """Files into `out`; returns (trainable names, frozen names)."""


def backend(name: str = "ort_training") -> TrainingBackend:
    """The training backend called `name`."""
    from .ort_training import OrtTrainingBackend
    backends = {OrtTrainingBackend.name: OrtTrainingBackend}
    if name not in backends:
        raise ValueError(f"unknown training backend {name!r}; choose one of {', '.join(backends)}")
    return backends[name]()
