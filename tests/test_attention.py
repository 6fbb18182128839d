"""ChunkedAttnProcessor computes the attention of diffusers' stock processor (fp32 tolerance)."""

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from hollow_export.export.attention import ChunkedAttnProcessor, attention_layers, chunked_attention

from conftest import unet_inputs


def _reference_attention(attn, x, context=None):
    """Float64 attention written out by hand: the independent reference."""
    context = x if context is None else context
    q, k, v = attn.to_q(x).double(), attn.to_k(context).double(), attn.to_v(context).double()
    b, n, inner = q.shape
    h = attn.heads
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / (inner // h) ** 0.5, dim=-1)
    out = (p @ v).transpose(1, 2).reshape(b, n, inner).float()
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@torch.no_grad()
def test_chunked_processor_equals_reference_and_stock(tiny_unet):
    layers = attention_layers(tiny_unet)
    assert layers
    g = torch.Generator().manual_seed(0)
    for name, attn in layers.items():
        dim = attn.to_q.in_features
        x = torch.randn(2, 256, dim, generator=g)
        context = None if attn.is_cross_attention is False else torch.randn(2, 77, attn.to_k.in_features, generator=g)
        stock = AttnProcessor2_0()(attn, x, context)
        ref = _reference_attention(attn, x, context)
        for chunk in (1, 7, 64, 100, 256, 1000):
            out = ChunkedAttnProcessor(chunk)(attn, x, context)
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (name, chunk)
            assert torch.allclose(out, stock, atol=1e-5, rtol=1e-5), (name, chunk)


@torch.no_grad()
def test_chunked_unet_equals_stock_unet_and_processors_come_back(tiny_unet):
    x, t, e = unet_inputs(tiny_unet)
    stock = tiny_unet(x, t, e).sample
    before = {n: type(m.processor) for n, m in attention_layers(tiny_unet).items()}
    with chunked_attention(tiny_unet, 48) as count:
        assert count == len(before)
        assert all(isinstance(m.processor, ChunkedAttnProcessor) for m in attention_layers(tiny_unet).values())
        chunked = tiny_unet(x, t, e).sample
    assert {n: type(m.processor) for n, m in attention_layers(tiny_unet).items()} == before
    assert torch.allclose(chunked, stock, atol=1e-5, rtol=1e-4)
