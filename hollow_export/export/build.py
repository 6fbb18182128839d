"""The on-device bundle: ONNX inference graphs, ORT training artifacts, prompts, schedule, manifest.

In:  a `StableDiffusionPipeline`, its `HollowPlan`, the prompts and the
     optimizer hyper-parameters (`BuildSettings`).
Out: a bundle folder (written whole or not at all, see `bundle.py` for the
     format both clients read):
       vae_encoder.onnx      photo [B,3,H,W] in [-1,1] -> scaled latent mean and std
       precompute.onnx       (noisy latent, timestep, class embedding) -> buffered hidden state
       training_model.onnx   hollowed net + LoRA + MSE loss, with its gradient graph
       eval_model.onnx       the same forward and loss, no gradients
       optimizer_model.onnx  AdamW with PyTorch semantics (adam_mode 0)
       frozen_weights.bin    the kept base weights (fp32 or fp16), external initializers of both graphs
       checkpoint            LoRA only (trainable), ORT checkpoint format
       prompts.safetensors   instance and class prompt embeddings [1, 77, D]
       schedule.safetensors  alphas_cumprod of the training noise schedule
       manifest.json         files with sha256, graph I/O, plan, LoRA names, hyper-parameters

The training files come from the on-device backend (`backend.py`, ONNX Runtime today);
the inference graphs from `onnx.export_inference`.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import bundle as fmt
from .. import store
from ..hollow import lora as lora_mod
from ..hollow.lora import AdamWSettings
from ..hollow.plan import HollowPlan
from ..hollow.split import HollowedNet, PrecomputeNet
from ..models.load import check_prediction_type
from ..models.prompts import encode_prompt
from .backend import backend
from .onnx import export_inference, param_bytes
from .ort_training import EngineLevers


@dataclass
class BuildSettings(EngineLevers, AdamWSettings):
    """The optimizer and the training graph's memory levers (inherited) and the defaults the phone starts from."""

    steps: int = 1000
    samples: int = 200
    batch_size: int = 1
    seed: int = 0


