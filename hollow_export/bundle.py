"""The bundle format: the contract between the host (`export/build.py`) and the phone.

In:  a bundle folder.
Out: a `Bundle` (`Bundle.from_pretrained(folder)`): its manifest, after checking the format
     version and every file's size and sha256, its id (the manifest's sha256), its prompt
     embeddings and noise schedule as numpy arrays, where its frozen weights live and how to open
     its training session; and the file and input names both clients agree on. `make_manifest` +
     `Bundle.save_pretrained` write a manifest (the build does).

Format 2 (issue 13): the kept base weights live once in `frozen_weights.bin` (fp32 or fp16, named
with its dtype and sha256 under `frozen`), referenced by the training and eval graphs as external
initializers; the checkpoint holds LoRA (and, once trained, its optimizer state) only; `training_session`
names the ORT session settings both clients use. Format 1 bundles (frozen weights in the checkpoint)
are refused with a message saying to rebuild.
Torch-free on purpose: the device runtime (`device/`), `merge.py` and the benchmarks read it, and
the Kotlin core's `Bundle` is its twin. android_demo/PROTOCOL.md describes it in prose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import store
from .errors import HollowError

FORMAT = "hollow-export-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
VAE_ENCODER = "vae_encoder.onnx"
PRECOMPUTE = "precompute.onnx"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
FROZEN_WEIGHTS = "frozen_weights.bin"  # format 2: the kept base weights, once
PROMPTS = "prompts.safetensors"
SCHEDULE = "schedule.safetensors"
PRECOMPUTE_INPUTS = ("sample", "timestep", "encoder_hidden_states")
TRAIN_INPUTS = ("sample", "timestep", "encoder_hidden_states", "hidden", "target")
FROZEN_DTYPES = ("float32", "float16")
# ORT session-config key (onnxruntime_session_options_config_keys.h, in 1.19.2): graph transformers to skip
DISABLE_OPTIMIZERS = "optimization.disable_specified_optimizers"


def training_session(unknown_batch: bool = True) -> dict:
    """The ORT session settings of the training Module, named in the manifest; both clients apply them.

    `unknown_batch`: whether the training graph has the unknown batch dimension (`export/batch_dim.py`, the
    default build); it decides the CPU arena. Measured on ORT 1.19.2 CPU (issue 13, step peak RSS, sd21
    512 px r=128, every lever, 2 threads):
    - CPU arena ON with an unknown batch: ORT's planner then allocates every activation fresh and frees it
      at its last use, and the arena recycles the freed blocks by size; off, each fresh buffer pays its page
      faults (fp32 frozen weights: 3.51 GB at 14.2 s with the arena, 3.37 GB at 21.4 s without; the
      static-batch graph: 4.14 GB at 14.4 s). fp16 frozen weights likewise: with every Cast gated on its
      reader (frozen.py) the fp32 weight copies are short-lived, 2.286 GB at 15.2 s with the arena against
      2.155 GB at 26.2 s without (sd15 256 px: 1.974 GB at 4.4 s against 2.074 GB at 7.3 s), so the arena
      stays on: 6 % more memory at sd21 for a step 42 % shorter. (Before the gating, one shared forward
      Cast per weight fragmented the arena: 4.00 GB with it, 3.34 GB without.)
    - CPU arena OFF with a static batch (ablation builds): the arena keeps every freed step buffer, so the
      peak grows by the largest transient set; off, they go back to malloc (mid 256 px baseline bundle
      1.72 -> 1.21 GB; memory pattern off measured the same, arena off is kept).
    - the graph transformers ConstantFolding and NchwcTransformer off: with the frozen weights as
      initializers (format 2) instead of checkpoint-fed inputs, constant folding copies every weight it can
      fold (e.g. a transposed copy) and NCHWc re-lays every conv weight and wraps convs in reorder nodes;
      held memory 0.82 -> 0.30 GB and step peak 1.29 -> 0.95 GB with both off (0.51 / 1.15 with folding off
      alone; session.disable_prepacking made it worse, 1.33). With checkpoint-fed weights neither transformer
      could touch them, so this is the session the earlier bundles ran. Left alone, the page-aligned
      external initializers are memory-mapped from frozen_weights.bin (clean, reclaimable pages). fp16 frozen weights need folding off
      anyway, or each Cast(fp16 initializer) is folded into an fp32 copy when the session is created.
    - no eval session unless evaluation is asked for (it holds its own copy of the weights).
    - `enable_mem_reuse` off with an unknown batch: no activation's shape can match, so the allocations are
      the same with it on (sd21 step peak 3.514 GB either way), but the planner then scans its whole free list
      for every tensor: session creation 8.0 -> 1.6 s at tiny, 12.7 -> 2.4 s at sd21. Python-only (no C or
      Java setter): the app gets the same memory and creates its session more slowly.
    """
    return {"enable_cpu_mem_arena": unknown_batch, "enable_mem_pattern": True, "enable_mem_reuse": not unknown_batch,
            "config_entries": {DISABLE_OPTIMIZERS: "ConstantFolding;NchwcTransformer"}, "eval_session": False}


class BundleError(HollowError):
    """A bundle that is incomplete, of another version or fails a hash (message names the file and fix)."""


def _graph_io(path: Path, skip: set[str]) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            if v.name in skip:
                continue
            t = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": [_dim(d) for d in t.shape.dim]})
        return out
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _dim(d) -> int | str:
    """A dimension as the manifest writes it: its value, its name, or "batch" when unknown (batch_dim.py)."""
    return d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch")


def make_manifest(folder: Path, identity: dict, plan: dict, prompts: dict, lora: list[dict], frozen_params: int,
                  hyper: dict, memory: dict, frozen_dtype: str = "float32") -> dict:
    """Describe every file in `folder` (sha256, size), every graph's user-facing inputs and outputs,
    the frozen-weights file (None when an ablation build left them in the checkpoint) and the session."""
    if frozen_dtype not in FROZEN_DTYPES:
        raise BundleError(f"frozen dtype must be one of {', '.join(FROZEN_DTYPES)} (got {frozen_dtype!r})")
    folder = Path(folder)
    params = {item["name"] for item in lora}
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        files[path.name] = {"sha256": store.sha256(path), "bytes": path.stat().st_size}
    frozen = set()
    if (folder / TRAINING_MODEL).exists():
        import onnx
        train = onnx.load(str(folder / TRAINING_MODEL), load_external_data=False)
        frozen = {i.name for i in train.graph.input if i.name not in TRAIN_INPUTS}
    graphs = {name: _graph_io(folder / name, params | frozen)
              for name in (VAE_ENCODER, PRECOMPUTE, TRAINING_MODEL, EVAL_MODEL) if (folder / name).exists()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": identity,
        "plan": plan,
        "prompts": prompts,
        "files": files,
        "graphs": graphs,
        "lora": lora,
        "frozen_param_count": frozen_params,
        "frozen": {"file": FROZEN_WEIGHTS, "dtype": frozen_dtype, "sha256": files[FROZEN_WEIGHTS]["sha256"],
                   "bytes": files[FROZEN_WEIGHTS]["bytes"]} if FROZEN_WEIGHTS in files
        else {"file": None, "dtype": "float32", "sha256": None, "bytes": 0},
        "training_session": training_session(bool(hyper.get("unknown_batch"))),
        "hyper": hyper,
        "memory": memory,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    store.write_json(Path(folder) / MANIFEST, manifest)


def bundle_id(folder: Path) -> str:
    """A bundle's id: the sha256 of its manifest.json (buffers, runs and LoRA exports name it)."""
    return store.sha256(Path(folder) / MANIFEST)


