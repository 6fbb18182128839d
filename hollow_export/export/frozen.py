"""Frozen base weights out of the ORT checkpoint: one memory-mappable external-data file (issue 13).

In:  the frozen (non-LoRA) weights as (name, array) pairs, one at a time; the training and eval graphs
     of `generate_artifacts` in which those weights are named graph inputs (fed from the checkpoint).
Out: `write_frozen_data` streams the weights into ONE file (`FROZEN_DATA`), each tensor of a page or more
     at an offset aligned to 4096 bytes (the page size, so a tensor can be mapped straight from the
     file), fp32 or fp16;
     `attach_frozen` turns each of those graph inputs into an initializer whose bytes live in that file,
     so training_model.onnx and eval_model.onnx both point into the same file and the checkpoint only
     holds LoRA (+ optimizer state). Nothing ever rewrites the file: training writes checkpoints only.
     Measured on ORT 1.19.2 CPU (mid bundle, the bundle's training session): the session memory-maps
     every page-aligned tensor (580 mappings of the file; 0.04 GB file-backed and 0.17 GB anonymous
     resident after load for 0.35 GB of weights), as long as constant folding and NCHWc do not copy them.

fp16 (`dtype="float16"`): the initializer is fp16 and a Cast to fp32 feeds its readers, so every
computation stays fp32 on weights rounded once to fp16. Two things would undo the halving:
  - ORT's constant folding turns Cast(constant initializer) into an fp32 initializer at session creation.
    The forward Cast has only the initializer as input, so the session must run with constant folding
    off (`bundle.training_session()`, applied by both clients).
  - A Cast reads only an initializer, so ORT may run it as early as it likes and hold its fp32 output
    until the reader runs; a Cast shared by forward and backward readers lives from the forward to the
    backward. Either way all fp32 weights are alive at once. So EVERY reader gets its own Cast, gated on
    an activation input of that reader (a backward tensor for a backward reader): Concat of the flat
    weight with an EMPTY slice of that tensor, exact, no arithmetic. Common-subexpression elimination
    cannot merge the copies and no execution order can run one before its reader's input exists, so one
    weight's fp32 copy at a time is alive. A forward reader with no activation input (a cross-attention
    key of the prompt, a graph input) shares one plain Cast. Measured, sd21 512 px r=128, every lever,
    step peak RSS: 3.34 GB with one shared Cast per weight for the forward readers, 2.39 GB gated (the
    static-batch plan measured such gates worse, at mid 0.844 vs 0.795 GB: its planner held their buffers).

Torch-free (onnx and numpy only); the writer never builds a protobuf holding weights.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bundle import FROZEN_WEIGHTS
from ..errors import HollowError
from .recompute_units import sort_topologically

FROZEN_DATA = FROZEN_WEIGHTS
ALIGN = 4096
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}
PREFIX = "frozen16"


class FrozenError(HollowError):
    """Frozen weights that do not match the graph they are attached to (message names the tensor)."""


def write_frozen_data(path: Path, tensors: Iterable[tuple[str, np.ndarray]], dtype: str = "float32",
                      align: int = ALIGN) -> list[dict]:
    """Stream `tensors` into `path`, stored as `dtype`; each tensor of `align` bytes or more at an
    `align`-byte aligned offset (smaller ones, which ORT copies anyway, at 64-byte offsets).

    Returns one entry per tensor: {name, dtype, dims, offset, length}. Only one tensor is in memory at a
    time (plus its cast copy for fp16).
    """
    if dtype not in DTYPES:
        raise FrozenError(f"frozen dtype must be one of {sorted(DTYPES)} (got {dtype!r})")
    np_dtype = DTYPES[dtype][0]
    table, offset = [], 0
    with open(path, "wb") as f:
        for name, array in tensors:
            raw = np.ascontiguousarray(np.asarray(array), dtype=np_dtype).astype(np.dtype(np_dtype).newbyteorder("<"),
                                                                                copy=False)
            # tensors of a page or more start on a page (mappable); small ones only on 64 bytes
            step = align if raw.nbytes >= align else 64
            if offset % step:
                pad = step - offset % step
                f.write(b"\0" * pad)
                offset += pad
            f.write(raw.tobytes())
            table.append({"name": name, "dtype": dtype, "dims": list(raw.shape), "offset": offset,
                          "length": raw.nbytes})
            offset += raw.nbytes
    return table


def external_initializer(entry: dict, location: str) -> TensorProto:
    """A TensorProto that points at `entry`'s bytes in `location` (relative to the model's folder)."""
    t = TensorProto()
    t.name = entry["name"]
    t.data_type = DTYPES[entry["dtype"]][1]
    t.dims.extend(entry["dims"])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(entry["offset"])), ("length", str(entry["length"]))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def attach_frozen(model: onnx.ModelProto, table: list[dict], location: str = FROZEN_DATA) -> int:
    """Replace the graph inputs named in `table` by initializers stored in `location`, in place.

    For float16 entries, fp32 Casts are inserted as the module docstring explains (training graphs: one
    shared forward Cast and one gated Cast per backward reader; graphs without a backward: one Cast).
    Returns how many inputs became initializers. Refuses an entry whose shape differs from the input's.
    """
    graph = model.graph
    by_name = {e["name"]: e for e in table}
    inputs = {i.name: i for i in graph.input}
    missing_here = [n for n in by_name if n not in inputs]
    if len(missing_here) == len(by_name) and by_name:
        raise FrozenError("none of the frozen weights is an input of this graph: is it already attached?")
    fp16 = [n for n in by_name if n in inputs and by_name[n]["dtype"] == "float16"]
    for name in by_name:
        if name not in inputs:
            continue
        dims = [d.dim_value for d in inputs[name].type.tensor_type.shape.dim]
        if dims != by_name[name]["dims"]:
            raise FrozenError(f"frozen weight {name}: graph input shape {dims}, stored {by_name[name]['dims']}")
    keep = [i for i in graph.input if i.name not in by_name]
    attached = [i.name for i in graph.input if i.name in by_name]
    del graph.input[:]
    graph.input.extend(keep)
    graph.initializer.extend(external_initializer(by_name[n], location) for n in attached)
    if fp16:
        _insert_casts(graph, fp16, {n: by_name[n]["dims"] for n in fp16})
    return len(attached)


def _insert_casts(graph: onnx.GraphProto, names: list[str], dims: dict) -> None:
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    backward_exists = any(n.op_type.endswith("Grad") or n.name.endswith("_Grad") for n in nodes)
    forward: set[int] = set(range(len(nodes)))
    if backward_exists:
        from .recompute import forward_nodes
        forward = forward_nodes(graph)
    readers = collections.defaultdict(list)
    for k, n in enumerate(nodes):
        for i in n.input:
            readers[i].append(k)
    graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), f"{PREFIX}/flat"),
                              numpy_helper.from_array(np.array([0], np.int64), f"{PREFIX}/zero")])
    added, forward_casts = [], []  # the forward readers' gated Casts go last: see below
    for w in names:
        tag = f"{PREFIX}/{w}"
        graph.initializer.append(numpy_helper.from_array(np.array(dims[w], np.int64), tag + "/shape"))
        shared = []  # forward readers with no activation to gate on (e.g. reading only the prompt): one Cast
        for j, k in enumerate(readers[w]):
            reader = nodes[k]
            backward = k not in forward
            gate = next((i for i in reader.input if i in producer and nodes[producer[i]].op_type != "Constant"
                         and (not backward or producer[i] not in forward)), None)
            if gate is None and backward:
                raise FrozenError(f"backward node {reader.name!r} reads frozen weight {w} but no backward tensor "
                                  "to gate its Cast on")
            if gate is None:
                shared.append(reader)
                continue
            t = f"{tag}/{'b' if backward else 'f'}{j}"
            (added if backward else forward_casts).extend([
                helper.make_node("Reshape", [gate, f"{PREFIX}/flat"], [t + "/g"], name=t + "/g"),
                helper.make_node("Slice", [t + "/g", f"{PREFIX}/zero", f"{PREFIX}/zero"], [t + "/empty"],
                                 name=t + "/empty"),
                helper.make_node("Cast", [t + "/empty"], [t + "/empty16"], name=t + "/empty16",
                                 to=TensorProto.FLOAT16),
                helper.make_node("Reshape", [w, f"{PREFIX}/flat"], [t + "/w"], name=t + "/w"),
                helper.make_node("Concat", [t + "/w", t + "/empty16"], [t + "/wg"], name=t + "/wg", axis=0),
                helper.make_node("Cast", [t + "/wg"], [t + "/wf"], name=t + "/cast", to=TensorProto.FLOAT),
                helper.make_node("Reshape", [t + "/wf", tag + "/shape"], [t + "/f32"], name=t + "/f32"),
            ])
            _rename_input(reader, w, t + "/f32")
        if shared:
            added.append(helper.make_node("Cast", [w], [tag + "/f32"], name=tag + "/cast", to=TensorProto.FLOAT))
            for reader in shared:
                _rename_input(reader, w, tag + "/f32")
    graph.node.extend(added + forward_casts)
    # ORT runs the graph close to its node order: sorted with the forward Casts last, each runs right before
    # its reader (sd21 fp16 step peak 2.39 GB; 3.05 GB left appended unsorted, 2.96 GB sorted in weight order)
    sort_topologically(graph)


def _rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
