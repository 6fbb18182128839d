"""Back on the host: the LoRA the phone returns, merged into models a user can run and share.

In:  a bundle (its manifest names the plan, the prompts and every LoRA tensor), the returned
     `lora.safetensors` (device export) and the base model the bundle was built from.
Out: a folder (written whole or not at all) holding
       pytorch_lora_weights.safetensors  diffusers format, alpha in the adapter metadata
       record.json                       class prompt and plan (so `generate --lora` reads it)
       single/                           optimum's ONNX Stable Diffusion layout: text encoder, U-Net
                                         with the LoRA fused (single path), VAE decoder and encoder,
                                         scheduler, tokenizer, model_index.json
       dual/precompute.onnx, dual/kept.onnx
                                         the paper's dual path: the frozen precompute graph (no LoRA)
                                         and the kept layers with the LoRA fused

Conditioning of the hollowed layers. In both paths the hollowed layers, which were never trained,
see the class prompt ("a dog") and only the kept layers see the prompt being generated, for the
conditional and the unconditional branch of classifier-free guidance alike. So the single-path
U-Net bakes the class prompt's embedding into its hollowed cross-attention layers as a constant:
its interface stays optimum's (sample, timestep, encoder_hidden_states -> out_sample) and its cost
that of plain inference; in the dual path one precompute call per denoising step serves both
guidance branches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import bundle as fmt
from . import lora as lora_mod
from . import store
from .anatomy import HollowPlan
from .errors import HollowError
from .split import HollowedNet, unet_forward

LORA_FORMAT = "hollow-export-lora"
OPSET = 17


class MergeError(HollowError, ValueError):
    """A LoRA that does not belong to the bundle or base model (message names the mismatch)."""


def read_returned_lora(bundle_dir: Path, lora_file: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The phone's LoRA tensors, checked against the bundle: id, hash, every name and shape."""
    from safetensors import safe_open

    lora_file = Path(lora_file)
    if not lora_file.exists():
        raise MergeError(f"--lora {lora_file} does not exist; pass the lora.safetensors the phone exported")
    record_path = lora_file.with_name("lora.json")
    expected = json.loads(record_path.read_text())["sha256"] if record_path.exists() else None
    state = store.load_tensors(lora_file, expected)
    with safe_open(str(lora_file), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != LORA_FORMAT:
        raise MergeError(f"{lora_file} is not a hollow-export LoRA export (metadata format "
                         f"{metadata.get('format')!r}); pass the file `device export` wrote")
    bundle_id = store.sha256(Path(bundle_dir) / fmt.MANIFEST)
    if metadata.get("bundle") != bundle_id:
        raise MergeError(f"{lora_file} was trained from another bundle (id {metadata.get('bundle', '?')[:12]}, "
                         f"this bundle is {bundle_id[:12]}); pass the bundle the phone trained")
    wanted = {item["unet_name"]: item["shape"] for item in manifest["lora"]}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(state) if list(state[k].shape) != wanted[k])
    if missing or extra or wrong:
        raise MergeError(f"{lora_file} does not match the bundle's LoRA: {len(missing)} missing (e.g. "
                         f"{missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), {len(wrong)} of another "
                         f"shape (e.g. {wrong[:2]})")
    return state


class SinglePathUNet(nn.Module):
    """The full U-Net (LoRA fused) with the class prompt's embedding baked into the hollowed layers."""

    def __init__(self, unet, plan: HollowPlan, class_embedding: torch.Tensor):
        super().__init__()
        self.unet, self.plan = unet, plan
        self.register_buffer("class_embedding", class_embedding)

    def forward(self, sample, timestep, encoder_hidden_states):
        klass = self.class_embedding.expand(sample.shape[0], -1, -1)
        return unet_forward(self.unet, self.plan, sample, timestep, encoder_hidden_states, klass)


class KeptNet(nn.Module):
    """The dual path's second half: the hollowed net (LoRA fused) as an inference graph."""

    def __init__(self, unet, plan: HollowPlan):
        super().__init__()
        self.net = HollowedNet(unet, plan)

    def forward(self, sample, timestep, encoder_hidden_states, hidden):
        return self.net(sample, timestep, encoder_hidden_states, hidden)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], output: str, axes: dict) -> None:
    from .export import EXTERNAL_DATA_THRESHOLD, _param_bytes
    import onnx
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad():
        raw = Path(scratch) / path.name
        torch.onnx.export(module.eval(), args, str(raw), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=[output], dynamic_axes=axes, do_constant_folding=True)
        for f in path.parent.glob(path.name + "*"):
            f.unlink()
        model = onnx.load(str(raw))
        large = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD
        onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=path.name + "_data" if large else None)


def fuse(pipe, state: dict[str, torch.Tensor], plan: HollowPlan, lora_dir: Path) -> None:
    """Write the diffusers LoRA file, load it with diffusers' own loader and fuse it into the U-Net."""
    lora_mod.save_diffusers(lora_dir, state, plan.lora)
    pipe.load_lora_weights(str(lora_dir), weight_name=lora_mod.LORA_FILE, adapter_name="personal")
    pipe.fuse_lora(adapter_names=["personal"])
    pipe.unload_lora_weights()


