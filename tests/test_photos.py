"""Photos straight off a phone: huge JPEGs, EXIF orientation, 16-bit grayscale, files that are not images.

References are built by hand from the pixel arrays written (numpy rotations, 65535 -> 255 scaling) or by
PIL's plain full-size decode, never by hollow_export.photos itself.
"""

import numpy as np
import pytest
from PIL import Image

from hollow_export import photos
from hollow_export.photos import PhotoError, load_photo, load_photos


def _as_unit(arr_uint8):
    return arr_uint8.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)  # landscape as stored by the sensor
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait photo
    for i in range(3):
        Image.fromarray(stored).save(tmp_path / f"p{i}.png", exif=exif.tobytes())
    shown = np.rot90(stored, k=-1)  # 64 high, 32 wide
    expected = _as_unit(np.ascontiguousarray(shown[16:48]))  # centre square, already 32 px: no resize
    out = load_photos(tmp_path, 32)
    np.testing.assert_array_equal(out[0], expected)
    assert not np.array_equal(out[0], _as_unit(stored[:, 16:48]))  # the sideways reading is not what we get


def test_16bit_grayscale_png_scales_to_8bit(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    wide[0, :4] = [0, 257, 32896, 65535]
    Image.fromarray(wide).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode in ("I;16", "I")
    img = load_photo(tmp_path / "g.png", 24)
    gray = np.rint(wide / 257.0).astype(np.uint8)  # 65535 -> 255, by hand
    np.testing.assert_array_equal(np.asarray(img), np.repeat(gray[:, :, None], 3, axis=2))
    assert list(np.asarray(img)[0, :4, 0]) == [0, 1, 128, 255]


def test_huge_jpeg_is_decoded_in_draft_mode_not_refused_as_a_bomb(tmp_path, monkeypatch):
    # A 200 MP photo exceeds PIL's 179 MP limit. Rather than write 600 MB, lower PIL's limit so this
    # 12 MP JPEG trips the same DecompressionBombError, and lower the draft threshold with it.
    w, h = 4000, 3000
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 255 // (w + h))], axis=2).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", w * h // 4)  # bomb error above 2x this: w*h/2 < w*h
    monkeypatch.setattr(photos, "DRAFT_ABOVE", w * h // 4)
    with pytest.raises(Image.DecompressionBombError):  # plain PIL refuses this file now
        Image.open(tmp_path / "big.jpg")
    from PIL import JpegImagePlugin
    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        drafts.append((size, self.size))
        return result
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    img = load_photo(tmp_path / "big.jpg", 256)
    assert img.size == (256, 256)
    assert drafts and drafts[0][1][0] < w  # decoded at reduced size by the DCT
    assert Image.MAX_IMAGE_PIXELS == w * h // 4  # the limit is restored after opening
    # reference: PIL's plain full-size decode (limit lifted), centre crop, bicubic resize
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(tmp_path / "big.jpg") as full:
        ref = full.convert("RGB").crop((500, 0, 3500, 3000)).resize((256, 256), Image.BICUBIC)
    diff = np.abs(np.asarray(img, dtype=np.float32) - np.asarray(ref, dtype=np.float32))
    assert diff.mean() < 2.0 and diff.max() < 24


def test_file_that_is_not_an_image_is_one_clear_error(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"this is a text file, not a photo")
    with pytest.raises(PhotoError, match="broken.jpg is not a readable image"):
        load_photos(tmp_path, 8)
