"""Images from a personalized model: the paper's dual path or single path, PyTorch or ONNX Runtime.

In:  PyTorch engine: a `StableDiffusionPipeline` and a LoRA folder written by `personalize` or
     `merge` (`pytorch_lora_weights.safetensors` + `record.json`). ORT engine: a folder written
     by `merge` (its `single/` and `dual/` graphs). Prompts, steps, guidance, seed.
Out: PIL images (and a contact sheet of several); `generate_files` writes them as PNGs.

Dual path (paper default): the original U-Net without LoRA, fed the class prompt, makes the
hidden state entering the kept up layers; the kept layers with LoRA and the prompt do the rest.
Single path: one pass of the full U-Net with the LoRA in it, the hollowed units fed the class
prompt, the kept units the prompt: plain inference cost. In both, the hollowed layers see the
class prompt in both classifier-free-guidance branches (see merge.py). A LoRA trained with
`--method lora` has no hollow: both paths are then the plain U-Net with LoRA. The two engines
draw the same initial noise from the seed and run the same scheduler, so they agree to within
float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import store
from ..errors import HollowError
from ..hollow.lora import LORA_FILE, adapters_disabled
from ..hollow.plan import HollowPlan
from ..hollow.split import HollowedNet, PrecomputeNet, unet_forward
from ..merge import RECORD
from ..models.prompts import encode_prompt

INFERENCE_PATHS = ("dual", "single")


class GenerateError(HollowError, ValueError):
    """A LoRA folder or option the generator cannot use (message names the fix)."""


def read_record(lora_dir: Path) -> dict:
    """The record a LoRA folder carries (class prompt, plan); refuses a folder without the LoRA file."""
    lora_dir = Path(lora_dir)
    if not (lora_dir / LORA_FILE).exists():
        raise GenerateError(f"{lora_dir} holds no {LORA_FILE}; pass the --out folder of personalize or merge")
    record_path = lora_dir / RECORD
    if not record_path.exists():
        raise GenerateError(f"{lora_dir} has no record.json (class prompt and hollow plan); "
                            "pass the --out folder of personalize or merge")
    return json.loads(record_path.read_text())


def noise_fn(pipe, plan: HollowPlan | None, path: str, context: torch.Tensor, klass: torch.Tensor):
    """eps(x, t) for one prompt embedding along the chosen inference path (PyTorch engine)."""
    unet = pipe.unet
    if path not in INFERENCE_PATHS:
        raise GenerateError(f"--inference must be one of {', '.join(INFERENCE_PATHS)} (got {path!r})")
    if plan is None:  # plain LoRA: no hollow, both paths are the plain U-Net
        return lambda x, t: unet(x, t, context.expand(x.shape[0], -1, -1)).sample
    if path == "single":
        return lambda x, t: unet_forward(unet, plan, x, t, context.expand(x.shape[0], -1, -1),
                                         klass.expand(x.shape[0], -1, -1))
    precompute, hollowed = PrecomputeNet(unet, plan), HollowedNet(unet, plan)

    def dual(x, t):
        with adapters_disabled(precompute):
            hidden = precompute(x, t, klass.expand(x.shape[0], -1, -1))
        return hollowed(x, t, context.expand(x.shape[0], -1, -1), hidden)
    return dual


def initial_latents(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def denoise(cond_eps, uncond_eps, scheduler, latents: torch.Tensor, steps: int, guidance: float, label: str):
    """The classifier-free-guided sampling loop shared by both engines; returns the final latents."""
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    # The bar counts U-Net evaluations: PNDM's PLMS warm-up evaluates its first timestep twice,
    # so 25 steps take 26 evaluations (diffusers' own pipeline loops over the same list).
    timesteps = scheduler.timesteps
    for t in tqdm(timesteps, desc=f"denoise ({label}, {steps} steps)", unit="U-Net eval"):
        x = scheduler.scale_model_input(latents, t)
        eps_u, eps_c = uncond_eps(x, t), cond_eps(x, t)
        latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    return latents


def to_image(decoded: torch.Tensor):
    from PIL import Image
    array = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


@torch.no_grad()
def generate(pipe, lora_dir: Path, prompt: str, path: str = "dual", steps: int = 25, guidance: float = 7.5,
             seed: int = 0, class_prompt: str | None = None):
    """One image for `prompt` with the LoRA in `lora_dir`, PyTorch engine; returns a PIL image."""
    record = read_record(lora_dir)
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE)
    plan = HollowPlan.from_json(record["plan"]) if record.get("method", "hollowed") == "hollowed" else None
    klass = encode_prompt(pipe, class_prompt or record["class_prompt"])
    cond = noise_fn(pipe, plan, path, encode_prompt(pipe, prompt), klass)
    uncond = noise_fn(pipe, plan, path, encode_prompt(pipe, ""), klass)
    side = plan.latent_shape[-1] if plan else pipe.unet.config.sample_size
    latents = initial_latents((1, pipe.unet.config.in_channels, side, side), seed)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    latents = denoise(lambda x, t: cond(x, torch.as_tensor(t).reshape(1)),
                      lambda x, t: uncond(x, torch.as_tensor(t).reshape(1)),
                      scheduler, latents, steps, guidance, f"{path} path")
    pipe.unload_lora_weights()
    return to_image(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)


def generate_ort(merged: Path, prompt: str, path: str = "dual", steps: int = 25, guidance: float = 7.5,
                 seed: int = 0):
    """One image for `prompt` from a merged folder, ONNX Runtime engine; returns a PIL image."""
    import diffusers
    from transformers import CLIPTokenizer

    from .engine import OrtEngine

    merged = Path(merged)
    record = read_record(merged)
    engine = OrtEngine(merged, path)
    tokenizer = CLIPTokenizer.from_pretrained(merged / "single" / "tokenizer", local_files_only=True)
    config = json.loads((merged / "single" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)

    def embed(text):
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np").input_ids
        return engine.encode(ids)
    context, empty = embed(prompt), embed("")
    unet_config = json.loads((merged / "single" / "unet" / "config.json").read_text())
    side = record["plan"]["latent_shape"][-1]
    latents = initial_latents((1, unet_config.get("in_channels", 4), side, side), seed)

    def eps(ctx):
        return lambda x, t: torch.from_numpy(engine.noise(x.numpy().astype(np.float32), float(t), ctx))
    latents = denoise(eps(context), eps(empty), scheduler, latents, steps, guidance, f"ort {path} path")
    vae_config = json.loads((merged / "single" / "vae_decoder" / "config.json").read_text())
    decoded = engine.decode((latents / vae_config.get("scaling_factor", 0.18215)).numpy().astype(np.float32))
    return to_image(torch.from_numpy(decoded))


def contact_sheet(images: list, columns: int = 4):
    """Several images side by side in rows of `columns`."""
    from PIL import Image
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


ENGINES = ("torch", "ort")


def image_paths(out: Path, count: int) -> tuple[list[Path], Path | None]:
    """Where `count` images go: `out` itself for one; `<stem>_<i>` each and `<stem>_sheet` for several."""
    out = Path(out)
    if count == 1:
        return [out], None
    return ([out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)],
            out.with_name(f"{out.stem}_sheet{out.suffix}"))


def generate_files(lora_dir: Path, prompts: list[str], out: Path, engine: str = "torch", path: str = "dual",
                   steps: int = 25, guidance: float = 7.5, seed: int = 0, class_prompt: str | None = None,
                   model: str | None = None, arch: str | None = None, log=print,
                   variant: str | None = None, overwrite: bool = False) -> list[Path]:
    """`hollow-export generate`: one PNG per prompt (and a contact sheet for several), written atomically;
    an existing file is replaced only with `overwrite`."""
    if steps < 1:
        raise GenerateError(f"--steps must be at least 1 (got {steps})")
    targets, sheet = image_paths(out, len(prompts))
    check_targets(targets + ([sheet] if sheet else []), overwrite)
    store.check_apart(out, {"--lora": lora_dir, "--model": model})
    if engine == "torch":
        from ..models.load import load_pipeline
        pipe = load_pipeline(model, arch, variant)
    images, written = [], []
    for text, target in zip(prompts, targets):
        if engine == "torch":
            image = generate(pipe, Path(lora_dir), text, path, steps, guidance, seed, class_prompt)
        else:
            image = generate_ort(Path(lora_dir), text, path, steps, guidance, seed)
        images.append(image)
        _save_png(image, target)
        log(f"wrote {target}")
        written.append(target)
    if sheet is not None:
        _save_png(contact_sheet(images), sheet)
        log(f"wrote {sheet}")
        written.append(sheet)
    return written


def check_targets(paths: list[Path], overwrite: bool) -> None:
    """Refuse image paths that are folders, or existing files without `overwrite`, before any work."""
    for path in paths:
        if path.is_dir():
            raise GenerateError(f"--out {path} is a folder; pass a file path such as {path / 'image.png'}")
        if path.exists() and not overwrite:
            raise GenerateError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
        if path.parent.exists() and not path.parent.is_dir():
            raise GenerateError(f"--out {path}: {path.parent} is a file, not a folder; choose another --out")
        store.check_writable(path.parent)


def _save_png(image, path: Path) -> None:
    with store.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
