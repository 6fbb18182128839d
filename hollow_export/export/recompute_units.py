"""Recompute each kept unit's activations in the backward of an ORT training graph (issue 13).

In:  an `onnx.ModelProto` of `training_model.onnx` as `generate_artifacts` writes it (forward + gradient
     graph, loss first output), exported from a net whose units ran under `split.UnitScope`s, so every
     forward node of unit K is named `/unit_scopes.K/...`; optionally already rewritten by
     `recompute.recompute_attention` (then its softmax copies are recomputed from this copy too).
Out: the same model, changed in place: no backward node reads an activation computed inside a unit any
     more. Each unit's backward reads a copy of the unit's forward instead, computed when the backward
     reaches that unit, so between the forward and the backward only the tensors entering and leaving the
     units are kept (ORT 1.19.2's own memory optimizer never runs for training-API graphs). This is
     gradient checkpointing per unit (PyTorch's `torch.utils.checkpoint`, `HollowedNet(recompute=True)`)
     done on the ONNX graph: one unit's activations are alive at a time, at the price of a second forward.

How the copy is made and kept late: for unit K, the forward nodes whose outputs a backward node reads are
copied with all their unit-internal ancestors; every tensor entering the copy from outside the unit (the
hidden state, the time embedding) enters through a gate

    z   = CastLike(Mul(Slice(Reshape(dY, [-1]), 0, 1), 0.0), x)    one element of dY, times zero
    x_g = Add(x, z)                                                 x + 0 == x bit for bit (finite dY)

where dY = `Y_grad`, the gradient of the unit's output Y, which exists only once the backward has reached
unit K. z also waits (the same `+ 0 * one element` way) for the weight gradients of unit K+1: ORT's
execution order otherwise leaves weight-gradient nodes (LoRA's dA, dB) to the very end of the backward,
holding every unit's recomputed inputs of them until then. So neither ORT's common-subexpression elimination (other inputs) nor any execution order (the
copy depends on dY) can merge the copy back into the forward or run it early. A copied node none of
whose inputs is gated or copied (it reads only weights, graph inputs or constants, e.g. a cross-attention
key projection of the prompt) is not copied: CSE would merge it back anyway, and its output is small.
The backward readers of the copied tensors are then pointed at the copies. The forward's own tensors die
at their last forward use, except the per-input lengths of ORT's ConcatTraining (a few int64s), which its
gradient reads from the forward.

Kept boundaries (`keep_boundaries`, the default): three tensors inside a unit are cheap to keep and dear to
recompute, so the copy reads them from the forward (through the same gate) instead of recomputing them:
  - the self-attention's output before its output projection (made by a `.../attn1/` node, read by a
    `.../attn1/to_out.0/` node): tokens x channels floats, against the scores MatMul, Softmax and P @ V the
    copy would redo (at 64x64 latents 4096 x 4096 per head; the backward's own softmax copy of
    `recompute.py` still recomputes P from the copy's Q and K, so those are recomputed as before);
  - the resnet's output the unit's transformer reads (made by a `.../resnets.N/` node, read by an
    `.../attentions.N/` node): one activation, against the resnet's second conv and its shortcut;
  - the resnet's first conv output (`.../resnets.N/conv1/`): one activation, against the largest conv of
    the copy (an up block's conv1 reads the skip concatenation: twice the channels); the copy still
    recomputes its input, GroupNorm and SiLU, which the conv's input gradient reads.
The copy then holds the unit's remaining activations only; the math is unchanged (the same bits).

Refusals (`RecomputeError`, naming the unit): a graph without `/unit_scopes.K/` nodes (exported without
unit scopes), a unit whose output has no gradient tensor to gate on, a rewrite that would make a cycle,
and a second rewrite.

Torch-free (onnx and numpy only).
"""

from __future__ import annotations

import collections
import heapq
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .recompute import RecomputeError, forward_nodes, zero_after

PREFIX = "recompute_units"
SCOPE = re.compile(r"^/unit_scopes\.(\d+)/")


def unit_of_nodes(graph: onnx.GraphProto, forward: set[int]) -> dict[int, int]:
    """Forward node index -> unit number, from the `/unit_scopes.K/` name prefix.

    Nodes that ORT's fusions renamed (e.g. `Gelu_token_7`) carry no scope; one whose every producer and
    every forward reader lie in the same unit belongs to that unit (repeated until nothing changes).
    """
    nodes = graph.node
    unit = {}
    for k in forward:
        m = SCOPE.match(nodes[k].name)
        if m:
            unit[k] = int(m.group(1))
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    readers = collections.defaultdict(list)
    for k in forward:
        for i in nodes[k].input:
            readers[i].append(k)
    changed = True
    while changed:
        changed = False
        for k in forward:
            if k in unit:
                continue
            around = [producer[i] for i in nodes[k].input if i in producer]
            around += [r for o in nodes[k].output for r in readers[o]]
            units = {unit.get(j) for j in around}
            if len(units) == 1 and None not in units:
                unit[k] = units.pop()
                changed = True
    return unit


