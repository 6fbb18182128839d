"""Local benchmarks: the paper's Table 1 on any architecture, the hollow-depth sweep, the ORT engine.

In:  an architecture (`tiny`, `sd15`, `sd21`, or the bench-only `mid`: SD1.5's layout with
     block_out_channels 128/256/512/512), a device (cpu or cuda), resolution, LoRA rank and hollow
     fraction or depth.
Out: `memory_table(...)`, `sweep(...)` and `ort_bench(...)` return a JSON-serialisable result
     (settings, rows, notes), write it with `store.write_json` plus a PNG chart (both atomic), and
     `*_text(result)` renders the printed table.

How each number is measured (also written into every result's `method` field):
- Memory, CPU: every case runs in a FRESH subprocess (`python -m hollow_export.profile child ...`)
  that imports torch, records its baseline RSS, builds the full random U-Net, keeps only what the
  case holds (e.g. the Hollowed Net case keeps the kept modules and deletes the U-Net; the
  collection case keeps only the precompute path), runs `gc`, records the RSS it holds, runs one
  warm step, resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), runs the
  measured steps and reads `VmHWM`. Reported peak = VmHWM - baseline RSS (the bytes the case adds
  to a Python+torch process, comparable to a GPU allocator peak); the absolute VmHWM and the RSS
  after load are reported beside it. Children run with `MALLOC_MMAP_THRESHOLD_=1048576` so freed
  tensors go back to the OS and the RSS follows the live bytes.
- Memory, CUDA: the same children, with `torch.cuda.max_memory_allocated` reset after the warm
  step (`memory_allocated` after load is the held figure).
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one step (forward, plus backward for the
  training cases; the optimizer adds no counted FLOPs), on the meta device (exact shapes, no
  memory, any size; real CPU tensors for `tiny`, same counts). Attention is counted on SDPA's math
  path (2 bmm forward, 4 backward): algorithmic FLOPs, without the score recomputation that fused
  attention kernels add in the backward. The backward counts what autograd really computes: frozen
  weights get no weight gradients (the paper's training FLOPs are 3x forward for every row).
- Low-precision rows (bf16/fp16 frozen weights, LoRA and its AdamW state fp32): on CUDA the case
  computes natively in that dtype; on CPU (whose fp16/bf16 convolutions run ~300x slower than fp32
  here) the frozen weights are STORED in that dtype and each layer computes in fp32 over an upcast
  copy (`store_frozen_weights`), so the row is exactly an fp32 step over rounded weights. Each row
  reports its loss and LoRA-update difference against the fp32 case, measured in the same run.
- ORT: each bundle is built in its own subprocess, then measured in a fresh torch-free subprocess
  (ONNX Runtime + numpy, like the phone): RSS after load, peak RSS (`getrusage`), median step time.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import store
from .errors import HollowError

BENCH_ARCHS = ("tiny", "mid", "sd15", "sd21")
MID_OVERRIDES = {"block_out_channels": [128, 256, 512, 512]}  # on SD1.5's config
DTYPES = ("fp32", "bf16", "fp16")
TOKENS = 77
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "TOKENIZERS_PARALLELISM": "false"}
GB = 1e9


class BenchError(HollowError, ValueError):
    """A benchmark setting that cannot run (message names the fix)."""


# ---------------------------------------------------------------- models

def bench_unet_config(arch: str) -> dict:
    from .models import arch_config
    if arch not in BENCH_ARCHS:
        raise BenchError(f"unknown --arch {arch!r}; choose one of {', '.join(BENCH_ARCHS)}")
    if arch == "mid":
        return {**arch_config("sd15", "unet"), **MID_OVERRIDES}
    return arch_config(arch, "unet")


def bench_unet(arch: str, meta: bool = False):
    """The U-Net of `arch` (random weights, fixed seed; `meta=True`: shapes only)."""
    import torch
    from diffusers import UNet2DConditionModel

    from .models import SEED, load_unet
    if arch != "mid":
        bench_unet_config(arch)
        return load_unet(arch=arch, meta=meta)
    torch.manual_seed(SEED)
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(bench_unet_config(arch)).eval()
    return UNet2DConditionModel.from_config(bench_unet_config(arch)).eval()


def bench_pipeline(arch: str):
    """A pipeline whose U-Net is `arch`'s; for non-tiny archs the VAE, tokenizer and scheduler are the
    tiny default's and the text encoder is a 2-layer CLIP of the U-Net's cross-attention width: only
    the U-Net graphs are measured, so the rest only has to have the right shapes."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import arch_config, load_pipeline
    if arch == "tiny":
        return load_pipeline(arch="tiny")
    import torch
    tiny = load_pipeline(arch="tiny")
    unet = bench_unet(arch)
    width = unet.config.cross_attention_dim
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(**{**arch_config("tiny", "text_encoder"), "hidden_size": width,
                                           "intermediate_size": width, "num_attention_heads": 8,
                                           "projection_dim": width})).eval()
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=text, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_plan(unet, rank: int, fraction: float | None, depth: int | None, resolution: int | None):
    from .anatomy import LoraSpec, make_plan
    if depth is None and fraction is None:
        fraction = 0.4
    return make_plan(unet, depth=depth, fraction=None if depth is not None else fraction,
                     lora=LoraSpec(rank=rank), resolution=resolution)


# ---------------------------------------------------------------- cases

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


def _checkpointed_net_class():
    from torch.utils.checkpoint import checkpoint

    from .split import HollowedNet, embed_timestep, run_down, run_head, run_up

    def up_with_skip(net, unit, h, skip, emb, context):
        return run_up(net, unit, h, emb, context, [skip])  # the list lives inside: recompute-safe

    class CheckpointedHollowedNet(HollowedNet):
        """The Hollowed Net with activation recomputation per kept unit (same modules, same names)."""

        def forward(self, sample, timestep, encoder_hidden_states, hidden, target=None):
            import torch
            emb = embed_timestep(self, sample, timestep)
            h, skips = sample, []
            for unit in self.down_units:
                h = checkpoint(run_down, self, unit, h, emb, encoder_hidden_states, use_reentrant=False)
                skips.append(h)
            h = hidden
            for unit in self.up_units:
                if unit.kind == "upsample":
                    h = checkpoint(run_up, self, unit, h, emb, encoder_hidden_states, [], use_reentrant=False)
                else:
                    h = checkpoint(up_with_skip, self, unit, h, skips.pop(), emb, encoder_hidden_states,
                                   use_reentrant=False)
            prediction = run_head(self, h)
            if target is None:
                return prediction
            return torch.nn.functional.mse_loss(prediction, target)

    return CheckpointedHollowedNet


