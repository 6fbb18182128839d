"""Shared fixtures: the embedded tiny pipeline and a mid-size random SD2-style U-Net."""

import os
import tempfile

import pytest
import torch

# Materialised models go to one cache per test session unless the caller set one.
os.environ.setdefault("HOLLOW_EXPORT_CACHE", os.path.join(tempfile.gettempdir(), "hollow-export-test-cache"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MID_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [2, 4, 4, 4],
    "block_out_channels": [32, 64, 64, 96],
    "cross_attention_dim": 48,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "norm_num_groups": 16,
    "sample_size": 16,
    "use_linear_projection": True,
    "upcast_attention": True,
}


@pytest.fixture(scope="session")
def tiny_pipe():
    from hollow_export.models import load_pipeline
    return load_pipeline(arch="tiny")


@pytest.fixture()
def tiny_unet():
    from hollow_export.models import load_unet
    return load_unet(arch="tiny")


@pytest.fixture()
def mid_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(3)
    return UNet2DConditionModel.from_config(MID_UNET).eval()


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, e
