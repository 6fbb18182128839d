"""batch_dim.unknown_batch: the graph trains like its static-batch twin; no activation keeps a shape ORT's
planner could match; refusals."""

import onnx
import numpy as np
import pytest
from onnx import shape_inference

from hollow_export import bundle as fmt
from hollow_export.export.batch_dim import BatchError, unknown_batch
from hollow_export.export.build import BuildSettings

from ort_steps import assert_batch_of_two_is_the_mean, build_tiny, ort_steps

STATIC = BuildSettings(lr=1e-3, unknown_batch=False)  # every other lever on, as the bundle is built


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("static") / "b", STATIC)


@pytest.fixture(scope="module")
def unknown(tiny_bundle):
    return tiny_bundle  # STATIC's twin: the batch left unknown, as `build` does


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


def test_a_batch_of_two_is_the_mean_of_its_two_samples(unknown):
    """At batch 1 every rewired `Shape(input)[0]` equals the constant 1 it replaced, so only a larger batch
    shows a batch that is wrong somewhere (the fp16 bundle: test_frozen.py)."""
    assert_batch_of_two_is_the_mean(unknown)
