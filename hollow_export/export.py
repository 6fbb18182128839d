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
       checkpoint            LoRA (trainable) and frozen kept weights, ORT checkpoint format
       prompts.safetensors   instance and class prompt embeddings [1, 77, D]
       schedule.safetensors  alphas_cumprod of the training noise schedule
       manifest.json         files with sha256, graph I/O, plan, LoRA names, hyper-parameters

The training graph is exported without its frozen weights: they become
named graph inputs, which ORT's training session feeds from the checkpoint
by name, and the checkpoint is written from the torch tensors directly. So
`generate_artifacts` only ever sees a graph of a few MB, whatever the model
size (it peaks near 8x the bytes of the graph it is given), and a >2 GB
hollowed net never meets protobuf's 2 GB limit. ORT 1.19.2 lacks gradients
or CPU kernels for three ops the U-Net exports to; `ort_friendly` swaps the
modules behind them for basic-op twins, each proven equal in the tests.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from . import bundle as fmt
from . import lora as lora_mod
from . import store
from .anatomy import HollowPlan
from .personalize import encode_prompt
from .split import HollowedNet, PrecomputeNet

OPSET = 17
MAX_ORT_IR_VERSION = 10  # ORT 1.19.2 loads IR <= 10
EXTERNAL_DATA_THRESHOLD = 1 << 30  # graphs with more weight bytes than this keep them in a .data file


@dataclass
class BuildSettings:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    steps: int = 1000
    samples: int = 200
    batch_size: int = 1
    seed: int = 0


# ---------------------------------------------------------------- ORT-friendly twins of three modules

