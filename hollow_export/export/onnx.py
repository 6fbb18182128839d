"""Generic ONNX export of torch modules, and basic-op twins of three modules ORT 1.19.2 cannot train.

In:  a torch module, example inputs, a target path and the graph's input/output names.
Out: `export_inference(...)` -> an ONNX inference graph (legacy exporter, opset `OPSET`), its
     weights in one external data file when they pass `EXTERNAL_DATA_THRESHOLD` (then streamed to
     that file tensor by tensor, never held as a protobuf: `export_streamed`);
     `ort_friendly(net)` -> `net` with GroupNorm, LayerNorm and Upsample2D swapped in place for
     twins built from basic ops (same parameters, same names, equal values and gradients).
"""

from __future__ import annotations

import contextlib
import os
import warnings
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import store

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1 << 30  # graphs with more weight bytes than this keep them in a data file


class GroupNormOps(nn.Module):
    """GroupNorm from basic ops (ORT has no gradient for InstanceNormalization, its usual export)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps, self.affine = norm.num_groups, norm.eps, norm.affine
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        g = x.reshape(n, self.num_groups, -1)
        mean = g.mean(dim=-1, keepdim=True)
        var = (g - mean).pow(2).mean(dim=-1, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


class LayerNormOps(nn.Module):
    """LayerNorm from basic ops (ORT's LayerNormalization gradient needs outputs the exporter drops)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.dims = tuple(range(-len(norm.normalized_shape), 0))
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        mean = x.mean(dim=self.dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=self.dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class Upsample2xOps(nn.Module):
    """diffusers' Upsample2D (nearest 2x, then conv) via reshape/expand (ORT has no CPU ResizeGrad)."""

    def __init__(self, up):
        super().__init__()
        if up.use_conv_transpose or up.norm is not None or not up.interpolate or not up.use_conv:
            raise ValueError("only the SD Upsample2D (nearest 2x + conv) has a basic-op twin")
        self.conv = up.conv

    def forward(self, x, output_size=None):
        n, c, h, w = x.shape
        x = x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
        return self.conv(x)


def ort_friendly(net: nn.Module) -> nn.Module:
    """Swap GroupNorm, LayerNorm and Upsample2D in `net` (in place) for basic-op twins, same names."""
    from diffusers.models.upsampling import Upsample2D

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                parent._modules[name] = GroupNormOps(child)
            elif isinstance(child, nn.LayerNorm):
                parent._modules[name] = LayerNormOps(child)
            elif isinstance(child, Upsample2D):
                parent._modules[name] = Upsample2xOps(child)
    return net


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def quiet_tracing():
    """Tracing diffusers' shape asserts and strided slices warns; expected, and no help to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        yield


def export_inference(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                     data_suffix: str = ".data") -> None:
    """Plain ONNX inference graph at `path`, replacing any older one; weights in `<name><data_suffix>`
    when large (`_data` is optimum's layout, `.data` the bundle's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    if param_bytes(module) > EXTERNAL_DATA_THRESHOLD:
        export_streamed(module, args, path, input_names, output_names, dynamic_axes, data_suffix)
        return
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad(), quiet_tracing():
        raw = Path(scratch) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        for old in (path, path.with_name(path.name + data_suffix)):
            old.unlink(missing_ok=True)
        os.replace(raw, path)


DATA_ALIGN = 4096  # tensors of a page or more start on a page of the data file (ORT can map them)


def export_streamed(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                    data_suffix: str = ".data") -> None:
    """`export_inference` for large nets: the graph is traced without its weights (they are graph inputs,
    named as in `module.named_parameters()`), then each weight is written straight from its torch
    tensor into `<name><data_suffix>` and becomes an initializer pointing there. The exporter would
    otherwise hold every weight 2-3 times over in protobufs (+6.4 GB for SD2.1's precompute graph).

    Without the exporter's constant folding, a Linear weight reaches its MatMul through a Transpose:
    a weight read only by Transposes is written transposed under the Transpose's output name and the
    Transpose dropped, as the folding would have; whatever else is foldable, ONNX Runtime folds at
    session creation (small tensors: norm scales, shapes).
    """
    path = Path(path)
    tensors = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad(), quiet_tracing():
        raw = Path(scratch) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=False,
                          export_params=False, keep_initializers_as_inputs=True)
        model = onnx.load(str(raw))
    graph = model.graph
    weights = [i.name for i in graph.input if i.name in tensors]
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    location = path.name + data_suffix
    for old in (path, path.with_name(location)):
        old.unlink(missing_ok=True)
    dropped, initializers = set(), []
    with store.atomic_path(path.with_name(location)) as data, open(data, "wb") as f:
        for name in weights:
            tensor = tensors[name].detach()
            nodes = readers.get(name, [])
            if nodes and all(n.op_type == "Transpose" for n in nodes):
                for n in nodes:
                    perm = next((list(a.ints) for a in n.attribute if a.name == "perm"),
                                list(range(tensor.dim()))[::-1])
                    initializers.append(_append_tensor(f, n.output[0], tensor.permute(perm), location))
                    dropped.add(id(n))
            else:
                initializers.append(_append_tensor(f, name, tensor, location))
    keep_nodes = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    keep_inputs = [i for i in graph.input if i.name not in tensors]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    graph.initializer.extend(initializers)
    with store.atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())


def _append_tensor(f, name: str, tensor: torch.Tensor, location: str) -> onnx.TensorProto:
    """Write `tensor`'s bytes at the end of `f` (a page-aligned offset when a page or more) and return
    an initializer pointing there."""
    array = tensor.contiguous().numpy()
    offset = f.tell()
    align = DATA_ALIGN if array.nbytes >= DATA_ALIGN else 64
    if offset % align:
        f.write(b"\0" * (align - offset % align))
        offset = f.tell()
    f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    init = onnx.TensorProto()
    init.name = name
    init.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    init.dims.extend(array.shape)
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    return init
