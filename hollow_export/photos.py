"""The user's photos as arrays, for the host trainer and the device runtime alike (numpy + PIL, no torch).

In:  a folder of photos and the training resolution.
Out: a float32 array [N, 3, R, R] in [-1, 1] (centre-cropped square, bicubic resize), with a digest
     of the photo files so a buffer can tell which photos it was collected from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .errors import HollowError

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_PHOTOS = 3


class PhotoError(HollowError, ValueError):
    """Photos that cannot be used (message names the file and the fix)."""


def photo_files(folder: Path, minimum: int = MIN_PHOTOS) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"--images {folder} is not a folder; pass the folder holding your photos")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if len(files) < minimum:
        raise PhotoError(f"{len(files)} photos ({', '.join(SUFFIXES)}) in {folder}, need at least {minimum}; "
                         "add 3-10 photos of the subject")
    return files


def load_photos(folder: Path, resolution: int, minimum: int = MIN_PHOTOS) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in photo_files(folder, minimum):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise PhotoError(f"{path} is not a readable image ({err}); remove it or replace it") from err
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        out.append((np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1))
    return np.stack(out)


def photos_digest(folder: Path, minimum: int = MIN_PHOTOS) -> str:
    h = hashlib.sha256()
    for path in photo_files(folder, minimum):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