def store_frozen_weights(net, dtype) -> None:
    """Hold `net`'s frozen weights in `dtype` (fp16/bf16) and compute in fp32, for devices without fast
    low-precision kernels (this CPU's bf16/fp16 conv is ~300x slower than fp32).

    A module's frozen tensors are upcast when it runs and put back after; the fp32 copies autograd
    saves for the backward are packed as their low-precision originals and upcast again when the
    backward unpacks them. Trainable (LoRA) parameters stay fp32. Held weight bytes: those of `dtype`,
    plus one layer's fp32 copy at a time.
    """
    import weakref

    import torch
    from torch.autograd.graph import saved_tensors_hooks

    copies: dict[int, tuple] = {}  # id(fp32 copy) -> (weakref to it, low-precision original)

    def upcast(module, _inputs):
        for kind in ("_parameters", "_buffers"):
            for name, low in list(getattr(module, kind).items()):
                if low is not None and low.dtype == dtype and not low.requires_grad:
                    full = low.float()
                    copies[id(full)] = (weakref.ref(full), low)
                    module.__dict__.setdefault("_stored_low", {})[(kind, name)] = low
                    getattr(module, kind)[name] = full

    def restore(module, _inputs, _output):
        for (kind, name), low in module.__dict__.pop("_stored_low", {}).items():
            copies.pop(id(getattr(module, kind)[name]), None)
            getattr(module, kind)[name] = low

    def pack(t):
        base = t if t._base is None else t._base
        entry = copies.get(id(base))
        if entry is not None and entry[0]() is base:
            return ("low", entry[1], t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(packed):
        if isinstance(packed, tuple) and packed[0] == "low":
            _, low, size, stride, offset = packed
            return low.float().as_strided(size, stride, offset)
        return packed

    for module in net.modules():
        frozen = [t for t in list(module._parameters.values()) if t is not None and not t.requires_grad]
        for t in frozen:
            t.data = t.data.to(dtype)
        if frozen:
            module.register_forward_pre_hook(upcast)
            module.register_forward_hook(restore)
    hooks = saved_tensors_hooks(pack, unpack)  # active from the start to the end of `net`'s forward

    def enter_hooks(_module, _inputs):
        hooks.__enter__()

    def exit_hooks(_module, _inputs, _output):
        hooks.__exit__(None, None, None)

    net.register_forward_pre_hook(enter_hooks)
    net.register_forward_hook(exit_hooks)


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

    from . import lora as lora_mod
    from .anatomy import LoraSpec, select_lora_targets
    from .split import HollowedNet, PrecomputeNet

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
        cls = _checkpointed_net_class() if case.checkpoint else HollowedNet
        spec = LoraSpec(rank=case.rank)
        net = lora_mod.inject(cls(unet, plan), spec, select_lora_targets(unet, spec, plan.kept))
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

    from .models import arch_config
    from .personalize import training_target
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
    import torch
    if not trainable:
        return None
    if not case.fused_step:
        return torch.optim.AdamW(trainable, lr=lr)
    per_tensor = {param: torch.optim.AdamW([param], lr=lr) for param in trainable}

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


# ---------------------------------------------------------------- FLOPs

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

    unet = bench_unet(arch, meta=device == "meta")
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

    from .split import HollowedNet, PrecomputeNet
    device = "cpu" if arch == "tiny" else "meta"
    unet = bench_unet(arch, meta=device == "meta")
    plan = bench_plan(unet, **plan_args)
    with torch.device(device):
        x, t, e = torch.randn(1, *plan.latent_shape), torch.tensor([500]), torch.randn(1, *plan.encoder_shape)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter, torch.no_grad():
        HollowedNet(unet, plan)(x, t, e, PrecomputeNet(unet, plan)(x, t, e))
    return counter.get_total_flops()


# ---------------------------------------------------------------- processes and memory

def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _status_bytes(field_name: str) -> int:
    """A /proc/self/status memory field in bytes (elsewhere: the peak RSS so far, from getrusage)."""
    kib = _status_kib(field_name)
    if kib is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or `reset_peak_rss`."""
    return _status_bytes("VmHWM")


def available_bytes() -> int:
    import psutil
    return psutil.virtual_memory().available


def run_child(spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh interpreter; returns its result dict (or an `error`)."""
    with tempfile.TemporaryDirectory(prefix="hollow-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, **CHILD_ENV}
        started = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "hollow_export.profile", "child", str(spec_path),
                                   str(out_path)], env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "wall_seconds": time.time() - started}
        if proc.returncode != 0 or not out_path.exists():
            if proc.returncode in (-9, 137):
                why = "killed (SIGKILL: out of memory?)"
            else:
                tail = (proc.stderr or "").strip().splitlines()[-3:]
                why = f"exit {proc.returncode}: " + " | ".join(tail)
            return {"error": why, "wall_seconds": time.time() - started}
        result = json.loads(out_path.read_text())
        result["wall_seconds"] = time.time() - started
        return result


