"""recompute_units.recompute_units: per-unit recomputation trains exactly like the plain graph; no backward
read of a unit-internal activation is left; refusals."""

import collections
import re
import shutil

import onnx
import pytest

from hollow_export import bundle as fmt
from hollow_export.export.build import BuildSettings
from hollow_export.export.recompute import RecomputeError
from hollow_export.export.recompute_units import recompute_units

from ort_steps import assert_trains_identically, backward_names, build_tiny, forward_names

PLAIN = BuildSettings(lr=1e-3, recompute_units=False)  # every other lever on, as the bundle is built


_build = build_tiny


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("plain") / "b", PLAIN)


def _held_unit_activations(model):
    """Independent inspection: (backward node, tensor) pairs where the backward reads an activation computed
    inside a unit (forward node named /unit_scopes.K/), not leaving it, and made from the unit's input
    activation (so not a weight-only tensor such as a cross-attention key of the prompt)."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    fwd = forward_names(g)

    def unit(n):
        return n.name.split("/")[1] if n.name.startswith("/unit_scopes.") else None

    readers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)

    graph_inputs = {i.name for i in g.input}
    shape_only = set()  # tensors computed from shapes and constants only (e.g. a batch-size Concat), not data
    for n in g.node:  # topological order
        if n.op_type == "ConcatTraining":  # its second output: the per-input lengths (ORT's contrib op)
            shape_only.update(n.output[1:])
        if n.op_type in ("Shape", "Constant") or all(
                i not in graph_inputs and (i not in prod or i in shape_only) for i in n.input if i):
            shape_only.update(n.output)

    def from_outside_activation(t, u, seen):
        n = prod.get(t)
        if n is None or t in seen:
            return False
        seen.add(t)
        if unit(n) != u:
            return t not in shape_only  # an activation entering the unit
        return any(from_outside_activation(i, u, seen) for i in n.input)

    held = []
    for n in g.node:
        if n.name not in fwd or unit(n) is None:
            continue
        for o in n.output:
            leaves = any(r.name in fwd and unit(r) != unit(n) for r in readers[o])
            if leaves or o == g.output[0].name:
                continue
            bwd = [r for r in readers[o] if r.name not in fwd]
            if bwd and o not in shape_only and from_outside_activation(o, unit(n), set()):
                held += [(r.name, o, unit(n)) for r in bwd]
    return held


def _recomputed_activations(model):
    """`_held_unit_activations` less the boundaries the copies read from the forward on purpose, told apart by
    the module names that make and read them (the rewrite's rule restated): the self-attention output its
    output projection reads, the resnet output the transformer reads, the resnet's first conv output."""
    g = model.graph
    prod = {o: n.name for n in g.node for o in n.output}
    fwd = forward_names(g)
    readers = collections.defaultdict(list)
    for n in g.node:
        if n.name in fwd:
            for i in n.input:
                readers[i].append(n.name)

    def boundary(t):
        made, read = prod[t], readers[t]
        return ("/attn1/" in made and "/attn1/to_out.0/" not in made and any("/attn1/to_out.0/" in r for r in read)) \
            or (re.search(r"/resnets\.\d+/", made) and any(re.search(r"/attentions\.\d+/", r) for r in read)) \
            or bool(re.search(r"/resnets\.\d+/conv1/", made))
    return [h for h in _held_unit_activations(model) if not boundary(h[1])]


def test_unit_recompute_trains_exactly_like_the_plain_graph(plain, tmp_path):
    before = onnx.load(str(plain / fmt.TRAINING_MODEL))
    held = _held_unit_activations(before)
    assert len(held) > 100  # the plain graph holds the units' activations for the backward
    holding = {u for _, _, u in held}
    shutil.copytree(plain, tmp_path / "units")
    model = onnx.load(str(tmp_path / "units" / fmt.TRAINING_MODEL))
    count = recompute_units(model)
    units = {n.name.split("/")[1] for n in before.graph.node if n.name.startswith("/unit_scopes.")}
    assert len(holding) <= count <= len(units)  # conv_in, the samplers: only their input is read back
    assert len(holding) > 5
    assert _recomputed_activations(model) == []
    onnx.save(model, str(tmp_path / "units" / fmt.TRAINING_MODEL))
    # measured bit-identical on ORT 1.19.2 CPU (the copies run the same kernels on the same bits): tolerance 0
    assert_trains_identically(tmp_path / "units", plain, steps=4)


def _copied(model, op, pattern):
    """Names of unit-copy nodes (recompute_units/K/...) of type `op` whose name matches `pattern`."""
    return [n.name for n in model.graph.node
            if n.name.startswith("recompute_units/") and n.op_type == op and re.search(pattern, n.name)]


def test_unit_copies_read_the_attention_and_resnet_outputs_from_the_forward(tiny_chunked_bundle, tmp_path):
    chunked = tiny_chunked_bundle  # attention in 4 chunks, as at sd21's 64x64 latents with 512
    whole = onnx.load(str(chunked / fmt.TRAINING_MODEL))
    recompute_units(whole, keep_boundaries=False)
    kept = onnx.load(str(chunked / fmt.TRAINING_MODEL))
    recompute_units(kept)
    attention_core = [("MatMul", r"/attn1/MatMul"), ("Softmax", r"/attn1/Softmax")]
    resnet_convs = [("Conv", r"/resnets\.\d+/conv[12]/")]
    for op, pattern in attention_core + resnet_convs:
        assert _copied(whole, op, pattern)  # without boundaries the copies redo them
        assert _copied(kept, op, pattern) == [], (op, pattern)
    assert _copied(kept, "Softmax", r"/attn2/Softmax")  # the cross-attention is still recomputed
    assert _held_unit_activations(whole) == []  # without boundaries the backward reads copies only
    held = {t for _, t, _ in _held_unit_activations(kept)}  # with them, the copies' gates read just those
    assert held and _recomputed_activations(kept) == []
    shutil.copytree(chunked, tmp_path / "kept")
    onnx.save(kept, str(tmp_path / "kept" / fmt.TRAINING_MODEL))
    assert_trains_identically(tmp_path / "kept", chunked, steps=3)


def test_built_bundle_has_the_units_rewritten(tiny_bundle):
    model = onnx.load(str(tiny_bundle / fmt.TRAINING_MODEL), load_external_data=False)
    assert any(n.name.startswith("recompute_units/") for n in model.graph.node)
    assert _recomputed_activations(model) == []
    backward = backward_names(model.graph)  # no copy can run before the backward reaches its unit
    copies = [n for n in model.graph.node if n.name.startswith("recompute_units/")]
    assert len(copies) > 1000
    assert [n.name for n in copies if n.name not in backward] == []


def test_graph_without_unit_scopes_is_refused(plain):
    model = onnx.load(str(plain / fmt.TRAINING_MODEL))
    for n in model.graph.node:
        n.name = n.name.replace("/unit_scopes.", "/elsewhere.")
    with pytest.raises(RecomputeError, match="unit_scopes"):
        recompute_units(model)


def test_rewriting_twice_is_refused(plain):
    model = onnx.load(str(plain / fmt.TRAINING_MODEL))
    recompute_units(model)
    with pytest.raises(RecomputeError, match="already"):
        recompute_units(model)


def test_recompute_levels_rewrite_only_the_high_resolution_units(tmp_path):
    static = _build(tmp_path / "static", BuildSettings(lr=1e-3, recompute_units=False, unknown_batch=False))
    every = recompute_units(onnx.load(str(static / fmt.TRAINING_MODEL)))
    shutil.copytree(static, tmp_path / "top")
    model = onnx.load(str(tmp_path / "top" / fmt.TRAINING_MODEL))
    count = recompute_units(model, levels=1)
    assert 0 < count < every
    held = {u for _, _, u in _held_unit_activations(model)}
    assert held  # the low-resolution units keep their activations for the backward
    onnx.save(model, str(tmp_path / "top" / fmt.TRAINING_MODEL))
    assert_trains_identically(tmp_path / "top", static, steps=3)
    with pytest.raises(RecomputeError, match="at least 1"):
        recompute_units(onnx.load(str(static / fmt.TRAINING_MODEL)), levels=0)


def _backward_reads_of_weight_transposes(model):
    """Independent inspection: forward Transposes of a 2-D initializer, and the backward nodes reading them."""
    graph = model.graph
    forward = forward_names(graph)
    two_d = {i.name for i in graph.initializer if len(i.dims) == 2}
    transposes = {n.output[0] for n in graph.node
                  if n.name in forward and n.op_type == "Transpose" and n.input[0] in two_d}
    return transposes, [(n.name, t) for n in graph.node if n.name not in forward for t in n.input if t in transposes]


def test_the_backward_reads_each_weight_untransposed(plain):
    """A Linear exports as MatMul(x, Transpose(W)) and ORT's gradient reads that W^T in the backward, so every
    linear weight would be held twice from the forward to the backward; the rewrite makes the backward read W
    (the training math is covered by the tests above)."""
    model = onnx.load(str(plain / fmt.TRAINING_MODEL), load_external_data=False)
    transposes, reads = _backward_reads_of_weight_transposes(model)
    assert len(transposes) > 50 and len(reads) > 50  # as exported, the backward reads the forward's W^T
    recompute_units(model)
    transposes, reads = _backward_reads_of_weight_transposes(model)
    assert len(transposes) > 50 and reads == []
