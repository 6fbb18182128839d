"""The U-Net cut in two: the frozen precompute net and the hollowed (trainable) net.

In:  a diffusers `UNet2DConditionModel` and its `HollowPlan`.
Out: `PrecomputeNet(sample, timestep, class_embedding) -> hidden`, the hidden
     state entering the first kept up layer, and
     `HollowedNet(sample, timestep, instance_embedding, hidden) -> noise`,
     the kept down units, the kept up units fed `hidden`, and the head
     (given a `target` too, it returns the training loss: what is exported;
     with `recompute=True` each kept unit's activations are recomputed in
     the backward instead of held: a benchmark row).

Both nets hold the U-Net's own module objects (no copy) under their original
dotted names, so a state dict of either net addresses the full U-Net. For
every depth, `HollowedNet(x, t, e, PrecomputeNet(x, t, e))` equals the
diffusers forward of the U-Net (tests/test_split.py). `unet_forward` runs the
whole U-Net unit by unit with one embedding for the kept units and one for
the hollowed units: the single-path inference of the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from torch.utils.checkpoint import checkpoint

from .plan import HollowPlan, Unit


def graft(root: nn.Module, name: str, module: nn.Module) -> None:
    """Register `module` under the dotted `name` inside `root`, creating containers on the way."""
    *path, leaf = name.split(".")
    node = root
    for part in path:
        if part not in node._modules:
            node.add_module(part, nn.ModuleDict())
        node = node._modules[part]
    node.add_module(leaf, module)


def embed_timestep(net: nn.Module, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The U-Net's timestep embedding (as `UNet2DConditionModel.get_time_embed` + `time_embedding`)."""
    if timestep.dim() == 0:
        timestep = timestep[None]
    t_emb = net.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
    return net.time_embedding(t_emb)


class UnitScope(nn.Module):
    """No weights: a unit called through it exports its ONNX nodes as `/unit_scopes.K/...`.

    The U-Net's module names repeat across blocks (every up block has a `resnets.0`), so the exported node
    names alone do not say which unit a node belongs to; the scope does, and the unit-recompute rewrite
    (`export/recompute_units.py`) reads its unit boundaries from it. Math and state dict are unchanged.
    """

    def forward(self, fn, *args):
        return fn(*args)


def unit_scopes(count: int) -> nn.ModuleList:
    return nn.ModuleList(UnitScope() for _ in range(count))


def _call(fn, *args):
    return fn(*args)


def run_down(net: nn.Module, unit: Unit, h, emb, context):
    """One down unit: conv_in, a resnet(+attention) layer, or a downsampler."""
    if unit.modules == ("conv_in",):
        return net.conv_in(h)
    if unit.kind == "downsample":
        return net.get_submodule(unit.modules[0])(h)
    h = net.get_submodule(unit.modules[0])(h, emb)
    if len(unit.modules) > 1:
        h = net.get_submodule(unit.modules[1])(h, encoder_hidden_states=context, return_dict=False)[0]
    return h


def run_up(net: nn.Module, unit: Unit, h, emb, context, skip=None):
    """One up unit: a resnet(+attention) layer taking its skip tensor, or an upsampler (no skip)."""
    if unit.kind == "upsample":
        return net.get_submodule(unit.modules[0])(h)
    h = torch.cat([h, skip], dim=1)
    h = net.get_submodule(unit.modules[0])(h, emb)
    if len(unit.modules) > 1:
        h = net.get_submodule(unit.modules[1])(h, encoder_hidden_states=context, return_dict=False)[0]
    return h


def run_mid(net: nn.Module, h, emb, context):
    return net.mid_block(h, emb, encoder_hidden_states=context)


def run_head(net: nn.Module, h):
    return net.conv_out(net.conv_act(net.conv_norm_out(h)))


def _is_down(unit: Unit) -> bool:
    return unit.kind in ("down", "downsample")


def pop_skip(unit: Unit, skips: list):
    """The skip tensor an up unit consumes: the last pushed for an up layer, none for an upsampler."""
    return skips.pop() if unit.kind == "up" else None


