"""The host reference trainer (PyTorch): collection, then LoRA fine-tuning of the hollowed net.

In:  a `StableDiffusionPipeline`, a folder of photos, instance and class
     prompts, a `HollowPlan` and `TrainSettings`.
Out: an output folder holding `pytorch_lora_weights.safetensors` (diffusers
     format), `buffer.safetensors` (method `hollowed`: the collected samples)
     and `record.json` (settings, plan, losses, peak memory).

Method `hollowed` (the paper): the frozen precompute net, fed the class
prompt, buffers the hidden state entering the first kept up layer for each
sample (latent, noise, timestep); LoRA on the hollowed net is then trained
with the instance prompt against MSE(predicted noise, noise). Method `lora`
is plain LoRA fine-tuning of the full U-Net on the same samples, for
comparisons. The on-device runtime (`device/`) is the ORT twin of this.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import store
from ..errors import HollowError
from ..hollow import lora as lora_mod
from ..hollow.lora import AdamWSettings
from ..hollow.plan import HollowPlan, select_lora_targets
from ..hollow.split import HollowedNet, PrecomputeNet
from ..models.prompts import encode_prompt
from ..photos import load_photos
from ..rss import peak_rss_bytes


class DataError(HollowError, ValueError):
    """Training data the trainer cannot use (message names the problem and the fix)."""


METHODS = ("hollowed", "lora")


@dataclass
class TrainSettings(AdamWSettings):
    method: str = "hollowed"  # hollowed | lora
    steps: int = 1000
    samples: int = 200
    batch_size: int = 1
    seed: int = 0
    device: str = "cpu"
    eval_samples: int = 8  # fixed batch on which the loss is reported before and after training


def load_images(folder: Path, resolution: int) -> torch.Tensor:
    """Photos centre-cropped, resized to `resolution`, as a [N, 3, H, W] tensor in [-1, 1]."""
    return torch.from_numpy(load_photos(folder, resolution))


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE latents (sampled, scaled by the VAE's scaling factor), one per photo."""
    dist = pipe.vae.encode(images.to(pipe.vae.device)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)
    return (dist.mean + dist.std * noise) * pipe.vae.config.scaling_factor


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise (epsilon models) or the velocity (v models)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise DataError(f"prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def draw_samples(latents: torch.Tensor, count: int, scheduler, generator: torch.Generator) -> dict:
    """`count` training samples: which photo, its noise, a timestep, the noisy latent and the target."""
    index = torch.arange(count) % latents.shape[0]
    clean = latents[index]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)
    return {
        "latents": clean,
        "noise": noise,
        "timesteps": timesteps,
        "noisy": scheduler.add_noise(clean, noise, timesteps),
        "target": training_target(scheduler, clean, noise, timesteps),
    }


@torch.no_grad()
def collect(precompute: PrecomputeNet, samples: dict, class_embedding: torch.Tensor,
            batch_size: int = 8) -> torch.Tensor:
    """Run the frozen precompute net on every sample with the class prompt: the buffer of hidden states."""
    device = class_embedding.device
    out = []
    count = samples["noisy"].shape[0]
    for start in tqdm(range(0, count, batch_size), desc="collect", unit="batch"):
        x = samples["noisy"][start:start + batch_size].to(device)
        t = samples["timesteps"][start:start + batch_size].to(device)
        out.append(precompute(x, t, class_embedding.expand(x.shape[0], -1, -1)).cpu())
    return torch.cat(out)


def _predict(net, method: str, samples: dict, idx, embedding, device):
    x = samples["noisy"][idx].to(device)
    t = samples["timesteps"][idx].to(device)
    context = embedding.expand(x.shape[0], -1, -1)
    if method == "hollowed":
        return net(x, t, context, samples["hidden"][idx].to(device))
    return net(x, t, context).sample


@torch.no_grad()
def fixed_batch_loss(net, method: str, samples: dict, embedding, device, count: int) -> float:
    idx = torch.arange(min(count, samples["noisy"].shape[0]))
    pred = _predict(net, method, samples, idx, embedding, device)
    return torch.nn.functional.mse_loss(pred, samples["target"][idx].to(device)).item()


