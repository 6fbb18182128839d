"""Frozen weights in one aligned external-data file: layout, LoRA-only checkpoints, fp16 close to fp32."""

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnxruntime.training.api import CheckpointState

from hollow_export import bundle as fmt
from hollow_export import store
from hollow_export.hollow.plan import LoraSpec, make_plan
from hollow_export.export.build import BuildSettings, build
from hollow_export.export.frozen import ALIGN, FROZEN_DATA, FrozenError, write_frozen_data
from hollow_export.models.load import load_pipeline

from ort_steps import assert_batch_of_two_is_the_mean, backward_names, ort_steps


def _build(folder, settings, round_fp16=False):
    pipe = load_pipeline(arch="tiny")
    if round_fp16:  # the reference for fp16 storage: fp32 weights that are exactly the fp16-rounded ones
        for p in pipe.unet.parameters():
            p.data = p.data.half().float()
    plan = make_plan(pipe.unet, depth=3, lora=LoraSpec(rank=4, alpha=8.0))
    build(pipe, plan, folder, "a sks dog", "a dog", settings, {"source": "tiny"})
    return folder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("frozen")
    return {
        "checkpoint": _build(root / "ckpt", BuildSettings(lr=1e-3, frozen_external=False)),
        "fp32": tiny_bundle,  # _build(..., BuildSettings(lr=1e-3)), shared
        "fp16": _build(root / "fp16", BuildSettings(lr=1e-3, frozen_dtype="float16")),
        "rounded": _build(root / "rounded", BuildSettings(lr=1e-3, frozen_external=False), round_fp16=True),
    }


def test_write_frozen_data_aligns_and_round_trips(tmp_path):
    g = np.random.default_rng(0)
    tensors = [("a", g.standard_normal((3, 5)).astype(np.float32)), ("big", g.standard_normal((40, 70))),
               ("c", g.standard_normal(7).astype(np.float32)), ("big2", g.standard_normal((2000,)))]
    for dtype, np_dtype in (("float32", np.float32), ("float16", np.float16)):
        table = write_frozen_data(tmp_path / dtype, iter(tensors), dtype)
        raw = (tmp_path / dtype).read_bytes()
        for (name, array), entry in zip(tensors, table):
            assert entry["name"] == name and entry["dims"] == list(array.shape)
            if entry["length"] >= ALIGN:
                assert entry["offset"] % ALIGN == 0
            stored = np.frombuffer(raw, np_dtype, array.size, entry["offset"]).reshape(array.shape)
            np.testing.assert_array_equal(stored, array.astype(np_dtype))
    with pytest.raises(FrozenError):
        write_frozen_data(tmp_path / "x", iter(tensors), "bfloat16")


def test_checkpoint_holds_lora_only_and_graphs_hold_the_frozen_weights(bundles):
    old = CheckpointState.load_checkpoint(str(bundles["checkpoint"] / fmt.CHECKPOINT))
    old_frozen = {n: np.array(p.data) for n, p in old.parameters if not p.requires_grad}
    assert old_frozen
    folder = bundles["fp32"]
    manifest = fmt.open_bundle(folder)
    state = CheckpointState.load_checkpoint(str(folder / fmt.CHECKPOINT))
    assert sorted(n for n, _ in state.parameters) == sorted(i["name"] for i in manifest["lora"])
    assert all(p.requires_grad for _, p in state.parameters)
    digest = hashlib.sha256((folder / FROZEN_DATA).read_bytes()).hexdigest()  # independent of store.sha256
    assert FROZEN_DATA in manifest["files"] and manifest["frozen"] == {
        "file": FROZEN_DATA, "dtype": "float32", "sha256": digest, "bytes": (folder / FROZEN_DATA).stat().st_size}
    assert manifest["training_session"] == fmt.training_session()
    for name in (fmt.TRAINING_MODEL, fmt.EVAL_MODEL):
        model = onnx.load(str(folder / name))  # loads the external data: the values must be the old checkpoint's
        inits = {i.name: i for i in model.graph.initializer}
        assert not any(i.name in old_frozen for i in model.graph.input)
        for n, value in old_frozen.items():
            if n in inits:
                np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[n]), value, err_msg=n)
        bare = onnx.load(str(folder / name), load_external_data=False)
        locations = {e.value for i in bare.graph.initializer for e in i.external_data if e.key == "location"}
        assert locations == {FROZEN_DATA}


