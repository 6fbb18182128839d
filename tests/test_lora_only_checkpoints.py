"""Format-2 checkpoints hold LoRA (and its AdamW state) only: resume after SIGKILL, export, frozen file untouched."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
from onnxruntime.training.api import CheckpointState

from hollow_export import bundle as fmt
from hollow_export import store
from hollow_export.device import collect as dcollect
from hollow_export.device import export as dexport
from hollow_export.device import train as dtrain

STEPS = 12

RUNNER = textwrap.dedent("""
    import sys
    for name in ('torch', 'diffusers', 'transformers', 'peft'):
        sys.modules[name] = None  # as on the phone
    from hollow_export.cli import main
    main()
""")


def _lora(path):
    state = CheckpointState.load_checkpoint(str(path))
    return {n: np.array(p.data) for n, p in state.parameters}


def test_lora_only_checkpoint_resumes_after_sigkill_to_the_uninterrupted_lora(small_bundle, photo_dir, tmp_path):
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

    run = tmp_path / "run"
    args = ["device", "train", "--bundle", small_bundle, "--buffer", buffer, "--run", run, "--steps", STEPS,
            "--checkpoint-every", 3]
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a first saved checkpoint, then kill before the run ends
        progress = dtrain.read_progress(run) if (run / dtrain.PROGRESS).exists() else None
        if progress and progress["step"] >= 3 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate(timeout=60)[0]
    killed_at = dtrain.read_progress(run)
    assert proc.returncode == -signal.SIGKILL, output
    assert 3 <= killed_at["step"] < STEPS, killed_at["step"]  # the kill landed after a checkpoint, mid-run

    resumed = dtrain.train(small_bundle, buffer, run, dtrain.TrainConfig(steps=STEPS, checkpoint_every=3,
                                                                         progress=False))
    assert resumed["finished"] and resumed["step"] == STEPS
    assert resumed["starts"] == [0, killed_at["step"]]  # resumed from the checkpoint, not trained again from 0
    got = _lora(run / resumed["checkpoint"])
    assert sorted(got) == names
    for n in names:
        np.testing.assert_array_equal(got[n], expected[n], err_msg=n)

    dexport.export_lora(small_bundle, run, tmp_path / "lora")
    record = json.loads((tmp_path / "lora" / dexport.LORA_RECORD).read_text())
    assert record["tensors"] == len(names) and record["checkpoint"] == resumed["checkpoint"]
    assert store.sha256(small_bundle / fmt.FROZEN_WEIGHTS) == frozen_before  # training never writes it
