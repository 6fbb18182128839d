"""Images from a personalized model, PyTorch engine: the paper's dual path or single path.

In:  a `StableDiffusionPipeline`, a LoRA folder written by `personalize` or
     `merge` (`pytorch_lora_weights.safetensors` + `record.json`), prompts.
Out: PIL images.

Dual path (paper default): the original U-Net without LoRA, fed the class
prompt, makes the hidden state entering the kept up layers; the kept layers
with LoRA and the instance prompt do the rest. Single path: one pass of the
full U-Net with the LoRA loaded, the hollowed units fed the class prompt,
the kept units the instance prompt: plain inference cost. A LoRA trained
with `--method lora` has no hollow; both paths then reduce to the plain
U-Net with LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .anatomy import HollowPlan
from .errors import HollowError
from .lora import LORA_FILE, adapters_disabled
from .personalize import encode_prompt
from .split import HollowedNet, PrecomputeNet, unet_forward

INFERENCE_PATHS = ("dual", "single")


class GenerateError(HollowError, ValueError):
    """A LoRA folder or option the generator cannot use (message names the fix)."""


def read_record(lora_dir: Path) -> dict:
    """The record a LoRA folder carries (class prompt, plan); refuses a folder without the LoRA file."""
    lora_dir = Path(lora_dir)
    if not (lora_dir / LORA_FILE).exists():
        raise GenerateError(f"{lora_dir} holds no {LORA_FILE}; pass the --out folder of personalize or merge")
    record_path = lora_dir / "record.json"
    if not record_path.exists():
        raise GenerateError(f"{lora_dir} has no record.json (class prompt and hollow plan); "
                            "pass the --out folder of personalize or merge")
    return json.loads(record_path.read_text())


def noise_fn(pipe, plan: HollowPlan | None, path: str, instance: torch.Tensor, klass: torch.Tensor):
    """eps(x, t) for one prompt pair along the chosen inference path."""
    unet = pipe.unet
    if path not in INFERENCE_PATHS:
        raise GenerateError(f"--inference must be one of {', '.join(INFERENCE_PATHS)} (got {path!r})")
    if plan is None:  # plain LoRA: no hollow, both paths are the plain U-Net
        return lambda x, t: unet(x, t, instance.expand(x.shape[0], -1, -1)).sample
    if path == "single":
        return lambda x, t: unet_forward(unet, plan, x, t, instance.expand(x.shape[0], -1, -1),
                                         klass.expand(x.shape[0], -1, -1))
    precompute, hollowed = PrecomputeNet(unet, plan), HollowedNet(unet, plan)

    def dual(x, t):
        with adapters_disabled(precompute):
            hidden = precompute(x, t, klass.expand(x.shape[0], -1, -1))
        return hollowed(x, t, instance.expand(x.shape[0], -1, -1), hidden)
    return dual


@torch.no_grad()
def generate(pipe, lora_dir: Path, prompt: str, path: str = "dual", steps: int = 25, guidance: float = 7.5,
             seed: int = 0, class_prompt: str | None = None):
    """One image for `prompt` with the LoRA in `lora_dir`, along `path`; returns a PIL image."""
    from PIL import Image

    record = read_record(lora_dir)
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE)
    plan = HollowPlan.from_json(record["plan"]) if record.get("method", "hollowed") == "hollowed" else None
    klass = encode_prompt(pipe, class_prompt or record["class_prompt"])
    uncond = encode_prompt(pipe, "")
    cond_eps = noise_fn(pipe, plan, path, encode_prompt(pipe, prompt), klass)
    uncond_eps = noise_fn(pipe, plan, path, uncond, uncond)

    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    side = plan.latent_shape[-1] if plan else pipe.unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=generator)
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=f"denoise ({path} path)", unit="step"):
        x = scheduler.scale_model_input(latents, t)
        t_in = torch.as_tensor(t).reshape(1)
        eps_u, eps_c = uncond_eps(x, t_in), cond_eps(x, t_in)
        eps = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    array = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))