class PrecomputeNet(nn.Module):
    """Frozen original path to the buffer: all down units, the mid block (if any), the hollowed up units."""

    def __init__(self, unet, plan: HollowPlan):
        super().__init__()
        self.plan = plan
        self.down_units = [u for u in plan.units if _is_down(u)]
        self.up_units = [u for u in plan.hollowed_units if u.kind in ("up", "upsample")]
        self.has_mid = any(u.kind == "mid" for u in plan.units)  # False for BK-SDM U-Nets
        self.time_proj = unet.time_proj  # no parameters
        for name in plan.precompute:
            graft(self, name, unet.get_submodule(name))
        self.requires_grad_(False)

    def forward(self, sample, timestep, encoder_hidden_states):
        emb = embed_timestep(self, sample, timestep)
        h, skips = sample, []
        for unit in self.down_units:
            h = run_down(self, unit, h, emb, encoder_hidden_states)
            skips.append(h)
        if self.has_mid:
            h = run_mid(self, h, emb, encoder_hidden_states)
        for unit in self.up_units:
            h = run_up(self, unit, h, emb, encoder_hidden_states, pop_skip(unit, skips))
        return h


class HollowedNet(nn.Module):
    """The kept layers: kept down units make the skips, the kept up units start from the buffer."""

    def __init__(self, unet, plan: HollowPlan, recompute: bool = False):
        super().__init__()
        self.plan = plan
        self.recompute = recompute
        self.down_units = [u for u in plan.kept_units if _is_down(u)]
        self.up_units = [u for u in plan.kept_units if u.kind in ("up", "upsample")]
        self.time_proj = unet.time_proj
        self.conv_act = unet.conv_act
        for name in plan.kept_modules:
            graft(self, name, unet.get_submodule(name))
        self.unit_scopes = unit_scopes(len(self.down_units) + len(self.up_units))

    def _run(self, k: int, fn, *args):
        """Unit `k`; with `recompute`, its activations are recomputed in the backward, not held."""
        if self.recompute:
            return self.unit_scopes[k](lambda *a: checkpoint(fn, self, *a, use_reentrant=False), *args)
        return self.unit_scopes[k](fn, self, *args)

    def forward(self, sample, timestep, encoder_hidden_states, hidden, target=None):
        """Noise prediction; with `target` given, the training loss MSE(prediction, target) instead."""
        emb = embed_timestep(self, sample, timestep)
        h, skips = sample, []
        for k, unit in enumerate(self.down_units):
            h = self._run(k, run_down, unit, h, emb, encoder_hidden_states)
            skips.append(h)
        h = hidden
        for k, unit in enumerate(self.up_units, start=len(self.down_units)):
            h = self._run(k, run_up, unit, h, emb, encoder_hidden_states, pop_skip(unit, skips))
        prediction = run_head(self, h)
        if target is None:
            return prediction
        return torch.nn.functional.mse_loss(prediction, target)


def unet_forward(unet, plan: HollowPlan, sample, timestep, kept_context, hollowed_context=None, scopes=None):
    """The whole U-Net, unit by unit; hollowed units see `hollowed_context` (default: `kept_context`).

    With one context this is the plain diffusers forward. With the instance prompt for the kept
    units and the class prompt for the hollowed ones it is the paper's single-path inference.
    `scopes` (`unit_scopes(len(plan.units))`, for an export) names each unit's ONNX nodes.
    """
    if hollowed_context is None:
        hollowed_context = kept_context
    hollowed = {u.modules for u in plan.hollowed_units}
    emb = embed_timestep(unet, sample, timestep)
    h, skips = sample, []
    for k, unit in enumerate(plan.units):
        context = hollowed_context if unit.modules in hollowed else kept_context
        scope = scopes[k] if scopes is not None else _call
        if _is_down(unit):
            h = scope(run_down, unet, unit, h, emb, context)
            skips.append(h)
        elif unit.kind == "mid":
            h = scope(run_mid, unet, h, emb, context)
        elif unit.kind in ("up", "upsample"):
            h = scope(run_up, unet, unit, h, emb, context, pop_skip(unit, skips))
    return run_head(unet, h)
