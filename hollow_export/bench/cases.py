"""The rows of the memory benchmark: what each case holds and what one of its steps does.

In:  a LoRA rank, case names, a U-Net and its plan, a device.
Out: `Case` values (`paper_cases`, `beyond_cases`, `pick_cases`), `build_case(...)` -> (net,
     trainable params) holding only the modules the case needs, `step_inputs_for(...)` (seeded
     training samples), `make_optimizer` and `run_step` (one forward, or forward + backward + AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HollowError

TOKENS = 77


class BenchError(HollowError, ValueError):
    """A benchmark setting that cannot run (message names the fix)."""


def bench_plan(unet, rank: int, fraction: float | None, depth: int | None, resolution: int | None):
    """The plan of a benchmark: depth wins over fraction; LoRA of `rank` on the paper's targets."""
    from ..hollow.plan import plan_from_options
    return plan_from_options(unet, fraction=None if depth is not None else fraction, depth=depth, rank=rank,
                             resolution=resolution)


@dataclass(frozen=True)
class Case:
    """One row of the memory table: what is held and what one step does."""

    name: str
    kind: str  # inference | collection | lora | hollowed | full_ft
    label: str
    rank: int | None = None  # LoRA rank (lora, hollowed)
    dtype: str = "fp32"  # precision of the frozen (base) weights and activations; LoRA stays fp32
    checkpoint: bool = False  # activation recomputation per kept unit (hollowed)
    buffer_dtype: str = "fp32"  # how the buffered hidden state is stored (hollowed)
    fused_step: bool = False  # AdamW step per LoRA tensor inside the backward, its gradient freed at once
    reference: str | None = None  # the fp32 case this one is compared with
    group: str = "paper"  # paper | beyond

    @property
    def training(self) -> bool:
        return self.kind in ("lora", "hollowed", "full_ft")


def paper_cases(rank: int) -> list[Case]:
    cases = [
        Case("inference", "inference", "Full U-Net inference (1 forward, no grad)"),
        Case(f"lora_r{rank}", "lora", f"LoRA FT r={rank} (full U-Net)", rank=rank),
        Case("lora_r1", "lora", "LoRA FT r=1 (full U-Net)", rank=1),
        Case("hollowed", "hollowed", f"Hollowed Net FT r={rank}", rank=rank),
        Case("collection", "collection", "Collection stage (precompute fwd)"),
        Case("full_ft", "full_ft", "Full fine-tuning (AdamW)"),
    ]
    return list({c.name: c for c in cases}.values())  # rank 1: one LoRA row


def beyond_cases(rank: int) -> list[Case]:
    b = dict(group="beyond", rank=rank, reference="hollowed")
    return [
        Case("hollowed_ckpt", "hollowed", "Hollowed + activation recompute", checkpoint=True, **b),
        Case("hollowed_buf16", "hollowed", "Hollowed, buffer stored fp16", buffer_dtype="fp16", **b),
        Case("inference_bf16", "inference", "Inference, weights bf16", dtype="bf16", group="beyond",
             reference="inference"),
        Case("hollowed_bf16", "hollowed", "Hollowed, frozen bf16 + LoRA fp32", dtype="bf16", **b),
        Case("hollowed_bf16_ckpt", "hollowed", "Hollowed, bf16 + recompute", dtype="bf16", checkpoint=True, **b),
        Case("inference_fp16", "inference", "Inference, weights fp16", dtype="fp16", group="beyond",
             reference="inference"),
        Case("hollowed_fp16", "hollowed", "Hollowed, frozen fp16 + LoRA fp32", dtype="fp16", **b),
        Case("hollowed_fp16_ckpt", "hollowed", "Hollowed, fp16 + recompute", dtype="fp16", checkpoint=True, **b),
        Case("hollowed_ckpt_fused", "hollowed", "Hollowed + recompute + step in backward", checkpoint=True,
             fused_step=True, **b),
        Case("hollowed_bf16_ckpt_fused", "hollowed", "Hollowed, bf16 + recompute + step in backward", dtype="bf16",
             checkpoint=True, fused_step=True, **b),
    ]


def all_cases(rank: int) -> list[Case]:
    return paper_cases(rank) + beyond_cases(rank)


def pick_cases(rank: int, names: list[str] | None) -> list[Case]:
    cases = all_cases(rank)
    if not names:
        return cases
    known = {c.name: c for c in cases}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return [known[n] for n in names]


