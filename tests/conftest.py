"""Shared fixtures: the embedded tiny pipeline, its BK-SDM-shaped siblings and a small random SD2-style U-Net."""

import os
import tempfile

import pytest
import torch

# Materialised models go to one cache per test session unless the caller set one.
os.environ.setdefault("HOLLOW_EXPORT_CACHE", os.path.join(tempfile.gettempdir(), "hollow-export-test-cache"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SMALL_SD2_UNET = {
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
    from hollow_export.models.load import load_pipeline
    return load_pipeline(arch="tiny")


@pytest.fixture()
def tiny_unet():
    from hollow_export.models.load import load_unet
    return load_unet(arch="tiny")


@pytest.fixture()
def tiny_bk_small_unet():
    """BK-SDM-Small's shape (no mid block, one layer per block) at tiny size."""
    from hollow_export.models.load import load_unet
    return load_unet(arch="tiny-bk-small")


@pytest.fixture()
def tiny_bk_tiny_unet():
    """BK-SDM-Tiny's shape (no mid block, one layer per block, no innermost stage) at tiny size."""
    from hollow_export.models.load import load_unet
    return load_unet(arch="tiny-bk-tiny")


@pytest.fixture()
def small_sd2_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(3)
    return UNet2DConditionModel.from_config(SMALL_SD2_UNET).eval()


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, e


def feed_buffer(unet, plan, hidden):
    """Pre-hook on the first kept up layer of a plain U-Net: the hidden state it receives becomes `hidden`.

    This lets the unmodified diffusers forward stand as the reference for "the full U-Net given the
    same buffered hidden state". Returns the hook handle (call .remove()).
    """
    first = next(u for u in plan.kept_units if u.kind == "up").modules[0]
    channels = hidden.shape[1]

    def hook(module, args):
        x = args[0].clone()
        x[:, :channels] = hidden
        return (x,) + args[1:]
    return unet.get_submodule(first).register_forward_pre_hook(hook)


def small_sd2_pipeline():
    """A StableDiffusionPipeline around the small SD2-style U-Net (tiny VAE and tokenizer, 48-wide text encoder)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hollow_export.models.load import load_pipeline
    tiny = load_pipeline(arch="tiny")
    torch.manual_seed(5)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=514, max_position_embeddings=77,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513)).eval()
    unet = UNet2DConditionModel.from_config(SMALL_SD2_UNET).eval()
    return StableDiffusionPipeline(vae=tiny.vae, text_encoder=text, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory):
    """A rank-4 bundle of the tiny default at depth 3, built once per test session."""
    from hollow_export.hollow.plan import LoraSpec, make_plan
    from hollow_export.export.build import BuildSettings, build
    from hollow_export.models.load import load_pipeline
    pipe = load_pipeline(arch="tiny")
    plan = make_plan(pipe.unet, depth=3, lora=LoraSpec(rank=4))
    out = tmp_path_factory.mktemp("small") / "bundle"
    build(pipe, plan, out, "a sks ball", "a ball", BuildSettings(lr=2e-3, samples=12, steps=24), {"source": "tiny"})
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """`ort_steps.build_tiny` with `BuildSettings(lr=1e-3)` (every lever as `build` sets it), built once per test
    session for every test that needs exactly that bundle. Read-only: a test that changes a bundle copies it."""
    from hollow_export.export.build import BuildSettings
    from ort_steps import build_tiny
    return build_tiny(tmp_path_factory.mktemp("tiny") / "bundle", BuildSettings(lr=1e-3))


@pytest.fixture(scope="session")
def tiny_chunked_bundle(tmp_path_factory):
    """`build_tiny` with attention in chunks of 64 query tokens (4 chunks at the tiny's 16x16 latents, as at
    sd21's 64x64 with 512) and no unit recompute; once per session, read-only."""
    from hollow_export.export.build import BuildSettings
    from ort_steps import build_tiny
    settings = BuildSettings(lr=1e-3, recompute_units=False, attention_chunk=64)
    return build_tiny(tmp_path_factory.mktemp("tiny-chunked") / "bundle", settings)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    from hollow_export.demo import subject_photos
    folder = tmp_path_factory.mktemp("photos")
    subject_photos(folder, 3, size=160)
    return folder
