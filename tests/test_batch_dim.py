"""batch_dim.unknown_batch: the graph trains like its static-batch twin; no activation keeps a shape ORT's
planner could match; refusals."""

import onnx
import numpy as np
import pytest
from onnx import shape_inference

from hollow_export import bundle as fmt
from hollow_export.export.batch_dim import BatchError, unknown_batch
from hollow_export.export.build import BuildSettings

from ort_steps import build_tiny, ort_steps

STATIC = BuildSettings(lr=1e-3, unknown_batch=False)  # every other lever on, as the bundle is built


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("static") / "b", STATIC)


@pytest.fixture(scope="module")
def unknown(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("unknown") / "b", BuildSettings(lr=1e-3))


def _static_activations(model) -> list[str]:
    """Independent inspection with ONNX's own shape inference (data propagation on): float tensors of rank >= 2
    computed from a batch input whose every dimension is a known value, the shapes ORT's planner matches."""
    graph = shape_inference.infer_shapes(model, data_prop=True).graph
    types = {v.name: v.type.tensor_type for v in list(graph.value_info) + list(graph.output)}
    from_data = set(fmt.TRAIN_INPUTS)
    for node in graph.node:  # topological; Shape/Size read only a tensor's shape, not its data
        if node.op_type not in ("Shape", "Size") and any(i in from_data for i in node.input):
            from_data.update(o for o in node.output if o)
    static = []
    for name in from_data - set(fmt.TRAIN_INPUTS):
        t = types.get(name)
        if t is not None and t.elem_type == onnx.TensorProto.FLOAT and t.HasField("shape") \
                and len(t.shape.dim) >= 2 and all(d.HasField("dim_value") for d in t.shape.dim):
            static.append(name)
    return static


def test_trains_like_the_static_batch_graph(static, unknown):
    """Same losses; the LoRA update agrees to 1e-4 of its norm (measured 3e-6 here: ORT fuses Conv+Add only with
    known shapes, so a few sums round differently; AdamW's normalised first steps carry that into the update)."""
    ref_losses, ref_lora = ort_steps(static, steps=4)
    losses, lora = ort_steps(unknown, steps=4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    _, start = ort_steps(static, steps=0)
    delta = np.concatenate([(lora[n] - start[n]).ravel() for n in sorted(lora)])
    ref_delta = np.concatenate([(ref_lora[n] - start[n]).ravel() for n in sorted(lora)])
    assert np.linalg.norm(ref_delta) > 0
    assert np.linalg.norm(delta - ref_delta) <= 1e-4 * np.linalg.norm(ref_delta)


def test_no_activation_keeps_a_static_shape(static, unknown):
    before = _static_activations(onnx.load(str(static / fmt.TRAINING_MODEL), load_external_data=False))
    after = _static_activations(onnx.load(str(unknown / fmt.TRAINING_MODEL), load_external_data=False))
    assert len(before) > 1000  # the check sees the static graph's activations
    assert after == []


def test_manifest_names_the_batch_and_turns_the_arena_on(unknown, static):
    manifest = fmt.open_bundle(unknown, verify=False)
    shapes = {i["name"]: i["shape"] for i in manifest["graphs"][fmt.TRAINING_MODEL]["inputs"]}
    assert shapes["sample"][0] == "batch" and shapes["hidden"][0] == "batch"
    assert manifest["training_session"]["enable_cpu_mem_arena"] is True
    assert fmt.open_bundle(static, verify=False)["training_session"]["enable_cpu_mem_arena"] is False


def test_refuses_a_second_rewrite_and_a_missing_input(unknown, static):
    model = onnx.load(str(unknown / fmt.TRAINING_MODEL), load_external_data=False)
    with pytest.raises(BatchError, match="not the static batch 1"):
        unknown_batch(model, list(fmt.TRAIN_INPUTS))
    model = onnx.load(str(static / fmt.TRAINING_MODEL), load_external_data=False)
    with pytest.raises(BatchError, match="'latents' not found"):
        unknown_batch(model, ["latents"])


@pytest.fixture(scope="module")
def unknown_fp16(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("unknown16") / "b", BuildSettings(lr=1e-3, frozen_dtype="float16"))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_batch_of_two_is_the_mean_of_its_two_samples(unknown, unknown_fp16, dtype):
    """At batch 1 every rewired `Shape(input)[0]` equals the constant 1 it replaced, so only a larger batch
    shows a batch that is wrong somewhere: one step on two samples (the runtime's `batch_size` 2) gives the
    mean of their two losses (the loss is a mean over equal-size samples) and of their LoRA gradients."""
    from onnxruntime.training.api import CheckpointState, Module

    from hollow_export.device.ort_session import training_options

    unknown = unknown if dtype == "fp32" else unknown_fp16  # fp16: the weights' Casts gated on activations
    options = training_options(fmt.open_bundle(unknown, verify=False)["training_session"])
    state = CheckpointState.load_checkpoint(str(unknown / fmt.CHECKPOINT))
    module = Module(str(unknown / fmt.TRAINING_MODEL), state, None, session_options=options)
    g = np.random.default_rng(5)
    names = sorted(n for n, p in state.parameters if p.requires_grad)
    for n in names:  # non-zero B, so every LoRA tensor has a gradient
        if "lora_B" in n:
            state.parameters[n] = (g.standard_normal(state.parameters[n].data.shape) * 0.1).astype(np.float32)
    graphs = fmt.open_bundle(unknown, verify=False)["graphs"]
    shapes = {i["name"]: i["shape"] for i in graphs[fmt.TRAINING_MODEL]["inputs"]}
    pair = {name: (g.integers(0, 1000, size=2).astype(np.int64) if name == "timestep"
                   else g.standard_normal([2, *shapes[name][1:]]).astype(np.float32))
            for name in module.input_names()}
    module.train()

    def step(feed):
        loss = float(module(*[feed[name] for name in module.input_names()]))
        grads = {n: state.parameters[n].grad.copy() for n in names}
        module.lazy_reset_grad()
        return loss, grads

    halves = [step({name: value[k:k + 1] for name, value in pair.items()}) for k in (0, 1)]
    loss, grads = step(pair)
    assert halves[0][0] != halves[1][0]
    assert abs(loss - (halves[0][0] + halves[1][0]) / 2) <= 1e-5 * abs(loss)
    for n in names:
        want = (halves[0][1][n] + halves[1][1][n]) / 2
        assert np.linalg.norm(want) > 0, n
        assert np.linalg.norm(grads[n] - want) <= 1e-4 * np.linalg.norm(want), n
