"""recompute.recompute_attention: same training as the un-rewritten graph, no backward reads of P, refusals."""

import shutil

import numpy as np
import onnx
import pytest

from hollow_export import bundle as fmt
from hollow_export.export.build import BuildSettings
from hollow_export.export.recompute import RecomputeError, recompute_attention

from ort_steps import (ancestor_names, assert_trains_identically, backward_names, build_tiny, forward_names,
                       ort_steps)

PLAIN = BuildSettings(lr=1e-3, recompute_attention=False, recompute_units=False, frozen_external=False)


_build = build_tiny


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("plain") / "b", PLAIN)


def _softmax_reads_in_backward(model):
    """Independent inspection: forward = ancestors of the loss; backward nodes reading a forward Softmax output."""
    g = model.graph
    fwd = forward_names(g)
    p = {n.output[0] for n in g.node if n.op_type == "Softmax" and n.name in fwd}
    return [(n.name, i) for n in g.node if n.name not in fwd for i in n.input if i in p]


def _chunks_run_their_backward_in_turn(model, forward_softmax):
    """Independent inspection: for query chunks sharing the keys (same scores-MatMul B input), the
    recomputed P of chunk j depends on chunk j-1's SoftmaxGrad, so no order runs two chunks' backward at
    once. Returns how many consecutive chunk pairs were checked."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    readers = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def ancestors(name):
        return ancestor_names(g, [name])

    groups = {}
    for sm in forward_softmax:  # graph order: chunk 0 first
        groups.setdefault(prod[sm.input[0]].input[1], []).append(sm)
    pairs = 0
    for chunks in groups.values():
        for before, after in zip(chunks, chunks[1:]):
            copy_before, copy = (next(n for n in g.node if n.op_type == "Softmax" and n.name.startswith("recompute/")
                                      and n.name.endswith(sm.name.strip("/") + "/P")) for sm in (before, after))
            grad = next(r for r in readers[copy_before.output[0]] if r.op_type.startswith("SoftmaxGrad"))
            assert grad.name in ancestors(copy.output[0]), (before.name, after.name)
            assert copy.name not in ancestors(grad.output[0])  # and not the other way round
            pairs += 1
    return pairs


def _ungated_copies(model):
    """Independent inspection: recomputed softmaxes (`recompute/` copies) with no ancestor computed from the
    gradient seed (the backward), i.e. copies ORT could run during the forward and hold, as it would hold P."""
    g = model.graph
    backward = backward_names(g)
    return [n.name for n in g.node if n.op_type == "Softmax" and n.name.startswith("recompute/")
            and n.name not in backward]


def _rewritten_copy(src, dst):
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / fmt.TRAINING_MODEL))
    count = recompute_attention(model)
    onnx.save(model, str(dst / fmt.TRAINING_MODEL))
    return count, model


def test_rewritten_graph_trains_exactly_like_the_plain_graph(plain, tmp_path):
    before = onnx.load(str(plain / fmt.TRAINING_MODEL))
    softmaxes = sum(n.op_type == "Softmax" for n in before.graph.node)
    assert _softmax_reads_in_backward(before)  # the plain graph keeps P for the backward
    count, after = _rewritten_copy(plain, tmp_path / "rc")
    assert count == softmaxes > 0
    assert _softmax_reads_in_backward(after) == []
    assert _ungated_copies(after) == []  # each copy waits for the backward (its gate on dO)
    # measured bit-identical on ORT 1.19.2 CPU (same kernels on the same bits): tolerance 0
    assert_trains_identically(tmp_path / "rc", plain, steps=4)


def test_chunked_export_is_recognised_and_trains_like_unchunked(plain, tiny_chunked_bundle):
    folder = tiny_chunked_bundle  # attention_chunk=64, no unit recompute; its frozen weights external, which
    # trains bit-identically to checkpoint-fed weights as in `plain` (test_frozen.py)
    model = onnx.load(str(folder / fmt.TRAINING_MODEL))
    unchunked = sum(n.op_type == "Softmax" for n in onnx.load(str(plain / fmt.TRAINING_MODEL)).graph.node)
    forward_softmax = [n for n in model.graph.node if n.op_type == "Softmax" and not n.name.startswith("recompute/")]
    assert len(forward_softmax) > unchunked  # 256-token attentions became 4 chunks
    assert _softmax_reads_in_backward(model) == []
    assert _ungated_copies(model) == []
    assert _chunks_run_their_backward_in_turn(model, forward_softmax) > 0
    ref_losses, ref_lora = ort_steps(plain, steps=3)
    losses, lora = ort_steps(folder, steps=3)
    worst = max(float(np.abs(lora[n] - ref_lora[n]).max()) for n in ref_lora)
    print(f"chunked vs unchunked: loss rel {np.abs(losses / ref_losses - 1).max():.1e}, LoRA {worst:.1e}")
    # other GEMM shapes, other rounding: fp32 tolerance (measured on tiny, 3 steps: loss equal, LoRA 7.3e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for name in ref_lora:
        np.testing.assert_allclose(lora[name], ref_lora[name], atol=1e-4, err_msg=name)


def test_unrecognised_attention_is_refused_naming_the_node(plain):
    model = onnx.load(str(plain / fmt.TRAINING_MODEL))
    g = model.graph
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    # S -> Identity -> Softmax: not MatMul -> Softmax any more
    g.node.append(onnx.helper.make_node("Identity", [softmax.input[0]], ["odd_scores"], name="odd"))
    softmax.input[0] = "odd_scores"
    with pytest.raises(RecomputeError, match=softmax.name):
        recompute_attention(model)


def test_backward_reader_of_unknown_kind_is_refused(plain):
    model = onnx.load(str(plain / fmt.TRAINING_MODEL))
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    # a backward node (consumer of the loss gradient chain) that reads P with an unexpected op
    grad = next(n for n in g.node if n.op_type == "SoftmaxGrad_13" and softmax.output[0] in n.input)
    g.node.append(onnx.helper.make_node("Mul", [softmax.output[0], grad.output[0]], ["odd_bwd"], name="odd_bwd"))
    g.node.append(onnx.helper.make_node("Identity", ["odd_bwd"], ["odd_out"], name="odd_out"))
    g.output.append(onnx.helper.make_tensor_value_info("odd_out", onnx.TensorProto.FLOAT, None))
    assert prod  # graph parsed
    with pytest.raises(RecomputeError, match="odd_bwd"):
        recompute_attention(model)


def test_rewriting_twice_is_refused(plain):
    model = onnx.load(str(plain / fmt.TRAINING_MODEL))
    recompute_attention(model)
    with pytest.raises(RecomputeError, match="already"):
        recompute_attention(model)
