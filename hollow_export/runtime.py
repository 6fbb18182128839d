"""The device runtime: collect, train (resumable), export — ONNX Runtime and numpy only, no torch.

In:  a bundle (checked against its manifest), the user's photos, a buffer file, a run folder.
Out: collect -> a buffer file of samples (index, timestep, clean latent, noise, buffered hidden state);
     train   -> ORT checkpoints and `progress.json` in the run folder (resumable at any kill);
     export  -> `lora.safetensors` (LoRA tensors under their full-U-Net names) + `lora.json` (its hash).

This is what the phone runs, with the very engine the phone has, so every bundle is proven to
train end to end here. `android_demo/` is the Kotlin twin and `android_demo/PROTOCOL.md` the
contract in prose: random streams, buffer layout, data order, learning rate, checkpoint policy.

Random numbers come from a counter-based SplitMix64 (`random_u64`), so a Kotlin client can
reproduce every draw, and a resumed run draws exactly what an uninterrupted one would: the data
order of epoch `e` depends only on (seed, e).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bundle as fmt
from . import store
from .errors import HollowError
from .photos import load_photos, photos_digest

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
STREAM_LATENT, STREAM_NOISE, STREAM_TIMESTEP, STREAM_ORDER = 1, 2, 3, 4

BUFFER_MAGIC = b"HLWBUF01"
BUFFER_VERSION = 1
PROGRESS = "progress.json"
LORA_EXPORT = "lora.safetensors"
LORA_RECORD = "lora.json"
LORA_FORMAT = "hollow-export-lora"


class RuntimeFault(HollowError):
    """A buffer, run folder or disk problem on the device (message names the problem and the fix)."""


# ---------------------------------------------------------------- random streams (SplitMix64, counter based)

def _mix(z):
    """SplitMix64 finaliser, on python ints or numpy uint64 arrays (arithmetic mod 2^64)."""
    if isinstance(z, np.ndarray):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def stream_key(seed: int, stream: int, index: int) -> int:
    """Key of one random stream: mix(mix(seed + stream*G) + index*G), all mod 2^64."""
    return _mix((_mix((seed + stream * GOLDEN) & MASK) + index * GOLDEN) & MASK)


def random_u64(key: int, count: int) -> np.ndarray:
    """Values j = 0..count-1 of a stream: mix(key + (j+1)*G)."""
    with np.errstate(over="ignore"):
        j = np.arange(1, count + 1, dtype=np.uint64)
        return _mix(np.uint64(key) + j * np.uint64(GOLDEN))


def random_uniform(key: int, count: int) -> np.ndarray:
    """Uniform doubles in (0, 1): ((u >> 11) + 0.5) * 2^-53."""
    return ((random_u64(key, count) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def random_normal(key: int, count: int) -> np.ndarray:
    """Standard normals (Box-Muller on consecutive uniform pairs), as float32."""
    u = random_uniform(key, 2 * ((count + 1) // 2)).reshape(-1, 2)
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    z = np.stack([r * np.cos(2 * np.pi * u[:, 1]), r * np.sin(2 * np.pi * u[:, 1])], axis=1).reshape(-1)
    return z[:count].astype(np.float32)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, count: int) -> list[int]:
    """Sample order of one epoch: Fisher-Yates, position i swaps with u_(n-1-i) mod (i+1)."""
    order = list(range(count))
    draws = random_u64(stream_key(seed, STREAM_ORDER, epoch), max(count - 1, 0))
    for step, i in enumerate(range(count - 1, 0, -1)):
        j = int(draws[step] % np.uint64(i + 1))
        order[i], order[j] = order[j], order[i]
    return order


# ---------------------------------------------------------------- buffer file

@dataclass
class BufferHeader:
    bundle: str  # sha256 of the bundle's manifest.json
    photos: str  # digest of the photo files
    capacity: int
    seed: int
    dtype: str  # float32 | float16 (noise and hidden; latents stay float32)
    latent_shape: list[int]
    hidden_shape: list[int]

    @property
    def record_bytes(self) -> int:
        item = np.dtype(self.dtype).itemsize
        latent, hidden = int(np.prod(self.latent_shape)), int(np.prod(self.hidden_shape))
        return 4 + 4 + 4 * latent + item * latent + item * hidden + 4

    def to_bytes(self) -> bytes:
        body = json.dumps({"format_version": BUFFER_VERSION, **self.__dict__, "record_bytes": self.record_bytes},
                          sort_keys=True).encode()
        return BUFFER_MAGIC + struct.pack("<I", len(body)) + body


def encode_record(header: BufferHeader, index: int, timestep: int, latent, noise, hidden) -> bytes:
    """One record: u32 index, i32 timestep, f32 latent, noise, hidden (header dtype), u32 crc32."""
    body = (struct.pack("<Ii", index, timestep) + np.ascontiguousarray(latent, "<f4").tobytes()
            + np.ascontiguousarray(noise, np.dtype(header.dtype).newbyteorder("<")).tobytes()
            + np.ascontiguousarray(hidden, np.dtype(header.dtype).newbyteorder("<")).tobytes())
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record(header: BufferHeader, raw: bytes, where: str) -> dict:
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    if zlib.crc32(body) != crc:
        raise RuntimeFault(f"{where} is corrupted (checksum mismatch); delete the buffer and run "
                           "`hollow-export device collect` again")
    index, timestep = struct.unpack("<Ii", body[:8])
    n_lat, n_hid = int(np.prod(header.latent_shape)), int(np.prod(header.hidden_shape))
    item = np.dtype(header.dtype).itemsize
    dt = np.dtype(header.dtype).newbyteorder("<")
    off = 8
    latent = np.frombuffer(body, "<f4", n_lat, off).reshape(header.latent_shape)
    off += 4 * n_lat
    noise = np.frombuffer(body, dt, n_lat, off).reshape(header.latent_shape).astype(np.float32)
    off += item * n_lat
    hidden = np.frombuffer(body, dt, n_hid, off).reshape(header.hidden_shape).astype(np.float32)
    return {"index": index, "timestep": timestep, "latent": latent, "noise": noise, "hidden": hidden}


def read_header(path: Path) -> tuple[BufferHeader, int]:
    """(header, byte offset of the first record); refuses files that are not buffers."""
    path = Path(path)
    if not path.exists():
        raise RuntimeFault(f"buffer {path} does not exist; run `hollow-export device collect` first")
    with open(path, "rb") as f:
        head = f.read(len(BUFFER_MAGIC) + 4)
        if len(head) < len(BUFFER_MAGIC) + 4 or head[:len(BUFFER_MAGIC)] != BUFFER_MAGIC:
            raise RuntimeFault(f"{path} is not a hollow-export buffer (bad magic); pass the file that "
                               "`device collect` wrote")
        (size,) = struct.unpack("<I", head[len(BUFFER_MAGIC):])
        try:
            data = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RuntimeFault(f"{path} has a damaged header; delete it and collect again") from err
    if data.get("format_version") != BUFFER_VERSION:
        raise RuntimeFault(f"{path} is buffer format v{data.get('format_version')}, this tool reads "
                           f"v{BUFFER_VERSION}; collect again")
    try:
        header = BufferHeader(**{k: data[k] for k in BufferHeader.__dataclass_fields__})
    except KeyError as err:
        raise RuntimeFault(f"{path} has a header without {err}; delete it and collect again") from err
    if data.get("record_bytes") != header.record_bytes:
        raise RuntimeFault(f"{path} declares {data.get('record_bytes')}-byte records, its shapes make "
                           f"{header.record_bytes}; delete it and collect again")
    return header, len(BUFFER_MAGIC) + 4 + size


class BufferReader:
    """Random access to complete, checksummed records, never holding the whole buffer in memory."""

    def __init__(self, path: Path, bundle_id: str):
        self.path = Path(path)
        self.header, self.start = read_header(self.path)
        if self.header.bundle != bundle_id:
            raise RuntimeFault(f"{self.path} was collected for another bundle; collect again with this bundle "
                               "(`hollow-export device collect --bundle ...`)")
        complete = (self.path.stat().st_size - self.start) // self.header.record_bytes
        if complete < self.header.capacity:
            raise RuntimeFault(f"{self.path} holds {complete} of {self.header.capacity} samples (truncated or "
                               "unfinished); run `hollow-export device collect` again to finish it")
        self.file = open(self.path, "rb")
        for i in range(self.header.capacity):  # one streaming pass: a damaged buffer fails now, not at 3 a.m.
            self[i]

    def __len__(self):
        return self.header.capacity

    def __getitem__(self, i: int) -> dict:
        self.file.seek(self.start + i * self.header.record_bytes)
        raw = self.file.read(self.header.record_bytes)
        record = decode_record(self.header, raw, f"{self.path} sample {i}")
        if record["index"] != i:
            raise RuntimeFault(f"{self.path} sample {i} is out of place; delete the buffer and collect again")
        return record

    def close(self):
        self.file.close()


# ---------------------------------------------------------------- sessions

def training_api():
    """`onnxruntime.training.api` (CheckpointState, Module, Optimizer) without importing torch.

    The `onnxruntime.training` package __init__ imports its PyTorch front-ends (ORTModule, amp,
    optim), though the on-device API is plain C++ bindings. A phone has no torch, so neither does
    this runtime: the package is entered through a bare module holding only its path.
    """
    import importlib
    import sys
    import types

    import onnxruntime

    if "onnxruntime.training" not in sys.modules:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
        sys.modules["onnxruntime.training"] = package
    onnxruntime.set_default_logger_severity(3)  # session creation warns about every unused constant
    return importlib.import_module("onnxruntime.training.api")


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bundle_id(folder: Path) -> str:
    return store.sha256(Path(folder) / fmt.MANIFEST)


def _prompts(folder: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(Path(folder) / fmt.PROMPTS))


def _alphas_cumprod(folder: Path) -> np.ndarray:
    from safetensors.numpy import load_file
    return load_file(str(Path(folder) / fmt.SCHEDULE))["alphas_cumprod"].astype(np.float32)


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


# ---------------------------------------------------------------- collect

def collect(bundle_dir: Path, images: Path, buffer_path: Path, samples: int, seed: int = 0,
            dtype: str = "float32", progress: bool = True) -> BufferHeader:
    """Append samples to the buffer until it holds `samples`; resumes a partly written buffer."""
    from tqdm import tqdm

    manifest = fmt.open_bundle(bundle_dir)
    if dtype not in ("float32", "float16"):
        raise RuntimeFault(f"--dtype must be float32 or float16 (got {dtype})")
    if samples < 1:
        raise RuntimeFault(f"--samples must be at least 1 (got {samples})")
    plan = manifest["plan"]
    header = BufferHeader(bundle=bundle_id(bundle_dir), photos=photos_digest(images), capacity=samples, seed=seed,
                          dtype=dtype, latent_shape=plan["latent_shape"], hidden_shape=plan["buffer_shape"])
    photos = load_photos(images, manifest["hyper"]["resolution"])
    buffer_path = Path(buffer_path)
    done = _open_for_append(buffer_path, header)

    vae = _session(Path(bundle_dir) / fmt.VAE_ENCODER)
    precompute = _session(Path(bundle_dir) / fmt.PRECOMPUTE)
    klass = _prompts(bundle_dir)["class"]
    acp = _alphas_cumprod(bundle_dir)
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
            _append(f, buffer_path, encode_record(header, i, record["timestep"], latent, noise.astype(dtype),
                                                  hidden[0].astype(dtype)))
    return header


def _open_for_append(path: Path, header: BufferHeader) -> int:
    """Create the buffer or check an existing one matches; drop a torn last record. Returns samples done."""
    if not path.exists() or path.stat().st_size == 0:
        with store.atomic_path(path) as tmp:
            tmp.write_bytes(header.to_bytes())
        return 0
    old, start = read_header(path)
    if old != header:
        what = [k for k in header.__dict__ if getattr(old, k) != getattr(header, k)]
        raise RuntimeFault(f"{path} was collected with other settings ({', '.join(what)} differ); pass a new "
                           "--buffer path or delete this one")
    size = path.stat().st_size
    done = min((size - start) // header.record_bytes, header.capacity)
    if start + done * header.record_bytes != size:
        os.truncate(path, start + done * header.record_bytes)  # a record torn by a kill
    return done


def _append(f, path: Path, record: bytes) -> None:
    try:
        f.write(record)
        f.flush()
        os.fsync(f.fileno())
    except OSError as err:
        raise RuntimeFault(f"cannot write {path} ({err.strerror}); free disk space and run collect again: "
                           "finished samples are kept") from err


# ---------------------------------------------------------------- train

@dataclass
class TrainConfig:
    steps: int
    checkpoint_every: int = 50
    max_minutes: float | None = None
    lr: float | None = None  # None: the bundle's
    progress: bool = True


def _checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def read_progress(run: Path) -> dict | None:
    path = Path(run) / PROGRESS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RuntimeFault(f"{path} is damaged; delete the run folder to start over") from err


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _save(state, run: Path, step: int, progress: dict) -> None:
    """Checkpoint (with optimizer state) then progress.json; keep the last two checkpoints.

    ORT writes weights over 2 GB to `<checkpoint>.data` and finds them by that name on load, so the
    checkpoint is written under its final name in a scratch folder, then moved in (data file first).
    `progress.json`, replaced atomically last, is what makes the new checkpoint the current one.
    """
    name = _checkpoint_name(step)
    scratch = run / f".saving-{name}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.mkdir()
        training_api().CheckpointState.save_checkpoint(state, str(scratch / name), include_optimizer_state=True)
        data = scratch / (name + ".data")
        for f in (data, scratch / name):
            if f.exists():
                _fsync(f)
                os.replace(f, run / f.name)
        progress = dict(progress, step=step, checkpoint=name, sha256=store.sha256(run / name),
                        data_sha256=store.sha256(run / data.name) if (run / data.name).exists() else None)
        store.write_json(run / PROGRESS, progress)
    except (OSError, RuntimeError) as err:  # the previous checkpoint and progress.json stay as they were
        raise RuntimeFault(f"cannot save a checkpoint in {run} ({err}); free disk space and run train again: "
                           "it resumes from the last saved checkpoint") from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    keep = {n for c in (name, progress.get("previous")) if c for n in (c, c + ".data")}
    for old in run.glob("checkpoint-*"):
        if old.name not in keep:
            old.unlink()


def train(bundle_dir: Path, buffer_path: Path, run: Path, config: TrainConfig) -> dict:
    """Train LoRA over the buffer; resumes from `run`'s last checkpoint; returns the progress record."""
    from tqdm import tqdm

    api = training_api()
    started = time.time()
    bundle_dir, run = Path(bundle_dir), Path(run)
    manifest = fmt.open_bundle(bundle_dir)
    identity = bundle_id(bundle_dir)
    buffer = BufferReader(buffer_path, identity)
    hyper = manifest["hyper"]
    run.mkdir(parents=True, exist_ok=True)
    progress = read_progress(run)
    if progress is None:
        progress = {"bundle": identity, "buffer_seed": buffer.header.seed, "seed": hyper["seed"], "losses": [],
                    "step": 0, "checkpoint": None, "previous": None}
        state = api.CheckpointState.load_checkpoint(str(bundle_dir / fmt.CHECKPOINT))
    else:
        if progress["bundle"] != identity:
            raise RuntimeFault(f"{run} belongs to another bundle; pass a new --run folder")
        path = run / progress["checkpoint"]
        data = path.with_name(path.name + ".data")
        if not path.exists() or store.sha256(path) != progress["sha256"] or (
                progress.get("data_sha256") and (not data.exists() or store.sha256(data) != progress["data_sha256"])):
            raise RuntimeFault(f"checkpoint {path} is missing or fails its hash; delete {run} to start over")
        state = api.CheckpointState.load_checkpoint(str(path))
    module = api.Module(str(bundle_dir / fmt.TRAINING_MODEL), state, str(bundle_dir / fmt.EVAL_MODEL))
    optimizer = api.Optimizer(str(bundle_dir / fmt.OPTIMIZER_MODEL), module)
    lr = config.lr if config.lr is not None else hyper["lr"]
    optimizer.set_learning_rate(lr)
    module.train()

    instance = _prompts(bundle_dir)["instance"]
    acp = _alphas_cumprod(bundle_dir)
    step = progress["step"]
    batch = hyper.get("batch_size", 1)
    bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", disable=not config.progress)
    while step < config.steps:
        inputs = _batch(buffer, acp, instance, progress["seed"], step, batch, hyper["prediction_type"])
        loss = float(module(*inputs))
        optimizer.step()
        module.lazy_reset_grad()
        step += 1
        progress["losses"].append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        out_of_time = config.max_minutes is not None and time.time() - started > 60 * config.max_minutes
        if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
            progress["previous"] = progress.get("checkpoint")
            _save(state, run, step, progress)  # every exit from this loop passes here first
            progress = read_progress(run)
        if out_of_time:
            break
    bar.close()
    buffer.close()
    progress["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    progress["finished"] = step >= config.steps
    return progress


def _batch(buffer: BufferReader, acp, instance, seed: int, step: int, batch: int, prediction_type: str) -> list:
    """Inputs of training step `step` (0-based): samples at positions step*batch.. of the epoch orders."""
    n = len(buffer)
    samples, targets, timesteps, hiddens = [], [], [], []
    for k in range(batch):
        position = step * batch + k
        epoch, offset = divmod(position, n)
        record = buffer[epoch_order(seed, epoch, n)[offset]]
        noisy, target = noisy_and_target(acp, record, prediction_type)
        samples.append(noisy)
        targets.append(target)
        timesteps.append(record["timestep"])
        hiddens.append(record["hidden"])
    return [np.stack(samples), np.array(timesteps, dtype=np.int64), np.repeat(instance, batch, axis=0),
            np.stack(hiddens), np.stack(targets)]


# ---------------------------------------------------------------- export

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

    manifest = fmt.open_bundle(bundle_dir)
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
    metadata = {"format": LORA_FORMAT, "format_version": "1", "bundle": bundle_id(bundle_dir),
                "rank": str(manifest["hyper"]["rank"]), "alpha": str(manifest["hyper"]["alpha"])}
    out = Path(out)
    with store.atomic_path(out / LORA_EXPORT) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    record = {**metadata, "file": LORA_EXPORT, "sha256": store.sha256(out / LORA_EXPORT),
              "tensors": len(tensors), "checkpoint": checkpoint.name}
    store.write_json(out / LORA_RECORD, record)
    return record
