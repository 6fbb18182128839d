"""The device runtime, ORT alone: collect -> train -> export, resume after SIGKILL, clear errors."""

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hollow_export import bundle as fmt
from hollow_export import store
from hollow_export.hollow import lora
from hollow_export.device import buffer, rng, ort_session
from hollow_export.device import collect as dcollect
from hollow_export.device import export as dexport
from hollow_export.device import train as dtrain
from hollow_export.hollow.plan import HollowPlan
from hollow_export.cli import main
from hollow_export.models.load import load_pipeline

from conftest import feed_buffer

STEPS = 24


@pytest.fixture(scope="module")
def collected(small_bundle, photo_dir, tmp_path_factory):
    buffer = tmp_path_factory.mktemp("buf") / "buffer.bin"
    dcollect.collect(small_bundle, photo_dir, buffer, samples=12, seed=3, progress=False)
    return buffer


@pytest.fixture(scope="module")
def trained(small_bundle, collected, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    progress = dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=STEPS, checkpoint_every=8,
                                                                               progress=False))
    out = tmp_path_factory.mktemp("lora")
    dexport.export_lora(small_bundle, run, out)
    return run, progress, out


def test_random_streams_are_the_documented_splitmix64():
    # reference values computed by the SplitMix64 definition in PROTOCOL.md with python ints
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)
    g = 0x9E3779B97F4A7C15
    key = mix((mix((7 + 2 * g) % 2**64) + 5 * g) % 2**64)
    expected = [mix((key + (j + 1) * g) % 2**64) for j in range(6)]
    assert rng.stream_key(7, 2, 5) == key
    assert [int(v) for v in rng.random_u64(key, 6)] == expected
    z = rng.random_normal(key, 20000).astype(np.float64)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    order = rng.epoch_order(1, 0, 50)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == rng.epoch_order(1, 0, 50) and order != rng.epoch_order(1, 1, 50)


def test_buffer_records_match_the_precompute_graph(small_bundle, collected):
    """Each buffered hidden state is what precompute.onnx gives for the stored recipe (independent session)."""
    import onnxruntime as ort
    manifest = fmt.open_bundle(small_bundle)
    reader = buffer.BufferReader(collected, fmt.bundle_id(small_bundle))
    session = ort.InferenceSession(str(small_bundle / fmt.PRECOMPUTE))
    acp = pipe_acp()
    klass = fmt.Bundle.from_pretrained(small_bundle).prompt_embeddings()["class"]
    assert len(reader) == 12
    for i in (0, 5, 11):
        r = reader[i]
        a = np.float64(acp[r["timestep"]])
        noisy = (np.sqrt(a) * r["latent"] + np.sqrt(1 - a) * r["noise"]).astype(np.float32)
        (hidden,) = session.run(None, {"sample": noisy[None], "timestep": np.array([r["timestep"]]),
                                       "encoder_hidden_states": klass})
        assert np.abs(hidden[0] - r["hidden"]).max() <= 1e-4
        assert list(r["hidden"].shape) == manifest["plan"]["buffer_shape"]
    reader.close()


def pipe_acp():
    return load_pipeline(arch="tiny").scheduler.alphas_cumprod.numpy()