def _child_case(spec: dict) -> dict:
    """In the child: build one case, hold only its modules, measure its step memory and losses."""
    import torch
    torch.set_num_threads(spec["threads"])
    from .lora import lora_parameters

    device = spec["device"]
    case = Case(**spec["case"])
    cuda = device.startswith("cuda")
    baseline = rss_bytes()
    started = time.time()
    unet = bench_unet(spec["arch"])
    if cuda:
        unet.to(device)
    plan = bench_plan(unet, **spec["plan"])
    items = step_inputs_for(spec["arch"], plan, spec["steps"], spec["seed"])
    if cuda:
        items = [{k: v.to(device) for k, v in item.items()} for item in items]
    net, trainable = build_case(unet, plan, case, device, items)
    del unet
    base_params = sum(p.numel() for n, p in net.named_parameters() if ".lora_" not in n)
    lora_params = sum(p.numel() for p in lora_parameters(net).values())
    save = spec.get("save")
    if save and case.kind in ("lora", "hollowed"):
        store.save_tensors(Path(save) / f"{case.name}.initial.safetensors",
                           {k: v.detach().float().cpu() for k, v in lora_parameters(net).items()})
    optimizer = make_optimizer(case, trainable, spec["lr"])
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated()
    held_rss = rss_bytes()
    load_seconds = time.time() - started

    losses, times, output = [], [], None
    peak_method = None
    for i, item in enumerate(items):
        if i == 1:  # after the warm step (optimizer state now exists)
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                peak_method = "torch.cuda.max_memory_allocated after one warm step"
            else:
                peak_method = ("VmHWM reset after one warm step (clear_refs), minus baseline RSS"
                               if reset_peak_rss() else "ru_maxrss over the whole child (no VmHWM reset)")
        t0 = time.time()
        loss, output = run_step(net, case, item, optimizer, device)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        if loss is not None:
            losses.append(loss)
    if cuda:
        peak, peak_abs = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated()
        held_case, base = held, 0
    else:
        peak_abs = peak_rss_bytes()
        peak, held_case, base = peak_abs - baseline, held_rss - baseline, baseline
    if save:
        if case.kind in ("lora", "hollowed"):
            store.save_tensors(Path(save) / f"{case.name}.final.safetensors",
                               {k: v.detach().float().cpu() for k, v in lora_parameters(net).items()})
        elif output is not None:
            store.save_tensors(Path(save) / f"{case.name}.output.safetensors", {"out": output.float().cpu()})
    return {
        "case": case.name,
        "base_params": base_params,
        "lora_params": lora_params,
        "trainable_params": sum(p.numel() for p in trainable),
        "baseline_rss_bytes": base,
        "held_bytes": held_case,
        "held_rss_bytes": held_rss,
        "peak_bytes": peak,
        "peak_abs_bytes": peak_abs,
        "peak_method": peak_method if len(items) > 1 else "single step: peak over load and step",
        "losses": losses,
        "step_seconds": times,
        "load_seconds": load_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def settings_block(**settings) -> dict:
    import torch
    return {**settings, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{_total_ram() / 2**30:.0f} GiB RAM, {platform.node()}",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _total_ram() -> int:
    import psutil
    return psutil.virtual_memory().total


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise BenchError(f"--device must be cpu or cuda (got {device!r})")
    import torch
    if not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible to torch here; use --device cpu")


# ---------------------------------------------------------------- fidelity (variant vs fp32 reference)

def _fidelity(save: Path, case: Case, result: dict, reference: dict) -> dict:
    import torch
    out = {"reference": case.reference}
    if result.get("losses") and reference.get("losses"):
        pairs = list(zip(result["losses"], reference["losses"]))
        out["loss_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
        out["losses"] = result["losses"]
        out["reference_losses"] = reference["losses"]
    if case.kind in ("lora", "hollowed"):
        paths = [save / f"{n}.{w}.safetensors" for n in (case.name, case.reference) for w in ("initial", "final")]
        if all(p.exists() for p in paths):
            vi, vf, ri, rf = (store.load_tensors(p) for p in paths)
            dv = torch.cat([(vf[k] - vi[k]).flatten() for k in sorted(vf)])
            dr = torch.cat([(rf[k] - ri[k]).flatten() for k in sorted(rf)])
            out["update_rel_diff"] = float((dv - dr).norm() / dr.norm().clamp_min(1e-30))
    else:
        a, b = save / f"{case.name}.output.safetensors", save / f"{case.reference}.output.safetensors"
        if a.exists() and b.exists():
            va, vb = store.load_tensors(a)["out"], store.load_tensors(b)["out"]
            out["output_rel_diff"] = float((va - vb).norm() / vb.norm().clamp_min(1e-30))
    return out


# ---------------------------------------------------------------- bench memory

def _full_ft_estimate(plan, results: dict) -> int:
    """Bytes full fine-tuning needs: weights, grads, two AdamW moments, plus the LoRA cases' activations
    (or, not measured yet, as many bytes as the weights)."""
    params = plan.unet_params * 4
    acts = [r["peak_bytes"] - r["held_bytes"] for n, r in results.items() if n.startswith("lora_r") and "peak_bytes" in r]
    return 4 * params + (max(acts) if acts else params)


MERGE_KEYS = ("arch", "device", "resolution", "rank", "depth", "steps")
FULL_FT_MARGIN = 1.5e9  # left free for the other processes on the machine


def memory_table(arch: str = "tiny", device: str = "cpu", resolution: int | None = None, rank: int = 128,
                 fraction: float | None = 0.4, depth: int | None = None, steps: int = 3,
                 cases: list[str] | None = None, measure: bool = True, out: Path | None = None,
                 threads: int | None = None, timeout: float | None = None, lr: float = 1e-4,
                 merge: bool = False, log=print) -> dict:
    """The paper's Table 1 (and the beyond-paper rows) on `arch`: params, peak memory, FLOPs per step.

    `merge=True` adds this run's cases to the result already in `out` for the same settings (arch,
    device, resolution, rank, depth, steps): its other rows are kept, the cases run now replace theirs.
    """
    _check_device(device)
    if steps < 2:
        raise BenchError("--steps must be at least 2 (one warm step, then measured steps)")
    if device == "cpu" and measure and not reset_peak_rss():
        log("note: cannot reset the peak RSS counter here; peaks include the model build")
    threads = threads or max(1, min(os.cpu_count() or 1, 16))
    unet_meta = bench_unet(arch, meta=True)
    plan = bench_plan(unet_meta, rank, fraction, depth, resolution)
    plan_args = {"rank": rank, "fraction": None, "depth": plan.depth, "resolution": plan.resolution}
    chosen = pick_cases(rank, cases)
    from .anatomy import LoraSpec, lora_param_count, select_lora_targets
    settings = settings_block(arch=arch, device=device, resolution=plan.resolution, rank=rank,
                              depth=plan.depth, max_depth=plan.max_depth,
                              hollowed_fraction=plan.hollowed_fraction, dtype="fp32 (rows say otherwise)",
                              batch=1, tokens=TOKENS, cross_attention_dim=plan.encoder_shape[1],
                              steps=steps, lr=lr, threads=threads,
                              unet_params=plan.unet_params, kept_params=plan.kept_params,
                              precompute_params=plan.precompute_params, lora_params_plan=plan.lora_params,
                              buffer_shape=plan.buffer_shape, buffer_bytes_fp32=plan.buffer_bytes_fp32)
    stem = f"memory_{arch}_{device}_{plan.resolution}px_r{rank}_k{plan.depth}"
    old = None
    if merge and out is not None and (Path(out) / f"{stem}.json").exists():
        old = json.loads((Path(out) / f"{stem}.json").read_text())
        old_settings = old["settings"]
        if not all(old_settings.get(k) == settings[k] for k in MERGE_KEYS):
            raise BenchError(f"--merge: {Path(out) / stem}.json was measured with other settings "
                             f"({', '.join(f'{k}={old_settings.get(k)}' for k in MERGE_KEYS)}); "
                             "drop --merge or pick another --out")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hollow-bench-save-") as save_dir:
        save = Path(save_dir)
        referenced = {c.reference for c in chosen if c.reference}
        order = [c for c in chosen if c.kind != "full_ft"] + [c for c in chosen if c.kind == "full_ft"]
        for case in order:
            row = {"case": case.name, "label": case.label, "kind": case.kind, "group": case.group,
                   "dtype": case.dtype, "checkpoint": case.checkpoint, "buffer_dtype": case.buffer_dtype,
                   "rank": case.rank}
            row["base_params_analytic"] = {"hollowed": plan.kept_params, "collection": plan.precompute_params
                                           }.get(case.kind, plan.unet_params)
            log(f"[{case.name}] FLOPs on meta ...")
            row["flops"] = case_flops(arch, plan_args, case)
            if case.kind == "lora":
                row["lora_params_analytic"] = lora_param_count(
                    unet_meta, select_lora_targets(unet_meta, LoraSpec(rank=case.rank)), case.rank)
            elif case.kind == "hollowed":
                row["lora_params_analytic"] = lora_param_count(unet_meta, plan.lora_targets, case.rank)
            if measure:
                if case.kind == "full_ft" and device == "cpu":
                    need, have = _full_ft_estimate(plan, results), available_bytes()
                    row["full_ft_estimate_bytes"] = need
                    if need + FULL_FT_MARGIN > have:
                        row["error"] = (f"not run: needs about {need / GB:.1f} GB (weights, grads, two AdamW "
                                        f"moments, activations) + {FULL_FT_MARGIN / GB:.1f} GB margin, "
                                        f"{have / GB:.1f} GB available")
                        log(f"[{case.name}] {row['error']}")
                        results[case.name] = row
                        continue
                log(f"[{case.name}] measuring in a fresh process ...")
                spec = {"job": "case", "case": asdict(case), "arch": arch, "device": device, "plan": plan_args,
                        "steps": steps, "seed": 0, "threads": threads, "lr": lr,
                        "save": str(save) if (case.reference or case.name in referenced) else None}
                child = run_child(spec, timeout)
                row.update({k: v for k, v in child.items() if k != "case"})
                if "error" in child:
                    log(f"[{case.name}] failed: {child['error']}")
                else:
                    log(f"[{case.name}] peak {child['peak_bytes'] / GB:.3f} GB, held {child['held_bytes'] / GB:.3f} "
                        f"GB, {child['wall_seconds']:.0f} s")
            results[case.name] = row
            if out is not None:  # what is measured so far survives an interrupted run
                store.write_json(Path(out) / f"{stem}.partial.json",
                                 {"kind": "memory", "partial": True, "settings": settings,
                                  "rows": list(results.values())})
        for case in chosen:
            row = results[case.name]
            if case.reference and case.reference in results and "peak_bytes" in row \
                    and "peak_bytes" in results[case.reference]:
                row["fidelity"] = _fidelity(save, case, row, results[case.reference])
    rows = [results[c.name] for c in chosen]
    if old is not None:
        kept = {r["case"]: r for r in old["rows"] if r["case"] not in results}
        order = [c.name for c in all_cases(rank)]
        rows = sorted(list(kept.values()) + rows, key=lambda r: order.index(r["case"]) if r["case"] in order else 99)
        settings["merged_from"] = old["settings"].get("merged_from", []) + [old["settings"]["date"]]
        log(f"merged with {len(kept)} row(s) measured on {old['settings']['date']}")
    _add_ratios(rows)
    result = {"kind": "memory", "settings": settings, "rows": rows,
              "dual_path_flops": dual_path_flops(arch, plan_args),
              "method": __doc__.split("How each number is measured")[1].strip(),
              "notes": _memory_notes(rows, device, settings)}
    if out is not None:
        write_outputs(result, Path(out), stem, memory_text, plot_memory)
        (Path(out) / f"{stem}.partial.json").unlink(missing_ok=True)
    return result


def _add_ratios(rows: list[dict]) -> None:
    by = {r["case"]: r for r in rows}
    inf = by.get("inference", {})
    for r in rows:
        if inf.get("peak_bytes") and r.get("peak_bytes") is not None:
            r["peak_vs_inference"] = r["peak_bytes"] / inf["peak_bytes"]
        same = by.get("inference" if r["dtype"] == "fp32" else f"inference_{r['dtype']}", {})
        if same.get("peak_bytes") and r.get("peak_bytes") is not None:
            r["peak_vs_inference_same_dtype"] = r["peak_bytes"] / same["peak_bytes"]
            r["peak_minus_inference_same_dtype_bytes"] = r["peak_bytes"] - same["peak_bytes"]
        if inf.get("flops"):
            r["flops_vs_inference"] = r["flops"]["step"] / inf["flops"]["step"]


def _memory_notes(rows: list[dict], device: str, settings: dict) -> list[str]:
    notes = []
    for r in rows:
        if r["buffer_dtype"] == "fp16" and r["kind"] == "hollowed":
            n, b = 200, settings["buffer_bytes_fp32"]
            notes.append(f"{r['case']}: one step holds one buffered state, so its peak cannot move; the buffer of "
                         f"{n} samples shrinks from {n * b / 1e6:.0f} MB to {n * b / 2e6:.0f} MB (hidden states only; "
                         "the device runtime streams it from disk)")
        if r["kind"] == "hollowed" and r.get("peak_vs_inference_same_dtype") is not None:
            d = r["peak_minus_inference_same_dtype_bytes"]
            notes.append(f"{r['case']}: training peak {'below' if d <= 0 else 'above'} {r['dtype']} inference "
                         f"by {abs(d) / GB:.3f} GB ({r['peak_vs_inference_same_dtype'] - 1:+.1%})")
        if r.get("error"):
            notes.append(f"{r['case']}: {r['error']}")
    if device == "cpu":
        notes.append("CPU peaks are process RSS (allocator and kernel workspaces included), not a GPU "
                     "allocator's tensor bytes; ratios are the comparable part")
    return notes


# ---------------------------------------------------------------- tables and plots

def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GB:.3f}"


def _fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def settings_text(settings: dict) -> str:
    keys = [k for k in settings if not isinstance(settings[k], (list, dict))]
    return "\n".join(f"  {k}: {settings[k]:.4f}" if isinstance(settings[k], float) else f"  {k}: {settings[k]}"
                     for k in keys)


def memory_text(result: dict) -> str:
    scale, unit = _flops_unit(result["rows"])
    rows = []
    for r in result["rows"]:
        fid = r.get("fidelity", {})
        diff = []
        if "loss_rel_diff" in fid:
            diff.append(f"loss {fid['loss_rel_diff']:.1e}")
        if "update_rel_diff" in fid:
            diff.append(f"upd {fid['update_rel_diff']:.1e}")
        if "output_rel_diff" in fid:
            diff.append(f"out {fid['output_rel_diff']:.1e}")
        rows.append([r["case"], r["dtype"], _fmt_params(r.get("base_params", r.get("base_params_analytic"))),
                     _fmt_params(r.get("trainable_params", r.get("base_params_analytic")) if r["kind"] == "full_ft"
                                 else r.get("lora_params", r.get("lora_params_analytic", 0))),
                     _fmt_bytes(r.get("held_bytes")), _fmt_bytes(r.get("peak_bytes")),
                     _fmt_ratio(r.get("peak_vs_inference")), _fmt_ratio(r.get("peak_vs_inference_same_dtype")),
                     f"{r['flops']['forward'] / scale:.4f}", f"{r['flops']['step'] / scale:.4f}",
                     _fmt_ratio(r.get("flops_vs_inference")), ", ".join(diff) or ("FAILED" if r.get("error") else "")])
    head = ["case", "dtype", "base params", "LoRA/train", "held GB", "peak GB", "vs inf", "vs inf(dtype)",
            f"fwd {unit}", f"step {unit}", "FLOPs vs inf", "diff vs fp32 ref"]
    s = result["settings"]
    text = [f"bench memory: {s['arch']} on {s['device']}, {s['resolution']} px, LoRA r={s['rank']}, depth "
            f"{s['depth']} ({s['hollowed_fraction']:.1%} hollowed)", settings_text(s), "",
            format_table(head, rows), "",
            f"dual-path inference FLOPs per denoising evaluation: {result['dual_path_flops'] / scale:.4f} {unit} "
            f"(full U-Net inference: {next((r['flops']['step'] for r in result['rows'] if r['case'] == 'inference'), 0) / scale:.4f})"]
    text += ["notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(text)


def _flops_unit(rows: list[dict]) -> tuple[float, str]:
    top = max((r["flops"]["step"] for r in rows if r.get("flops")), default=0)
    return (1e12, "TFLOPs") if top >= 1e11 else (1e9, "GFLOPs")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_memory(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["rows"] if r.get("peak_bytes") is not None or r.get("flops")]
    names = [r["case"] for r in rows]
    colors = ["tab:blue" if r["group"] == "paper" else "tab:orange" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2))
    peaks = [(r.get("peak_bytes") or 0) / GB for r in rows]
    a.barh(names, peaks, color=colors)
    inf = next((r for r in rows if r["case"] == "inference" and r.get("peak_bytes")), None)
    if inf:
        a.axvline(inf["peak_bytes"] / GB, color="k", ls="--", lw=1, label="inference fp32")
        a.legend(loc="upper right", fontsize=8)
    for i, r in enumerate(rows):
        if r.get("error"):
            a.text(0, i, "  not measured", va="center", fontsize=8)
        elif r.get("peak_bytes") is not None:
            ratio = r.get("peak_vs_inference_same_dtype")
            a.text(r["peak_bytes"] / GB, i, f" {r['peak_bytes'] / GB:.2f}" + (f" ({ratio:.2f}x)" if ratio else ""),
                   va="center", fontsize=8)
    a.set_xlabel("peak memory per step (GB); (x) = vs inference at the same precision")
    a.set_xlim(0, max(peaks + [0.001]) * 1.3)
    a.invert_yaxis()
    scale, unit = _flops_unit(rows)
    b.barh(names, [r["flops"]["step"] / scale for r in rows], color=colors)
    b.set_xlabel(f"FLOPs per step ({unit}; training: forward + backward)")
    b.invert_yaxis()
    s = result["settings"]
    fig.suptitle(f"{s['arch']} {s['device']} {s['resolution']}px r={s['rank']} depth {s['depth']} "
                 f"({s['hollowed_fraction']:.0%} hollowed), torch {s['torch']}, {s['date'][:10]}")
    save_figure(fig, path)
    plt.close(fig)


def write_outputs(result: dict, out: Path, stem: str, text_fn, plot_fn) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path)}
    store.write_json(json_path, result)
    plot_fn(result, png_path)
    return result


