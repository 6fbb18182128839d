"""Back on the host: the LoRA the phone returns, merged into models a user can run and share.

In:  a bundle (its manifest names the plan, the prompts and every LoRA tensor), the returned
     `lora.safetensors` (device export) and the base model the bundle was built from
     (`merge_bundle` finds it from the manifest's model identity, bench bundles included).
Out: a folder (written whole or not at all; never over anything but an earlier merge, and that only
     with `overwrite`; never inside or around an input) holding
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

import torch
from torch import nn

from . import store
from .bundle import PRECOMPUTE, Bundle
from .device.export import LORA_FORMAT, LORA_RECORD
from .errors import HollowError
from .export.onnx import export_inference, quiet_tracing
from .hollow import lora as lora_mod
from .hollow.plan import HollowPlan
from .hollow.split import HollowedNet, unet_forward
from .models.prompts import encode_prompt

RECORD = "record.json"


class MergeError(HollowError, ValueError):
    """A LoRA that does not belong to the bundle or base model (message names the mismatch)."""


def read_returned_lora(bundle: Bundle, lora_file: Path) -> dict[str, torch.Tensor]:
    """The phone's LoRA tensors, checked against the bundle: id, hash, every name and shape."""
    from safetensors import safe_open

    lora_file = Path(lora_file)
    if not lora_file.exists():
        raise MergeError(f"--lora {lora_file} does not exist; pass the lora.safetensors the phone exported")
    state = store.load_tensors(lora_file, returned_hash(lora_file))
    with safe_open(str(lora_file), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != LORA_FORMAT:
        raise MergeError(f"{lora_file} is not a hollow-export LoRA export (metadata format "
                         f"{metadata.get('format')!r}); pass the file `device export` wrote")
    bundle_id = bundle.id
    if metadata.get("bundle") != bundle_id:
        raise MergeError(f"{lora_file} was trained from another bundle (id {metadata.get('bundle', '?')[:12]}, "
                         f"this bundle is {bundle_id[:12]}); pass the bundle the phone trained")
    wanted = {item["unet_name"]: item["shape"] for item in bundle.manifest["lora"]}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(state) if list(state[k].shape) != wanted[k])
    if missing or extra or wrong:
        raise MergeError(f"{lora_file} does not match the bundle's LoRA: {len(missing)} missing (e.g. "
                         f"{missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), {len(wrong)} of another "
                         f"shape (e.g. {wrong[:2]})")
    bad = sorted(k for k, v in state.items() if not torch.isfinite(v).all())
    if bad:
        raise MergeError(f"{lora_file} holds non-finite values (NaN or inf) in {len(bad)} tensors (e.g. {bad[0]}): "
                         "training diverged; train again (lower --lr) and export a finite checkpoint")
    return state


def returned_hash(lora_file: Path) -> str:
    """The sha256 that `device export` recorded in lora.json beside the LoRA file."""
    record_path = Path(lora_file).with_name(LORA_RECORD)
    fix = f"copy the {LORA_RECORD} that `device export` wrote beside {Path(lora_file).name}"
    if not record_path.is_file():
        raise MergeError(f"{record_path} is missing (it holds the LoRA file's hash); {fix}")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise MergeError(f"{record_path} is not readable JSON ({err}); {fix}") from err
    digest = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(digest, str) or len(digest) != 64:
        raise MergeError(f"{record_path} records no sha256 of the LoRA file; {fix}")
    return digest


class SinglePathUNet(nn.Module):
    """The full U-Net (LoRA fused) with the class prompt's embedding baked into the hollowed layers."""

    def __init__(self, unet, plan: HollowPlan, class_embedding: torch.Tensor):
        super().__init__()
        self.unet, self.plan = unet, plan
        self.register_buffer("class_embedding", class_embedding)

    def forward(self, sample, timestep, encoder_hidden_states):
        klass = self.class_embedding.expand(sample.shape[0], -1, -1)
        return unet_forward(self.unet, self.plan, sample, timestep, encoder_hidden_states, klass)