def test_trained_lora_transfers_to_full_unet_and_loss_falls(small_bundle, collected, trained):
    run, progress, out = trained
    losses = progress["losses"]
    assert len(losses) == STEPS and progress["finished"]
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    record = json.loads((out / dexport.LORA_RECORD).read_text())
    from hollow_export.store import load_tensors
    state = load_tensors(out / dexport.LORA_EXPORT, record["sha256"])

    manifest = fmt.open_bundle(small_bundle)
    plan = HollowPlan.from_json(manifest["plan"])
    pipe = load_pipeline(arch="tiny")
    lora.load_into(pipe.unet, state, plan.lora)
    reader = buffer.BufferReader(collected, fmt.bundle_id(small_bundle))
    instance = torch.from_numpy(fmt.Bundle.from_pretrained(small_bundle).prompt_embeddings()["instance"])
    acp = fmt.Bundle.from_pretrained(small_bundle).alphas_cumprod()

    from onnxruntime.training.api import CheckpointState, Module
    ckpt = CheckpointState.load_checkpoint(str(run / progress["checkpoint"]))
    module = Module(str(small_bundle / fmt.TRAINING_MODEL), ckpt, str(small_bundle / fmt.EVAL_MODEL))
    module.eval()
    for i in range(0, 12, 4):
        r = reader[i]
        noisy, target = dcollect.noisy_and_target(acp, r, "epsilon")
        t = np.array([r["timestep"]], dtype=np.int64)
        ort_loss = float(module(noisy[None], t, instance.numpy(), r["hidden"][None], target[None]))
        handle = feed_buffer(pipe.unet, plan, torch.from_numpy(r["hidden"][None]))
        with torch.no_grad():
            pred = pipe.unet(torch.from_numpy(noisy[None]), torch.from_numpy(t), instance).sample
        handle.remove()
        host_loss = torch.nn.functional.mse_loss(pred, torch.from_numpy(target[None])).item()
        assert abs(ort_loss - host_loss) <= 1e-5 * host_loss
    reader.close()


RUNNER = textwrap.dedent("""
    import sys
    for name in ('torch', 'diffusers', 'transformers', 'peft'):
        sys.modules[name] = None  # any import of these now raises ImportError
    from hollow_export.cli import main
    main()
""")


def _device_cli(*args, **kw):
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **kw}
    return subprocess.Popen([sys.executable, "-c", RUNNER, "device", *map(str, args)], **kw)


def _wait_for_checkpoint(proc, run, after: int, output) -> int:
    """Poll progress.json until it names a checkpoint past step `after`; that step."""
    while proc.poll() is None:
        progress = dtrain.read_progress(run)
        if progress and progress["step"] > after:
            return progress["step"]
        time.sleep(0.005)
    pytest.fail(f"training exited ({proc.returncode}) before a checkpoint past step {after}: {output.read_text()}")


def _wait_for_shown_step(proc, output, past: int) -> None:
    """Poll the process's own progress bar until it shows a step past `past`."""
    while proc.poll() is None:
        shown = _shown_steps(output.read_text())
        if shown and shown[-1] > past:
            return
        time.sleep(0.005)
    pytest.fail(f"training exited ({proc.returncode}) before showing a step past {past}: {output.read_text()}")


def _shown_steps(text: str) -> list[int]:
    """The steps tqdm's frames show, first to last: where the process began and how far it got (its own
    output, not progress.json)."""
    return [int(n) for n in re.findall(rf"train:[^\r\n]*?(\d+)/{STEPS}", text)]


PLAIN_CLI = textwrap.dedent("""
    import atexit, sys
    atexit.register(lambda: print("torch loaded:", sys.modules.get("torch") is not None))
    from hollow_export.cli import main
    main()
""")


def test_device_cli_trains_without_loading_the_installed_torch(small_bundle, collected, trained, tmp_path):
    """`import onnxruntime` of the training wheel loads torch wherever it is installed (its build check
    imports ORTModule); the device runtime imports ORT with torch held off, so the plain CLI (no blocker)
    trains torch-free, as on the phone, with the same losses as the in-process run."""
    probe = subprocess.run([sys.executable, "-c",
                            "import sys, onnxruntime; print(sys.modules.get('torch') is not None)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "True", probe.stdout + probe.stderr  # the fault this guards against is real
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", PLAIN_CLI, "device", "train", "--bundle", str(small_bundle),
                          "--buffer", str(collected), "--run", str(run), "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch loaded: False" in out.stdout, out.stdout
    assert dtrain.read_progress(run)["losses"] == trained[1]["losses"][:2]


def test_every_save_closes_the_sessions_and_training_goes_on_exactly(small_bundle, collected, tmp_path,
                                                                     monkeypatch):
    """Each checkpoint is saved with the training sessions closed (so the save's serialisation buffer does not
    land on their arena and mapped weights), and reopening them over the in-memory state changes nothing: a
    run saving after every step ends with the losses and LoRA of a run saving once, bit for bit."""
    import weakref

    from hollow_export.store import load_tensors
    opened, open_at_save = [], []
    real_open, real_save = dtrain.open_sessions, dtrain._save

    def spy_open(*args):
        module, optimizer = real_open(*args)
        opened.extend((weakref.ref(module), weakref.ref(optimizer)))  # the optimizer holds a session of its own
        return module, optimizer

    def spy_save(*args):
        open_at_save.append(sum(ref() is not None for ref in opened))
        return real_save(*args)

    monkeypatch.setattr(dtrain, "open_sessions", spy_open)
    monkeypatch.setattr(dtrain, "_save", spy_save)
    every = dtrain.train(small_bundle, collected, tmp_path / "every", dtrain.TrainConfig(steps=6, checkpoint_every=1,
                                                                                       progress=False))
    assert len(opened) == 12 and open_at_save == [0] * 6  # opened once, reopened after each save but the last
    monkeypatch.undo()
    once = dtrain.train(small_bundle, collected, tmp_path / "once", dtrain.TrainConfig(steps=6, checkpoint_every=6,
                                                                                      progress=False))
    assert every["losses"] == once["losses"]
    loras = []
    for name in ("every", "once"):
        dexport.export_lora(small_bundle, tmp_path / name, tmp_path / f"lora_{name}")
        loras.append(load_tensors(tmp_path / f"lora_{name}" / dexport.LORA_EXPORT))
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])  # bit for bit, as the SIGKILL test


