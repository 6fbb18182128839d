"""The split is exact: hollowed(x, t, e, precompute(x, t, e)) is the plain diffusers forward."""

import pytest
import torch

from hollow_export.hollow.plan import make_plan, max_depth, min_depth, walk
from hollow_export.hollow.split import HollowedNet, PrecomputeNet, unet_forward

from conftest import unet_inputs


@pytest.mark.parametrize("which", ["tiny_unet", "small_sd2_unet", "tiny_bk_small_unet", "tiny_bk_tiny_unet"])
def test_every_depth_is_exact(which, request):
    unet = request.getfixturevalue(which)
    x, t, e = unet_inputs(unet)
    units = walk(unet)
    assert min_depth(units) == (0 if unet.mid_block is not None else 1)
    with torch.no_grad():
        reference = unet(x, t, e).sample
        for depth in range(min_depth(units), max_depth(units) + 1):
            plan = make_plan(unet, depth=depth)
            hidden = PrecomputeNet(unet, plan)(x, t, e)
            assert list(hidden.shape[1:]) == plan.buffer_shape
            out = HollowedNet(unet, plan)(x, t, e, hidden)
            assert (out - reference).abs().max().item() <= 1e-5, depth
            assert (unet_forward(unet, plan, x, t, e) - reference).abs().max().item() <= 1e-5


def test_nets_hold_only_their_modules_under_original_names(small_sd2_unet):
    plan = make_plan(small_sd2_unet, depth=3)
    unet_params = dict(small_sd2_unet.named_parameters())
    pre = dict(PrecomputeNet(small_sd2_unet, plan).named_parameters())
    hol = dict(HollowedNet(small_sd2_unet, plan).named_parameters())
    assert all(unet_params[n] is p for n, p in {**pre, **hol}.items())  # same tensors, same names
    kept_up = [u.modules[0] for u in plan.kept_units if u.kind in ("up", "upsample")] + ["conv_out"]
    assert not any(n.startswith(tuple(kept_up)) for n in pre)
    assert not any(n.startswith(tuple(plan.hollowed_modules)) for n in hol)
    assert sum(p.numel() for p in hol.values()) == plan.kept_params
    assert sum(p.numel() for p in pre.values()) == plan.precompute_params


def test_single_path_contexts_reach_the_right_units(tiny_unet):
    """With different prompts, single path differs from both one-prompt forwards (each context is used)."""
    plan = make_plan(tiny_unet, depth=3)
    x, t, e = unet_inputs(tiny_unet)
    e2 = torch.randn_like(e)
    with torch.no_grad():
        mixed = unet_forward(tiny_unet, plan, x, t, e, e2)
        dual = HollowedNet(tiny_unet, plan)(x, t, e, PrecomputeNet(tiny_unet, plan)(x, t, e2))
        assert (mixed - tiny_unet(x, t, e).sample).abs().max() > 1e-4
        assert (mixed - tiny_unet(x, t, e2).sample).abs().max() > 1e-4
        # the two paths differ only through the kept down units feeding the hollowed ones
        assert (mixed - dual).abs().max() > 1e-6
