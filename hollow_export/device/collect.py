"""Collection on the device: photos -> VAE latents -> noise, timesteps -> precompute -> the buffer file.

In:  a bundle, a folder of photos, a buffer path, how many samples, a seed and the storage dtype.
Out: the buffer file (appended until it holds `samples`; a partly written one is resumed) and
     its header. Random draws come from `rng.py`, so the Kotlin collector writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import PRECOMPUTE, VAE_ENCODER, Bundle
from ..photos import load_photos, photos_digest
from .buffer import BufferHeader, append_record, encode_record, open_for_append
from .errors import RuntimeFault
from .ort_session import inference_session
from .rng import STREAM_LATENT, STREAM_NOISE, STREAM_TIMESTEP, random_normal, random_u64, stream_key


def noisy_and_target(acp: np.ndarray, record: dict, prediction_type: str) -> tuple[np.ndarray, np.ndarray]:
    """DDPM forward noising in float32, as diffusers' add_noise; the target is the noise or the velocity."""
    a = np.sqrt(acp[record["timestep"]]).astype(np.float32)
    s = np.sqrt(np.float32(1.0) - acp[record["timestep"]]).astype(np.float32)
    noisy = a * record["latent"] + s * record["noise"]
    if prediction_type == "epsilon":
        return noisy, record["noise"]
    if prediction_type == "v_prediction":
        return noisy, a * record["noise"] - s * record["latent"]
    raise RuntimeFault(f"prediction_type {prediction_type!r} is not supported")


def collect(bundle_dir: Path, images: Path, buffer_path: Path, samples: int | None = None, seed: int = 0,
            dtype: str = "float32", progress: bool = True) -> BufferHeader:
    """Append samples to the buffer until it holds `samples` (default: the bundle's); resumes a partly
    written buffer."""
    from tqdm import tqdm

    bundle = Bundle.from_pretrained(bundle_dir)
    manifest = bundle.manifest
    samples = bundle.hyper["samples"] if samples is None else samples
    if dtype not in ("float32", "float16"):
        raise RuntimeFault(f"--dtype must be float32 or float16 (got {dtype})")
    if samples < 1:
        raise RuntimeFault(f"--samples must be at least 1 (got {samples})")
    plan = manifest["plan"]
    header = BufferHeader(bundle=bundle.id, photos=photos_digest(images), capacity=samples, seed=seed,
                          dtype=dtype, latent_shape=plan["latent_shape"], hidden_shape=plan["buffer_shape"])
    photos = load_photos(images, manifest["hyper"]["resolution"])
    buffer_path = Path(buffer_path)
    done = open_for_append(buffer_path, header)  # a resumed or complete buffer is checked record by record
    if done == samples:
        return header

    vae = inference_session(bundle.path(VAE_ENCODER))
    precompute = inference_session(bundle.path(PRECOMPUTE))
    klass = bundle.prompt_embeddings()["class"]
    acp = bundle.alphas_cumprod()
    timesteps = random_u64(stream_key(seed, STREAM_TIMESTEP, 0), samples) % np.uint64(len(acp))
    latents = []
    for p in range(len(photos)):
        mean, std = vae.run(None, {"image": photos[p:p + 1]})
        eps = random_normal(stream_key(seed, STREAM_LATENT, p), mean.size).reshape(mean.shape)
        latents.append((mean + std * eps)[0].astype(np.float32))
    n_latent = int(np.prod(plan["latent_shape"]))
    with open(buffer_path, "ab") as f:
        bar = tqdm(range(done, samples), desc="collect", unit="sample", disable=not progress, initial=done,
                   total=samples)
        for i in bar:
            latent = latents[i % len(latents)]
            noise = random_normal(stream_key(seed, STREAM_NOISE, i), n_latent).reshape(latent.shape)
            if dtype == "float16":
                noise = noise.astype(np.float16).astype(np.float32)  # train on exactly what is stored
            record = {"timestep": int(timesteps[i]), "latent": latent, "noise": noise}
            noisy, _ = noisy_and_target(acp, record, "epsilon")
            (hidden,) = precompute.run(None, {"sample": noisy[None], "timestep": np.array([record["timestep"]],
                                              dtype=np.int64), "encoder_hidden_states": klass})
            append_record(f, buffer_path, encode_record(header, i, record["timestep"], latent, noise.astype(dtype),
                                                  hidden[0].astype(dtype)))
    return header