def test_runtime_runs_without_torch_and_resumes_after_sigkill(small_bundle, collected, trained, tmp_path):
    """Killed right after a checkpoint and mid-way between two, each restart resumes from the checkpoint on
    disk at the kill, and the final LoRA equals the uninterrupted run's bit for bit. The bundle's checkpoints
    hold LoRA and its AdamW state only (format 2), so this is also the SIGKILL proof for that format."""
    from hollow_export.store import load_tensors
    assert fmt.open_bundle(small_bundle)["frozen"]["file"] == fmt.FROZEN_WEIGHTS
    expected = load_tensors(trained[2] / dexport.LORA_EXPORT)
    run = tmp_path / "run"
    args = ["train", "--bundle", small_bundle, "--buffer", collected, "--run", run, "--steps", STEPS,
            "--checkpoint-every", 4]
    outputs, landed = [], []  # landed: the checkpoint step on disk when each kill struck
    # three kills: mid-way after the process's 2nd checkpoint, right after its 1st, mid-way after its 2nd
    for attempt, mid_way in enumerate((True, False, True, None)):
        outputs.append(tmp_path / f"out{attempt}.txt")
        with open(outputs[-1], "w") as sink:
            proc = _device_cli(*args, stdout=sink, stderr=subprocess.STDOUT)
        if mid_way is None:  # the last restart runs to the end
            assert proc.wait(timeout=300) == 0, outputs[-1].read_text()
            break
        seen = _wait_for_checkpoint(proc, run, landed[-1] if landed else 0, outputs[-1])
        if mid_way:
            seen = _wait_for_checkpoint(proc, run, seen, outputs[-1])
            _wait_for_shown_step(proc, outputs[-1], seen)  # a step past that checkpoint: work the restart redoes
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        at_death = dtrain.read_progress(run)["step"]
        assert seen <= at_death < STEPS
        landed.append(at_death)
    assert len(landed) == 3 and len(set(landed)) == 3
    # the mid-way kills struck after steps past the checkpoint: work that the restart had to redo
    assert _shown_steps(outputs[0].read_text())[-1] > landed[0] and _shown_steps(outputs[2].read_text())[-1] > landed[2]
    # each restart began at the checkpoint on disk when the one before it was killed: its own progress bar
    # shows it, and progress.json lists where every process that saved a checkpoint began
    assert [_shown_steps(o.read_text())[0] for o in outputs] == [0] + landed
    assert "finished at step 24" in outputs[-1].read_text()
    assert dtrain.read_progress(run)["starts"] == [0] + landed
    proc = _device_cli("export", "--bundle", small_bundle, "--checkpoint", run, "--out", tmp_path / "lora")
    assert proc.wait(timeout=120) == 0, proc.stdout.read()
    got = load_tensors(tmp_path / "lora" / dexport.LORA_EXPORT)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)  # bit for bit
    for name in (dexport.LORA_EXPORT, dexport.LORA_RECORD):
        assert (tmp_path / "lora" / name).read_bytes() == (trained[2] / name).read_bytes()