def compute_dtype(case: "Case", device: str) -> str:
    """What a case computes in: its dtype natively on CUDA; fp32 over low-precision stored weights on CPU."""
    return case.dtype if device.startswith("cuda") else "fp32"


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_case(unet, plan, case: Case, device: str = "cpu", step_inputs: list | None = None):
    """(net, trainable params) for `case`, holding only the modules the case needs.

    For the hollowed cases, `step_inputs` (dicts with sample/timestep/context) get their buffered
    `hidden` from the precompute net first (fp32, before anything is deleted).
    """
    import torch

    from ..hollow import lora as lora_mod
    from ..hollow.plan import LoraSpec, select_lora_targets
    from ..hollow.split import HollowedNet, PrecomputeNet
    from .precision import store_frozen_weights

    if case.kind == "hollowed" and step_inputs is not None:
        pre = PrecomputeNet(unet, plan)
        with torch.no_grad():
            for item in step_inputs:
                hidden = pre(item["sample"], item["timestep"], item["context"])
                if case.buffer_dtype == "fp16":
                    hidden = hidden.half()
                item["hidden"] = hidden
        del pre
    if case.kind == "inference":
        net = unet
    elif case.kind == "collection":
        net = PrecomputeNet(unet, plan)
    elif case.kind == "hollowed":
        spec = LoraSpec(rank=case.rank)
        net = lora_mod.inject(HollowedNet(unet, plan, recompute=case.checkpoint), spec,
                              select_lora_targets(unet, spec, plan.kept_modules))
    elif case.kind == "lora":
        spec = LoraSpec(rank=case.rank)
        net = lora_mod.inject(unet, spec, select_lora_targets(unet, spec))
    elif case.kind == "full_ft":
        net = unet.requires_grad_(True)
    else:
        raise BenchError(f"unknown case kind {case.kind}")
    trainable = [p for p in net.parameters() if p.requires_grad] if case.training else []
    if not case.training:
        net.requires_grad_(False)
    if case.dtype != "fp32" and compute_dtype(case, device) == "fp32":
        store_frozen_weights(net, _torch_dtype(case.dtype))
    elif case.dtype != "fp32":
        net.to(_torch_dtype(case.dtype))
        for name, param in net.named_parameters():
            if ".lora_" in name:
                param.data = param.data.float()
    net.to(device)
    return net, trainable


def step_inputs_for(arch: str, plan, steps: int, seed: int = 0) -> list[dict]:
    """`steps` fixed training samples: noisy latent, timestep, 77-token context, target (seeded)."""
    import torch
    from diffusers import DDPMScheduler

    from ..models.registry import arch_config
    from ..train.trainer import training_target
    scheduler = DDPMScheduler.from_config(arch_config("sd15" if arch == "mid" else arch, "scheduler"))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        clean = torch.randn(1, *plan.latent_shape, generator=g)
        noise = torch.randn(1, *plan.latent_shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
        out.append({"sample": scheduler.add_noise(clean, noise, t), "timestep": t,
                    "context": torch.randn(1, *plan.encoder_shape, generator=g),
                    "target": training_target(scheduler, clean, noise, t)})
    return out


def make_optimizer(case: Case, trainable: list, lr: float):
    """torch's AdamW over the trainable tensors; with `fused_step`, one AdamW per tensor stepped from its
    post-accumulate-grad hook (torch's recipe for fusing the step into the backward): every LoRA gradient
    is applied and freed as soon as it is complete, so the gradients never all exist at once. Returns the
    optimizer `run_step` calls, or None when the backward itself steps."""
    from ..hollow.lora import AdamWSettings
    if not trainable:
        return None
    if not case.fused_step:
        return AdamWSettings(lr=lr).torch_optimizer(trainable)
    per_tensor = {param: AdamWSettings(lr=lr).torch_optimizer([param]) for param in trainable}

    def step(param):
        per_tensor[param].step()
        per_tensor[param].zero_grad(set_to_none=True)

    for param in trainable:
        param.register_post_accumulate_grad_hook(step)
    return None


def run_step(net, case: Case, item: dict, optimizer, device: str):
    """One step of `case`: a forward (no grad), or forward + backward + AdamW. Returns (loss or None, output)."""
    import torch
    dtype = _torch_dtype(compute_dtype(case, device))
    x = item["sample"].to(device, dtype)
    t = item["timestep"].to(device)
    ctx = item["context"].to(device, dtype)
    if not case.training:
        with torch.no_grad():
            out = net(x, t, ctx)
        return None, (out.sample if hasattr(out, "sample") else out)
    if case.kind == "hollowed":
        pred = net(x, t, ctx, item["hidden"].to(device, dtype))
    else:
        pred = net(x, t, ctx).sample
    loss = torch.nn.functional.mse_loss(pred.float(), item["target"].to(device))
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()  # with a fused step, the backward also updates the LoRA tensors
    if optimizer is not None:
        optimizer.step()
    return loss.item(), None
