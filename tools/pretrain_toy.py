"""Pretrain the tiny SD-shaped pipeline on the toy world, reproducibly, on a CPU in about an hour.

    nice -n 15 python tools/pretrain_toy.py --out models/tiny-toy --docs docs/toy

Stages (each seeded; the settings and losses are printed and saved beside the weights):
1. data: render `--images` scenes of the pretraining distribution (`hollow_export.toy.world.sample_scene`).
2. VAE: AutoencoderKL from `models/tiny/vae.json`, L1 + MSE reconstruction + a small KL term; afterwards
   frozen, and its `scaling_factor` set to 1 / std of the latents (what SD's 0.18215 is for its VAE).
3. latents: every image encoded once (posterior mean and std kept; a fresh sample is drawn per step).
4. U-Net: UNet2DConditionModel from `models/tiny/unet.json`, epsilon prediction under the DDPM noise
   schedule of `models/tiny/scheduler.json` (scaled_linear 0.00085..0.012, 1000 steps), captions through
   the text encoder; 10% of captions replaced by the empty prompt so classifier-free guidance works;
   an EMA of the weights is what is saved.
The text encoder is the tiny random CLIPTextModel (models/tiny/text_encoder.json, seed 0) over a byte
tokenizer that has the world's words as whole tokens (`world.WORDS`, "sks" included), kept FIXED: it is a
deterministic function of the caption, so the U-Net learns to read it through cross-attention.

Out: a diffusers folder (safetensors) with SHA256SUMS and pretrain.json; docs: loss log (CSV), loss curve
and a sample sheet (PNG).
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# Worker threads sleep instead of spinning at barriers: on a CPU shared with other jobs a spinning
# thread that waits for a descheduled sibling burns the little time this niced process gets.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hollow_export.models import load, registry  # noqa: E402
from hollow_export.toy import world  # noqa: E402

SHEET_PROMPTS = (
    "a red ball on the beach",
    "a blue striped box in the snow",
    "a yellow star at night",
    "a green dotted cup indoors",
    "a pink heart on the grass",
    "a orange checked ball indoors",
    "a purple star on the beach",
    "a ball",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(it, total: int, label: str, every: int):
    """A plain progress bar that works in a log file (one line per `every` steps)."""
    start = time.time()
    for i, x in enumerate(it):
        yield x
        if (i + 1) % every == 0 or i + 1 == total:
            el = time.time() - start
            eta = el / (i + 1) * (total - i - 1)
            bar = "#" * int(30 * (i + 1) / total)
            print(f"  {label} [{bar:<30}] {i + 1}/{total} {el:.0f}s elapsed, {eta:.0f}s left", flush=True)


def render_data(n: int) -> tuple[torch.Tensor, list[str]]:
    imgs, caps = [], []
    for start in progress(range(0, n, 100), math.ceil(n / 100), "render", every=10):
        batch, c, _ = world.sample_batch(start, min(100, n - start), split="train")
        imgs.append(batch)
        caps.extend(c)
    x = torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    return x, caps


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def lr_at(step: int, warmup: int, peak: float, progress_frac: float) -> float:
    """Linear warm-up, then cosine to 10% of the peak over `progress_frac` in [0, 1]."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, progress_frac)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def stage_progress(step: int, steps: int, start: float, minutes: float) -> float:
    """How far a stage is: by steps, or by its wall-clock budget when the shared CPU is slower.

    On an idle machine the steps end first and the run is exactly reproducible; on a busy one the
    budget ends first and the schedule still completes (the steps done are saved in pretrain.json).
    """
    return max(step / steps, (time.time() - start) / (60 * minutes))