def test_collect_runs_without_torch(small_bundle, photo_dir, collected, tmp_path):
    """`device collect` with torch, diffusers, transformers and peft unimportable writes the same buffer."""
    path = tmp_path / "buffer.bin"
    proc = _device_cli("collect", "--bundle", small_bundle, "--images", photo_dir, "--buffer", path,
                       "--samples", 12, "--seed", 3)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert path.read_bytes() == collected.read_bytes()


def test_broken_buffers_are_refused_with_the_fix(small_bundle, collected, tmp_path):
    def train(buffer):
        return CliRunner().invoke(main, ["device", "train", "--bundle", str(small_bundle), "--buffer", str(buffer),
                                         "--run", str(tmp_path / "r"), "--steps", "2"])
    truncated = tmp_path / "truncated.bin"
    data = collected.read_bytes()
    truncated.write_bytes(data[: len(data) - 5000])
    res = train(truncated)
    assert res.exit_code != 0 and "holds 11 of 12 samples" in res.output and "collect` again" in res.output
    corrupted = tmp_path / "corrupted.bin"
    data = bytearray(data)
    data[-3000] ^= 0x55
    corrupted.write_bytes(bytes(data))
    res = train(corrupted)
    assert res.exit_code != 0 and "corrupted (checksum mismatch)" in res.output
    res = train(tmp_path / "missing.bin")
    assert res.exit_code != 0 and "collect` first" in res.output
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a buffer at all")
    res = train(tmp_path / "junk.bin")
    assert res.exit_code != 0 and "not a hollow-export buffer" in res.output


def test_buffer_from_another_bundle_and_tampered_bundle(small_bundle, collected, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_bundle, other)
    manifest = json.loads((other / fmt.MANIFEST).read_text())
    manifest["prompts"]["instance"] = "a zwx ball"  # a different bundle: its manifest differs
    (other / fmt.MANIFEST).write_text(json.dumps(manifest))
    res = CliRunner().invoke(main, ["device", "train", "--bundle", str(other), "--buffer", str(collected), "--run",
                                    str(tmp_path / "r"), "--steps", "2"])
    assert res.exit_code != 0 and "collected for another bundle" in res.output
    data = bytearray((other / fmt.TRAINING_MODEL).read_bytes())
    data[100] ^= 1
    (other / fmt.TRAINING_MODEL).write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["device", "train", "--bundle", str(other), "--buffer", str(collected), "--run",
                                    str(tmp_path / "r"), "--steps", "2"])
    assert res.exit_code != 0 and "training_model.onnx fails its sha256" in res.output


def test_bad_photos(small_bundle, tmp_path, photo_dir):
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(next(photo_dir.iterdir()), few)
    res = CliRunner().invoke(main, ["device", "collect", "--bundle", str(small_bundle), "--images", str(few),
                                    "--buffer", str(tmp_path / "b.bin"), "--samples", "2"])
    assert res.exit_code != 0 and "need at least 3" in res.output
    bad = tmp_path / "bad"
    shutil.copytree(photo_dir, bad)
    (bad / "zz.jpg").write_text("not a jpeg")
    res = CliRunner().invoke(main, ["device", "collect", "--bundle", str(small_bundle), "--images", str(bad),
                                    "--buffer", str(tmp_path / "b.bin"), "--samples", "2"])
    assert res.exit_code != 0 and "zz.jpg is not a readable image" in res.output


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from hollow_export.device import train as dtrain
    from hollow_export.errors import HollowError
    bundle, buffer, run, limit = sys.argv[1:5]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    try:
        dtrain.train(Path(bundle), Path(buffer), Path(run), dtrain.TrainConfig(steps=8, checkpoint_every=4,
                                                                                 progress=False))
    except HollowError as err:
        print("ERROR:", err)
        sys.exit(1)
