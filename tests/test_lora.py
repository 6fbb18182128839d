"""LoRA trained in the hollowed net drops into the full U-Net by name, through diffusers' own loader."""

import pytest
import torch

from hollow_export.hollow import lora
from hollow_export.hollow.plan import LoraSpec, make_plan
from hollow_export.models.load import load_pipeline
from hollow_export.hollow.split import HollowedNet, PrecomputeNet

from conftest import feed_buffer, unet_inputs


def _trained_lora(unet, plan, seed=0):
    """A LoRA with non-zero B (as after training), in the hollowed net."""
    net = lora.inject(HollowedNet(unet, plan), plan.lora, plan.lora_targets, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.lora_parameters(net).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


@pytest.mark.parametrize("depth, alpha", [(3, None), (1, 32.0), (6, 2.0)])
def test_lora_file_loads_into_full_unet_and_reproduces_hollowed_output(tmp_path, depth, alpha):
    pipe = load_pipeline(arch="tiny")
    unet = pipe.unet
    plan = make_plan(unet, depth=depth, lora=LoraSpec(rank=4, alpha=alpha))
    x, t, e = unet_inputs(unet)
    e_class = torch.randn_like(e)
    with torch.no_grad():
        hidden = PrecomputeNet(unet, plan)(x, t, e_class)  # the buffer, from the frozen original U-Net
        plain = unet(x, t, e).sample

    net = _trained_lora(unet, plan)
    with torch.no_grad():
        trained = net(x, t, e, hidden)
    lora.save_diffusers(tmp_path, lora.lora_state(net), plan.lora)

    fresh = load_pipeline(arch="tiny")
    fresh.load_lora_weights(str(tmp_path), weight_name=lora.LORA_FILE)  # diffusers' own loader
    handle = feed_buffer(fresh.unet, plan, hidden)
    with torch.no_grad():
        full = fresh.unet(x, t, e).sample  # the plain diffusers forward, LoRA loaded by diffusers
        handle.remove()
        with_lora_no_buffer = fresh.unet(x, t, e).sample
    assert (full - trained).abs().max().item() <= 1e-5
    assert (with_lora_no_buffer - plain).abs().max().item() > 1e-2  # the LoRA changes the output


def test_load_into_refuses_foreign_lora(small_sd2_unet, tiny_unet):
    plan = make_plan(tiny_unet, depth=3, lora=LoraSpec(rank=4))
    state = lora.lora_state(_trained_lora(tiny_unet, plan))
    with pytest.raises(lora.LoraError, match="does not belong to this U-Net"):
        lora.load_into(small_sd2_unet, state, plan.lora)


def test_only_lora_is_trainable_and_starts_as_identity(tiny_unet):
    plan = make_plan(tiny_unet, depth=3, lora=LoraSpec(rank=4))
    x, t, e = unet_inputs(tiny_unet)
    with torch.no_grad():
        hidden = PrecomputeNet(tiny_unet, plan)(x, t, e)
        before = HollowedNet(tiny_unet, plan)(x, t, e, hidden)
    net = lora.inject(HollowedNet(tiny_unet, plan), plan.lora, plan.lora_targets)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(p.numel() for n, p in net.named_parameters() if p.requires_grad) == plan.lora_params
    with torch.no_grad():
        assert torch.equal(net(x, t, e, hidden), before)