BOUNDARIES = (  # (made by a node named like this, read by a node named like that): kept from the forward
    (re.compile(r"/attn1/(?!to_out\.0/)"), re.compile(r"/attn1/to_out\.0/")),
    (re.compile(r"/resnets\.\d+/"), re.compile(r"/attentions\.\d+/")),
    (re.compile(r"/resnets\.\d+/conv1/"), re.compile(r"/resnets\.\d+/(?!conv1/)")),
)


def recompute_units(model: onnx.ModelProto, levels: int | None = None, keep_boundaries: bool = True) -> int:
    """Point every backward reader of a unit's activation at a dY-gated copy of the unit's forward, in place.

    `levels`: only the units of the `levels` highest resolutions are recomputed (None: every unit); a unit's
    level is read from its output's element count, which halves from one level of an SD U-Net to the next
    (twice the channels on a quarter of the pixels), so a unit is recomputed when its output holds at least
    1 / 2**(levels - 1) of the largest unit output. The low-resolution units keep their activations: little
    memory for much convolution work. `keep_boundaries`: the copy reads the unit's self-attention output
    and resnet output from the forward (module docstring). Returns the number of units rewritten. Raises
    RecomputeError as the module docstring says.
    """
    graph = model.graph
    if any(init.name == f"{PREFIX}/zero" for init in graph.initializer):
        raise RecomputeError("this training graph is already unit-recomputed (it holds recompute_units/ nodes)")
    nodes = list(graph.node)
    forward = forward_nodes(graph)
    unit = unit_of_nodes(graph, forward)
    if not unit:
        raise RecomputeError("no node of the training graph is named /unit_scopes.K/...: the net was exported "
                             "without split.UnitScope, so its units cannot be found; rebuild with this version")
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    readers = collections.defaultdict(list)
    for k, n in enumerate(nodes):
        for i in n.input:
            readers[i].append(k)
    graph_outputs = {o.name for o in graph.output}
    members = collections.defaultdict(list)
    for k, u in unit.items():
        members[u].append(k)

    trained = {i.name for i in graph.input if i.name + "_grad" in producer}
    params = {u: sorted({i for k in ks for i in nodes[k].input if i in trained}) for u, ks in members.items()}
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0.0], np.float32), f"{PREFIX}/zero"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{PREFIX}/flat"),
        numpy_helper.from_array(np.array([0], np.int64), f"{PREFIX}/start"),
        numpy_helper.from_array(np.array([1], np.int64), f"{PREFIX}/end"),
    ])
    added, redirect, rewritten = [], {}, 0
    outputs_of = {u: [o for k in sorted(members[u]) for o in nodes[k].output
                      if o and (o in graph_outputs or any(r in forward and r not in members[u] for r in readers[o]))]
                  for u in members}
    kept = _units_below(graph, outputs_of, levels)
    for u in sorted(members):
        inside = set(members[u])
        outputs = outputs_of[u]
        saved = [o for k in sorted(inside) for o in nodes[k].output
                 if o and o not in outputs and any(r not in forward for r in readers[o])
                 and not _lengths(nodes[k], o)]
        if not saved or u in kept:
            continue
        grads = [o + "_grad" for o in outputs if o + "_grad" in producer and producer[o + "_grad"] not in forward]
        if not grads:
            raise RecomputeError(f"unit {u} (nodes /unit_scopes.{u}/...): none of its outputs {outputs[:3]} has a "
                                 "gradient tensor <output>_grad in the backward to gate its recomputation on")
        d_out = max(grads, key=lambda g: producer[g])  # the last computed: the copy starts as late as possible
        recomputed = inside - (_boundaries(nodes, inside, readers) if keep_boundaries else set())
        needed = _ancestors_inside(nodes, producer, recomputed, saved)
        tag = f"{PREFIX}/{u}"
        after = next((params[j] for j in sorted(members) if j > u and params[j]), [])
        gate, zero = zero_after(f"{tag}/wait", [d_out] + [p + "_grad" for p in after], PREFIX)
        renamed: dict[str, str] = {}
        copies = []
        for k in sorted(needed):
            node = nodes[k]
            inputs = []
            for i in node.input:
                if i in renamed:
                    inputs.append(renamed[i])
                elif i in producer and producer[i] in forward and producer[i] not in recomputed \
                        and nodes[producer[i]].op_type != "Constant":
                    renamed[i] = f"{tag}/in/{i}"
                    gate += [helper.make_node("CastLike", [zero, i], [f"{tag}/z/{i}"], name=f"{tag}/z/{i}"),
                             helper.make_node("Add", [i, f"{tag}/z/{i}"], [renamed[i]], name=renamed[i])]
                    inputs.append(renamed[i])
                else:
                    inputs.append(i)
            if inputs == list(node.input):
                continue  # reads nothing gated or copied: CSE would merge the copy back; keep the original
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{tag}/{node.name.lstrip('/')}"
            del copy.input[:]
            copy.input.extend(inputs)
            del copy.output[:]
            for o in node.output:
                renamed[o] = f"{tag}/{o}" if o else ""
                copy.output.append(renamed[o])
            copies.append(copy)
        for o in saved:
            if o in renamed:
                redirect[o] = renamed[o]
        added += gate + copies
        rewritten += 1
    for k, n in enumerate(nodes):
        if k not in forward:
            for j, i in enumerate(n.input):
                if i in redirect:
                    n.input[j] = redirect[i]
    graph.node.extend(added)
    read_weights_untransposed(graph)
    sort_topologically(graph)
    return rewritten