""")


def test_full_disk_keeps_earlier_checkpoints(small_bundle, collected, tmp_path):
    run = tmp_path / "run"
    dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=4, checkpoint_every=4, progress=False))
    before = dtrain.read_progress(run)
    size = (run / before["checkpoint"]).stat().st_size
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(small_bundle), str(collected), str(run),
                           str(size // 2)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "free disk space" in proc.stdout
    after = dtrain.read_progress(run)
    assert after["checkpoint"] == before["checkpoint"] and (run / after["checkpoint"]).exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    resumed = dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=8, checkpoint_every=4,
                                                                              progress=False))
    assert resumed["finished"] and resumed["step"] == 8


def test_fp16_buffer_effect_on_training_loss(small_bundle, photo_dir, collected, trained, tmp_path):
    """fp16 storage halves noise/hidden bytes; the loss curve stays within 2% of the fp32 one."""
    half = tmp_path / "half.bin"
    header = dcollect.collect(small_bundle, photo_dir, half, samples=12, seed=3, dtype="float16", progress=False)
    full_header, _ = buffer.read_header(collected)
    assert header.record_bytes < full_header.record_bytes
    progress = dtrain.train(small_bundle, half, tmp_path / "run16", dtrain.TrainConfig(steps=STEPS,
                             checkpoint_every=STEPS, progress=False))
    fp32, fp16 = np.array(trained[1]["losses"]), np.array(progress["losses"])
    rel = np.abs(fp16 - fp32).max() / fp32.mean()
    print(f"fp16 buffer: max per-step loss difference {rel:.2e} of the mean fp32 loss")
    assert rel < 0.02


# ---------------------------------------------------------------- export checks what it stamps


def _other_bundle(small_bundle, folder):
    """A copy of the bundle with another instance prompt: another manifest, so another bundle id."""
    shutil.copytree(small_bundle, folder)
    manifest = json.loads((folder / fmt.MANIFEST).read_text())
    manifest["prompts"]["instance"] = "a sks dog"
    (folder / fmt.MANIFEST).write_text(json.dumps(manifest))
    assert fmt.bundle_id(folder) != fmt.bundle_id(small_bundle)
    return folder


def test_export_refuses_another_bundles_run_a_bad_hash_and_a_bare_checkpoint(small_bundle, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    progress = dtrain.read_progress(run)
    other = _other_bundle(small_bundle, tmp_path / "other")

    def export(bundle, checkpoint):
        out = tmp_path / "out"
        with pytest.raises(dexport.RuntimeFault) as err:
            dexport.export_lora(bundle, checkpoint, out)
        assert not out.exists() or not list(out.iterdir())  # nothing written
        return str(err.value)

    assert "trained for another bundle" in export(other, run)
    assert "trained for another bundle" in export(other, run / progress["checkpoint"])
    assert "is not the last checkpoint" in export(small_bundle, run / progress["previous"])
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / progress["checkpoint"], bare)
    assert "outside its run folder cannot be checked" in export(small_bundle, bare / progress["checkpoint"])
    # one flipped byte of the checkpoint, at its middle (inside the tensors, not the header)
    path = run / progress["checkpoint"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert "fails its hash" in export(small_bundle, run)
    assert "fails its hash" in export(small_bundle, path)
    res = CliRunner().invoke(main, ["device", "export", "--bundle", str(small_bundle), "--checkpoint", str(run),
                                    "--out", str(tmp_path / "cli")])
    assert res.exit_code == 1 and "fails its hash" in res.output and not (tmp_path / "cli").exists()


def test_export_follows_the_output_folder_rules(small_bundle, trained, tmp_path):
    """`device export` writes its folder whole, never into an input, and replaces only its own output."""
    run, progress, first = trained
    for inside in (run, run / "lora", small_bundle / "lora"):  # the run folder, or inside an input
        with pytest.raises(store.StoreError, match="overlaps"):
            dexport.export_lora(small_bundle, run, inside)
    assert sorted(p.name for p in run.iterdir()) == sorted([dtrain.PROGRESS, progress["checkpoint"],
                                                            progress["previous"]])
    out = tmp_path / "lora"
    record = dexport.export_lora(small_bundle, run, out)
    with pytest.raises(store.StoreError, match="pass --overwrite"):
        dexport.export_lora(small_bundle, run, out)
    assert dexport.export_lora(small_bundle, run, out, overwrite=True) == record
    assert (out / dexport.LORA_EXPORT).read_bytes() == (first / dexport.LORA_EXPORT).read_bytes()
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "dog.jpg").write_bytes(b"not ours")
    with pytest.raises(store.StoreError, match="not an earlier `device export` output"):
        dexport.export_lora(small_bundle, run, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["dog.jpg"]
    res = CliRunner().invoke(main, ["device", "export", "--bundle", str(small_bundle), "--checkpoint", str(run),
                                    "--out", str(out)])
    assert res.exit_code == 1 and "--overwrite" in res.output


EXPORT_ONCE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from hollow_export.device.export import export_lora
    export_lora(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
""")