def fine_tune(net, method: str, samples: dict, embedding, settings: TrainSettings) -> list[float]:
    """AdamW on the LoRA parameters of `net` over the samples, shuffled with the seed; per-step losses."""
    params = list(lora_mod.lora_parameters(net).values())
    optimizer = settings.torch_optimizer(params)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    count = samples["noisy"].shape[0]
    order = torch.randperm(count, generator=generator)
    losses = []
    bar = tqdm(range(settings.steps), desc=f"train ({method})", unit="step")
    for step in bar:
        start = (step * settings.batch_size) % count
        idx = order[start:start + settings.batch_size]
        if start + settings.batch_size >= count:
            order = torch.randperm(count, generator=generator)
        pred = _predict(net, method, samples, idx, embedding, settings.device)
        loss = torch.nn.functional.mse_loss(pred, samples["target"][idx].to(settings.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses


def peak_memory_bytes(device: str) -> int:
    """Peak CUDA allocation on a GPU, else the process's peak resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


def personalize(pipe, plan: HollowPlan, images: Path, instance_prompt: str, class_prompt: str,
                out: Path, settings: TrainSettings) -> dict:
    """Collection + fine-tuning (or plain LoRA); writes the LoRA file, buffer and record into `out`."""
    if settings.method not in METHODS:
        raise ValueError(f"--method must be hollowed or lora (got {settings.method!r})")
    started = time.time()
    out = Path(out)
    device = settings.device
    pipe.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    photos = load_images(images, plan.resolution)
    latents = encode_images(pipe, photos, generator).cpu()
    from diffusers import DDPMScheduler
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    samples = draw_samples(latents, settings.samples, noise_scheduler, generator)
    instance = encode_prompt(pipe, instance_prompt)
    unet = pipe.unet

    if settings.method == "hollowed":
        samples["hidden"] = collect(PrecomputeNet(unet, plan), samples, encode_prompt(pipe, class_prompt))
        store.save_tensors(out / "buffer.safetensors", {k: samples[k] for k in
                                                         ("latents", "noise", "timesteps", "hidden")})
        net = lora_mod.inject(HollowedNet(unet, plan), plan.lora, plan.lora_targets, seed=settings.seed)
    else:
        net = lora_mod.inject(unet, plan.lora, select_lora_targets(unet, plan.lora), seed=settings.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    loss_before = fixed_batch_loss(net, settings.method, samples, instance, device, settings.eval_samples)
    losses = fine_tune(net, settings.method, samples, instance, settings)
    loss_after = fixed_batch_loss(net, settings.method, samples, instance, device, settings.eval_samples)
    state = lora_mod.lora_state(net)
    lora_file = lora_mod.save_diffusers(out, state, plan.lora)
    record = {
        "method": settings.method,
        "instance_prompt": instance_prompt,
        "class_prompt": class_prompt,
        "settings": asdict(settings),
        "plan": plan.to_json(),
        "lora_file": lora_file.name,
        "lora_sha256": store.sha256(lora_file),
        "lora_params": sum(v.numel() for v in state.values()),
        "losses": losses,
        "fixed_batch_loss_before": loss_before,
        "fixed_batch_loss_after": loss_after,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "process peak RSS",
        "seconds": time.time() - started,
    }
    store.write_json(out / "record.json", record)
    return record


def personalize_from_options(images: Path, instance_prompt: str, class_prompt: str, out: Path,
                             settings: TrainSettings, model: str | None = None, arch: str | None = None,
                             variant: str | None = None, overwrite: bool = False, **plan_options) -> dict:
    """`hollow-export personalize`: check the model's prediction type (before loading it), load it, plan it
    from the options, train; returns the record.

    `out` is written whole or not at all, over an earlier personalize output only with `overwrite`."""
    from ..hollow.plan import plan_from_options
    from ..models.load import check_prediction_type, load_pipeline, scheduler_config

    store.check_output_dir(Path(out), "personalize", overwrite)  # before any work
    store.check_apart(Path(out), {"--images": images, "--model": model})
    check_prediction_type(scheduler_config(model, arch))
    pipe = load_pipeline(model, arch, variant)
    plan = plan_from_options(pipe.unet, **plan_options)
    with store.atomic_dir(Path(out), "personalize", overwrite) as tmp:
        return personalize(pipe, plan, Path(images), instance_prompt, class_prompt, tmp, settings)
