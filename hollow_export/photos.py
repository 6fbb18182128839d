"""The user's photos as arrays, for the host trainer and the device runtime alike (numpy + PIL, no torch).

In:  a folder of photos and the training resolution; photos straight off a phone are fine (200 MP
     JPEGs are decoded at reduced size by the DCT, EXIF orientation is applied, 16-bit grayscale
     is scaled to 8 bits).
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


# Decoding limits. PIL refuses images over 2 * Image.MAX_IMAGE_PIXELS (179 MP) as "decompression bombs";
# phone cameras take 200 MP photos. A JPEG this large is decoded at reduced size by the DCT (draft mode),
# never at full size; other formats are decoded in full up to MAX_PIXELS.
MAX_PIXELS = 400_000_000
DRAFT_ABOVE = 50_000_000  # below this, photos decode at full size (identical to the Android client's decode)
WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL modes of 16-bit grayscale sources


def _open_unlimited(path: Path):
    """Image.open without PIL's decompression-bomb check (the size is checked by `load_photo`)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _to_rgb(img):
    """8-bit RGB of any PIL mode; 16-bit grayscale is scaled 65535 -> 255, not clipped to white."""
    from PIL import Image

    if img.mode in WIDE_GRAY:
        wide = np.asarray(img, dtype=np.float64)  # I;16* -> uint16 values, I -> int32 values of a 16-bit source
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def _decode(path: Path, resolution: int):
    """The photo as displayed (EXIF orientation applied), 8-bit RGB; huge JPEGs decoded at reduced size,
    never below `resolution` on the short side."""
    from PIL import ImageOps

    with _open_unlimited(path) as img:
        pixels = img.width * img.height
        if pixels > DRAFT_ABOVE and img.format == "JPEG":
            # the DCT decodes at 1/2, 1/4 or 1/8 size, keeping at least `resolution` on the short side
            scale = max(1, min(img.size) // resolution)
            img.draft("RGB", (img.width // scale, img.height // scale))
        elif pixels > MAX_PIXELS:
            raise PhotoError(f"{path} has {pixels / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f} MP "
                             "this tool decodes; save it as JPEG or downscale it")
        img = ImageOps.exif_transpose(img)  # portrait photos are stored sideways with an orientation tag
        return _to_rgb(img)


def load_photo(path: Path, resolution: int):
    """One photo as an 8-bit RGB PIL image, EXIF orientation applied, centre-cropped and resized to `resolution`."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = _decode(path, resolution)
    except PhotoError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise PhotoError(f"{path} is not a readable image ({err}); remove it or replace it") from err
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)


def load_photos(folder: Path, resolution: int, minimum: int = MIN_PHOTOS) -> np.ndarray:
    """Every photo in `folder` as float32 [N, 3, R, R] in [-1, 1]."""
    out = []
    for path in photo_files(folder, minimum):
        img = load_photo(path, resolution)
        out.append((np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1))
    return np.stack(out)


def photos_digest(folder: Path, minimum: int = MIN_PHOTOS) -> str:
    h = hashlib.sha256()
    for path in photo_files(folder, minimum):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