# ---------------------------------------------------------------- bench sweep

def _sweep_losses(depths: list[int], rank: int, resolution: int | None, steps: int, samples: int, lr: float,
                  seed: int, log=print) -> dict:
    """Tiny default only: fine-tune each depth (and plain LoRA) `steps` steps on the same synthetic samples."""
    import copy

    import torch

    from . import lora as lora_mod
    from .anatomy import LoraSpec, make_plan, select_lora_targets
    from .demo import subject_photos
    from .models import load_pipeline
    from .personalize import (TrainSettings, collect, draw_samples, encode_images, encode_prompt,
                              fine_tune, fixed_batch_loss, load_images)
    from .split import HollowedNet, PrecomputeNet

    pipe = load_pipeline(arch="tiny")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subject_photos(Path(tmp), 5, size=128, seed=seed)
        plan0 = make_plan(pipe.unet, depth=0, lora=LoraSpec(rank=rank), resolution=resolution)
        generator = torch.Generator().manual_seed(seed)
        latents = encode_images(pipe, load_images(Path(tmp), plan0.resolution), generator)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    base = draw_samples(latents, samples, scheduler, generator)
    instance, klass = encode_prompt(pipe, "a sks ball"), encode_prompt(pipe, "a ball")
    settings = TrainSettings(steps=steps, samples=samples, lr=lr, seed=seed)
    for depth in ["lora", *depths]:
        unet = copy.deepcopy(pipe.unet)
        data = dict(base)
        if depth == "lora":
            spec = LoraSpec(rank=rank)
            net = lora_mod.inject(unet, spec, select_lora_targets(unet, spec), seed=seed)
            method = "lora"
        else:
            plan = make_plan(unet, depth=depth, lora=LoraSpec(rank=rank), resolution=resolution)
            data["hidden"] = collect(PrecomputeNet(unet, plan), data, klass)
            net = lora_mod.inject(HollowedNet(unet, plan), plan.lora, plan.lora_targets, seed=seed)
            method = "hollowed"
        before = fixed_batch_loss(net, method, data, instance, "cpu", settings.eval_samples)
        losses = fine_tune(net, method, data, instance, settings)
        after = fixed_batch_loss(net, method, data, instance, "cpu", settings.eval_samples)
        tail = losses[-min(10, len(losses)):]
        out[depth] = {"fixed_batch_loss_before": before, "fixed_batch_loss_after": after,
                      "mean_loss_last10": sum(tail) / len(tail), "losses": losses}
        log(f"[loss depth {depth}] fixed-batch loss {before:.5f} -> {after:.5f}")
    return out


