"""The Kotlin protocol core (android_demo/core) against the Python reference, value for value.

The core is compiled once per session with Debian's kotlinc (android_demo/core/run_tests.sh,
into the git-ignored android_demo/core/build/) and driven through its ProtocolTool command line:
random streams, epoch orders, timesteps, bundle checks, buffers both ways, training-step inputs,
run folders both ways, photo preprocessing, collection (with fake engines on both sides), the
ORT checkpoint reader and the LoRA export. Without kotlinc the module is skipped, except under
CI=true, where it fails (CI installs it: apt-get install -y kotlin junit4 libgoogle-gson-java).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hollow_export import store
from hollow_export.device import buffer, rng
from hollow_export.device import collect as dcollect
from hollow_export.device import export as dexport
from hollow_export.device import train as dtrain
from hollow_export.device.buffer import read_header
from hollow_export import bundle as fmt

CORE = Path(__file__).resolve().parents[1] / "android_demo" / "core"
APT = "apt-get install -y kotlin junit4 libgoogle-gson-java"
JARS = ("/usr/share/java/gson.jar", "/usr/share/java/junit4.jar")


class Tool:
    """ProtocolTool subcommands: keyword options become --options; returns the printed JSON."""

    def __init__(self, classpath: str):
        self.classpath = classpath

    def __call__(self, command, *, expect_error=False, **options):
        cmd = ["java", "-XX:TieredStopAtLevel=1", "-Xss4m", "-cp", self.classpath,
               "org.hollowexport.core.ProtocolTool", command]
        for key, value in options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if expect_error:
            assert done.returncode == 2, done.stdout + done.stderr
            return json.loads(done.stdout)
        assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
        return json.loads(done.stdout)


@pytest.fixture(scope="session")
def kotlin():
    missing = [j for j in JARS if not os.path.exists(j)]
    if shutil.which("kotlinc") is None or shutil.which("java") is None or missing:
        reason = f"kotlinc, java or {', '.join(JARS)} not installed; install them with: {APT}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(["bash", str(CORE / "run_tests.sh"), "--build-only"], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    return Tool((CORE / "build" / "classpath.txt").read_text().strip())


def f32(path, shape=(-1,)):
    return np.fromfile(path, dtype="<f4").reshape(shape)


# ---------------------------------------------------------------- random streams


def test_streams_match_python(kotlin):
    exact, within_ulp, total = 0, 0, 0
    for seed, stream, index in [(0, 1, 0), (7, 2, 5), (3, 3, 0), (2**63 + 5, 4, 17), (2**64 - 1, 2, 123456)]:
        out = kotlin("streams", seed=seed, stream=stream, index=index, count=4099)
        key = rng.stream_key(seed, stream, index)
        assert int(out["key"]) == key
        assert [int(v) for v in out["u64"]] == [int(v) for v in rng.random_u64(key, 4099)]
        ours = np.array(out["normal_bits"], dtype=np.int64)
        ref = rng.random_normal(key, 4099).view(np.int32).astype(np.int64)
        # float32 values of one sign: adjacent floats differ by 1 in their bit patterns
        ulps = np.abs(ours - ref)
        assert np.all(np.sign(ours) == np.sign(ref)) and ulps.max() <= 1, f"{ulps.max()} ulp"
        exact += int((ulps == 0).sum())
        within_ulp += int((ulps == 1).sum())
        total += ulps.size
    # Kotlin uses StrictMath (fdlibm), numpy the platform libm: equal here, 1 ulp tolerated elsewhere
    print(f"normals: {exact}/{total} bit-identical, {within_ulp} one float32 ulp apart")


def test_epoch_orders_and_timesteps_match(kotlin):
    for count in (1, 2, 12, 50, 257):
        for epoch in (0, 1, 5):
            assert kotlin("order", seed=3, epoch=epoch, count=count)["order"] == rng.epoch_order(3, epoch, count)
    out = kotlin("timesteps", seed=11, count=300, T=1000)["timesteps"]
    ref = rng.random_u64(rng.stream_key(11, rng.STREAM_TIMESTEP, 0), 300) % np.uint64(1000)
    assert out == [int(t) for t in ref]


def test_float16_rounding_matches_numpy(kotlin, tmp_path):
    rng = np.random.default_rng(0)
    tiny = np.float32(2.0**-24)
    values = np.concatenate([
        rng.standard_normal(2000).astype(np.float32) * 3,
        rng.standard_normal(500).astype(np.float32) * np.float32(1e-6),  # float16 subnormals
        np.array([65504, 65519, 65520, 70000, -65520, 0.0, -0.0, 1e-8, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11,
                  1 + 3 * 2.0**-11, np.inf, -np.inf], dtype=np.float32),
        (np.arange(-40, 40, dtype=np.float32) + np.float32(0.5)) * tiny,  # ties in the subnormal range
    ]).astype(np.float32)
    values.astype("<f4").tofile(tmp_path / "v.bin")
    out = kotlin("half", values=tmp_path / "v.bin")
    assert out["bits"] == values.astype(np.float16).view(np.uint16).astype(int).tolist()
    assert out["back"] == values.astype(np.float16).astype(np.float32).view(np.int32).tolist()


def test_float_text_is_python_repr(kotlin):
    values = [1e-05, 0.0001, 4.0, 1e16, 123.456, -0.5, 0.1 + 0.2, 2.5e-07, 0.25 + 2**-30, 1e22]
    out = kotlin("json-float", values=",".join(repr(v) for v in values))["repr"]
    assert [float(v) for v in out] == values  # always the same number
    assert out[:7] == [repr(v) for v in values[:7]]  # and Python's text where Java's digits are shortest


# ---------------------------------------------------------------- bundle


def test_kotlin_verifies_a_python_bundle_and_refuses_a_flipped_byte(kotlin, small_bundle, tmp_path):
    out = kotlin("verify-bundle", bundle=small_bundle)
    manifest = fmt.open_bundle(small_bundle)
    assert out["id"] == fmt.bundle_id(small_bundle)
    assert out["files"] == len(manifest["files"]) and out["lora"] == len(manifest["lora"])
    assert out["latent_shape"] == manifest["plan"]["latent_shape"]
    assert out["buffer_shape"] == manifest["plan"]["buffer_shape"]
    assert out["lr"] == manifest["hyper"]["lr"]
    assert out["rank"] == str(manifest["hyper"]["rank"]) and out["alpha"] == str(manifest["hyper"]["alpha"])
    # format 2: the frozen-weights file (hash checked with the others) and the training session settings
    assert out["frozen"] == {"file": fmt.FROZEN_WEIGHTS, "dtype": "float32",
                             "sha256": store.sha256(small_bundle / fmt.FROZEN_WEIGHTS)}
    assert out["training_session"] == fmt.training_session()

    copy = tmp_path / "bundle"
    shutil.copytree(small_bundle, copy)
    target = copy / fmt.PRECOMPUTE
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    err = kotlin("verify-bundle", bundle=copy, expect_error=True)
    assert "precompute.onnx" in err["error"] and "sha256" in err["error"]
    # a missing file alone (a fresh copy, every other file intact): the missing branch, not the modified one
    missing = tmp_path / "missing"
    shutil.copytree(small_bundle, missing)
    (missing / fmt.SCHEDULE).unlink()
    err = kotlin("verify-bundle", bundle=missing, expect_error=True)
    assert "schedule.safetensors is missing" in err["error"] and "sha256" not in err["error"], err
    manifest_path = copy / fmt.MANIFEST
    manifest_path.write_text(manifest_path.read_text().replace('"format_version": 2', '"format_version": 1'))
    err = kotlin("verify-bundle", bundle=copy, expect_error=True)  # a format-1 bundle: rebuild it
    assert "v1" in err["error"] and "hollow-export-bundle v2" in err["error"] and "rebuild" in err["error"]


def test_kotlin_refuses_a_flipped_byte_in_the_frozen_weights(kotlin, small_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(small_bundle, copy)
    target = copy / fmt.FROZEN_WEIGHTS
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x10
    target.write_bytes(bytes(data))
    err = kotlin("verify-bundle", bundle=copy, expect_error=True)
    assert "frozen_weights.bin fails its sha256" in err["error"]


# ---------------------------------------------------------------- buffers


@pytest.fixture(scope="module")
def buffers(small_bundle, photo_dir, tmp_path_factory):
    """Python-collected buffers of the real bundle: float32 and float16."""
    folder = tmp_path_factory.mktemp("kt-buffers")
    out = {}
    for dtype in ("float32", "float16"):
        path = folder / f"{dtype}.bin"
        dcollect.collect(small_bundle, photo_dir, path, samples=6, seed=3, dtype=dtype, progress=False)
        out[dtype] = path
    return out


def test_kotlin_reads_python_buffers(kotlin, small_bundle, buffers, tmp_path):
    bundle_id = fmt.bundle_id(small_bundle)
    for dtype, path in buffers.items():
        out = kotlin("read-buffer", buffer=path, bundle_id=bundle_id, out=tmp_path / "r.bin")
        reader = buffer.BufferReader(path, bundle_id)
        header = reader.header
        assert out["header_json"].encode() == header.to_bytes()[12:]
        assert out["dtype"] == dtype and out["capacity"] == 6 and out["record_bytes"] == header.record_bytes
        n_lat, n_hid = int(np.prod(header.latent_shape)), int(np.prod(header.hidden_shape))
        values = f32(tmp_path / "r.bin", (6, 2 * n_lat + n_hid))
        for i in range(6):
            ref = reader[i]
            assert out["indices"][i] == i and out["timesteps"][i] == ref["timestep"]
            np.testing.assert_array_equal(values[i, :n_lat], ref["latent"].reshape(-1))
            np.testing.assert_array_equal(values[i, n_lat:2 * n_lat], ref["noise"].reshape(-1))
            np.testing.assert_array_equal(values[i, 2 * n_lat:], ref["hidden"].reshape(-1))
        reader.close()
    err = kotlin("read-buffer", buffer=buffers["float32"], bundle_id="0" * 64, out=tmp_path / "x", expect_error=True)
    assert "another bundle" in err["error"]
    torn = tmp_path / "torn.bin"
    torn.write_bytes(buffers["float32"].read_bytes()[:-7])
    err = kotlin("read-buffer", buffer=torn, bundle_id=bundle_id, out=tmp_path / "x", expect_error=True)
    assert "holds 5 of 6 samples" in err["error"] and "collect again to finish it" in err["error"]


def test_kotlin_written_buffer_is_python_identical_and_trains(kotlin, small_bundle, buffers, tmp_path):
    bundle_id = fmt.bundle_id(small_bundle)
    for dtype, path in buffers.items():
        reader = buffer.BufferReader(path, bundle_id)
        header = reader.header
        records = [reader[i] for i in range(len(reader))]
        reader.close()
        (tmp_path / "header.json").write_text(json.dumps(
            {k: getattr(header, k) for k in ("bundle", "photos", "capacity", "seed", "dtype", "latent_shape",
                                             "hidden_shape")}))
        np.concatenate([np.concatenate([r["latent"].reshape(-1), r["noise"].reshape(-1), r["hidden"].reshape(-1)])
                        for r in records]).astype("<f4").tofile(tmp_path / "records.bin")
        timesteps = ",".join(str(r["timestep"]) for r in records)
        out_file = tmp_path / f"kt-{dtype}.bin"
        # a first session killed mid-record after 3 samples, then a second one resuming
        first = kotlin("write-buffer", header=tmp_path / "header.json", records=tmp_path / "records.bin",
                       timesteps=timesteps, out=out_file, stop_after=3, torn=True)
        assert first["done"] == 3
        second = kotlin("write-buffer", header=tmp_path / "header.json", records=tmp_path / "records.bin",
                        timesteps=timesteps, out=out_file)
        assert second["resumed_at"] == 3 and second["done"] == 6
        assert out_file.read_bytes() == path.read_bytes()
        buffer.BufferReader(out_file, bundle_id).close()  # Python accepts it (every crc and index)

    progress = dtrain.train(small_bundle, tmp_path / "kt-float16.bin", tmp_path / "run",
                             dtrain.TrainConfig(steps=2, checkpoint_every=1, progress=False))
    assert progress["finished"] and len(progress["losses"]) == 2 and np.all(np.isfinite(progress["losses"]))


def test_training_inputs_match_python_batch(kotlin, small_bundle, buffers, tmp_path):
    manifest = fmt.open_bundle(small_bundle, verify=False)
    acp = fmt.Bundle.from_pretrained(small_bundle).alphas_cumprod()
    instance = fmt.Bundle.from_pretrained(small_bundle).prompt_embeddings()["instance"]
    seed = manifest["hyper"]["seed"]
    bundle_id = fmt.bundle_id(small_bundle)
    for path, prediction, batch, steps in [(buffers["float32"], "epsilon", 1, 14),
                                           (buffers["float16"], "v_prediction", 2, 7)]:
        out = kotlin("train-inputs", bundle=small_bundle, buffer=path, steps=steps, prediction_type=prediction,
                     batch=batch, out=tmp_path / "inputs.bin")
        assert out["lr"] == pytest.approx(manifest["hyper"]["lr"], rel=1e-7)
        reader = buffer.BufferReader(path, bundle_id)
        sample_n = int(np.prod(out["sample_shape"]))
        hidden_n = int(np.prod(out["hidden_shape"]))
        enc_n = int(np.prod(out["encoder_shape"]))
        per = 2 * sample_n + hidden_n + enc_n
        values = f32(tmp_path / "inputs.bin", (steps, per))
        for step in range(steps):  # crosses epoch boundaries (6 records)
            sample, timestep, ehs, hidden, target = dtrain._batch(reader, acp, instance, seed, step, batch,
                                                                   prediction)
            n = len(reader)
            expected = [rng.epoch_order(seed, (step * batch + k) // n, n)[(step * batch + k) % n]
                        for k in range(batch)]
            assert out["records"][step] == expected
            assert out["timesteps"][step] == timestep.tolist()
            row = values[step]
            np.testing.assert_allclose(row[:sample_n], sample.reshape(-1), rtol=0, atol=1e-6)
            np.testing.assert_allclose(row[sample_n:2 * sample_n], target.reshape(-1), rtol=0, atol=1e-6)
            np.testing.assert_array_equal(row[2 * sample_n:2 * sample_n + hidden_n], hidden.reshape(-1))
            np.testing.assert_array_equal(row[2 * sample_n + hidden_n:], ehs.reshape(-1))
            assert list(sample.shape) == out["sample_shape"] and list(ehs.shape) == out["encoder_shape"]
        reader.close()


# ---------------------------------------------------------------- run folders and checkpoints


def test_run_folders_resume_across_languages(kotlin, small_bundle, buffers, tmp_path):
    buffer = buffers["float32"]
    manifest = fmt.open_bundle(small_bundle, verify=False)
    seed = manifest["hyper"]["seed"]

    def expected_records(steps):
        return [[rng.epoch_order(seed, s // 6, 6)[s % 6]] for s in steps]

    # Kotlin's loop (a recording engine that saves the bundle's initial checkpoint) stops at step 3
    run = tmp_path / "kt-run"
    out = kotlin("fake-train", bundle=small_bundle, buffer=buffer, run=run, steps=8, every=2, stop_at=3)
    assert out["step"] == 3 and not out["finished"] and out["loaded"] == "checkpoint"
    assert out["checkpoint"] == "checkpoint-000003" and out["previous"] == "checkpoint-000002"
    assert out["files"] == ["checkpoint-000002", "checkpoint-000003", "progress.json"]
    assert out["records"] == expected_records(range(3))
    assert out["lr"] == pytest.approx(manifest["hyper"]["lr"], rel=1e-7)
    # Kotlin records the buffer's identity as the reference does, and where its session began
    header, _ = read_header(buffer)
    recorded = dtrain.read_progress(run)
    assert recorded["buffer"] == dtrain.buffer_identity(header) and recorded["starts"] == [0]
    # the reference refuses to resume it over another buffer, naming what differs
    with pytest.raises(dtrain.RuntimeFault, match=r"trained on another buffer \(dtype differ\)"):
        dtrain.train(small_bundle, buffers["float16"], run, dtrain.TrainConfig(steps=6, progress=False))
    # ... and Python's reference resumes that run folder to the end
    progress = dtrain.train(small_bundle, buffer, run, dtrain.TrainConfig(steps=6, checkpoint_every=2,
                                                                           progress=False))
    assert progress["step"] == 6 and progress["finished"] and len(progress["losses"]) == 6
    assert progress["losses"][:3] == pytest.approx([0.25, 0.251, 0.252])
    assert progress["buffer_seed"] == 3 and progress["previous"] == "checkpoint-000004"

    # the other way: Kotlin resumes a Python run folder (hash-checked, same data order)
    out = kotlin("fake-train", bundle=small_bundle, buffer=buffer, run=run, steps=9, every=4)
    assert out["loaded"] == "checkpoint-000006" and out["step"] == 9 and out["finished"]
    assert out["records"] == expected_records(range(6, 9))
    assert out["files"] == ["checkpoint-000008", "checkpoint-000009", "progress.json"]
    assert dtrain.read_progress(run)["losses"][:6] == progress["losses"]
    assert dtrain.read_progress(run)["starts"] == [0, 3, 6]  # Kotlin, Python, Kotlin
    # Kotlin refuses to resume the run over another buffer too
    err = kotlin("fake-train", bundle=small_bundle, buffer=buffers["float16"], run=run, steps=10, expect_error=True)
    assert "trained on another buffer (dtype differ)" in err["error"]
    # the checkpoint missing alone, then present but modified: each branch on its own
    saved = (run / "checkpoint-000009").read_bytes()
    (run / "checkpoint-000009").unlink()
    err = kotlin("fake-train", bundle=small_bundle, buffer=buffer, run=run, steps=10, expect_error=True)
    assert "checkpoint-000009 is missing or fails its hash" in err["error"]
    (run / "checkpoint-000009").write_bytes(saved)
    assert kotlin("fake-train", bundle=small_bundle, buffer=buffer, run=run, steps=10)["step"] == 10  # restored
    (run / "checkpoint-000010").write_bytes(b"tampered")
    err = kotlin("fake-train", bundle=small_bundle, buffer=buffer, run=run, steps=11, expect_error=True)
    assert "checkpoint-000010 is missing or fails its hash" in err["error"]


def _lora_files(folder):
    from safetensors import safe_open
    record = json.loads((folder / dexport.LORA_RECORD).read_text())
    tensors = store.load_tensors(folder / dexport.LORA_EXPORT, record["sha256"])
    with safe_open(str(folder / dexport.LORA_EXPORT), "pt") as f:
        metadata = f.metadata()
    return record, tensors, metadata


def test_lora_export_matches_python(kotlin, small_bundle, buffers, tmp_path):
    run = tmp_path / "run"
    dtrain.train(small_bundle, buffers["float32"], run, dtrain.TrainConfig(steps=2, checkpoint_every=2,
                                                                             progress=False))
    py_out, kt_out, given_out = tmp_path / "py", tmp_path / "kt", tmp_path / "given"
    dexport.export_lora(small_bundle, run, py_out)
    kotlin("write-lora", bundle=small_bundle, checkpoint=run, out=kt_out)  # reads the ORT checkpoint itself
    py_record, py_tensors, py_meta = _lora_files(py_out)
    kt_record, kt_tensors, kt_meta = _lora_files(kt_out)
    assert kt_meta == py_meta
    assert {k: v for k, v in kt_record.items() if k != "sha256"} == {k: v for k, v in py_record.items()
                                                                     if k != "sha256"}
    assert sorted(kt_tensors) == sorted(py_tensors) and len(kt_tensors) == len(fmt.open_bundle(small_bundle)["lora"])
    for name, value in py_tensors.items():
        assert kt_tensors[name].dtype == value.dtype and kt_tensors[name].shape == value.shape
        assert bool((kt_tensors[name] == value).all()), name
    # trained: the LoRA B matrices moved away from their zero init
    assert any(float(v.abs().sum()) > 0 for k, v in kt_tensors.items() if "lora_B" in k)

    # the run's checkpoint is LoRA-only (format 2): Kotlin reads every LoRA tensor value for value as ORT
    # holds it, and finds no frozen parameter in it
    from onnxruntime.training.api import CheckpointState
    checkpoint = run / dtrain.read_progress(run)["checkpoint"]
    state = CheckpointState.load_checkpoint(str(checkpoint))
    names = [item["name"] for item in fmt.open_bundle(small_bundle)["lora"]]
    out = kotlin("checkpoint-params", checkpoint=checkpoint, names=",".join(names), out=tmp_path / "lora.bin")
    assert out["trainable"] == len(names) and out["frozen"] == 0
    np.testing.assert_array_equal(f32(tmp_path / "lora.bin"),
                                  np.concatenate([np.asarray(state.parameters[n].data).reshape(-1) for n in names]))

    # tensors handed over by Python (not from a checkpoint) come out the same too
    kotlin("write-lora", bundle=small_bundle, tensors=py_out / dexport.LORA_EXPORT, checkpoint_name="given",
           out=given_out)
    given_record, given_tensors, given_meta = _lora_files(given_out)
    assert given_meta == py_meta and given_record["checkpoint"] == "given"
    assert all(bool((given_tensors[k] == v).all()) for k, v in py_tensors.items())

    # a checkpoint of another bundle is refused, naming the missing parameter
    other = tmp_path / "other.ckpt"
    _write_checkpoint(other, [("unrelated.weight", np.zeros((2, 2), np.float32), None)], [])
    err = kotlin("write-lora", bundle=small_bundle, checkpoint=other, out=tmp_path / "x", expect_error=True)
    assert "lacks" in err["error"] and "another bundle" in err["error"]


def _write_checkpoint(path, trainable, frozen, external=None):
    """An ORT training checkpoint flatbuffer written with ORT's own schema bindings.

    Each tensor is (name, array, external_offset or None); external tensors' bytes go to `external`.
    """
    import flatbuffers
    import onnxruntime
    sys.path.insert(0, str(Path(onnxruntime.__file__).parent / "tools" / "ort_format_model"))
    from ort_flatbuffers_py.fbs import Checkpoint, ModuleState, Tensor

    builder = flatbuffers.Builder(1024)

    def tensor(name, array, offset):
        name_off = builder.CreateString(name)
        Tensor.TensorStartDimsVector(builder, array.ndim)
        for d in reversed(array.shape):
            builder.PrependInt64(d)
        dims = builder.EndVector()
        raw = None if offset is not None else builder.CreateNumpyVector(
            np.frombuffer(array.astype("<f4").tobytes(), np.uint8))
        Tensor.TensorStart(builder)
        Tensor.TensorAddName(builder, name_off)
        Tensor.TensorAddDims(builder, dims)
        Tensor.TensorAddDataType(builder, 1)
        if raw is not None:
            Tensor.TensorAddRawData(builder, raw)
        else:
            Tensor.TensorAddExternalDataOffset(builder, offset)
        return Tensor.TensorEnd(builder)

    def vector(start, items):
        offsets = [tensor(*item) for item in items]
        start(builder, len(offsets))
        for o in reversed(offsets):
            builder.PrependUOffsetTRelative(o)
        return builder.EndVector()

    req = vector(ModuleState.ModuleStateStartRequiresGradParamsVector, trainable)
    fro = vector(ModuleState.ModuleStateStartFrozenParamsVector, frozen)
    ModuleState.ModuleStateStart(builder)
    ModuleState.ModuleStateAddRequiresGradParams(builder, req)
    ModuleState.ModuleStateAddFrozenParams(builder, fro)
    ModuleState.ModuleStateAddHasExternalData(builder, external is not None)
    module = ModuleState.ModuleStateEnd(builder)
    Checkpoint.CheckpointStart(builder)
    Checkpoint.CheckpointAddVersion(builder, 2)
    Checkpoint.CheckpointAddModuleState(builder, module)
    builder.Finish(Checkpoint.CheckpointEnd(builder), file_identifier=b"ODTC")
    path.write_bytes(bytes(builder.Output()))
    if external is not None:
        blob = bytearray()
        for name, array, offset in sorted(trainable + frozen, key=lambda t: -1 if t[2] is None else t[2]):
            if offset is not None:
                blob.extend(b"\0" * (offset - len(blob)))
                blob.extend(array.astype("<f4").tobytes())
        Path(str(path) + ".data").write_bytes(bytes(blob))


def test_checkpoint_reader_handles_external_data(kotlin, tmp_path):
    rng = np.random.default_rng(1)
    inline = rng.standard_normal((4, 8)).astype(np.float32)
    big = rng.standard_normal((16, 4)).astype(np.float32)
    frozen = rng.standard_normal((3,)).astype(np.float32)
    path = tmp_path / "checkpoint-000010"
    _write_checkpoint(path, [("a.lora_A.default.weight", inline, None), ("a.lora_B.default.weight", big, 64)],
                      [("frozen.weight", frozen, 0)], external=True)
    out = kotlin("checkpoint-params", checkpoint=path, names="a.lora_B.default.weight,a.lora_A.default.weight",
                 out=tmp_path / "p.bin")
    assert out["version"] == 2 and out["trainable"] == 2 and out["frozen"] == 1
    assert out["shapes"] == [[16, 4], [4, 8]]
    values = f32(tmp_path / "p.bin")
    np.testing.assert_array_equal(values[:64], big.reshape(-1))
    np.testing.assert_array_equal(values[64:], inline.reshape(-1))
    Path(str(path) + ".data").unlink()
    err = kotlin("checkpoint-params", checkpoint=path, names="a.lora_B.default.weight", out=tmp_path / "p.bin",
                 expect_error=True)
    assert "checkpoint-000010.data is missing" in err["error"]


# ---------------------------------------------------------------- photos and collection


def test_photo_preprocessing_is_pillow_exact(kotlin, tmp_path):
    from PIL import Image
    from hollow_export.photos import load_photos, photos_digest
    rng = np.random.default_rng(2)
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, (w, h) in {"c_landscape.png": (200, 150), "a_portrait.png": (97, 160), "b_small.png": (60, 90),
                         "d_exact.png": (128, 128), "e_wide.png": (301, 129)}.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[: h // 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]  # smooth half, noisy half
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not a photo")
    out = kotlin("preprocess", images=folder, resolution=128, out=tmp_path / "px.bin")
    assert out["files"] == sorted(p.name for p in folder.glob("*.png"))
    assert out["digest"] == photos_digest(folder)
    ours = f32(tmp_path / "px.bin", (5, 3, 128, 128))
    np.testing.assert_array_equal(ours, load_photos(folder, 128))


class _FakeSession:
    """Stand-ins for the ORT sessions, computing what ProtocolTool's FakeEncoder/FakePrecompute compute."""

    def __init__(self, path, buffer_shape):
        self.kind = Path(path).name
        self.buffer_shape = buffer_shape

    def run(self, _outputs, feeds):
        if self.kind == fmt.VAE_ENCODER:
            mean = np.ascontiguousarray(feeds["image"][:, [0, 1, 2, 0], ::8, ::8] * np.float32(0.5), np.float32)
            return [mean, np.full_like(mean, 0.25)]
        noisy = feeds["sample"].reshape(-1)
        states = feeds["encoder_hidden_states"].reshape(-1)
        idx = np.arange(int(np.prod(self.buffer_shape)))
        hidden = noisy[idx % noisy.size] * np.float32(feeds["timestep"][0]) + states[idx % states.size]
        return [hidden.astype(np.float32).reshape(1, *self.buffer_shape)]


