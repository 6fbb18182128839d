"""The host trainer lowers the loss on a fixed batch for both methods; generate writes images."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from hollow_export.cli import main
from hollow_export.demo import subject_photos

FAST = ["--arch", "tiny", "--rank", "4", "--steps", "40", "--samples", "8", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    subject_photos(folder, 3, size=160)
    return folder


@pytest.mark.parametrize("method", ["hollowed", "lora"])
def test_personalize_lowers_fixed_batch_loss_and_generates(tmp_path, photos, method):
    out = tmp_path / method
    res = CliRunner().invoke(main, ["personalize", *FAST, "--images", str(photos), "--instance-prompt", "a sks ball",
                                    "--class-prompt", "a ball", "--method", method, "--out", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "record.json").read_text())
    assert record["fixed_batch_loss_after"] < 0.9 * record["fixed_batch_loss_before"]
    assert record["peak_memory_bytes"] > 0 and (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "buffer.safetensors").exists() == (method == "hollowed")
    for path in ("dual", "single"):
        image = tmp_path / f"{method}_{path}.png"
        res = CliRunner().invoke(main, ["generate", "--lora", str(out), "--prompt", "a sks ball", "--inference", path,
                                        "--steps", "2", "--out", str(image)])
        assert res.exit_code == 0, res.output
        assert Image.open(image).size == (128, 128)


def test_bad_photos_are_refused_with_the_fix(tmp_path, photos):
    import shutil
    (tmp_path / "empty").mkdir()
    shutil.copytree(photos, tmp_path / "bad")
    (tmp_path / "bad" / "cat.png").write_text("not an image")
    base = ["personalize", *FAST, "--instance-prompt", "a sks ball", "--class-prompt", "a ball"]
    res = CliRunner().invoke(main, [*base, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")])
    assert res.exit_code != 0 and "add 3-10 photos" in res.output
    res = CliRunner().invoke(main, [*base, "--images", str(tmp_path / "bad"), "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and "cat.png is not a readable image" in res.output
    assert not (tmp_path / "o2" / "record.json").exists()