def train_vae(data: torch.Tensor, args, dev, losses: list):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_config(registry.arch_config("tiny", "vae")).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    start = time.time()
    for step in progress(range(args.vae_steps), args.vae_steps, "vae", every=max(1, args.vae_steps // 100)):
        frac = stage_progress(step, args.vae_steps, start, args.vae_max_minutes)
        if frac >= 1.0:
            log(f"VAE stopped by --vae-max-minutes {args.vae_max_minutes} at step {step} of {args.vae_steps}")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 50, args.vae_lr, frac)
        idx = torch.randint(0, len(data), (args.vae_batch,), generator=g)
        # 64 px crops (offset on the 8 px latent grid): the VAE is convolutional, crops cost a quarter.
        oy, ox = (8 * torch.randint(0, (128 - args.vae_crop) // 8 + 1, (2,), generator=g)).tolist()
        x = to_float(data[idx][:, :, oy:oy + args.vae_crop, ox:ox + args.vae_crop]).to(dev)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode(z).sample
        l1, l2 = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + l2 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(("vae", step, l1.item(), l2.item(), kl.item()))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, data: torch.Tensor, dev) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(data), 64):
        post = vae.encode(to_float(data[start:start + 64]).to(dev)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def world_text_encoder(tokenizer_folder: Path):
    """The FIXED text side: a byte tokenizer with the world's words as whole tokens (`world.WORDS`) and the
    tiny CLIPTextModel over that vocabulary, random weights from the registry seed, never trained.

    Whole-word tokens matter: with characters only, the 2-layer random encoder smears a word over its letters
    and the tiny U-Net learned colours but not contexts (the first shipped model, 2026-11-23)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load._clip_byte_tokenizer(tokenizer_folder, world.WORDS)
    torch.manual_seed(registry.SEED)
    config = CLIPTextConfig(**{**registry.arch_config("tiny", "text_encoder"), "vocab_size": len(tokenizer)})
    return tokenizer, CLIPTextModel(config).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], dev) -> torch.Tensor:
    """Exactly what StableDiffusionPipeline.encode_prompt does for the tiny encoder (no attention mask)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(dev)
    return text_encoder(ids)[0]


def train_unet(lat_mean, lat_std, scale, cap_index, cap_emb, empty_emb, args, dev, losses: list):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    sched_cfg = registry.arch_config("tiny", "scheduler")
    noise_sched = DDPMScheduler(
        num_train_timesteps=sched_cfg["num_train_timesteps"], beta_start=sched_cfg["beta_start"],
        beta_end=sched_cfg["beta_end"], beta_schedule=sched_cfg["beta_schedule"], prediction_type="epsilon",
    )
    alphas = noise_sched.alphas_cumprod.to(dev)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel.from_config(registry.arch_config("tiny", "unet")).to(dev).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 2)
    n = len(lat_mean)
    start = time.time()
    for step in progress(range(args.unet_steps), args.unet_steps, "unet", every=max(1, args.unet_steps // 100)):
        frac = stage_progress(step, args.unet_steps, start, args.unet_max_minutes)
        if frac >= 1.0:
            log(f"U-Net stopped by --unet-max-minutes {args.unet_max_minutes} at step {step} of {args.unet_steps}")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 100, args.unet_lr, frac)
        idx = torch.randint(0, n, (args.unet_batch,), generator=g)
        eps_post = torch.randn(lat_mean[idx].shape, generator=g)
        z0 = ((lat_mean[idx] + lat_std[idx] * eps_post) * scale).to(dev)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g).to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = cap_emb[cap_index[idx]].to(dev)
        drop = (torch.rand(len(idx), generator=g) < args.uncond).to(dev)
        cond = torch.where(drop.view(-1, 1, 1), empty_emb.expand_as(cond), cond)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(("unet", step, loss.item()))
    return ema


def sha256sums(folder: Path) -> str:
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot_losses(losses: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, k=50):
        v = np.asarray(v, np.float64)
        if len(v) < k:
            return v
        return np.convolve(v, np.ones(k) / k, mode="valid")

    vae = [r for r in losses if r[0] == "vae"]
    unet = [r for r in losses if r[0] == "unet"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if vae:
        ax[0].plot(smooth([r[2] for r in vae]), label="L1")
        ax[0].plot(smooth([r[3] for r in vae]), label="MSE")
        ax[0].set_yscale("log")
        ax[0].set_title("VAE reconstruction (moving avg 50)")
        ax[0].set_xlabel("step")
        ax[0].legend()
    if unet:
        ax[1].plot(smooth([r[2] for r in unet], 100))
        ax[1].set_title("U-Net epsilon MSE (moving avg 100)")
        ax[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sample_sheet(folder: Path, path: Path, seeds=(0, 1, 2, 3), steps: int = 20, guidance: float = 4.0) -> dict:
    """Rows = prompts, columns = seeds; generated through the normal from_pretrained path."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image, ImageDraw

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows, images = [], {}
    for prompt in SHEET_PROMPTS:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np").images
        arr = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        images[prompt] = arr
        label = Image.new("RGB", (170, 128), (255, 255, 255))
        ImageDraw.Draw(label).multiline_text((4, 50), prompt.replace(" on ", "\non ").replace(" in ", "\nin ")
                                             .replace(" at ", "\nat "), fill=(0, 0, 0))
        rows.append(np.concatenate([np.asarray(label)] + list(arr), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/tiny-toy"))
    p.add_argument("--docs", type=Path, default=Path("docs/toy"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-max-minutes", type=float, default=12.0)
    p.add_argument("--vae-from", type=Path, default=None,
                   help="reuse the VAE an earlier run saved (OUT.vae) instead of training one")
    p.add_argument("--vae-crop", type=int, default=64, help="VAE trains on square crops of this size")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the per-element KL term")
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--unet-max-minutes", type=float, default=60.0,
                   help="wall-clock guard on a shared CPU: stop early (logged, and saved in pretrain.json)")
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--uncond", type=float, default=0.1, help="fraction of captions replaced by the empty prompt")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    log(f"settings: {json.dumps({k: str(v) for k, v in vars(args).items()})} device={dev}")
    t0 = time.time()
    timings = {}

    data, caps = render_data(args.images)
    timings["render_s"] = time.time() - t0
    log(f"rendered {len(data)} images in {timings['render_s']:.0f}s")

    losses: list = []
    t = time.time()
    if args.vae_from is not None:  # a VAE saved by an earlier run (stage 2 skipped)
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(args.vae_from, local_files_only=True).to(dev).eval().requires_grad_(False)
        log(f"VAE loaded from {args.vae_from} (not retrained)")
    else:
        vae = train_vae(data, args, dev, losses)
        vae.save_pretrained(Path(str(args.out) + ".vae"), safe_serialization=True)  # for --vae-from
    timings["vae_s"] = time.time() - t
    lat_mean, lat_std = encode_all(vae, data, dev)
    scale = float(1.0 / lat_mean.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        x = to_float(data[:64]).to(dev)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        vae_mse = float(F.mse_loss(rec, x))
    log(f"VAE {timings['vae_s']:.0f}s; held-in reconstruction MSE {vae_mse:.4f}; latent std "
        f"{float(lat_mean.std()):.3f} -> scaling_factor {scale:.4f}")

    tmp = Path(str(args.out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    parts = load._random_parts("tiny", tmp / "tokenizer")  # scheduler (the U-Net and VAE are trained here)
    tokenizer, text_encoder = world_text_encoder(tmp / "tokenizer")
    text_encoder = text_encoder.to(dev)
    unique = sorted(set(caps))
    cap_emb = torch.cat([encode_prompts(tokenizer, text_encoder, unique[i:i + 256], dev).cpu()
                         for i in range(0, len(unique), 256)])
    lookup = {c: i for i, c in enumerate(unique)}
    cap_index = torch.tensor([lookup[c] for c in caps])
    empty_emb = encode_prompts(tokenizer, text_encoder, [""], dev)
    log(f"{len(unique)} distinct captions encoded by the fixed text encoder")

    t = time.time()
    unet = train_unet(lat_mean, lat_std, scale, cap_index, cap_emb, empty_emb, args, dev, losses)
    timings["unet_s"] = time.time() - t

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(
        unet=unet.cpu(), vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer,
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    unet_losses = [r[2] for r in losses if r[0] == "unet"]
    vae_rows = [r for r in losses if r[0] == "vae"]
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(dev),
        "torch": torch.__version__,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "vae_final_l1_mse_kl_last100": ([float(np.mean([r[i] for r in vae_rows[-100:]])) for i in (2, 3, 4)]
                                        if vae_rows else f"not trained: loaded from {args.vae_from}"),
        "vae_recon_mse_eval64": vae_mse,
        "scaling_factor": scale,
        "vae_steps_done": len(vae_rows),
        "unet_steps_done": len(unet_losses),
        "unet_final_loss_last200": float(np.mean(unet_losses[-200:])),
        "text_encoder": ("fixed: CLIPTextModel of models/tiny/text_encoder.json with the vocabulary of the byte "
                         f"tokenizer + {len(world.WORDS)} whole world words ({len(tokenizer)} tokens), random "
                         "weights, seed 0"),
        "distinct_captions": len(unique),
    }
    (tmp / "pretrain.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    os.rename(tmp, args.out)
    sha256sums(args.out)
    log(f"saved {args.out}: {json.dumps(summary['timings_s'])}, U-Net loss {summary['unet_final_loss_last200']:.4f}")

    args.docs.mkdir(parents=True, exist_ok=True)
    with open(args.docs / "pretrain_loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "step", "loss_or_l1", "mse", "kl"])
        for r in losses:
            w.writerow([r[0], r[1]] + [f"{v:.5f}" for v in r[2:]])
    plot_losses(losses, args.docs / "pretrain_loss.png")
    t = time.time()
    sample_sheet(args.out, args.docs / "samples.png")
    log(f"sample sheet {args.docs / 'samples.png'} in {time.time() - t:.0f}s; total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
