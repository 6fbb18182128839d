"""FLOPs of one step of a benchmark case, counted exactly (FlopCounterMode, on the meta device).

In:  an architecture, plan arguments and a `Case`.
Out: {forward, backward, step} FLOPs per case (cached per process), and the FLOPs of one dual-path
     denoising evaluation (precompute + kept layers).
"""

from __future__ import annotations

from dataclasses import replace

from ..models.load import load_unet
from .cases import Case, bench_plan, build_case


def flop_counter(display: bool = False):
    """FlopCounterMode that also knows the CPU flash-attention kernel (same formula as SDPA)."""
    import torch
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward_flops
    return fc.FlopCounterMode(display=display, custom_mapping=mapping)


def case_flops(arch: str, plan_args: dict, case: Case, device: str | None = None) -> dict:
    """FLOPs of one step of `case`: forward, backward and their sum.

    Counted on the meta device (any size, no memory), or on real CPU tensors for `tiny` (faster than
    meta's Python kernels there; the counts are the same, tests/test_profile.py checks both).
    Precision and buffer variants count like their fp32 case; results are cached per process.
    """
    device = device or ("cpu" if arch == "tiny" else "meta")
    key = (arch, tuple(sorted(plan_args.items())), case.kind, case.rank, case.checkpoint, device)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _case_flops(arch, plan_args, case, device)
    return dict(_FLOPS_CACHE[key])


_FLOPS_CACHE: dict = {}


def _case_flops(arch: str, plan_args: dict, case: Case, device: str) -> dict:
    import torch

    unet = load_unet(arch=arch, meta=device == "meta")
    plan = bench_plan(unet, **plan_args)
    with torch.device(device):
        item = {"sample": torch.randn(1, *plan.latent_shape), "timestep": torch.tensor([500]),
                "context": torch.randn(1, *plan.encoder_shape), "target": torch.randn(1, *plan.latent_shape),
                "hidden": torch.randn(1, *plan.buffer_shape)}
    net, _ = build_case(unet, plan, replace(case, dtype="fp32", buffer_dtype="fp32"), device=device)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter:
        if case.training:
            x, t, ctx = item["sample"], item["timestep"], item["context"]
            pred = net(x, t, ctx, item["hidden"]) if case.kind == "hollowed" else net(x, t, ctx).sample
            loss = torch.nn.functional.mse_loss(pred, item["target"])
            forward = counter.get_total_flops()
            loss.backward()
        else:
            with torch.no_grad():
                net(item["sample"], item["timestep"], item["context"])
            forward = counter.get_total_flops()
    total = counter.get_total_flops()
    return {"forward": forward, "backward": total - forward, "step": total}


def dual_path_flops(arch: str, plan_args: dict) -> int:
    """FLOPs of one dual-path denoising evaluation: precompute (class prompt) + kept layers."""
    import torch

    from ..hollow.split import HollowedNet, PrecomputeNet
    device = "cpu" if arch == "tiny" else "meta"
    unet = load_unet(arch=arch, meta=device == "meta")
    plan = bench_plan(unet, **plan_args)
    with torch.device(device):
        x, t, e = torch.randn(1, *plan.latent_shape), torch.tensor([500]), torch.randn(1, *plan.encoder_shape)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter, torch.no_grad():
        HollowedNet(unet, plan)(x, t, e, PrecomputeNet(unet, plan)(x, t, e))
    return counter.get_total_flops()