class VaeEncoderNet(nn.Module):
    """photo -> (latent mean, latent std), both already multiplied by the VAE's scaling factor."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image):
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        return mean * self.scaling_factor, std * self.scaling_factor


def lora_names(trainable: list[str]) -> list[dict]:
    """Checkpoint name -> full-U-Net (peft state dict) name of every LoRA tensor."""
    prefix = f".{lora_mod.ADAPTER}."
    return [{"name": n, "unet_name": n.replace(prefix, ".")} for n in trainable]


def build(pipe, plan: HollowPlan, out: Path, instance_prompt: str, class_prompt: str,
          settings: BuildSettings, identity: dict, overwrite: bool = False, release: bool = False) -> dict:
    """Write the bundle for `plan` into `out` (atomically; an earlier bundle there only with
    `overwrite`, see `store.atomic_dir`); return the manifest.

    With `release`, `pipe` is spent: its text encoder, VAE and U-Net are dropped as soon as no later
    stage needs them (the training stage keeps only the kept modules), so the build never holds them
    all at once (SD2.1: text encoder 1.4 GB, VAE 0.3 GB, U-Net modules off the kept path 1.3 GB).
    """
    check_prediction_type(pipe.scheduler.config)
    started = time.time()
    stages = ["prompts + schedule", "vae_encoder.onnx", "precompute.onnx", "training artifacts", "manifest"]
    bar = tqdm(total=len(stages), desc="build", unit="stage")

    def stage(i):
        if i:
            bar.update(1)
        bar.set_postfix_str(stages[i])
    context_dim = pipe.unet.config.cross_attention_dim
    vae_encoder_bytes = param_bytes(pipe.vae.encoder) + param_bytes(pipe.vae.quant_conv)
    c, h, w = plan.latent_shape
    with store.atomic_dir(Path(out), "build", overwrite) as tmp, torch.no_grad(), warnings.catch_warnings():
        # tracing diffusers' shape asserts and strided slices: expected, and no help to the user
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        stage(0)
        store.save_tensors(tmp / fmt.PROMPTS, {"instance": encode_prompt(pipe, instance_prompt),
                                               "class": encode_prompt(pipe, class_prompt)})
        store.save_tensors(tmp / fmt.SCHEDULE, {"alphas_cumprod": pipe.scheduler.alphas_cumprod.float()})
        _release(pipe, "text_encoder", release)
        stage(1)
        side = plan.resolution
        export_inference(VaeEncoderNet(pipe.vae), (torch.zeros(1, 3, side, side),), tmp / fmt.VAE_ENCODER,
                         ["image"], ["latent_mean", "latent_std"],
                         {"image": {0: "batch"}, "latent_mean": {0: "batch"}, "latent_std": {0: "batch"}})
        _release(pipe, "vae", release)
        stage(2)
        export_inference(PrecomputeNet(pipe.unet, plan),
                         (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64),
                          torch.zeros(1, plan.encoder_shape[0], context_dim)),
                         tmp / fmt.PRECOMPUTE, list(fmt.PRECOMPUTE_INPUTS), ["hidden"],
                         {k: {0: "batch"} for k in (*fmt.PRECOMPUTE_INPUTS, "hidden")})
        stage(3)
        net = lora_mod.inject(HollowedNet(pipe.unet, plan), plan.lora, plan.lora_targets, seed=settings.seed)
        _release(pipe, "unet", release)  # the modules off the kept path go; `net` holds the kept ones
        args = (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64), torch.zeros(1, *plan.encoder_shape),
                torch.zeros(1, *plan.buffer_shape), torch.zeros(1, c, h, w))
        with ort_info_dropped():
            trainable, frozen = backend().write_artifacts(net, args, list(fmt.TRAIN_INPUTS), tmp, settings)
        stage(4)
        params = dict(net.named_parameters())
        manifest = fmt.make_manifest(
            folder=tmp,
            identity=identity,
            plan=plan.to_json(),
            prompts={"instance": instance_prompt, "class": class_prompt},
            lora=[dict(item, shape=list(params[item["name"]].shape)) for item in lora_names(trainable)],
            frozen_params=len(frozen),
            hyper={**asdict(settings), "rank": plan.lora.rank, "alpha": plan.lora.lora_alpha,
                   "prediction_type": pipe.scheduler.config.prediction_type,
                   "num_train_timesteps": pipe.scheduler.config.num_train_timesteps,
                   "resolution": plan.resolution},
            memory={
                "vae_encoder_param_bytes": vae_encoder_bytes,
                "precompute_param_bytes": plan.precompute_params * 4,
                "hollowed_base_param_bytes": plan.kept_params * 4,  # the kept layers' base weights (v1 key)
                "lora_param_bytes": plan.lora_params * 4,
                "optimizer_state_bytes": plan.lora_params * 4 * 2,
                "buffer_bytes_per_sample_fp32": plan.buffer_bytes_fp32,
            },
            frozen_dtype=settings.frozen_dtype,
        )
        bar.update(1)
        bar.close()
        manifest["build_seconds"] = round(time.time() - started, 1)
        fmt.write_manifest(tmp, manifest)
    return manifest


def _release(pipe, component: str, release: bool) -> None:
    """Drop `pipe.<component>` (when `release`) and collect, so its memory goes back before the next stage."""
    if release:
        setattr(pipe, component, None)
        gc.collect()


def build_bundle(out: Path, instance_prompt: str, class_prompt: str, settings: BuildSettings,
                 model: str | None = None, arch: str | None = None, variant: str | None = None,
                 overwrite: bool = False, **plan_options) -> tuple[dict, HollowPlan]:
    """`hollow-export build`: check the output folder and the model's prediction type (before loading it),
    load it, plan it from the options, write the bundle; (manifest, plan)."""
    from ..hollow.plan import plan_from_options
    from ..models.load import load_pipeline, model_identity, scheduler_config

    store.check_output_dir(Path(out), "build", overwrite)  # before any work
    store.check_apart(Path(out), {"--model": model})
    check_prediction_type(scheduler_config(model, arch))
    pipe = load_pipeline(model, arch, variant)
    plan = plan_from_options(pipe.unet, **plan_options)
    manifest = build(pipe, plan, Path(out), instance_prompt, class_prompt, settings,
                     model_identity(model, arch, variant), overwrite, release=True)
    return manifest, plan


@contextmanager
def ort_info_dropped():
    """Drop ONNX Runtime's INFO log lines (hundreds per graph pass) from stderr; other lines pass through.

    ORT's gradient builder logs at INFO to the process's stderr whatever the default logger severity
    is set to (its session options are made inside onnxruntime.training), so the file descriptor is
    filtered around the call.
    """
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if "[I:onnxruntime" not in line:
                    sys.stderr.write(line)
            sys.stderr.flush()