def sweep(arch: str = "tiny", steps: int = 100, rank: int | None = None, resolution: int | None = None,
          measure: bool = True, device: str = "cpu", samples: int = 200, lr: float = 1e-3, seed: int = 0,
          depths: list[int] | None = None, out: Path | None = None, threads: int | None = None,
          timeout: float | None = None, log=print) -> dict:
    """Every hollow depth 0..max: hollowed share, training peak memory, FLOPs, and (tiny) the loss."""
    _check_device(device)
    rank = rank or (4 if arch == "tiny" else 128)
    threads = threads or max(1, min(os.cpu_count() or 1, 16))
    unet_meta = bench_unet(arch, meta=True)
    plan0 = bench_plan(unet_meta, rank, None, 0, resolution)
    depths = list(range(plan0.max_depth + 1)) if depths is None else depths
    settings = settings_block(arch=arch, device=device, resolution=plan0.resolution, rank=rank,
                              max_depth=plan0.max_depth, dtype="fp32", batch=1, tokens=TOKENS,
                              loss_steps=steps if arch == "tiny" else None, samples=samples, lr=lr, seed=seed,
                              threads=threads, unet_params=plan0.unet_params, measured=measure)
    rows = []

    def measured(case: Case, plan_args: dict) -> dict:
        if not measure:
            return {}
        spec = {"job": "case", "case": asdict(case), "arch": arch, "device": device, "plan": plan_args,
                "steps": 2, "seed": seed, "threads": threads, "lr": lr, "save": None}
        child = run_child(spec, timeout)
        if "error" in child:
            log(f"[{case.name} {plan_args}] failed: {child['error']}")
        return {k: child.get(k) for k in ("peak_bytes", "held_bytes", "peak_abs_bytes", "error") if k in child}

    refs = {}
    for case in (Case("inference", "inference", "inference"), Case(f"lora_r{rank}", "lora", "LoRA", rank=rank)):
        args = {"rank": rank, "fraction": None, "depth": 0, "resolution": plan0.resolution}
        log(f"[reference {case.name}] ...")
        refs[case.kind] = {"case": case.name, "flops": case_flops(arch, args, case), **measured(case, args)}
    for depth in depths:
        plan = bench_plan(unet_meta, rank, None, depth, resolution)
        args = {"rank": rank, "fraction": None, "depth": depth, "resolution": plan.resolution}
        case = Case("hollowed", "hollowed", "Hollowed Net", rank=rank)
        log(f"[depth {depth}] {plan.hollowed_fraction:.1%} hollowed ...")
        analytic = plan.kept_params * 4 + plan.lora_params * 4 * 4 + plan.buffer_bytes_fp32
        rows.append({"depth": depth, "hollowed_fraction": plan.hollowed_fraction, "kept_params": plan.kept_params,
                     "lora_params": plan.lora_params, "buffer_shape": plan.buffer_shape,
                     "analytic_state_bytes": analytic, "flops": case_flops(arch, args, case),
                     **measured(case, args)})
    if arch == "tiny" and steps > 0:
        losses = _sweep_losses(depths, rank, resolution, steps, samples, lr, seed, log)
        for row in rows:
            row["loss"] = losses[row["depth"]]
        refs["lora"]["loss"] = losses["lora"]
    result = {"kind": "sweep", "settings": settings, "references": refs, "rows": rows,
              "method": "per depth: the Hollowed Net training case of `bench memory` (fresh process, one warm step, "
                        "then the measured step); analytic_state_bytes = kept weights + LoRA (weights, grads, "
                        "two AdamW moments) + one buffered hidden state; FLOPs on meta; loss: host trainer "
                        "(personalize.fine_tune) on synthetic photos (demo.subject_photos), fixed seed"}
    if out is not None:
        write_outputs(result, Path(out), f"sweep_{arch}_{device}_{plan0.resolution}px_r{rank}", sweep_text, plot_sweep)
    return result


