"""Export on the device: the trained LoRA as the small file the phone sends back.

In:  a bundle and a checkpoint file or run folder.
Out: `lora.safetensors` (LoRA tensors under their full-U-Net names, float32, metadata naming the
     format, the bundle id, rank and alpha) and `lora.json` (its sha256): what `merge` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import store
from ..bundle import Bundle
from .errors import RuntimeFault
from .ort_session import training_api
from .train import read_progress

LORA_EXPORT = "lora.safetensors"
LORA_RECORD = "lora.json"
LORA_FORMAT = "hollow-export-lora"


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or a run folder (its last saved checkpoint)."""
    path = Path(path)
    if path.is_dir():
        progress = read_progress(path)
        if progress is None or not progress.get("checkpoint"):
            raise RuntimeFault(f"{path} holds no finished checkpoint; run `hollow-export device train` first")
        return path / progress["checkpoint"]
    if not path.exists():
        raise RuntimeFault(f"checkpoint {path} does not exist")
    return path


def export_lora(bundle_dir: Path, checkpoint: Path, out: Path) -> dict:
    """LoRA tensors from a checkpoint, under full-U-Net names, as the small file the phone sends back."""
    from safetensors.numpy import save_file

    bundle = Bundle.from_pretrained(bundle_dir)
    manifest = bundle.manifest
    checkpoint = resolve_checkpoint(checkpoint)
    try:
        state = training_api().CheckpointState.load_checkpoint(str(checkpoint))
    except Exception as err:  # ORT raises its own types for unreadable flatbuffers
        raise RuntimeFault(f"{checkpoint} is not a readable checkpoint ({err}); pass a checkpoint of this run") \
            from err
    tensors = {}
    for item in manifest["lora"]:
        if item["name"] not in state.parameters:
            raise RuntimeFault(f"{checkpoint} lacks {item['name']}: it belongs to another bundle")
        tensors[item["unet_name"]] = np.ascontiguousarray(state.parameters[item["name"]].data, np.float32)
    metadata = {"format": LORA_FORMAT, "format_version": "1", "bundle": bundle.id,
                "rank": str(manifest["hyper"]["rank"]), "alpha": str(manifest["hyper"]["alpha"])}
    out = Path(out)
    with store.atomic_path(out / LORA_EXPORT) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    record = {**metadata, "file": LORA_EXPORT, "sha256": store.sha256(out / LORA_EXPORT),
              "tensors": len(tensors), "checkpoint": checkpoint.name}
    store.write_json(out / LORA_RECORD, record)
    return record