def test_export_is_byte_for_byte_reproducible(small_bundle, trained, tmp_path):
    """Exports of one checkpoint (run folder or its checkpoint file, this process or a fresh one) are identical."""
    run, progress, first = trained
    dexport.export_lora(small_bundle, run / progress["checkpoint"], tmp_path / "again")
    subprocess.run([sys.executable, "-c", EXPORT_ONCE, str(small_bundle), str(run), str(tmp_path / "child")],
                   check=True, timeout=120)
    for name in (dexport.LORA_EXPORT, dexport.LORA_RECORD):
        assert (tmp_path / "again" / name).read_bytes() == (first / name).read_bytes(), name
        assert (tmp_path / "child" / name).read_bytes() == (first / name).read_bytes(), name
    # the bytes are a valid safetensors file holding the checkpoint's LoRA tensors (read by ORT directly)
    from safetensors import safe_open
    state = ort_session.training_api().CheckpointState.load_checkpoint(str(run / progress["checkpoint"]))
    manifest = fmt.open_bundle(small_bundle)
    with safe_open(str(first / dexport.LORA_EXPORT), "np") as f:
        assert f.metadata()["bundle"] == fmt.bundle_id(small_bundle)
        assert f.metadata()["rank"] == str(manifest["hyper"]["rank"])
        for item in manifest["lora"]:
            assert np.array_equal(f.get_tensor(item["unet_name"]), state.parameters[item["name"]].data)
    # the fault being fixed is real: safetensors alone writes the metadata in varying orders
    from safetensors.numpy import save
    metadata = {k: str(k) for k in ("format", "format_version", "bundle", "rank", "alpha")}
    assert len({save({"x": np.zeros(2, np.float32)}, metadata=metadata) for _ in range(20)}) > 1


# ---------------------------------------------------------------- NaN, infinity and bad numbers


def test_library_refuses_bad_numbers(small_bundle, photo_dir, tmp_path):
    for bad in ({"lr": 0.0}, {"lr": -1e-4}, {"lr": float("nan")}, {"lr": float("inf")}, {"steps": 0},
                {"steps": -5}, {"checkpoint_every": 0}, {"checkpoint_every": -3}, {"max_minutes": -1.0}):
        with pytest.raises(dtrain.RuntimeFault, match="must be"):
            dtrain.TrainConfig(**bad)
    with pytest.raises(dcollect.RuntimeFault, match="at least 1"):
        dcollect.collect(small_bundle, photo_dir, tmp_path / "b.bin", samples=0, progress=False)
    assert not (tmp_path / "b.bin").exists()


def _progress_bytes(run):
    return (run / dtrain.PROGRESS).read_bytes()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(small_bundle, collected, tmp_path, monkeypatch):
    run = tmp_path / "run"
    dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=4, checkpoint_every=4, progress=False))
    before = _progress_bytes(run)
    kept = dtrain.read_progress(run)["checkpoint"]

    def unchanged():
        assert _progress_bytes(run) == before and sorted(p.name for p in run.iterdir()) == [kept, dtrain.PROGRESS]

    # an absurd rate through the CLI: step 5's loss is computed before its update, which throws the LoRA
    # to ~1e6; step 6's loss is the first non-finite one. One line, exit 1, nothing saved past step 4.
    res = CliRunner().invoke(main, ["device", "train", "--bundle", str(small_bundle), "--buffer", str(collected),
                                    "--run", str(run), "--steps", "24", "--checkpoint-every", "4", "--lr", "1e6"])
    assert res.exit_code == 1 and "finished" not in res.output, res.output
    assert "diverged at step 6 (loss nan)" in res.output and "checkpoint-000004 (step 4) is kept" in res.output
    assert "smaller --lr" in res.output
    unchanged()
    # past the library's lr check (as a caller bypassing it would be), lr nan makes the LoRA nan while the
    # step's loss is still finite: the checkpoint due right then is not written
    monkeypatch.setattr(dtrain.TrainConfig, "__post_init__", lambda self: None)
    with pytest.raises(dtrain.RuntimeFault, match=r"diverged at step 5 \(.* holds NaN or infinity\)"):
        dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=8, checkpoint_every=1,
                                                                      lr=float("nan"), progress=False))
    unchanged()
    monkeypatch.undo()
    # the run resumes from the kept checkpoint with a sane rate
    done = dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=8, checkpoint_every=4,
                                                                         progress=False))
    assert done["finished"] and done["starts"][-1] == 4 and np.all(np.isfinite(done["losses"]))