def sweep_text(result: dict) -> str:
    s = result["settings"]
    refs = result["references"]
    rows = []
    for name, ref in (("inference", refs["inference"]), ("plain LoRA", refs["lora"])):
        loss = ref.get("loss", {}).get("fixed_batch_loss_after")
        rows.append([name, "-", _fmt_bytes(ref.get("peak_bytes")), "-", f"{ref['flops']['step'] / 1e9:.3f}",
                     "-" if loss is None else f"{loss:.5f}"])
    for r in result["rows"]:
        loss = r.get("loss", {}).get("fixed_batch_loss_after")
        rows.append([f"depth {r['depth']}", f"{r['hollowed_fraction']:.1%}", _fmt_bytes(r.get("peak_bytes")),
                     _fmt_bytes(r["analytic_state_bytes"]), f"{r['flops']['step'] / 1e9:.3f}",
                     "-" if loss is None else f"{loss:.5f}"])
    head = ["row", "hollowed", "peak GB", "analytic GB", "step GFLOPs",
            f"loss after {s.get('loss_steps')} steps" if s.get("loss_steps") else "loss"]
    return "\n".join([f"bench sweep: {s['arch']} on {s['device']}, {s['resolution']} px, LoRA r={s['rank']}",
                      settings_text(s), "", format_table(head, rows)])


