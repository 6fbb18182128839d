"""Recompute attention probabilities in the backward of an ORT training graph (issue 13).

In:  an `onnx.ModelProto` of `training_model.onnx` as `onnxruntime.training.artifacts.generate_artifacts`
     writes it (forward + gradient graph; the loss is the first graph output).
Out: the same model, changed in place: no backward node reads a forward attention's softmax output P any
     more; each reads a recomputed copy instead, so P (heads x queries x keys floats per attention, the
     largest tensors of a diffusion U-Net step) is freed right after its forward use. The math is
     bit-identical (the copy runs the very same MatMul and Softmax on the very same bits).

The attention pattern recognised is what the legacy TorchScript exporter makes of
`F.scaled_dot_product_attention` (also once per query chunk, see `attention.py`):

    S = MatMul(A, B)           A = Mul(Q, c), B = Mul(K^T, c), c = sqrt(scale) a scalar constant
    P = Softmax(S, axis=-1)
    O = MatMul(P, V)

with ORT's gradient nodes reading P in exactly two ways: `FusedMatMul(P, dO, transA=1)` (dV = P^T dO) and
`SoftmaxGrad_13(dP, P)`, where dO = `O_grad` is the gradient entering P @ V. Any other shape (a Softmax fed
by something else than a MatMul, P read by another forward node or by another backward op, a missing
`O_grad`) is refused with `RecomputeError` naming the node: a rewrite that skipped it silently would leave
the memory problem in place without anyone knowing.

Why a gate: a plain copy `MatMul(A, B) -> Softmax` is a common subexpression of the forward one, and ORT's
CommonSubexpressionElimination merges it straight back (P is then kept again). Nor does ORT promise to run
an input-independent copy late: any execution order may compute it during the forward. So the copy's input
is made data-dependent on dO, a tensor that exists only once the backward has reached this attention:

    z    = Mul(Slice(Reshape(dO, [-1]), 0, 1), 0.0)     one element of dO, times zero: a [1] tensor of 0
    Q_rc = Add(Q, z)                                    Q + 0 == Q bit for bit (finite dO)
    P_rc = Softmax(MatMul(Mul(Q_rc, c), B))             the forward's own Mul -> MatMul -> Softmax chain

Neither CSE (different inputs) nor constant folding (dO is not a constant) can undo it, and topological
order alone forces the copy after dO is computed, whatever the execution order. The gate sits BEFORE the
query's scale Mul (A = Mul(Q, c), c a scalar constant) so that the copy has the very structure of the
forward and ORT's graph fusions treat both alike. Measured on ORT 1.19.2: gated that way, losses and LoRA
after 4 steps equal the un-rewritten graph's bit for bit; gated after the scale (Add(A, z)) they differ by
~1e-7 (some fusion then rounds the copy's scores differently). A scores MatMul whose query side is not
such a scalar Mul is therefore refused too.
Caveat: a non-finite dO (inf/nan) turns the gate into nan; such a step is already lost anyway.

Torch-free (onnx and numpy only).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import HollowError

PREFIX = "recompute"  # names of the added nodes, tensors and constants start with this
_SOFTMAX_GRADS = ("SoftmaxGrad_13", "SoftmaxGrad")


class RecomputeError(HollowError):
    """A training graph whose attention the recompute rewrite does not recognise (message names the node)."""


def forward_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes the loss (first graph output) depends on: the forward pass."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    if not graph.output or graph.output[0].name not in producer:
        raise RecomputeError("the graph's first output is not produced by a node: not a training graph "
                             "from generate_artifacts (its first output must be the loss)")
    seen: set[int] = set()
    stack = [producer[graph.output[0].name]]
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        stack.extend(producer[i] for i in graph.node[k].input if i in producer)
    return seen


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def recompute_attention(model: onnx.ModelProto) -> int:
    """Rewire every backward reader of a forward attention softmax to a dO-gated recomputed copy, in place.

    Returns the number of attentions rewritten (0 for a graph without attention). Raises RecomputeError on
    an attention it does not recognise and on a graph it has already rewritten.
    """
    graph = model.graph
    if any(init.name == f"{PREFIX}/zero" for init in graph.initializer):
        raise RecomputeError("this training graph is already rewritten (it holds recompute/ nodes)")
    nodes = list(graph.node)
    forward = forward_nodes(graph)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    consumers = collections.defaultdict(list)
    for k, n in enumerate(nodes):
        for i in n.input:
            consumers[i].append(k)

    scalars = {init.name for init in graph.initializer if int(np.prod(init.dims)) == 1}
    plans = []
    for k in sorted(forward):
        softmax = nodes[k]
        if softmax.op_type != "Softmax":
            continue
        where = f"Softmax node {softmax.name!r}"
        if _attr(softmax, "axis", -1) != -1:
            raise RecomputeError(f"{where}: softmax over axis {_attr(softmax, 'axis')} is not attention "
                                 "(expected axis -1)")
        s = softmax.input[0]
        if s not in producer or nodes[producer[s]].op_type != "MatMul":
            what = nodes[producer[s]].op_type if s in producer else "a graph input or initializer"
            raise RecomputeError(f"{where}: its input comes from {what}, not MatMul(Q, K^T); unrecognised "
                                 "attention pattern (only plain MatMul-Softmax-MatMul attention is supported)")
        scores = nodes[producer[s]]
        a = scores.input[0]
        scale = nodes[producer[a]] if a in producer else None
        if scale is None or scale.op_type != "Mul" or not any(_is_scalar_constant(scalars, producer, nodes, i)
                                                               for i in scale.input):
            raise RecomputeError(f"{where}: the query side of its scores MatMul {scores.name!r} is not "
                                 "Mul(Q, scalar constant); unrecognised attention pattern")
        p = softmax.output[0]
        fwd_readers = [c for c in consumers[p] if c in forward]
        bwd_readers = [c for c in consumers[p] if c not in forward]
        if len(fwd_readers) != 1 or nodes[fwd_readers[0]].op_type != "MatMul" \
                or list(nodes[fwd_readers[0]].input).index(p) != 0:
            raise RecomputeError(f"{where}: its output is read in the forward by "
                                 f"{[nodes[c].op_type + ' ' + nodes[c].name for c in fwd_readers]}, expected "
                                 "exactly one MatMul(P, V)")
        if not bwd_readers:
            continue  # P is not kept for any gradient: nothing to recompute
        out = nodes[fwd_readers[0]].output[0]
        d_out = out + "_grad"
        if d_out not in producer or producer[d_out] in forward:
            raise RecomputeError(f"{where}: no backward tensor {d_out!r} (the gradient entering P @ V) to gate "
                                 "the recomputation on")
        for c in bwd_readers:
            reader = nodes[c]
            ok = (reader.op_type == "FusedMatMul" and list(reader.input) == [p, d_out] and _attr(reader, "transA") == 1
                  and not _attr(reader, "transBatchA", 0)) or \
                 (reader.op_type in _SOFTMAX_GRADS and len(reader.input) == 2 and reader.input[1] == p
                  and reader.input[0] != p)
            if not ok:
                raise RecomputeError(f"{where}: its output is read in the backward by {reader.op_type} node "
                                     f"{reader.name!r} with inputs {list(reader.input)}; expected only "
                                     f"FusedMatMul(P, {d_out}, transA=1) and SoftmaxGrad(dP, P)")
        plans.append((softmax, scores, scale, d_out, [nodes[c] for c in bwd_readers]))

    if not plans:
        return 0
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0.0], np.float32), f"{PREFIX}/zero"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{PREFIX}/flat"),
        numpy_helper.from_array(np.array([0], np.int64), f"{PREFIX}/start"),
        numpy_helper.from_array(np.array([1], np.int64), f"{PREFIX}/end"),
    ])
    added = []
    previous = {}  # K side of the scores -> the backward tensors of that attention's previous query chunk
    for j, (softmax, scores, scale, d_out, readers) in enumerate(plans):
        t = f"{PREFIX}/{j}/{softmax.name.strip('/')}"
        b = scores.input[1]
        k = 0 if not _is_scalar_constant(scalars, producer, nodes, scale.input[0]) else 1  # the query side
        q, c = scale.input[k], scale.input[1 - k]
        chain = _chunk_backward_outputs(nodes, consumers, forward, readers, softmax.output[0])
        if b in previous:
            d_out = _chain_after(t, d_out, previous[b], [c for c in consumers[d_out] if c not in forward],
                                 nodes, added)
        previous[b] = chain
        gate, zero = zero_after(t + "/gate", [d_out])
        added += [
            *gate,
            helper.make_node("Add", [q, zero], [t + "/Q"], name=t + "/Q"),
            helper.make_node("Mul", [t + "/Q", c] if k == 0 else [c, t + "/Q"], [t + "/A"], name=t + "/A"),
            helper.make_node("MatMul", [t + "/A", b], [t + "/S"], name=t + "/S"),
            helper.make_node("Softmax", [t + "/S"], [t + "/P"], name=t + "/P", axis=-1),
        ]
        for reader in readers:
            for i, name in enumerate(reader.input):
                if name == softmax.output[0]:
                    reader.input[i] = t + "/P"
    graph.node.extend(added)
    return len(plans)


def _chunk_backward_outputs(nodes, consumers, forward: set[int], readers: list, p: str) -> list[str]:
    """The backward tensors after which a chunk's P, dP and dS are dead: what the readers of P make (dV's
    part, dS) and what the readers of dS make (the scores' input gradients)."""
    outs = [o for r in readers for o in r.output if o]
    d_s = [o for r in readers if r.op_type in _SOFTMAX_GRADS for o in r.output if o]
    outs += [o for d in d_s for c in consumers[d] if c not in forward for o in nodes[c].output if o]
    return [o for o in outs if o not in d_s]


def _chain_after(t: str, d_out: str, after: list[str], d_out_readers: list[int], nodes, added: list) -> str:
    """dO of this query chunk, made to wait for the previous chunk's backward: dO + 0 * (one element of each
    tensor in `after`); every backward reader of dO reads it. ORT would otherwise start every chunk's
    backward at once (their dO all come from one split), holding every chunk's P, dP and dS together."""
    wait, zero = zero_after(t + "/after", after)
    chained = f"{t}/dO_chained"
    added += [*wait, helper.make_node("Add", [d_out, zero], [chained], name=chained)]
    for c in d_out_readers:
        for i, name in enumerate(nodes[c].input):
            if name == d_out:
                nodes[c].input[i] = chained
    return chained


def zero_after(tag: str, tensors: list[str], prefix: str = PREFIX) -> tuple[list, str]:
    """The gate: nodes making a [1] float 0 that exists only once every tensor in `tensors` does, the sum
    over them of Mul(Slice(Reshape(x, [-1]), 0, 1), 0.0); returns (nodes, the zero's name). Needs the
    `prefix`/flat, /start, /end, /zero initializers. x + zero == x bit for bit when every x is finite."""
    nodes, terms = [], []
    for j, x in enumerate(tensors):
        t = f"{tag}/{j}"
        nodes += [helper.make_node("Reshape", [x, f"{prefix}/flat"], [t + "/flat"], name=t + "/flat"),
                  helper.make_node("Slice", [t + "/flat", f"{prefix}/start", f"{prefix}/end"], [t + "/one"],
                                   name=t + "/one"),
                  helper.make_node("Mul", [t + "/one", f"{prefix}/zero"], [t + "/z"], name=t + "/z")]
        terms.append(t + "/z")
    zero = terms[0]
    for j, term in enumerate(terms[1:]):
        nodes.append(helper.make_node("Add", [zero, term], [f"{tag}/sum{j}"], name=f"{tag}/sum{j}"))
        zero = f"{tag}/sum{j}"
    return nodes, zero


def _is_scalar_constant(scalars: set, producer, nodes, name: str) -> bool:
    """`name` is a one-element initializer (in `scalars`) or Constant output (the attention scale)."""
    if name in scalars:
        return True
    if name in producer and nodes[producer[name]].op_type == "Constant":
        value = _attr(nodes[producer[name]], "value")
        return value is not None and int(np.prod(value.dims)) == 1
    return False


def backward_softmax_reads(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(backward node, forward Softmax) pairs where a backward node reads a forward softmax output."""
    graph = model.graph
    forward = forward_nodes(graph)
    softmax_out = {graph.node[k].output[0]: graph.node[k].name for k in forward
                   if graph.node[k].op_type == "Softmax"}
    return [(n.name, softmax_out[i]) for k, n in enumerate(graph.node) if k not in forward
            for i in n.input if i in softmax_out]