def test_export_refuses_non_finite_lora(small_bundle, collected, tmp_path, monkeypatch):
    """A checkpoint holding NaNs (saved here with both of training's guards switched off) is not exported."""
    monkeypatch.setattr(dtrain.TrainConfig, "__post_init__", lambda self: None)
    monkeypatch.setattr(dtrain, "non_finite", lambda *_: None)
    run = tmp_path / "run"
    dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=1, checkpoint_every=1, lr=float("nan"),
                                                                  progress=False))
    monkeypatch.undo()
    state = ort_session.training_api().CheckpointState.load_checkpoint(str(run / "checkpoint-000001"))
    names = [item["name"] for item in fmt.open_bundle(small_bundle)["lora"]]
    assert np.isnan(state.parameters[names[0]].data).all()  # the fault is in the file export reads
    with pytest.raises(dexport.RuntimeFault, match=f"NaN or infinity in {names[0]}.*smaller --lr"):
        dexport.export_lora(small_bundle, run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a run keeps its buffer


def test_resume_refuses_a_buffer_from_other_photos(small_bundle, photo_dir, collected, tmp_path):
    from PIL import Image
    photos = tmp_path / "photos"
    shutil.copytree(photo_dir, photos)
    first = sorted(photos.iterdir())[0]
    Image.open(first).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(first)
    other = tmp_path / "other.bin"
    dcollect.collect(small_bundle, photos, other, samples=12, seed=3, progress=False)  # same seed and size
    run = tmp_path / "run"
    dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=2, checkpoint_every=2, progress=False))
    before = _progress_bytes(run)
    with pytest.raises(dtrain.RuntimeFault, match=r"trained on another buffer \(photos differ\).*pass the buffer"):
        dtrain.train(small_bundle, other, run, dtrain.TrainConfig(steps=4, checkpoint_every=2, progress=False))
    assert _progress_bytes(run) == before
    assert dtrain.train(small_bundle, collected, run, dtrain.TrainConfig(steps=4, checkpoint_every=2,
                                                                         progress=False))["finished"]


# ---------------------------------------------------------------- collect checks a finished buffer


def test_collect_again_on_a_complete_but_corrupted_buffer_reports_it(small_bundle, photo_dir, collected, tmp_path):
    damaged = tmp_path / "buffer.bin"
    data = bytearray(collected.read_bytes())
    header, start = buffer.read_header(collected)
    sample = 7
    data[start + sample * header.record_bytes + header.record_bytes // 2] ^= 0x10  # inside sample 7's hidden state
    damaged.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["device", "collect", "--bundle", str(small_bundle), "--images", str(photo_dir),
                                    "--buffer", str(damaged), "--samples", "12", "--seed", "3"])
    assert res.exit_code == 1, res.output
    assert f"sample {sample} is corrupted (checksum mismatch)" in res.output and "collect` again" in res.output
    assert damaged.read_bytes() == bytes(data)  # reported, not silently rewritten
    # the intact buffer is accepted as complete and left as it was
    copy = tmp_path / "intact.bin"
    shutil.copy(collected, copy)
    dcollect.collect(small_bundle, photo_dir, copy, samples=12, seed=3, progress=False)
    assert copy.read_bytes() == collected.read_bytes()