def fuse(pipe, state: dict[str, torch.Tensor], plan: HollowPlan, lora_dir: Path) -> None:
    """Write the diffusers LoRA file, load it with diffusers' own loader and fuse it into the U-Net."""
    store.canonical_safetensors(lora_mod.save_diffusers(lora_dir, state, plan.lora))
    pipe.load_lora_weights(str(lora_dir), weight_name=lora_mod.LORA_FILE, adapter_name="personal")
    pipe.fuse_lora(adapter_names=["personal"])
    pipe.unload_lora_weights()


def merge(pipe, bundle_dir: Path, lora_file: Path, out: Path, overwrite: bool = False) -> dict:
    """Everything in the module docstring, into `out` (an earlier merge there only with `overwrite`,
    see `store.atomic_dir`); returns the record."""
    from optimum.exporters.onnx import onnx_export_from_model

    bundle = Bundle.from_pretrained(bundle_dir)
    manifest = bundle.manifest
    plan = HollowPlan.from_json(bundle.plan)
    state = read_returned_lora(bundle, lora_file)
    lora_mod.check_fits(pipe.unet, state)
    prompts = manifest["prompts"]
    with store.atomic_dir(Path(out), "merge", overwrite) as tmp, quiet_tracing():
        fuse(pipe, state, plan, tmp)
        record = {"method": "hollowed", "instance_prompt": prompts["instance"], "class_prompt": prompts["class"],
                  "plan": manifest["plan"], "lora_file": lora_mod.LORA_FILE,
                  "lora_sha256": store.sha256(tmp / lora_mod.LORA_FILE), "bundle": bundle.id,
                  "source_lora": str(lora_file)}
        store.write_json(tmp / RECORD, record)

        onnx_export_from_model(pipe, tmp / "single", do_validation=False)
        c, h, w = plan.latent_shape
        klass = encode_prompt(pipe, prompts["class"])
        context = torch.zeros(1, *plan.encoder_shape)
        export_inference(SinglePathUNet(pipe.unet, plan, klass), (torch.zeros(1, c, h, w), torch.tensor(1.0), context),
                         tmp / "single" / "unet" / "model.onnx", ["sample", "timestep", "encoder_hidden_states"],
                         ["out_sample"], {"sample": {0: "batch_size", 2: "height", 3: "width"},
                                          "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                                          "out_sample": {0: "batch_size", 2: "height", 3: "width"}},
                         data_suffix="_data")
        (tmp / "dual").mkdir()
        for name in (PRECOMPUTE, PRECOMPUTE + ".data"):
            if bundle.path(name).exists():
                shutil.copy2(bundle.path(name), tmp / "dual" / name)
        export_inference(HollowedNet(pipe.unet, plan), (torch.zeros(1, c, h, w), torch.zeros(1, dtype=torch.int64),
                                                        context, torch.zeros(1, *plan.buffer_shape)),
                         tmp / "dual" / "kept.onnx", ["sample", "timestep", "encoder_hidden_states", "hidden"],
                         ["out_sample"],
                         {k: {0: "batch"} for k in ("sample", "timestep", "encoder_hidden_states", "hidden", "out_sample")},
                         data_suffix="_data")
        store.write_json(tmp / "dual" / "dual_path.json", {
            "precompute": PRECOMPUTE, "kept": "kept.onnx", "class_prompt": prompts["class"],
            "instance_prompt": prompts["instance"], "components": "../single",
            "class_embedding": "class_embedding.safetensors"})
        store.save_tensors(tmp / "dual" / "class_embedding.safetensors", {"class": klass})
    return record


def merge_bundle(bundle_dir: Path, lora_file: Path, out: Path, model: str | None = None,
                 variant: str | None = None, overwrite: bool = False) -> dict:
    """`hollow-export merge`: the base model the bundle was built from, in the weight variant it was built
    with (or `model` in `variant`), then `merge`."""
    from .models.load import pipeline_for

    store.check_output_dir(Path(out), "merge", overwrite)  # before any work
    store.check_apart(Path(out), {"--bundle": bundle_dir, "--lora": lora_file, "--model": model})
    identity = Bundle.from_pretrained(bundle_dir, verify=False).manifest["model"]
    return merge(pipeline_for(identity, model, variant), Path(bundle_dir), Path(lora_file), Path(out), overwrite)
