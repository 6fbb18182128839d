"""LoRA on the hollowed net with peft, and its way back into the full U-Net.

In:  a net whose modules carry the U-Net's original names (the `HollowedNet`,
     or the U-Net itself for plain LoRA) and the plan's `LoraSpec`/targets.
Out: the net with peft LoRA layers (only LoRA trainable); the LoRA state dict
     (peft names: `<module>.lora_A.weight`, `<module>.lora_B.weight`), which
     loads into the full U-Net unchanged and saves as a diffusers
     `pytorch_lora_weights.safetensors` (`load_lora_weights(dir)` reads it,
     alpha carried in the file's adapter metadata).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from .. import store
from ..errors import HollowError
from .plan import LoraSpec, fan_in

ADAPTER = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"


class LoraError(HollowError, ValueError):
    """A LoRA state that does not fit the model it is loaded into (message names the mismatch)."""


def lora_config(spec: LoraSpec, targets: list[str]) -> LoraConfig:
    """peft config adapting exactly the named modules (full dotted names: no accidental matches)."""
    return LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(targets),
                      lora_dropout=0.0, bias="none", init_lora_weights=True)


def adapter_metadata(spec: LoraSpec, targets: list[str]) -> dict:
    """The LoraConfig kwargs diffusers rebuilds the adapter from (so alpha != rank loads right)."""
    return {"r": spec.rank, "lora_alpha": spec.lora_alpha, "target_modules": sorted(targets),
            "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none"}


def inject(net: torch.nn.Module, spec: LoraSpec, targets: list[str], seed: int | None = 0) -> torch.nn.Module:
    """Add LoRA to `net` in place; freeze everything but LoRA. lora_B starts at zero (output unchanged)."""
    if seed is not None:
        torch.manual_seed(seed)
    inject_adapter_in_model(lora_config(spec, targets), net, adapter_name=ADAPTER)
    for name, param in net.named_parameters():
        param.requires_grad_(".lora_" in name)
    return net


def lora_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed by full-U-Net module names (`...to_q.lora_A.weight`), detached, contiguous."""
    state = get_peft_model_state_dict(net, adapter_name=ADAPTER)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def lora_parameters(net: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters, by their name in `net` (`...to_q.lora_A.default.weight`)."""
    return {n: p for n, p in net.named_parameters() if ".lora_" in n}


def _base_weight(unet, module_name: str) -> torch.Tensor:
    module = unet.get_submodule(module_name)  # AttributeError if absent
    return (module.get_base_layer() if isinstance(module, BaseTunerLayer) else module).weight


def check_fits(unet, state: dict[str, torch.Tensor]) -> None:
    """Raise LoraError unless every tensor of `state` names a module of `unet` with matching shape."""
    problems = []
    for key, tensor in state.items():
        module_name, _, kind = key.rpartition(".lora_")
        try:
            weight = _base_weight(unet, module_name)
        except AttributeError:
            problems.append(f"{key}: no module {module_name} in this U-Net")
            continue
        fits = fan_in(tensor) == fan_in(weight) if kind.startswith("A") else tensor.shape[0] == weight.shape[0]
        if not fits:
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit {module_name} {tuple(weight.shape)}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LoraError("this LoRA does not belong to this U-Net (trained from another bundle or model?): "
                        + "; ".join(problems[:5]) + more)


def targets_of(state: dict[str, torch.Tensor]) -> list[str]:
    """Module names adapted by a LoRA state dict."""
    return sorted({k.rpartition(".lora_")[0] for k in state})


def load_into(unet, state: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """Add an adapter to the full U-Net and load `state` into it, by name; every tensor must land."""
    check_fits(unet, state)
    unet.add_adapter(lora_config(spec, targets_of(state)), adapter_name=ADAPTER)
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise LoraError(f"LoRA tensors did not land in the U-Net: {unexpected[:5]}")


def save_diffusers(folder: Path, state: dict[str, torch.Tensor], spec: LoraSpec) -> Path:
    """Write `pytorch_lora_weights.safetensors` in diffusers' key format with the adapter metadata."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    path = Path(folder) / LORA_FILE
    with store.atomic_path(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        StableDiffusionPipeline.save_lora_weights(
            scratch,
            unet_lora_layers=convert_state_dict_to_diffusers(state),
            unet_lora_adapter_metadata=adapter_metadata(spec, targets_of(state)),
            safe_serialization=True,
        )
        os.replace(Path(scratch) / LORA_FILE, tmp)
    return path


@dataclass
class AdamWSettings:
    """The optimizer of the LoRA tensors, host and device alike: PyTorch's AdamW (decoupled decay)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def torch_optimizer(self, params, lr: float | None = None):
        """`torch.optim.AdamW` over `params` with these settings (`lr` overrides)."""
        return torch.optim.AdamW(params, lr=self.lr if lr is None else lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay)


@contextmanager
def adapters_disabled(net: torch.nn.Module):
    """Run `net` as the original model: every LoRA layer in it bypassed, then restored."""
    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer in layers:
            layer.enable_adapters(True)