def plot_sweep(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows, refs = result["rows"], result["references"]
    x = [100 * r["hollowed_fraction"] for r in rows]
    has_loss = any("loss" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if has_loss else 2, figsize=(15 if has_loss else 10, 4))
    a = axes[0]
    if any(r.get("peak_bytes") is not None for r in rows):
        a.plot(x, [(r.get("peak_bytes") or float("nan")) / GB for r in rows], "o-", label="Hollowed Net (measured)")
    a.plot(x, [r["analytic_state_bytes"] / GB for r in rows], "s--", label="kept weights + LoRA state (analytic)")
    for name, ref, ls in (("inference", refs["inference"], ":"), ("plain LoRA", refs["lora"], "-.")):
        if ref.get("peak_bytes"):
            a.axhline(ref["peak_bytes"] / GB, color="gray", ls=ls, label=f"{name} (measured)")
    a.set_ylabel("training peak memory (GB)")
    a.legend(fontsize=8)
    b = axes[1]
    b.plot(x, [r["flops"]["step"] / 1e9 for r in rows], "o-", label="Hollowed Net step")
    b.axhline(refs["lora"]["flops"]["step"] / 1e9, color="gray", ls="-.", label="plain LoRA step")
    b.axhline(refs["inference"]["flops"]["step"] / 1e9, color="gray", ls=":", label="inference")
    b.set_ylabel("GFLOPs per step")
    b.legend(fontsize=8)
    if has_loss:
        c = axes[2]
        c.plot(x, [r["loss"]["fixed_batch_loss_after"] for r in rows], "o-", label="after fine-tuning")
        c.plot(x, [r["loss"]["fixed_batch_loss_before"] for r in rows], "x:", label="before")
        c.axhline(refs["lora"]["loss"]["fixed_batch_loss_after"], color="gray", ls="-.", label="plain LoRA after")
        c.set_ylabel(f"fixed-batch loss after {result['settings']['loss_steps']} steps")
        c.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("hollowed share of U-Net parameters (%)")
    s = result["settings"]
    fig.suptitle(f"hollow-depth sweep: {s['arch']} {s['resolution']}px r={s['rank']} ({s['device']}, "
                 f"torch {s['torch']}, {s['date'][:10]})")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------- bench ort

def _child_ort_build(spec: dict) -> dict:
    """In the child: write one ORT folder (hollowed bundle, plain-LoRA artifacts or U-Net inference graph)."""
    import torch
    torch.set_num_threads(spec["threads"])
    from .export import BuildSettings, UNetLoss, build, export_inference, plain_lora_artifacts

    started = time.time()
    out = Path(spec["out"])
    kind = spec["kind"]
    if kind == "hollowed":
        pipe = bench_pipeline(spec["arch"])
        plan = bench_plan(pipe.unet, **spec["plan"])
        build(pipe, plan, out, "a sks dog", "a dog", BuildSettings(), {"source": f"bench:{spec['arch']}"})
    else:
        unet = bench_unet(spec["arch"])
        plan = bench_plan(unet, **spec["plan"])
        out.mkdir(parents=True, exist_ok=True)
        if kind == "lora":
            plain_lora_artifacts(unet, plan, out, BuildSettings())
        else:
            c, h, w = plan.latent_shape
            export_inference(UNetLoss(unet), (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64),
                                              torch.zeros(1, *plan.encoder_shape)),
                             out / "unet.onnx", ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                             None)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"build_seconds": time.time() - started, "build_peak_rss_bytes": peak_rss_bytes(), "disk_bytes": size}


def _ort_inputs(names: list[str], shapes: dict, seed: int):
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        if name == "timestep":
            out.append(np.array([int(rng.integers(0, 1000))], dtype=np.int64))
        else:
            out.append(rng.standard_normal([1, *shapes[name]]).astype(np.float32))
    return out