def test_external_frozen_bundle_trains_like_the_checkpoint_bundle_and_never_rewrites_the_data(bundles):
    ref_losses, ref_lora = ort_steps(bundles["checkpoint"], steps=3)
    digest = store.sha256(bundles["fp32"] / FROZEN_DATA)
    losses, lora = ort_steps(bundles["fp32"], steps=3)
    worst = max(float(np.abs(lora[n] - ref_lora[n]).max()) for n in ref_lora)
    print(f"external fp32 vs checkpoint-fed: loss {np.abs(losses - ref_losses).max():.1e}, LoRA {worst:.1e}")
    # measured bit-identical on ORT 1.19.2 CPU with the bundle's session (constant folding and NCHWc off,
    # so ORT computes on the external initializers exactly as on checkpoint-fed inputs)
    np.testing.assert_array_equal(losses, ref_losses)
    assert worst == 0.0
    assert store.sha256(bundles["fp32"] / FROZEN_DATA) == digest


def test_fp16_frozen_weights_compute_in_fp32_over_rounded_weights(bundles):
    """fp16 storage == fp32 training over the fp16-rounded weights (the Casts are exact, the math fp32)."""
    ref_losses, ref_lora = ort_steps(bundles["rounded"], steps=3)
    losses, lora = ort_steps(bundles["fp16"], steps=3)
    worst = max(float(np.abs(lora[n] - ref_lora[n]).max()) for n in ref_lora)
    print(f"fp16 storage vs fp32 over rounded weights: loss {np.abs(losses - ref_losses).max():.1e}, LoRA {worst:.1e}")
    # measured bit-identical on ORT 1.19.2 CPU: fp16 -> fp32 Casts are exact and nothing else changes
    np.testing.assert_array_equal(losses, ref_losses)
    assert worst == 0.0


def test_fp16_frozen_weights_give_a_close_loss_and_half_the_bytes(bundles):
    f32 = (bundles["fp32"] / FROZEN_DATA).stat().st_size
    f16 = (bundles["fp16"] / FROZEN_DATA).stat().st_size
    assert f16 < 0.62 * f32  # small tensors are padded to 64 bytes, big ones to pages
    _, init = ort_steps(bundles["fp32"], steps=0)
    ref_losses, ref_lora = ort_steps(bundles["fp32"], steps=3)
    losses, lora = ort_steps(bundles["fp16"], steps=3)  # the bundle's settings: constant folding off
    update = sum(float(np.abs(ref_lora[n] - init[n]).sum()) for n in ref_lora)
    diff = sum(float(np.abs(lora[n] - ref_lora[n]).sum()) for n in ref_lora)
    loss_rel = float(np.abs(losses / ref_losses - 1).max())
    print(f"fp16 vs fp32 frozen weights: loss rel {loss_rel:.1e}, LoRA update rel {diff / update:.1e}")
    # measured on tiny (3 AdamW steps, lr 1e-3): loss 6.3e-6 relative, LoRA update 1.8e-3 relative
    assert update > 0 and loss_rel < 1e-4 and diff < 1e-2 * update
    model = onnx.load(str(bundles["fp16"] / fmt.TRAINING_MODEL), load_external_data=False)
    stored = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert stored and all(i.data_type == onnx.TensorProto.FLOAT16 for i in stored)
    manifest = json.loads((bundles["fp16"] / fmt.MANIFEST).read_text())
    assert manifest["frozen"]["dtype"] == "float16"
    # the gated Casts' fp32 copies are short-lived: fp16 bundles run with the CPU arena on, like fp32 ones
    assert manifest["training_session"]["enable_cpu_mem_arena"] is True
    assert json.loads((bundles["fp32"] / fmt.MANIFEST).read_text())["training_session"]["enable_cpu_mem_arena"] is True
    assert "ConstantFolding" in manifest["training_session"]["config_entries"][fmt.DISABLE_OPTIMIZERS].split(";")


