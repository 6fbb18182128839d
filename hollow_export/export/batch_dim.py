"""Give an ONNX graph exported at batch 1 an unknown batch dimension, so ORT frees every activation at its last use (issue 13).

In:  an `onnx.ModelProto` exported at batch 1 (`training_model.onnx` after `generate_artifacts` and the
     recompute rewrites, or an inference graph) and the names of its batch inputs (`sample`, ...).
Out: the same model, changed in place: the batch inputs' first dimension is unknown (neither a value nor a
     name), every Reshape / Expand whose constant target shape starts with the batch (1) takes that first
     entry from `Shape(first batch input)[0:1]` instead (shapes a graph already computes with Shape nodes,
     as an export without constant folding writes them, follow the inputs by themselves), and the stale
     `value_info` is dropped. Only a Reshape / Expand of a tensor computed from the batch inputs' data is
     rewired: a weight reshaped to (1, C, 1, 1) for broadcasting keeps its 1. The math and the kernels are
     unchanged; the graph runs at batch 1 as before and at any other batch (a batch's loss and gradients
     are the mean of its samples').
     `unknown_batch` returns the number of Reshape / Expand nodes rewired.

Why. ORT's sequential allocation planner (1.19.2, `allocation_planner.cc`) lets a new tensor take the buffer
of any freed tensor of the SAME STATIC SHAPE, and that buffer then stays allocated until the new tensor
dies. In a training graph a buffer freed early in the forward is so held through the rest of the forward
and into the backward, until a backward tensor of its shape is done: every shape keeps as many buffers as
it ever had live at once, summed over shapes, instead of the live set. ORT's own comment on the switch
(`SessionOptions::enable_mem_reuse`): "it can lead to memory being held for longer than needed and can
impact peak memory consumption". That switch is Python-only: the C and Java APIs (the phone) cannot turn
it off. Measured, sd21 512 px r=128 all-lever bundle, step peak RSS: 4.14 GB as planned, 3.50 GB with
`enable_mem_reuse = False`, 3.51 GB with this rewrite and the CPU arena on, at the same step time.

How it works: the planner only compares shapes it knows (`SameShape`: equal values or equal symbolic
names). An unknown dimension makes an activation incomparable, so it is allocated when produced and freed
at its last use. A symbolic name ("batch") would not do: equal names compare equal and the reuse is back.
ORT's memory pattern cannot plan tensors of unknown size either, so each one is a fresh allocation; with
the CPU arena OFF every such allocation pays its page faults (step 1.5x slower, measured), so the bundle
turns the arena ON with this rewrite (`bundle.training_session`): the arena recycles freed blocks by size
at run time, without holding them for later tensors.

Refusals (`BatchError`): a named batch input missing from the graph or whose first dimension is not the
static 1 (this includes a second rewrite), and a graph with neither a batch-1 shape constant to rewire nor
a Shape node (nothing would carry the batch).

Torch-free (onnx and numpy only).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import HollowError

PREFIX = "unknown_batch"
RESHAPING = ("Reshape", "Expand")  # ops whose second input is a target shape


class BatchError(HollowError):
    """A graph this rewrite does not recognise (message names the input or what is missing)."""


def unknown_batch(model: onnx.ModelProto, inputs: list[str]) -> int:
    """Make the first dimension of `inputs` unknown and rewire every batch-1 shape constant (see module doc)."""
    graph = model.graph
    batch_inputs = _batch_inputs(graph, inputs)
    constants = _int64_constants(graph)
    derived = _batch_derived(graph, [value.name for value in batch_inputs])
    batch = f"{PREFIX}/batch"
    added = [helper.make_node("Shape", [batch_inputs[0].name], [batch], name=batch, start=0, end=1)]
    rewired, count = {}, 0
    for node in graph.node:
        if node.op_type not in RESHAPING or len(node.input) < 2 or node.input[0] not in derived:
            continue  # a weight's (1, C, 1, 1) stays: its 1 is a broadcast, not the batch
        shape = constants.get(node.input[1])
        if shape is None or shape.ndim != 1 or len(shape) < 2 or shape[0] != 1:
            continue
        if node.input[1] not in rewired:
            rewired[node.input[1]] = _runtime_shape(graph, node.input[1], shape, batch, added)
        node.input[1] = rewired[node.input[1]]
        count += 1
    if not count and not any(node.op_type == "Shape" for node in graph.node):
        raise BatchError("no Reshape or Expand with a batch-1 constant shape and no Shape node in this graph: "
                         "nothing carries the batch, so it was not exported from a diffusers U-Net at batch 1")
    for value in batch_inputs:
        value.type.tensor_type.shape.dim[0].Clear()  # unknown: no dim_value, no dim_param
    del graph.value_info[:]  # inferred at batch 1; ORT would merge them back into the shapes
    nodes = added + list(graph.node)  # the batch Shape and the Concats read only graph inputs and constants
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _batch_inputs(graph: onnx.GraphProto, names: list[str]) -> list:
    by_name = {value.name: value for value in graph.input}
    out = []
    for name in names:
        value = by_name.get(name)
        if value is None:
            raise BatchError(f"graph input {name!r} not found (inputs: {', '.join(by_name)})")
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
            raise BatchError(f"graph input {name!r} has first dimension "
                             f"{(dims[0].dim_param or dims[0].dim_value or 'unknown') if dims else 'none'}, "
                             f"not the static batch 1 this rewrite expects (rewritten already?)")
        out.append(value)
    return out


def _batch_derived(graph: onnx.GraphProto, inputs: list[str]) -> set[str]:
    """Names of the tensors computed from the data of `inputs` (Shape and Size read only a shape)."""
    derived, changed = set(inputs), True
    while changed:  # one pass when the nodes are in topological order, as exported
        changed = False
        for node in graph.node:
            if node.op_type in ("Shape", "Size") or not any(i in derived for i in node.input):
                continue
            new = [o for o in node.output if o and o not in derived]
            derived.update(new)
            changed = changed or bool(new)
    return derived


def _int64_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Name -> value of every int64 initializer and Constant node output."""
    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer
           if init.data_type == onnx.TensorProto.INT64}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value" \
                and node.attribute[0].t.data_type == onnx.TensorProto.INT64:
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _runtime_shape(graph: onnx.GraphProto, name: str, shape: np.ndarray, batch: str, added: list) -> str:
    """Concat(batch, shape[1:]) as a new tensor; returns its name."""
    tail = f"{PREFIX}/{name}/tail"
    graph.initializer.append(numpy_helper.from_array(shape[1:].astype(np.int64), tail))
    out = f"{PREFIX}/{name}"
    added.append(helper.make_node("Concat", [batch, tail], [out], name=out, axis=0))
    return out