def test_collection_matches_python_byte_for_byte(kotlin, small_bundle, photo_dir, tmp_path, monkeypatch):
    buffer_shape = fmt.open_bundle(small_bundle, verify=False)["plan"]["buffer_shape"]
    monkeypatch.setattr(dcollect, "inference_session", lambda path, *a, **k: _FakeSession(path, buffer_shape))
    for dtype in ("float32", "float16"):
        ref = tmp_path / f"py-{dtype}.bin"
        dcollect.collect(small_bundle, photo_dir, ref, samples=7, seed=5, dtype=dtype, progress=False)
        ours = tmp_path / f"kt-{dtype}.bin"
        first = kotlin("fake-collect", bundle=small_bundle, images=photo_dir, buffer=ours, samples=7, seed=5,
                       dtype=dtype, stop_after=4)
        assert first["done"] == 4
        with open(ours, "ab") as f:  # killed while writing record 4
            f.write(b"\x01" * 100)
        second = kotlin("fake-collect", bundle=small_bundle, images=photo_dir, buffer=ours, samples=7, seed=5,
                        dtype=dtype)
        assert second["done"] == 7
        assert ours.read_bytes() == ref.read_bytes()
    err = kotlin("fake-collect", bundle=small_bundle, images=photo_dir, buffer=ours, samples=7, seed=6,
                 dtype="float16", expect_error=True)
    assert "seed differ" in err["error"]


# ---------------------------------------------------------------- the Kotlin unit tests themselves


def test_kotlin_unit_tests_pass(kotlin):
    """CI runs pytest only: this runs android_demo/core's JUnit suite (compiles it once, ~40 s)."""
    done = subprocess.run(["bash", str(CORE / "run_tests.sh")], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "OK (" in done.stdout
