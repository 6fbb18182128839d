"""Training on the device: LoRA over the buffer with ORT's training API, resumable at any kill.

In:  a bundle, a buffer file, a run folder and a `TrainConfig` (steps, checkpoint interval,
     time limit, learning-rate override).
Out: ORT checkpoints (the last two kept) and `progress.json` in the run folder, and the progress
     record (losses, step, peak RSS, the buffer's identity, the step each process began at). A resume
     checks the bundle, the buffer and the checkpoint's hash; a non-finite loss or LoRA stops training
     with the last good checkpoint kept. Data order: `rng.epoch_order`; checkpoint policy:
     android_demo/PROTOCOL.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import store
from ..bundle import CHECKPOINT, Bundle
from ..rss import peak_rss_bytes
from .buffer import BufferReader
from .collect import noisy_and_target
from .errors import RuntimeFault
from .ort_session import training_api, training_module
from .rng import epoch_order

PROGRESS = "progress.json"


@dataclass
class TrainConfig:
    steps: int | None = None  # None: the bundle's
    checkpoint_every: int = 50
    max_minutes: float | None = None
    lr: float | None = None  # None: the bundle's
    progress: bool = True

    def __post_init__(self):
        """The library's own check of the numbers (the CLI's option ranges are the first line)."""
        if self.steps is not None and self.steps < 1:
            raise RuntimeFault(f"steps must be at least 1 (got {self.steps})")
        if self.checkpoint_every < 1:
            raise RuntimeFault(f"checkpoint_every must be at least 1 (got {self.checkpoint_every})")
        if self.max_minutes is not None and not self.max_minutes >= 0:
            raise RuntimeFault(f"max_minutes must be 0 or more (got {self.max_minutes})")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise RuntimeFault(f"the learning rate must be a finite number above 0 (got {self.lr})")


def buffer_identity(header) -> dict:
    """What names a buffer's content: a run trains on one buffer, and refuses another on resume."""
    return {"bundle": header.bundle, "photos": header.photos, "seed": header.seed, "capacity": header.capacity,
            "dtype": header.dtype}


def check_buffer(run: Path, progress: dict, header) -> None:
    """Refuse to resume `run` over a buffer other than the one it started on."""
    recorded = progress.get("buffer")
    if recorded is None:  # a run folder written before runs recorded their buffer (or by the Kotlin core)
        recorded = {"seed": progress["buffer_seed"]} if "buffer_seed" in progress else {}
    differ = [k for k, v in recorded.items() if buffer_identity(header).get(k) != v]
    if differ:
        raise RuntimeFault(f"{run} was trained on another buffer ({', '.join(differ)} differ); pass the buffer "
                           "it started with, or a new --run folder to train on this one")


def verified_checkpoint(run: Path, progress: dict) -> Path:
    """The run's current checkpoint, after checking it (and its .data file) against progress.json's hashes."""
    if not progress.get("checkpoint"):
        raise RuntimeFault(f"{run} holds no finished checkpoint; run `hollow-export device train` first")
    path = Path(run) / progress["checkpoint"]
    data = path.with_name(path.name + ".data")
    if not path.exists() or store.sha256(path) != progress["sha256"] or (
            progress.get("data_sha256") and (not data.exists() or store.sha256(data) != progress["data_sha256"])):
        raise RuntimeFault(f"checkpoint {path} is missing or fails its hash; delete {run} to start over")
    return path


def non_finite(state, names) -> str | None:
    """The first of the named (LoRA) parameters holding a NaN or an infinity, or None."""
    for name in names:
        if not np.isfinite(state.parameters[name].data).all():
            return name
    return None


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


