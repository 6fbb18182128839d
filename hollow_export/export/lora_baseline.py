"""The plain-LoRA baseline on the full U-Net, as graphs for the benchmarks.

In:  a U-Net, a `HollowPlan` (rank, targets, resolution to match) and the AdamW settings.
Out: `FullUNet(unet)`, the full U-Net on plain tensors (noise prediction; with a target, the
     training loss, like `HollowedNet`), and `plain_lora_artifacts(...)`, its training files for
     the on-device backend with LoRA on every matching U-Net layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..hollow import lora as lora_mod
from ..hollow.lora import AdamWSettings
from ..hollow.plan import HollowPlan, select_lora_targets
from ..hollow.split import unet_forward, unit_scopes
from .backend import backend

FULL_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class FullUNet(nn.Module):
    """The whole U-Net on tensors: the noise prediction, or with `target` the training loss MSE(prediction, target).

    Given the plan, it runs the U-Net unit by unit (`split.unet_forward`, equal to the diffusers forward),
    each unit under its own `UnitScope`, so the unit-recompute lever applies to plain LoRA as to Hollowed Net.
    """

    def __init__(self, unet, plan: HollowPlan | None = None):
        super().__init__()
        self.unet = unet
        self.plan = plan
        self.unit_scopes = unit_scopes(len(plan.units)) if plan is not None else None

    def forward(self, sample, timestep, encoder_hidden_states, target=None):
        if self.plan is None:
            prediction = self.unet(sample, timestep, encoder_hidden_states).sample
        else:
            prediction = unet_forward(self.unet, self.plan, sample, timestep, encoder_hidden_states,
                                      scopes=self.unit_scopes)
        if target is None:
            return prediction
        return torch.nn.functional.mse_loss(prediction, target)


def full_unet_args(plan: HollowPlan, with_target: bool) -> tuple:
    """Example inputs of `FullUNet` at the plan's shapes (batch 1)."""
    c, h, w = plan.latent_shape
    args = (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64), torch.zeros(1, *plan.encoder_shape))
    return args + (torch.zeros(1, c, h, w),) if with_target else args


def plain_lora_artifacts(unet, plan: HollowPlan, out: Path, optimizer: AdamWSettings,
                         seed: int = 0) -> tuple[list, list]:
    """Training files of plain LoRA on the full U-Net, same rank/targets/resolution as `plan`."""
    lora_mod.inject(unet, plan.lora, select_lora_targets(unet, plan.lora), seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    return backend().write_artifacts(FullUNet(unet, plan), full_unet_args(plan, with_target=True),
                                     [*FULL_UNET_INPUTS, "target"], out, optimizer)
