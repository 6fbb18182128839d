"""Format-2 checkpoints hold LoRA (and its AdamW state) only: names, size, export, frozen file untouched.

Resuming such a checkpoint after SIGKILL, bit for bit, is test_device's
test_runtime_runs_without_torch_and_resumes_after_sigkill (its `small_bundle` is this format)."""

import json

import numpy as np
from onnxruntime.training.api import CheckpointState

from hollow_export import bundle as fmt
from hollow_export import store
from hollow_export.device import collect as dcollect
from hollow_export.device import export as dexport
from hollow_export.device import train as dtrain

STEPS = 6


def _lora(path):
    state = CheckpointState.load_checkpoint(str(path))
    return {n: np.array(p.data) for n, p in state.parameters}


def test_lora_only_checkpoint_holds_the_lora_and_its_state_and_exports(small_bundle, photo_dir, tmp_path):
    buffer = tmp_path / "buffer.bin"
    dcollect.collect(small_bundle, photo_dir, buffer, samples=6, seed=3, progress=False)
    frozen_before = store.sha256(small_bundle / fmt.FROZEN_WEIGHTS)
    names = sorted(item["name"] for item in fmt.open_bundle(small_bundle)["lora"])

    reference = tmp_path / "reference"
    dtrain.train(small_bundle, buffer, reference, dtrain.TrainConfig(steps=STEPS, checkpoint_every=3, progress=False))
    expected = _lora(reference / dtrain.read_progress(reference)["checkpoint"])
    assert sorted(expected) == names  # the checkpoint holds the LoRA tensors and nothing else
    lora_floats = sum(int(np.prod(item["shape"])) for item in fmt.open_bundle(small_bundle)["lora"])
    size = (reference / dtrain.read_progress(reference)["checkpoint"]).stat().st_size
    # LoRA + AdamW's two moments, float32, plus a few hundred bytes of name and FlatBuffer per tensor copy
    # (measured 566720 bytes here, for 39680 LoRA floats); the frozen weights alone are several MB
    assert size <= 3 * (4 * lora_floats + 512 * len(names))
    assert size < (small_bundle / fmt.FROZEN_WEIGHTS).stat().st_size / 4

    dexport.export_lora(small_bundle, reference, tmp_path / "lora")
    record = json.loads((tmp_path / "lora" / dexport.LORA_RECORD).read_text())
    assert record["tensors"] == len(names) and record["checkpoint"] == dtrain.read_progress(reference)["checkpoint"]
    assert store.sha256(small_bundle / fmt.FROZEN_WEIGHTS) == frozen_before  # training never writes it
