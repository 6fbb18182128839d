"""Export on the device: the trained LoRA as the small file the phone sends back.

In:  a bundle and a run folder (or a checkpoint file inside one: the run's progress.json beside it
     is what proves which bundle and buffer it was trained for, and its hash).
Out: a folder holding `lora.safetensors` (LoRA tensors under their full-U-Net names, float32, metadata
     naming the format, the bundle id, rank and alpha) and `lora.json` (its sha256): what `merge` reads.
     Both are byte-for-byte reproducible: one checkpoint always exports the same bytes. The folder is
     written whole or not at all, under the output-folder rules of every command (`store.atomic_dir`:
     a new or empty folder, or with `overwrite` an earlier export holding nothing else; never inside
     the bundle or the run folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import store
from ..bundle import Bundle
from .errors import RuntimeFault
from .ort_session import training_api
from .train import PROGRESS, non_finite, read_progress, verified_checkpoint

LORA_EXPORT = "lora.safetensors"
LORA_RECORD = "lora.json"
LORA_FORMAT = "hollow-export-lora"
COMMAND = "device export"  # names the output folder's writer (store.atomic_dir)


def resolve_checkpoint(path: Path, bundle_id: str) -> Path:
    """The checked checkpoint of a run folder (its last saved one), or of a checkpoint file in its run folder.

    A checkpoint carries neither its bundle nor a hash: only its run's progress.json does. So a bare
    checkpoint file (no progress.json beside it, or one naming another checkpoint) is refused rather
    than exported unchecked, under this bundle's id.
    """
    path = Path(path)
    if not path.exists():
        raise RuntimeFault(f"checkpoint {path} does not exist; pass the --run folder of `device train`")
    run = path if path.is_dir() else path.parent
    progress = read_progress(run)
    if progress is None:
        raise RuntimeFault(f"{run} has no {PROGRESS}: a checkpoint outside its run folder cannot be checked; "
                           "pass the --run folder of `device train`")
    if not path.is_dir() and progress.get("checkpoint") != path.name:
        raise RuntimeFault(f"{path.name} is not the last checkpoint of {run} (that is {progress.get('checkpoint')}) "
                           "and has no recorded hash; pass the run folder to export its last checkpoint")
    if progress.get("bundle") != bundle_id:
        raise RuntimeFault(f"{run} was trained for another bundle; pass that bundle's folder as --bundle, or "
                           "train this one with `hollow-export device train`")
    return verified_checkpoint(run, progress)


def export_lora(bundle_dir: Path, checkpoint: Path, out: Path, overwrite: bool = False) -> dict:
    """LoRA tensors from a checkpoint, under full-U-Net names, as the small file the phone sends back."""
    from safetensors.numpy import save_file

    checkpoint = Path(checkpoint)
    store.check_apart(Path(out), {"--bundle": bundle_dir,
                                  "--checkpoint": checkpoint if checkpoint.is_dir() else checkpoint.parent})
    store.check_output_dir(Path(out), COMMAND, overwrite)
    bundle = Bundle.from_pretrained(bundle_dir)
    manifest = bundle.manifest
    checkpoint = resolve_checkpoint(checkpoint, bundle.id)
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
    bad = non_finite(state, [item["name"] for item in manifest["lora"]])
    if bad:
        raise RuntimeFault(f"{checkpoint} holds NaN or infinity in {bad}: the training diverged; train again "
                           "with a smaller --lr in a new --run folder")
    metadata = {"format": LORA_FORMAT, "format_version": "1", "bundle": bundle.id,
                "rank": str(manifest["hyper"]["rank"]), "alpha": str(manifest["hyper"]["alpha"])}
    with store.atomic_dir(Path(out), COMMAND, overwrite) as tmp:
        save_file(tensors, str(tmp / LORA_EXPORT), metadata=metadata)
        store.canonical_safetensors(tmp / LORA_EXPORT)
        record = {**metadata, "file": LORA_EXPORT, "sha256": store.sha256(tmp / LORA_EXPORT),
                  "tensors": len(tensors), "checkpoint": checkpoint.name}
        store.write_json(tmp / LORA_RECORD, record)
    return record
