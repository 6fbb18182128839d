"""The unit walk and hollow plan against the figures checked on the real SD2.1 architecture, and on the
published BK-SDM U-Nets (no mid block). Expected module lists are written out by hand from each layout;
parameter counts are summed over the plain diffusers U-Net's named parameters by module name."""

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


# The innermost skip pairs of SD2.1's U-Net, written out by hand from its layout (down blocks 0-3 with two
# resnet(+attention) layers each and downsamplers on blocks 0-2; up blocks 0-3 with three layers each and
# upsamplers on blocks 0-2). Depth k hollows the mid block and these prefixes up to k.
SD21_HOLLOWED_BY_DEPTH = [
    ["mid_block"],
    ["down_blocks.3.resnets.1", "up_blocks.0.resnets.0"],
    ["down_blocks.3.resnets.0", "up_blocks.0.resnets.1"],
    ["down_blocks.2.downsamplers", "up_blocks.0.resnets.2", "up_blocks.0.upsamplers"],
    ["down_blocks.2.resnets.1", "down_blocks.2.attentions.1", "up_blocks.1.resnets.0", "up_blocks.1.attentions.0"],
]


def _params_under(unet, prefixes):
    """Parameters of the plain diffusers U-Net whose names lie under one of `prefixes` (by name only)."""
    return sum(p.numel() for n, p in unet.named_parameters() if any(n.startswith(x + ".") for x in prefixes))


def test_sd21_fraction_04_is_depth_3_with_paper_numbers(sd21):
    plan = make_plan(sd21, fraction=0.4, lora=LoraSpec(rank=128))
    total = sum(p.numel() for p in sd21.parameters())
    hollowed = _params_under(sd21, [x for k in range(4) for x in SD21_HOLLOWED_BY_DEPTH[k]])
    assert plan.depth == 3
    assert plan.hollowed_params == hollowed and plan.kept_params == total - hollowed
    assert round((total - hollowed) / 1e6, 2) == 528.95  # HOLLOWED_NET.md: 528.95M base (paper: 527M)
    assert round(plan.lora_params / 1e6, 1) == 24.0  # paper: 24M
    assert plan.buffer_shape == [1280, 16, 16]  # 512 px -> 64 latent, /8 by three downsamplers, x2 by one upsampler
    assert plan.hollowed_modules == ["down_blocks.2.downsamplers.0", "down_blocks.3.resnets.0",
                                     "down_blocks.3.resnets.1", "mid_block", "up_blocks.0.resnets.0",
                                     "up_blocks.0.resnets.1", "up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0"]


def test_sd21_hollowed_share_by_depth(sd21):
    total = sum(p.numel() for p in sd21.parameters())
    for k in range(5):
        by_hand = _params_under(sd21, [x for d in range(k + 1) for x in SD21_HOLLOWED_BY_DEPTH[d]])
        assert make_plan(sd21, depth=k).hollowed_params == by_hand, k
    shares = [round(_params_under(sd21, [x for d in range(k + 1) for x in SD21_HOLLOWED_BY_DEPTH[d]]) / total * 100, 1)
              for k in range(5)]
    assert shares == [11.3, 20.6, 29.8, 38.9, 56.4]  # HOLLOWED_NET.md, checked on the real architecture


@pytest.mark.parametrize("arch, published", [("bk-sdm-base", 0.58), ("bk-sdm-small", 0.49), ("bk-sdm-tiny", 0.33)])
def test_bk_sdm_configs_have_the_published_sizes(arch, published):
    """BK-SDM model card: U-Nets of 0.58B (Base), 0.49B (Small), 0.33B (Tiny) parameters."""
    unet = load_unet(arch=arch, meta=True)
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e9 - published) < 0.01
    assert (unet.mid_block is None) == (arch != "bk-sdm-base")


def test_bk_sdm_small_walk_and_depths():
    """No mid block: depth k hollows the innermost k skip pairs only; depth 0 (nothing) is refused."""
    unet = load_unet(arch="bk-sdm-small", meta=True)
    units = walk(unet)
    assert not any(u.kind == "mid" for u in units)
    # conv_in + one layer per down block + 3 downsamplers = 8 skips; up blocks have 2 layers each = 8 pops
    assert [u.skip for u in units if u.kind == "up"] == list(reversed(range(8)))
    with pytest.raises(PlanError, match="between 1 .*no mid block"):
        make_plan(unet, depth=0)
    by_hand = [["down_blocks.3.resnets.0", "up_blocks.0.resnets.0"],
               ["down_blocks.2.downsamplers.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0"],
               ["down_blocks.2.resnets.0", "down_blocks.2.attentions.0", "up_blocks.1.resnets.0",
                "up_blocks.1.attentions.0"]]
    for k in (1, 2, 3):
        expected = [n for d in range(k) for n in by_hand[d]]
        plan = make_plan(unet, depth=k)
        assert sorted(plan.hollowed_modules) == sorted(expected)
        assert plan.hollowed_params == _params_under(unet, expected)
    assert make_plan(unet, depth=1).buffer_shape == [1280, 8, 8]  # the last down unit's output, 64 / 8
    assert make_plan(unet, depth=2).buffer_shape == [1280, 16, 16]


def test_bk_sdm_tiny_has_no_innermost_stage():
    unet = load_unet(arch="bk-sdm-tiny", meta=True)
    plan = make_plan(unet, depth=1)
    assert sorted(plan.hollowed_modules) == sorted(["down_blocks.2.resnets.0", "down_blocks.2.attentions.0",
                                                    "up_blocks.0.resnets.0", "up_blocks.0.attentions.0"])
    assert plan.buffer_shape == [1280, 16, 16]  # 64 / 4: two downsamplers only


def test_fraction_without_a_mid_block_never_picks_depth_0():
    """A 0.01 target is nearest to hollowing nothing; without a mid block the shallowest real cut is depth 1."""
    unet = load_unet(arch="bk-sdm-small", meta=True)
    assert make_plan(unet, fraction=0.01).depth == 1
    total = sum(p.numel() for p in unet.parameters())
    by_hand = ["down_blocks.2.downsamplers.0", "down_blocks.3.resnets.0", "up_blocks.0.resnets.0",
               "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0"]
    share = _params_under(unet, by_hand) / total
    assert make_plan(unet, fraction=share).depth == 2


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
    res = runner.invoke(main, ["plan", "--arch", "bk-sdm-small", "--depth", "0"])
    assert res.exit_code == 1 and "between 1" in res.output and "no mid block" in res.output
    res = runner.invoke(main, ["plan", "--arch", "tiny", "--fraction", "1.5"])
    assert res.exit_code != 0 and "between 0 and 1" in res.output