def open_bundle(folder: Path, verify: bool = True) -> dict:
    """The manifest of `folder`, refusing a bundle that is incomplete, of another version or tampered."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise BundleError(f"{folder} is not a bundle (no {MANIFEST}); run `hollow-export build --out {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON ({err}); rebuild the bundle") from err
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{folder} has format {manifest.get('format')} v{manifest.get('format_version')}; this "
                          f"tool reads {FORMAT} v{FORMAT_VERSION} (frozen weights out of the checkpoint): rebuild "
                          f"it with `hollow-export build`")
    frozen = manifest.get("frozen")
    if not isinstance(frozen, dict) or frozen.get("dtype") not in FROZEN_DTYPES or (
            frozen.get("file") is not None
            and manifest["files"].get(frozen["file"], {}).get("sha256") != frozen.get("sha256")):
        raise BundleError(f"{path} names no valid frozen-weights file (its `frozen` entry must be a listed file "
                          "with its sha256); rebuild the bundle with `hollow-export build`")
    if verify:
        for name, info in manifest["files"].items():
            file = folder / name
            if not file.exists():
                raise BundleError(f"bundle file {name} is missing from {folder}; copy the whole bundle again")
            if file.stat().st_size != info["bytes"] or store.sha256(file) != info["sha256"]:
                raise BundleError(f"bundle file {name} fails its sha256 check (corrupted or modified); "
                                  "copy the bundle again or rebuild it")
    return manifest


@dataclass
class Bundle:
    """An opened bundle: its folder and its checked manifest (the Kotlin core's `Bundle` is the twin)."""

    folder: Path
    manifest: dict

    @classmethod
    def from_pretrained(cls, folder: Path, verify: bool = True) -> "Bundle":
        """Open `folder`, refusing a bundle that is incomplete, of another version or tampered (`verify`)."""
        return cls(Path(folder), open_bundle(folder, verify))

    def save_pretrained(self, folder: Path | None = None) -> None:
        """Write the manifest into `folder` (default: the bundle's own), whose files it describes."""
        write_manifest(self.folder if folder is None else folder, self.manifest)

    @property
    def id(self) -> str:
        return bundle_id(self.folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def plan(self) -> dict:
        return self.manifest["plan"]

    @property
    def hyper(self) -> dict:
        return self.manifest["hyper"]

    @property
    def frozen(self) -> dict:
        """{file, dtype, sha256, bytes} of the frozen weights (file None: they are in the checkpoint)."""
        return self.manifest["frozen"]

    @property
    def training_session(self) -> dict:
        """The ORT settings of the training session (`training_session`), as the manifest names them."""
        return self.manifest["training_session"]

    def prompt_embeddings(self) -> dict[str, np.ndarray]:
        """`instance` and `class` prompt embeddings, [1, 77, D] float32."""
        from safetensors.numpy import load_file
        return load_file(str(self.folder / PROMPTS))

    def alphas_cumprod(self) -> np.ndarray:
        """The training noise schedule's cumulative alphas, float32."""
        from safetensors.numpy import load_file
        return load_file(str(self.folder / SCHEDULE))["alphas_cumprod"].astype(np.float32)
