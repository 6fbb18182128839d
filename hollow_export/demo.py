"""Synthetic subject photos for smoke runs on the embedded default (no data can be downloaded here).

In:  a folder and a count (`write_subject_photos` writes the folder atomically), and optionally a
     toy-world subject seed (`write_world_photos`).
Out: PNG photos of one made-up subject (a striped ball on a textured floor)
     from different viewpoints, sizes and lighting: enough for the pipeline
     to have a consistent "instance" to learn, never a stand-in for real data.
     With a subject seed: the toy world's photos of that subject (`toy.world.save_subject_photos`,
     128 px, in its two photo contexts) and `subject_lines`, the prompts to use with them (printed,
     never written beside the photos: a `--images` folder must hold photos only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import store


def write_subject_photos(out: Path, count: int = 5, overwrite: bool = False) -> list[Path]:
    """`hollow-export demo-photos`: the photos written as one folder (whole or not at all; an earlier
    demo-photos folder is replaced only with `overwrite`); returns their final paths."""
    with store.atomic_dir(Path(out), "demo-photos", overwrite) as tmp:
        names = [path.name for path in subject_photos(tmp, count)]
    return [Path(out) / name for name in names]


def write_world_photos(out: Path, seed: int, count: int = 5, overwrite: bool = False) -> list[Path]:
    """`hollow-export demo-photos --subject-seed N`: toy-world subject N's photos as one folder (same
    atomic rules as `write_subject_photos`); returns their final paths."""
    from .toy import world

    with store.atomic_dir(Path(out), "demo-photos", overwrite) as tmp:
        names = [Path(path).name for path in world.save_subject_photos(seed, tmp, count)]
    return [Path(out) / name for name in names]


def subject_lines(seed: int) -> list[str]:
    """What a user needs to personalize toy-world subject `seed`: what it is, its prompts, its contexts."""
    from .toy import world

    sub = world.subject(seed)
    novel = [world.instance_prompt(sub.cls, c) for c in sub.novel_contexts]
    return [f"subject {seed}: {sub.description}",
            f"  instance prompt: {sub.instance_prompt!r}   class prompt: {sub.class_prompt!r}",
            f"  photo contexts: {', '.join(sub.photo_contexts)}",
            f"  novel contexts: {', '.join(sub.novel_contexts)} (never in the photos; test prompts: "
            + "; ".join(repr(p) for p in novel) + ")"]


def subject_photos(out: Path, count: int = 5, size: int = 256, seed: int = 0) -> list[Path]:
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        floor = 0.35 + 0.1 * np.sin(xx * rng.uniform(20, 40)) * np.cos(yy * rng.uniform(20, 40))
        image = np.stack([floor * rng.uniform(0.8, 1.2), floor * 0.9, floor * 0.7], -1)
        cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6), rng.uniform(0.18, 0.3)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        stripes = (np.sin((xx - cx + yy - cy) * 40 + rng.uniform(0, 6)) > 0)[..., None]
        ball = np.where(stripes, [0.9, 0.15, 0.1], [0.95, 0.9, 0.2]) * rng.uniform(0.7, 1.1)
        image = np.where(inside[..., None], ball, image)
        path = out / f"subject_{i:02d}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
