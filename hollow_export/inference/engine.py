"""ONNX Runtime inference of a merged folder: the denoiser of the `ort` engine, no torch.

In:  a folder written by `merge` and the inference path (`single` or `dual`).
Out: an `OrtEngine` with `encode(token ids)`, `noise(latent, t, context)` (one U-Net evaluation
     along the path: the single-path U-Net, or precompute with the class prompt + the kept layers)
     and `decode(latents)`; `inference/generate.py` runs the sampling loop around it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import PRECOMPUTE
from ..device.ort_session import inference_session
from ..merge import MergeError


class OrtEngine:
    """Denoising steps with ONNX Runtime alone, over a merged folder (single or dual path)."""

    def __init__(self, merged: Path, path: str):
        merged = Path(merged)
        if path not in ("single", "dual"):
            raise MergeError(f"--inference must be single or dual (got {path!r})")
        if not (merged / "single" / "model_index.json").exists():
            raise MergeError(f"{merged} is not a merged folder (no single/model_index.json); run `hollow-export merge`")
        session = inference_session
        self.path = path
        self.text_encoder = session(merged / "single" / "text_encoder" / "model.onnx")
        self.vae_decoder = session(merged / "single" / "vae_decoder" / "model.onnx")
        if path == "single":
            self.unet = session(merged / "single" / "unet" / "model.onnx")
        else:
            self.precompute = session(merged / "dual" / PRECOMPUTE)
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
