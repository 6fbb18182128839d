"""The unit walk and hollow plan against the figures checked on the real SD2.1 architecture."""

import json

import pytest
from click.testing import CliRunner

from hollow_export.hollow.plan import LoraSpec, PlanError, lora_param_count, make_plan, select_lora_targets, walk
from hollow_export.cli import main
from hollow_export.models.load import load_unet


@pytest.fixture(scope="module")
def sd21():
    return load_unet(arch="sd21", meta=True)


def test_sd21_parameter_counts_match_the_paper(sd21):
    total = sum(p.numel() for p in sd21.parameters())
    assert total == 865_910_724
    for rank, expected in ((1, 207_488), (128, 26_558_464)):  # the paper's 207K / 27M
        assert lora_param_count(sd21, select_lora_targets(sd21, LoraSpec(rank=rank)), rank) == expected


def test_sd21_fraction_04_is_depth_3_with_paper_numbers(sd21):
    plan = make_plan(sd21, fraction=0.4, lora=LoraSpec(rank=128))
    assert plan.depth == 3
    assert round(plan.hollowed_fraction, 3) == 0.389
    assert plan.kept_params == 528_952_004  # paper: 527M base
    assert round(plan.lora_params / 1e6, 1) == 24.0  # paper: 24M
    assert plan.buffer_shape == [1280, 16, 16]  # 1.31 MB per sample in fp32
    assert plan.hollowed_modules == ["down_blocks.2.downsamplers.0", "down_blocks.3.resnets.0", "down_blocks.3.resnets.1",
                             "mid_block", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1",
                             "up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0"]


def test_sd21_hollowed_share_by_depth(sd21):
    shares = [round(make_plan(sd21, depth=k).hollowed_fraction * 100, 1) for k in range(5)]
    assert shares == [11.3, 20.6, 29.8, 38.9, 56.4]


def test_walk_pairs_every_skip(tiny_unet):
    units = walk(tiny_unet)
    pushed = [u.skip for u in units if u.kind in ("down", "downsample")]
    popped = [u.skip for u in units if u.kind == "up"]
    assert pushed == list(range(12)) and popped == list(reversed(range(12)))


def test_every_module_is_hollowed_or_kept_exactly_once(tiny_unet):
    top = {name.split(".")[0] for name, p in tiny_unet.named_parameters()}
    for k in range(12):
        plan = make_plan(tiny_unet, depth=k)
        assert not set(plan.hollowed_modules) & set(plan.kept_modules)
        covered = sum(p.numel() for n in plan.hollowed_modules + plan.kept_modules for p in tiny_unet.get_submodule(n).parameters())
        assert covered == plan.unet_params
        assert {n.split(".")[0] for n in plan.kept_modules} | {"mid_block", "down_blocks", "up_blocks"} >= top - {"mid_block"}


@pytest.mark.parametrize("kwargs, words", [
    (dict(fraction=0.0), "between 0 and 1"),
    (dict(fraction=1.2), "between 0 and 1"),
    (dict(depth=-1), "--depth must be between 0"),
    (dict(depth=12), "--depth must be between 0"),
    (dict(depth=1, resolution=100), "--resolution must be a multiple of 64"),
    (dict(depth=1, lora=LoraSpec(blocks=("nowhere",))), "selects no module"),
])
def test_plan_errors_name_the_fix(tiny_unet, kwargs, words):
    with pytest.raises(PlanError, match=words):
        make_plan(tiny_unet, **kwargs)


def test_unsupported_variant_is_named():
    from diffusers import UNet2DConditionModel
    import torch
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, layers_per_block=1)
    with pytest.raises(PlanError, match="down_blocks.1 is SimpleCrossAttnDownBlock2D"):
        walk(unet)


def test_blockwise_and_conv_presets(tiny_unet):
    attn = make_plan(tiny_unet, depth=3, lora=LoraSpec(rank=4))
    conv = make_plan(tiny_unet, depth=3, lora=LoraSpec(rank=4, targets="attn+conv"))
    block = make_plan(tiny_unet, depth=3, lora=LoraSpec(rank=4, blocks=("up_blocks.3",)))
    assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in attn.lora_targets)
    assert any(n.endswith("conv1") for n in conv.lora_targets) and conv.lora_params > attn.lora_params
    assert block.lora_targets and all(n.startswith("up_blocks.3.") for n in block.lora_targets)
    assert not any(n.startswith(tuple(attn.hollowed_modules)) for n in attn.lora_targets)


def test_cli_plan_json_and_table():
    runner = CliRunner()
    res = runner.invoke(main, ["plan", "--arch", "sd21", "--fraction", "0.4", "--rank", "128", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["depth"] == 3 and data["unet_params"] == 865_910_724
    res = runner.invoke(main, ["plan", "--arch", "sd21", "--depth", "3"])
    assert res.exit_code == 0 and "38.9%" in res.output and "1280x16x16" in res.output
    res = runner.invoke(main, ["plan", "--arch", "tiny", "--fraction", "1.5"])
    assert res.exit_code != 0 and "between 0 and 1" in res.output
