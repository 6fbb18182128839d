"""An offline judge for the toy world: the stand-in for DINO / CLIP-I / CLIP-T where none can be downloaded.

In:  images (uint8 [N, 128, 128, 3] or a list of them) and, for prompt fidelity, their prompts.
Out: (a) embeddings for subject fidelity: `object` (the DINO analogue: trained only to tell class,
     colour and pattern apart, so it looks at the object) and `image` (the CLIP-I analogue: the whole
     picture's pooled features, background included); the score is the mean cosine between generated
     images and reference photos. (b) read-outs for prompt fidelity (the CLIP-T analogue): the judge's
     probability of the class and context that the prompt names.

A small CNN trained ONLY on renders of `world` (all combinations, held-out ones included, since the judge
must recognise subjects), never on generated images. Weights: `models/toy-judge/judge.safetensors` with
its config and SHA256SUMS; `train()` rebuilds them (`python -m hollow_export.toy.judge`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..models.registry import MODELS_DIR
from . import world

JUDGE_DIR = MODELS_DIR / "toy-judge"  # the repository's models/, or the copy a regular install ships
HEADS = {"cls": world.CLASSES, "colour": world.COLOUR_NAMES, "pattern": world.PATTERNS, "context": world.CONTEXTS}
INPUT = 64  # the judge looks at 64 px: enough for class, colour, pattern and context
EMBED = 64


class JudgeNet(nn.Module):
    """Conv trunk -> pooled image features; an object embedding -> class/colour/pattern; context from the trunk."""

    def __init__(self, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 3 * width, 4 * width]
        layers = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            if i > 0:  # one conv at full resolution keeps the judge cheap on a CPU
                layers += [nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            layers += [nn.MaxPool2d(2)]
        self.trunk = nn.Sequential(*layers)  # 64 -> 4 px
        feat = chans[-1] * 2  # mean- and max-pooled
        self.object = nn.Sequential(nn.Linear(feat, 128), nn.ReLU(), nn.Linear(128, EMBED))
        self.heads = nn.ModuleDict({
            "cls": nn.Linear(EMBED, len(world.CLASSES)),
            "colour": nn.Linear(EMBED, len(world.COLOUR_NAMES)),
            "pattern": nn.Linear(EMBED, len(world.PATTERNS)),
            "context": nn.Linear(feat, len(world.CONTEXTS)),
        })

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        image = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return image, self.object(image)

    def forward(self, x: torch.Tensor) -> dict:
        image, obj = self.features(x)
        out = {k: self.heads[k](obj) for k in ("cls", "colour", "pattern")}
        out["context"] = self.heads["context"](image)
        return out


def to_input(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or a list, or float in [0, 1]) -> float [N, 3, 64, 64] normalised to [-1, 1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(i) for i in images])
    x = torch.as_tensor(np.asarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x.permute(0, 3, 1, 2)
    if x.shape[-1] != INPUT:
        x = F.interpolate(x, size=(INPUT, INPUT), mode="area")
    return x * 2 - 1


# ------------------------------------------------------------------------------------------------ data

def sample_any_scene(seed: int, split: str) -> world.Scene:
    """A scene over ALL combinations (held-out ones too), all attributes said: the judge's training stream."""
    rng = world._rng("judge", split, int(seed))
    return world.Scene(
        cls=world.CLASSES[int(rng.integers(len(world.CLASSES)))],
        colour=world.COLOUR_NAMES[int(rng.integers(len(world.COLOUR_NAMES)))],
        pattern=world.PATTERNS[int(rng.integers(len(world.PATTERNS)))],
        context=world.CONTEXTS[int(rng.integers(len(world.CONTEXTS)))],
        pattern_angle=float(rng.uniform(-60, 60)),
        pattern_scale=float(rng.uniform(0.35, 0.6)),
        **world._pose(rng),
    )


def labelled(start: int, n: int, split: str) -> tuple[np.ndarray, dict]:
    scenes = [sample_any_scene(s, split) for s in range(start, start + n)]
    images = np.stack([world.render(s) for s in scenes])
    labels = {k: np.array([names.index(getattr(s, k)) for s in scenes]) for k, names in HEADS.items()}
    return images, labels


# ------------------------------------------------------------------------------------------------ use