def merge(pipe, bundle_dir: Path, lora_file: Path, out: Path) -> dict:
    """Everything in the module docstring, into `out`; returns the record."""
    from optimum.exporters.onnx import onnx_export_from_model

    from .personalize import encode_prompt

    bundle_dir = Path(bundle_dir)
    manifest = fmt.open_bundle(bundle_dir)
    plan = HollowPlan.from_json(manifest["plan"])
    state = read_returned_lora(bundle_dir, lora_file, manifest)
    lora_mod.check_fits(pipe.unet, state)
    prompts = manifest["prompts"]
    with store.atomic_dir(Path(out)) as tmp:
        fuse(pipe, state, plan, tmp)
        record = {"method": "hollowed", "instance_prompt": prompts["instance"], "class_prompt": prompts["class"],
                  "plan": manifest["plan"], "lora_file": lora_mod.LORA_FILE,
                  "lora_sha256": store.sha256(tmp / lora_mod.LORA_FILE), "bundle": store.sha256(
                      bundle_dir / fmt.MANIFEST), "source_lora": str(lora_file)}
        store.write_json(tmp / "record.json", record)

        onnx_export_from_model(pipe, tmp / "single", do_validation=False)
        c, h, w = plan.latent_shape
        klass = encode_prompt(pipe, prompts["class"])
        context = torch.zeros(1, *plan.encoder_shape)
        _export(SinglePathUNet(pipe.unet, plan, klass), (torch.zeros(1, c, h, w), torch.tensor(1.0), context),
                tmp / "single" / "unet" / "model.onnx", ["sample", "timestep", "encoder_hidden_states"],
                "out_sample", {"sample": {0: "batch_size", 2: "height", 3: "width"},
                               "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                               "out_sample": {0: "batch_size", 2: "height", 3: "width"}})
        (tmp / "dual").mkdir()
        for name in (fmt.PRECOMPUTE, fmt.PRECOMPUTE + ".data"):
            if (bundle_dir / name).exists():
                shutil.copy2(bundle_dir / name, tmp / "dual" / name)
        _export(KeptNet(pipe.unet, plan), (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64), context,
                                           torch.zeros(1, *plan.buffer_shape)),
                tmp / "dual" / "kept.onnx", ["sample", "timestep", "encoder_hidden_states", "hidden"], "out_sample",
                {k: {0: "batch"} for k in ("sample", "timestep", "encoder_hidden_states", "hidden", "out_sample")})
        store.write_json(tmp / "dual" / "dual_path.json", {
            "precompute": fmt.PRECOMPUTE, "kept": "kept.onnx", "class_prompt": prompts["class"],
            "instance_prompt": prompts["instance"], "components": "../single",
            "class_embedding": "class_embedding.safetensors"})
        store.save_tensors(tmp / "dual" / "class_embedding.safetensors", {"class": klass})
    return record


# ---------------------------------------------------------------- ONNX Runtime inference of the merged export

class OrtEngine:
    """Denoising steps with ONNX Runtime alone, over a merged folder (single or dual path)."""

    def __init__(self, merged: Path, path: str):
        import onnxruntime as ort

        merged = Path(merged)
        if path not in ("single", "dual"):
            raise MergeError(f"--inference must be single or dual (got {path!r})")
        if not (merged / "single" / "model_index.json").exists():
            raise MergeError(f"{merged} is not a merged folder (no single/model_index.json); run `hollow-export merge`")
        options = ort.SessionOptions()
        options.log_severity_level = 3

        def session(p):
            return ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        self.path = path
        self.text_encoder = session(merged / "single" / "text_encoder" / "model.onnx")
        self.vae_decoder = session(merged / "single" / "vae_decoder" / "model.onnx")
        if path == "single":
            self.unet = session(merged / "single" / "unet" / "model.onnx")
        else:
            self.precompute = session(merged / "dual" / fmt.PRECOMPUTE)
            self.kept = session(merged / "dual" / "kept.onnx")
            from safetensors.numpy import load_file
            self.klass = load_file(str(merged / "dual" / "class_embedding.safetensors"))["class"]

    def encode(self, ids: np.ndarray) -> np.ndarray:
        return self.text_encoder.run(None, {"input_ids": ids.astype(np.int64)})[0]

    def noise(self, x: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
        if self.path == "single":
            return self.unet.run(None, {"sample": x, "timestep": np.array(t, dtype=np.float32),
                                        "encoder_hidden_states": context})[0]
        timestep = np.full((x.shape[0],), int(t), dtype=np.int64)
        klass = np.repeat(self.klass, x.shape[0], axis=0)
        (hidden,) = self.precompute.run(None, {"sample": x, "timestep": timestep, "encoder_hidden_states": klass})
        return self.kept.run(None, {"sample": x, "timestep": timestep, "encoder_hidden_states": context,
                                    "hidden": hidden})[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.vae_decoder.run(None, {"latent_sample": latents})[0]