def _lengths(node: onnx.NodeProto, tensor: str) -> bool:
    """`tensor` is the per-input lengths output of ORT's ConcatTraining (a few int64s, read by its gradient's
    SplitTraining): the backward reads the forward's own, so the copy need not redo the concatenation (nor,
    for a query-chunked attention, every chunk feeding it)."""
    return node.op_type == "ConcatTraining" and tensor in node.output[1:]


def _boundaries(nodes, inside: set[int], readers: dict) -> set[int]:
    """The unit's nodes whose outputs its copy reads from the forward (`BOUNDARIES`, module docstring)."""
    kept = set()
    for k in inside:
        for made, read in BOUNDARIES:
            if made.search(nodes[k].name) and any(read.search(nodes[r].name) for o in nodes[k].output if o
                                                  for r in readers[o] if r in inside):
                kept.add(k)
    return kept


def _units_below(graph: onnx.GraphProto, outputs_of: dict, levels: int | None) -> set:
    """Units whose largest output has fewer than max / 2**(levels - 1) elements (static shapes as exported)."""
    if levels is None:
        return set()
    if levels < 1:
        raise RecomputeError(f"recompute levels must be at least 1 (got {levels})")
    dims = {v.name: v.type.tensor_type.shape.dim for v in list(graph.value_info) + list(graph.output)}

    def elements(name):
        d = dims.get(name)
        return int(np.prod([x.dim_value for x in d])) if d and all(x.HasField("dim_value") for x in d) else None

    size = {u: max((elements(o) or 0 for o in outs), default=0) for u, outs in outputs_of.items()}
    if not any(size.values()):
        raise RecomputeError("no unit output has a static shape in this graph: the levels cannot be told apart")
    floor = max(size.values()) / 2 ** (levels - 1)
    return {u for u, n in size.items() if 0 < n < floor}


def read_weights_untransposed(graph: onnx.GraphProto) -> int:
    """Every backward MatMul / FusedMatMul reading a forward `Transpose(W)` of a 2-D weight reads W itself, with
    its transpose flag flipped (a MatMul becomes FusedMatMul); returns how many inputs were changed.

    A `Linear` exports as MatMul(x, Transpose(W)); ORT's gradient dX = FusedMatMul(dY, W^T, transB=1) and the
    unit copy's MatMul read that W^T, so without this every linear weight of the kept units is held a second
    time, as an fp32 transpose, from the forward to the backward (with fp16 frozen weights: an fp32 copy of
    them all). After it, the forward's W^T dies at its one forward use.
    """
    nodes = list(graph.node)
    forward = forward_nodes(graph)
    weights = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    weights.update({i.name: len(i.dims) for i in graph.initializer})
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    changed = 0
    for k, node in enumerate(nodes):
        if k in forward or node.op_type not in ("MatMul", "FusedMatMul"):
            continue
        for j in (0, 1):
            t = node.input[j]
            if t not in producer or producer[t] not in forward:
                continue
            transpose = nodes[producer[t]]
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            if transpose.op_type != "Transpose" or weights.get(transpose.input[0]) != 2 or perm != [1, 0]:
                continue
            if node.op_type == "MatMul":
                node.op_type, node.domain = "FusedMatMul", "com.microsoft"
                node.attribute.extend([helper.make_attribute("alpha", 1.0),
                                       helper.make_attribute("transA", 0), helper.make_attribute("transB", 0),
                                       helper.make_attribute("transBatchA", 0),
                                       helper.make_attribute("transBatchB", 0)])
            flag = next(a for a in node.attribute if a.name == ("transA", "transB")[j])
            flag.i = 1 - flag.i
            node.input[j] = transpose.input[0]
            changed += 1
    return changed


def _ancestors_inside(nodes, producer: dict, inside: set[int], tensors: list[str]) -> set[int]:
    """The unit's nodes that `tensors` depend on (inside the unit only)."""
    seen: set[int] = set()
    stack = [producer[t] for t in tensors]
    while stack:
        k = stack.pop()
        if k in seen or k not in inside:
            continue
        seen.add(k)
        stack.extend(producer[i] for i in nodes[k].input if i in producer)
    return seen


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder graph.node topologically (stable); a cycle is a RecomputeError (nothing is written then)."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [len({producer[i] for i in n.input if i in producer}) for n in nodes]
    users = collections.defaultdict(set)
    for k, n in enumerate(nodes):
        for i in n.input:
            if i in producer:
                users[producer[i]].add(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for j in users[k]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        done = set(order)
        stuck = next(n.name for k, n in enumerate(nodes) if k not in done)
        raise RecomputeError(f"the unit recompute would make a cycle in the training graph (at node {stuck!r}); "
                             "this graph's backward reads a unit's activation before the unit's output gradient")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)