class Judge:
    """The trained judge (CPU, eval mode). Load with `Judge.load()`."""

    def __init__(self, net: JudgeNet, config: dict):
        self.net = net.eval()
        self.config = config

    @classmethod
    def load(cls, folder: Path = JUDGE_DIR, check_hash: bool = True) -> "Judge":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        weights = folder / "judge.safetensors"
        if check_hash:
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            if digest != config["sha256"]:
                raise ValueError(f"{weights} has sha256 {digest}, config.json says {config['sha256']}; "
                                 "rebuild it with `python -m hollow_export.toy.judge`")
        net = JudgeNet(config["width"])
        net.load_state_dict(load_file(weights))
        return cls(net, config)

    @torch.no_grad()
    def _run(self, images, batch: int = 256):
        x = to_input(images)
        outs = []
        for i in range(0, len(x), batch):
            image, obj = self.net.features(x[i:i + batch])
            logits = {k: self.net.heads[k](obj) for k in ("cls", "colour", "pattern")}
            logits["context"] = self.net.heads["context"](image)
            outs.append((image, obj, logits))
        image = torch.cat([o[0] for o in outs])
        obj = torch.cat([o[1] for o in outs])
        probs = {k: torch.cat([o[2][k] for o in outs]).softmax(-1) for k in HEADS}
        return image, obj, probs

    def embed(self, images, kind: str = "object") -> np.ndarray:
        """L2-normalised embeddings: `object` (DINO analogue) or `image` (CLIP-I analogue)."""
        image, obj, _ = self._run(images)
        e = obj if kind == "object" else image
        return F.normalize(e, dim=-1).numpy()

    def predict(self, images) -> list[dict]:
        """Most likely class, colour, pattern and context of each image."""
        _, _, probs = self._run(images)
        idx = {k: p.argmax(-1).tolist() for k, p in probs.items()}
        return [{k: HEADS[k][idx[k][i]] for k in HEADS} for i in range(len(idx["cls"]))]

    def probabilities(self, images) -> dict:
        """{head: float [N, classes]}."""
        return {k: v.numpy() for k, v in self._run(images)[2].items()}

    def subject_similarity(self, generated, references, kind: str = "object") -> float:
        """Mean cosine between every generated image and every reference photo (DINO/CLIP-I analogue)."""
        g, r = self.embed(generated, kind), self.embed(references, kind)
        return float((g @ r.T).mean())

    def prompt_fidelity(self, images, prompts) -> dict:
        """CLIP-T analogue: mean probability of what each prompt names (class and context; colour and
        pattern too when named). Returns the overall mean and the per-attribute means."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        probs = self.probabilities(images)
        per = {k: [] for k in HEADS}
        scores = []
        for i, prompt in enumerate(prompts):
            want = world.parse_prompt(prompt)
            got = [float(probs[k][i, HEADS[k].index(want[k])]) for k in ("cls", "context") if want[k]]
            for k in HEADS:
                if want[k]:
                    per[k].append(float(probs[k][i, HEADS[k].index(want[k])]))
            scores.append(float(np.mean(got)) if got else float("nan"))
        return {"score": float(np.nanmean(scores)), **{k: float(np.mean(v)) for k, v in per.items() if v}}


def accuracy(judge: Judge, n: int = 1000, split: str = "test", start: int = 0) -> dict:
    """Per-head accuracy on fresh renders (a stream the judge never trained on)."""
    images, labels = labelled(start, n, split)
    probs = judge.probabilities(images)
    return {k: float((probs[k].argmax(-1) == labels[k]).mean()) for k in HEADS}


# ------------------------------------------------------------------------------------------------ training

def train(folder: Path = JUDGE_DIR, images: int = 6000, steps: int = 4000, batch: int = 32, seed: int = 0,
          width: int = 24, lr: float = 3e-3, max_minutes: float = 60.0, log=print) -> dict:
    """Train on renders only (split "train"), test on fresh renders (split "test"); save safetensors + hash."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    t0 = time.time()
    x_all, y_all = [], {k: [] for k in HEADS}
    for start in range(0, images, 500):
        x, y = labelled(start, min(500, images - start), "train")
        x_all.append(to_input(x))
        for k in HEADS:
            y_all[k].append(torch.as_tensor(y[k]))
        log(f"judge: rendered {start + len(x)}/{images} ({time.time() - t0:.0f}s)")
    x_all = torch.cat(x_all)
    y_all = {k: torch.cat(v) for k, v in y_all.items()}
    net = JudgeNet(width).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        # By steps, or by the wall-clock budget on a busy shared CPU (the schedule completes either way).
        frac = max(step / steps, (time.time() - start) / (60 * max_minutes))
        if frac >= 1.0:
            log(f"judge: stopped by max_minutes={max_minutes} at step {step} of {steps}")
            steps = step
            break
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * frac))
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = x_all[idx]
        flip = torch.rand(batch, generator=g) < 0.5  # mirror images keep every label
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y_all[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"judge: step {step + 1}/{steps} loss {float(loss):.3f} ({time.time() - t0:.0f}s)")
    net.eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "judge.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    config = {"width": width, "input": INPUT, "embed": EMBED, "heads": {k: list(v) for k, v in HEADS.items()},
              "trained_on": f"{images} renders of world split 'train' (all combinations), never generated images",
              "steps_done": steps, "max_minutes": max_minutes, "batch": batch, "seed": seed, "lr": lr, "sha256": digest}
    judge = Judge(net, config)
    acc = accuracy(judge, n=1000, split="test")
    sub = subject_accuracy(judge)
    config["accuracy_fresh_renders_1000"] = acc
    config["accuracy_subject_photos"] = sub
    config["train_seconds"] = round(time.time() - t0, 1)
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (folder / "SHA256SUMS").write_text(f"{digest}  judge.safetensors\n")
    log(f"judge: accuracy on 1000 fresh renders {acc}; subject photos {sub}")
    return config


def subject_accuracy(judge: Judge, seeds=range(20), n: int = 5) -> dict:
    """Accuracy on the reference photos of subjects (held-out combinations) 0..19."""
    hits = {k: [] for k in HEADS}
    for seed in seeds:
        scenes = world.subject_scenes(seed, n)
        for scene, pred in zip(scenes, judge.predict([world.render(s) for s in scenes])):
            for k in HEADS:
                hits[k].append(pred[k] == getattr(scene, k))
    return {k: float(np.mean(v)) for k, v in hits.items()}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Train the toy-world judge on renders and save it.")
    p.add_argument("--out", type=Path, default=JUDGE_DIR)
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=60.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    def log_line(message: str) -> None:
        print(message, flush=True)

    train(a.out, images=a.images, steps=a.steps, max_minutes=a.max_minutes, log=log_line)
