"""Model sources: the embedded default is a diffusers folder loaded like a user's; clear errors otherwise."""

import json

import pytest
import torch
from click.testing import CliRunner

from hollow_export.cli import main
from hollow_export.models.load import ModelError, load_pipeline, load_unet, materialize


def test_tiny_default_is_a_diffusers_folder_loaded_like_a_users(tmp_path):
    folder = materialize("tiny")
    index = json.loads((folder / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))  # no pickle
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    mine = load_pipeline(model=str(folder))
    for (n, a), (_, b) in zip(ref.unet.state_dict().items(), mine.unet.state_dict().items()):
        assert torch.equal(a, b), n
    ids = mine.tokenizer("a sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0].item() == mine.tokenizer.bos_token_id


def test_meta_unet_has_the_real_parameter_count():
    real, meta = load_unet(arch="tiny"), load_unet(arch="tiny", meta=True)
    assert sum(p.numel() for p in real.parameters()) == sum(p.numel() for p in meta.parameters())


def test_model_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers Stable Diffusion folder"):
        load_unet(model=str(tmp_path))
    with pytest.raises(ModelError, match="either --model PATH or --arch NAME"):
        load_unet(model=str(tmp_path), arch="tiny")
    res = CliRunner().invoke(main, ["plan", "--model", str(tmp_path)])
    assert res.exit_code == 1 and "save_pretrained" in res.output