def _child_ort_measure(spec: dict) -> dict:
    """In the child (no torch): ORT training steps or inference runs; RSS and median step time."""
    import resource

    import numpy as np
    import onnxruntime as ort

    from . import bundle as fmt
    from .runtime import training_api
    baseline = rss_bytes()
    folder = Path(spec["folder"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.log_severity_level = 3
    times = []
    started = time.time()
    if spec["kind"] in ("hollowed", "lora"):
        api = training_api()
        state = api.CheckpointState.load_checkpoint(str(folder / fmt.CHECKPOINT))
        module = api.Module(str(folder / fmt.TRAINING_MODEL), state, str(folder / fmt.EVAL_MODEL),
                            session_options=options)
        optimizer = api.Optimizer(str(folder / fmt.OPTIMIZER_MODEL), module)
        optimizer.set_learning_rate(1e-4)
        module.train()
        names = module.input_names()
        load_seconds = time.time() - started
        held = rss_bytes()
        losses = []
        for i in range(spec["steps"]):
            inputs = _ort_inputs(names, spec["shapes"], i)
            t0 = time.time()
            losses.append(float(module(*inputs)))
            optimizer.step()
            module.lazy_reset_grad()
            times.append(time.time() - t0)
        extra = {"losses": losses, "inputs": names}
    else:
        session = ort.InferenceSession(str(folder / "unet.onnx"), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        load_seconds = time.time() - started
        held = rss_bytes()
        for i in range(spec["steps"]):
            feed = dict(zip(names, _ort_inputs(names, spec["shapes"], i)))
            t0 = time.time()
            session.run(None, feed)
            times.append(time.time() - t0)
        extra = {"inputs": names}
    measured = times[1:] if len(times) > 1 else times
    return {"baseline_rss_bytes": baseline, "held_rss_bytes": held,
            "peak_rss_bytes": peak_rss_bytes(),  # VmHWM: this image only
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "median_step_seconds": float(np.median(measured)), "step_seconds": times,
            "load_seconds": load_seconds, "torch_loaded": sys.modules.get("torch") is not None, **extra}


def ort_bench(arch: str = "tiny", resolution: int | None = None, rank: int = 128, fraction: float | None = 0.4,
              depth: int | None = None, steps: int = 5, threads: int | None = None, out: Path | None = None,
              workdir: Path | None = None, timeout: float | None = None, kinds: tuple = ("hollowed", "lora",
                                                                                          "inference"),
              log=print) -> dict:
    """ORT training steps of the Hollowed Net bundle vs a plain-LoRA bundle vs ORT U-Net inference."""
    if steps < 2:
        raise BenchError("--steps must be at least 2 (the first run is a warm-up, not timed in the median)")
    threads = threads or max(1, min(os.cpu_count() or 1, 16))
    unet_meta = bench_unet(arch, meta=True)
    plan = bench_plan(unet_meta, rank, fraction, depth, resolution)
    plan_args = {"rank": rank, "fraction": None, "depth": plan.depth, "resolution": plan.resolution}
    shapes = {"sample": plan.latent_shape, "target": plan.latent_shape, "encoder_hidden_states": plan.encoder_shape,
              "hidden": plan.buffer_shape}
    import onnxruntime
    settings = settings_block(arch=arch, device="cpu (ONNX Runtime CPUExecutionProvider)",
                              onnxruntime=onnxruntime.__version__, resolution=plan.resolution, rank=rank,
                              depth=plan.depth, hollowed_fraction=plan.hollowed_fraction, dtype="fp32", batch=1,
                              tokens=TOKENS, steps=steps, threads=threads, unet_params=plan.unet_params,
                              kept_params=plan.kept_params, lora_params_hollowed=plan.lora_params)
    labels = {"hollowed": "Hollowed Net training (bundle)", "lora": "plain LoRA training (full U-Net)",
              "inference": "U-Net inference (InferenceSession)"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hollow-ort-", dir=workdir) as tmp:
        for kind in kinds:
            row = {"kind": kind, "label": labels[kind]}
            folder = Path(tmp) / kind
            log(f"[{kind}] building in a fresh process ...")
            built = run_child({"job": "ort_build", "kind": kind, "arch": arch, "plan": plan_args, "out": str(folder),
                               "threads": threads}, timeout)
            row.update(built)
            if "error" not in built:
                log(f"[{kind}] built in {built['build_seconds']:.0f} s, peak RSS {built['build_peak_rss_bytes'] / GB:.2f}"
                    f" GB, {built['disk_bytes'] / GB:.2f} GB on disk; measuring in a fresh process ...")
                measured = run_child({"job": "ort_measure", "kind": kind, "folder": str(folder), "steps": steps,
                                      "shapes": shapes, "threads": threads}, timeout)
                if "error" in measured:
                    row["error"] = "measure: " + measured["error"]
                else:
                    row.update(measured)
                    log(f"[{kind}] peak RSS {measured['peak_rss_bytes'] / GB:.3f} GB, median step "
                        f"{measured['median_step_seconds']:.3f} s")
            else:
                row["error"] = "build: " + built["error"]
                log(f"[{kind}] {row['error']}")
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
            rows.append(row)
    by = {r["kind"]: r for r in rows}
    ratios = {}
    for a, b in (("hollowed", "lora"), ("hollowed", "inference"), ("lora", "inference")):
        if "peak_rss_bytes" in by.get(a, {}) and "peak_rss_bytes" in by.get(b, {}):
            ratios[f"{a}/{b}"] = {"peak_rss": by[a]["peak_rss_bytes"] / by[b]["peak_rss_bytes"],
                                  "peak_rss_over_baseline": (by[a]["peak_rss_bytes"] - by[a]["baseline_rss_bytes"])
                                  / (by[b]["peak_rss_bytes"] - by[b]["baseline_rss_bytes"]),
                                  "median_step_time": by[a]["median_step_seconds"] / by[b]["median_step_seconds"]}
    result = {"kind": "ort", "settings": settings, "rows": rows, "ratios": ratios,
              "method": "each bundle built in its own subprocess (export.build / export.plain_lora_artifacts / "
                        "export.export_inference), then measured in a fresh torch-free subprocess: peak RSS = "
                        "that child's VmHWM over its whole life (session creation included; getrusage's "
                        "ru_maxrss is recorded too but on Linux it keeps the pre-exec parent's peak, so it "
                        "cannot go below the launching Python's RSS), held = RSS after the sessions are "
                        "created, median over steps 2..N (step 1 is a warm-up); random inputs"}
    if out is not None:
        write_outputs(result, Path(out), f"ort_{arch}_{plan.resolution}px_r{rank}_k{plan.depth}", ort_text, plot_ort)
    return result


def ort_text(result: dict) -> str:
    s = result["settings"]
    rows = []
    for r in result["rows"]:
        rows.append([r["kind"], f"{r['build_seconds']:.0f}" if "build_seconds" in r else "-",
                     _fmt_bytes(r.get("build_peak_rss_bytes")), _fmt_bytes(r.get("disk_bytes")),
                     _fmt_bytes(r.get("held_rss_bytes")), _fmt_bytes(r.get("peak_rss_bytes")),
                     "-" if "median_step_seconds" not in r else f"{r['median_step_seconds']:.3f}",
                     r.get("error", "")])
    head = ["engine", "build s", "build peak GB", "disk GB", "RSS loaded GB", "peak RSS GB", "median step s", "error"]
    ratio_rows = [[k, f"{v['peak_rss']:.2f}x", f"{v['peak_rss_over_baseline']:.2f}x", f"{v['median_step_time']:.2f}x"]
                  for k, v in result["ratios"].items()]
    return "\n".join([f"bench ort: {s['arch']}, {s['resolution']} px, LoRA r={s['rank']}, depth {s['depth']} "
                      f"({s['hollowed_fraction']:.1%} hollowed), ORT {s['onnxruntime']}", settings_text(s), "",
                      format_table(head, rows), "",
                      format_table(["ratio", "peak RSS", "peak RSS over baseline", "median step time"], ratio_rows)])


def plot_ort(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["rows"] if "peak_rss_bytes" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["kind"] for r in rows]
    a.bar(names, [r["peak_rss_bytes"] / GB for r in rows], label="peak RSS")
    a.bar(names, [r["held_rss_bytes"] / GB for r in rows], alpha=0.6, label="RSS after load")
    a.set_ylabel("GB")
    a.legend(fontsize=8)
    b.bar(names, [r["median_step_seconds"] for r in rows])
    b.set_ylabel("median step / run (s)")
    s = result["settings"]
    fig.suptitle(f"ORT {s['onnxruntime']}: {s['arch']} {s['resolution']}px r={s['rank']} depth {s['depth']} "
                 f"({s['date'][:10]})")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------- child entry point

def _child_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    job = spec["job"]
    if job == "case":
        result = _child_case(spec)
    elif job == "ort_build":
        result = _child_ort_build(spec)
    elif job == "ort_measure":
        for name in ("torch", "diffusers", "transformers", "peft"):
            sys.modules[name] = None  # as on the phone: onnxruntime's optional torch import now fails fast
        result = _child_ort_measure(spec)
    else:
        raise SystemExit(f"unknown job {job}")
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "child":
        sys.exit(_child_main(sys.argv[2:]))
    raise SystemExit("usage: python -m hollow_export.profile child SPEC.json OUT.json (internal)")