def test_fp16_weight_casts_wait_for_their_readers(bundles):
    """Independent inspection of the fp16 training graph: an fp32 copy made from the weights alone (which ORT may
    run at any time and hold) is read only by nodes with no computed activation to wait for; every other copy
    depends on its reader's activation, so it cannot run before that reader's input exists."""
    graph = onnx.load(str(bundles["fp16"] / fmt.TRAINING_MODEL), load_external_data=False).graph
    from_weights = {i.name for i in graph.initializer}  # tensors computed from initializers and constants only
    changed = True  # the graphs need not be in topological order: iterate to a fixed point
    while changed:
        changed = False
        for n in graph.node:
            if n.output[0] not in from_weights and all(i in from_weights for i in n.input if i):
                from_weights.update(o for o in n.output if o)
                changed = True
    readers = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    produced = {o for n in graph.node for o in n.output if o}
    fp16 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    early = [n for n in graph.node if n.op_type == "Cast" and n.input[0] in fp16]
    gated = [n for n in graph.node if n.op_type == "Cast" and n.input[0] not in from_weights
             and n.name.startswith("frozen16/") and n.attribute[0].i == onnx.TensorProto.FLOAT]
    assert len(gated) > 20
    backward = backward_names(graph)
    backward_gated = 0
    for cast in gated:  # a backward reader's copy waits for the backward, not just for some forward tensor
        after = [r for r in readers.get(cast.output[0], [])]
        after += [r2 for r in after if r.op_type == "Reshape" for r2 in readers.get(r.output[0], [])]
        if any(r.name in backward for r in after):
            assert cast.name in backward, f"{cast.name} feeds a backward reader but waits for no backward tensor"
            backward_gated += 1
    assert backward_gated > 20
    for cast in early:
        for reader in readers.get(cast.output[0], []):
            waits = [i for i in reader.input if i in produced and i not in from_weights]
            assert not waits, f"{reader.name} reads an early fp32 weight copy though it could wait for {waits[0]}"


def _weight_copies_ort_makes(folder, settings, tmp_path):
    """Independent of the package's graph code: the training graph as ORT optimises it at session creation
    (`optimized_model_filepath`) and the initializers of 256 or more elements ORT added to it, i.e. weights
    it computed once and holds (a folded Cast or Transpose of a frozen weight)."""
    from onnxruntime.training.api import Module

    from hollow_export.device.ort_session import training_options

    options = training_options(settings)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    Module(str(folder / fmt.TRAINING_MODEL), CheckpointState.load_checkpoint(str(folder / fmt.CHECKPOINT)), None,
           session_options=options)
    original = {i.name for i in onnx.load(str(folder / fmt.TRAINING_MODEL), load_external_data=False).graph.initializer}
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False).graph.initializer
    return [i.name for i in optimized if i.name not in original and np.prod(i.dims) >= 256]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_bundle_session_makes_no_copy_of_a_frozen_weight(bundles, dtype, tmp_path):
    """With the manifest's session (ConstantFolding and NchwcTransformer off) ORT adds no weight of its own to the
    graph it runs; with ORT's defaults it folds the weights' Transposes (and fp16 Casts) into fp32 copies."""
    settings = fmt.open_bundle(bundles[dtype], verify=False)["training_session"]
    assert _weight_copies_ort_makes(bundles[dtype], settings, tmp_path) == []
    if dtype == "fp16":  # the check sees folding: with ORT's default optimizers the Casts are folded
        defaults = {**settings, "config_entries": {}}
        assert len(_weight_copies_ort_makes(bundles[dtype], defaults, tmp_path)) > 20


def test_fp16_bundle_runs_a_batch_of_two(bundles):
    """The fp16 weights' Casts are gated on empty slices of activations: they hold at any batch too."""
    assert_batch_of_two_is_the_mean(bundles["fp16"])