class GroupNormOps(nn.Module):
    """GroupNorm from basic ops (ORT has no gradient for InstanceNormalization, its usual export)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps, self.affine = norm.num_groups, norm.eps, norm.affine
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        g = x.reshape(n, self.num_groups, -1)
        mean = g.mean(dim=-1, keepdim=True)
        var = (g - mean).pow(2).mean(dim=-1, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


class LayerNormOps(nn.Module):
    """LayerNorm from basic ops (ORT's LayerNormalization gradient needs outputs the exporter drops)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.dims = tuple(range(-len(norm.normalized_shape), 0))
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        mean = x.mean(dim=self.dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=self.dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class Upsample2xOps(nn.Module):
    """diffusers' Upsample2D (nearest 2x, then conv) via reshape/expand (ORT has no CPU ResizeGrad)."""

    def __init__(self, up):
        super().__init__()
        if up.use_conv_transpose or up.norm is not None or not up.interpolate or not up.use_conv:
            raise ValueError("only the SD Upsample2D (nearest 2x + conv) has a basic-op twin")
        self.conv = up.conv

    def forward(self, x, output_size=None):
        n, c, h, w = x.shape
        x = x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
        return self.conv(x)


def ort_friendly(net: nn.Module) -> nn.Module:
    """Swap GroupNorm, LayerNorm and Upsample2D in `net` (in place) for basic-op twins, same names."""
    from diffusers.models.upsampling import Upsample2D

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                parent._modules[name] = GroupNormOps(child)
            elif isinstance(child, nn.LayerNorm):
                parent._modules[name] = LayerNormOps(child)
            elif isinstance(child, Upsample2D):
                parent._modules[name] = Upsample2xOps(child)
    return net


# ---------------------------------------------------------------- graphs

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


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_inference(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    """Plain ONNX inference graph (legacy exporter, opset 17); weights in `<name>.data` when large."""
    module.eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad():
        raw = Path(scratch) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        if _param_bytes(module) <= EXTERNAL_DATA_THRESHOLD:
            os.replace(raw, path)
            return
        model = onnx.load(str(raw))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)


def _lift_frozen_to_inputs(model: onnx.ModelProto, frozen: set[str]) -> list[str]:
    """Move frozen initializers out of the graph into named inputs (fed from the checkpoint by ORT)."""
    keep, lifted = [], []
    for init in model.graph.initializer:
        if init.name in frozen:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            lifted.append(init.name)
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return lifted


def export_training_graph(net: nn.Module, args: tuple, input_names: list[str], path: Path) -> tuple[list, list]:
    """`net` (LoRA injected, returning the loss) as ONNX in TRAINING mode, frozen weights as named inputs.

    Returns (trainable names, frozen names) as they appear in the graph.
    """
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / "graph.onnx"  # weights land beside it when over 2 GB: the proto stays small
        torch.onnx.export(net, args, str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.TRAINING, input_names=input_names,
                          output_names=["loss"], export_params=True, keep_initializers_as_inputs=False)
        model = onnx.load(str(raw), load_external_data=False)
        names = {n for n, _ in net.named_parameters()}
        trainable = [i.name for i in model.graph.initializer if ".lora_" in i.name]
        frozen_in_graph = {i.name for i in model.graph.initializer if i.name in names and ".lora_" not in i.name}
        frozen = _lift_frozen_to_inputs(model, frozen_in_graph)
        onnx.load_external_data_for_model(model, scratch)  # what is left: LoRA and the exporter's constants
    onnx.save(model, str(path))
    return trainable, frozen


def generate_training_artifacts(graph_path: Path, trainable: list[str], out: Path, settings: BuildSettings) -> None:
    """training/eval/optimizer models via onnxruntime.training.artifacts; loss is the graph's first output."""
    import onnxruntime
    from onnxruntime.training import artifacts, onnxblock

    onnxruntime.set_default_logger_severity(3)  # the gradient builder logs every graph pass at INFO
    model = onnx.load(str(graph_path))
    artifacts.generate_artifacts(
        model, requires_grad=trainable, frozen_params=[], loss=None,
        optimizer=onnxblock.optim.AdamW(bias_correction=True, betas=settings.betas, eps=settings.eps,
                                        weight_decay=settings.weight_decay),
        artifact_directory=str(out))
    optimizer_path = out / "optimizer_model.onnx"
    optim = onnx.load(str(optimizer_path))
    for node in optim.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = 0  # PyTorch's AdamW, not Hugging Face's (the onnxblock default)
    for path in (optimizer_path, out / "training_model.onnx", out / "eval_model.onnx"):
        m = optim if path == optimizer_path else onnx.load(str(path))
        m.ir_version = min(m.ir_version, MAX_ORT_IR_VERSION)
        onnx.save(m, str(path))
    (out / "checkpoint").unlink()  # replaced by write_checkpoint (frozen weights included)


def write_checkpoint(net: nn.Module, trainable: list[str], frozen: list[str], path: Path) -> None:
    """ORT checkpoint straight from the torch tensors: LoRA trainable, kept weights frozen."""
    from onnxruntime.capi._pybind_state import save_checkpoint

    params = dict(net.named_parameters())

    def proto(name):
        return onnx.numpy_helper.from_array(params[name].detach().cpu().numpy(), name).SerializeToString()
    save_checkpoint([proto(n) for n in trainable], [proto(n) for n in frozen], str(path), False)


def training_artifacts(net: nn.Module, args: tuple, input_names: list[str], out: Path,
                       settings: BuildSettings) -> tuple[list, list]:
    """training/eval/optimizer models and checkpoint of `net` into `out`; returns (trainable, frozen) names."""
    ort_friendly(net)
    graph = out / "graph_for_artifacts.onnx"
    with torch.enable_grad():
        trainable, frozen = export_training_graph(net, args, input_names, graph)
    generate_training_artifacts(graph, trainable, out, settings)
    graph.unlink()
    gc.collect()
    write_checkpoint(net, trainable, frozen, out / fmt.CHECKPOINT)
    return trainable, frozen


class UNetLoss(nn.Module):
    """The full U-Net with its loss: the plain-LoRA baseline's training graph (for benchmarks).
    Without a target it returns the noise prediction (the full U-Net's inference graph), as HollowedNet does."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, target=None):
        prediction = self.unet(sample, timestep, encoder_hidden_states).sample
        if target is None:
            return prediction
        return torch.nn.functional.mse_loss(prediction, target)


def plain_lora_artifacts(unet, plan: HollowPlan, out: Path, settings: BuildSettings) -> tuple[list, list]:
    """ORT training artifacts of plain LoRA on the full U-Net, same rank/targets/resolution as `plan`."""
    from .anatomy import select_lora_targets

    lora_mod.inject(unet, plan.lora, select_lora_targets(unet, plan.lora), seed=settings.seed)
    c, h, w = plan.latent_shape
    args = (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64),
            torch.zeros(1, *plan.encoder_shape), torch.zeros(1, c, h, w))
    out.mkdir(parents=True, exist_ok=True)
    return training_artifacts(UNetLoss(unet), args, ["sample", "timestep", "encoder_hidden_states", "target"],
                              out, settings)


# ---------------------------------------------------------------- build

def lora_names(trainable: list[str]) -> list[dict]:
    """Checkpoint name -> full-U-Net (peft state dict) name of every LoRA tensor."""
    prefix = f".{lora_mod.ADAPTER}."
    return [{"name": n, "unet_name": n.replace(prefix, ".")} for n in trainable]


def build(pipe, plan: HollowPlan, out: Path, instance_prompt: str, class_prompt: str,
          settings: BuildSettings, identity: dict) -> dict:
    """Write the bundle for `plan` into `out` (atomically); return the manifest."""
    started = time.time()
    stages = ["prompts + schedule", "vae_encoder.onnx", "precompute.onnx", "training artifacts", "manifest"]
    bar = tqdm(total=len(stages), desc="build", unit="stage")

    def stage(i):
        if i:
            bar.update(1)
        bar.set_postfix_str(stages[i])
    unet, vae = pipe.unet, pipe.vae
    context_dim = unet.config.cross_attention_dim
    c, h, w = plan.latent_shape
    with store.atomic_dir(Path(out)) as tmp, torch.no_grad():
        stage(0)
        store.save_tensors(tmp / fmt.PROMPTS, {"instance": encode_prompt(pipe, instance_prompt),
                                               "class": encode_prompt(pipe, class_prompt)})
        store.save_tensors(tmp / fmt.SCHEDULE, {"alphas_cumprod": pipe.scheduler.alphas_cumprod.float()})
        stage(1)
        side = plan.resolution
        export_inference(VaeEncoderNet(vae), (torch.zeros(1, 3, side, side),), tmp / fmt.VAE_ENCODER,
                         ["image"], ["latent_mean", "latent_std"],
                         {"image": {0: "batch"}, "latent_mean": {0: "batch"}, "latent_std": {0: "batch"}})
        stage(2)
        export_inference(PrecomputeNet(unet, plan),
                         (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64),
                          torch.zeros(1, plan.encoder_shape[0], context_dim)),
                         tmp / fmt.PRECOMPUTE, list(fmt.PRECOMPUTE_INPUTS), ["hidden"],
                         {k: {0: "batch"} for k in (*fmt.PRECOMPUTE_INPUTS, "hidden")})
        stage(3)
        net = lora_mod.inject(HollowedNet(unet, plan), plan.lora, plan.lora_targets, seed=settings.seed)
        args = (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64), torch.zeros(1, *plan.encoder_shape),
                torch.zeros(1, *plan.buffer_shape), torch.zeros(1, c, h, w))
        trainable, frozen = training_artifacts(net, args, list(fmt.TRAIN_INPUTS), tmp, settings)
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
                "vae_encoder_param_bytes": _param_bytes(vae.encoder) + _param_bytes(vae.quant_conv),
                "precompute_param_bytes": plan.precompute_params * 4,
                "hollowed_base_param_bytes": plan.kept_params * 4,
                "lora_param_bytes": plan.lora_params * 4,
                "optimizer_state_bytes": plan.lora_params * 4 * 2,
                "buffer_bytes_per_sample_fp32": plan.buffer_bytes_fp32,
            },
        )
        bar.update(1)
        bar.close()
        manifest["build_seconds"] = round(time.time() - started, 1)
        fmt.write_manifest(tmp, manifest)
    return manifest
