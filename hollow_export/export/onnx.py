"""Generic ONNX export of torch modules, and basic-op twins of three modules ORT 1.19.2 cannot train.

In:  a torch module, example inputs, a target path and the graph's input/output names.
Out: `export_inference(...)` -> an ONNX inference graph (legacy exporter, opset `OPSET`), its
     weights in one external data file when they pass `EXTERNAL_DATA_THRESHOLD`;
     `ort_friendly(net)` -> `net` with GroupNorm, LayerNorm and Upsample2D swapped in place for
     twins built from basic ops (same parameters, same names, equal values and gradients).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

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


def export_inference(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                     data_suffix: str = ".data") -> None:
    """Plain ONNX inference graph at `path`, replacing any older one; weights in `<name><data_suffix>`
    when large (`_data` is optimum's layout, `.data` the bundle's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad():
        raw = Path(scratch) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        for old in (path, path.with_name(path.name + data_suffix)):
            old.unlink(missing_ok=True)
        if param_bytes(module) <= EXTERNAL_DATA_THRESHOLD:
            os.replace(raw, path)
            return
        onnx.save_model(onnx.load(str(raw)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + data_suffix, size_threshold=1024)