def open_sessions(bundle: Bundle, state, lr: float):
    """(Module, Optimizer) over checkpoint `state`, with the bundle's training session, in training mode at `lr`.

    `train` closes them before every checkpoint save and opens them again after it: ORT serialises the
    LoRA and AdamW state into one buffer (0.42 GB at sd21 r=128), and with the sessions open it lands on
    top of everything they hold, their arena's freed activation blocks and the mapped frozen weights
    included. sd21 512 px: steps peak at 3.32 GB and the save at 3.74 GB with the sessions open, 1.61 GB
    closed (fp16 bundle: 2.34 and 2.75 GB). `state` keeps the parameters and both moments with the step
    count, so training goes on exactly as from a checkpoint on disk; reopening costs about 2 s per save.
    """
    module, optimizer = training_module(bundle.folder, state, bundle.training_session)  # no eval session
    optimizer.set_learning_rate(lr)
    module.train()
    return module, optimizer


def train(bundle_dir: Path, buffer_path: Path, run: Path, config: TrainConfig) -> dict:
    """Train LoRA over the buffer; resumes from `run`'s last checkpoint; returns the progress record."""
    from tqdm import tqdm

    api = training_api()
    started = time.time()
    bundle_dir, run = Path(bundle_dir), Path(run)
    bundle = Bundle.from_pretrained(bundle_dir)
    identity = bundle.id
    buffer = BufferReader(buffer_path, identity)
    hyper = bundle.hyper
    config = replace(config, steps=hyper["steps"] if config.steps is None else config.steps)
    run.mkdir(parents=True, exist_ok=True)
    progress = read_progress(run)
    if progress is None:
        progress = {"bundle": identity, "buffer_seed": buffer.header.seed, "buffer": buffer_identity(buffer.header),
                    "seed": hyper["seed"], "losses": [], "step": 0, "checkpoint": None, "previous": None}
        state = api.CheckpointState.load_checkpoint(str(bundle_dir / CHECKPOINT))
    else:
        if progress["bundle"] != identity:
            raise RuntimeFault(f"{run} belongs to another bundle; pass a new --run folder")
        check_buffer(run, progress, buffer.header)
        state = api.CheckpointState.load_checkpoint(str(verified_checkpoint(run, progress)))
    progress["starts"] = progress.get("starts", []) + [progress["step"]]  # where each process began
    lr = config.lr if config.lr is not None else hyper["lr"]
    module, optimizer = open_sessions(bundle, state, lr)

    instance = bundle.prompt_embeddings()["instance"]
    acp = bundle.alphas_cumprod()
    step = progress["step"]
    batch = hyper.get("batch_size", 1)
    bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", disable=not config.progress)
    while step < config.steps:
        inputs = _batch(buffer, acp, instance, progress["seed"], step, batch, hyper["prediction_type"])
        loss = float(module(*inputs))
        if not math.isfinite(loss):
            _stop_non_finite(run, progress, step + 1, f"loss {loss}")
        optimizer.step()
        module.lazy_reset_grad()
        step += 1
        progress["losses"].append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        out_of_time = config.max_minutes is not None and time.time() - started > 60 * config.max_minutes
        if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
            bad = non_finite(state, [item["name"] for item in bundle.manifest["lora"]])
            if bad:  # never save a non-finite state
                _stop_non_finite(run, progress, step, f"{bad} holds NaN or infinity")
            progress["previous"] = progress.get("checkpoint")
            module = optimizer = None  # sessions closed for the save: see open_sessions
            _save(state, run, step, progress)  # every exit from this loop passes here first
            progress = read_progress(run)
            if step < config.steps and not out_of_time:
                module, optimizer = open_sessions(bundle, state, lr)
        if out_of_time:
            break
    bar.close()
    buffer.close()
    progress["peak_rss_bytes"] = peak_rss_bytes()
    progress["finished"] = step >= config.steps
    return progress


def _stop_non_finite(run: Path, progress: dict, step: int, what: str) -> None:
    if progress.get("checkpoint"):
        kept = f"{progress['checkpoint']} (step {progress['step']}) is kept in {run}"
        then = "it resumes from the kept checkpoint"
    else:
        kept, then = f"no checkpoint was saved in {run}", "it starts from step 0"
    raise RuntimeFault(f"training diverged at step {step} ({what}); stopped, {kept}; run again with a smaller "
                       f"--lr ({then})")


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
