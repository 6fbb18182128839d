"""Query-chunked attention for the exported training graph (issue 13).

In:  a torch module holding diffusers `Attention` layers (the hollowed net), a chunk size in query tokens.
Out: inside `chunked_attention(net, chunk)`, every attention runs `ChunkedAttnProcessor`: the queries are
     split into chunks of `chunk` tokens and each chunk does its own scaled-dot-product attention against
     all keys; the outputs are concatenated. Each query row's softmax only ever sees its own row, so the
     result is the same attention (up to GEMM rounding: other shapes, other blocking). On leaving, the
     previous processors are back.

Why: ORT has gradients only for plain MatMul-Softmax-MatMul attention, which keeps the softmax output P
(heads x queries x keys) of every attention for the backward. With `recompute.recompute_attention` P is
recomputed in the backward instead; chunking then makes each recomputed P only heads x chunk x keys
floats, alive one chunk at a time. Without the recompute rewrite chunking does not help (every chunk's P
is saved). Used for the training graph export only; inference graphs keep the stock processor.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class ChunkedAttnProcessor:
    """diffusers' AttnProcessor2_0 with the queries split into chunks of `chunk` tokens.

    Supports what Stable Diffusion's attention layers use (self and cross attention, 3-D or 4-D input,
    residual connection, output rescale, no mask); refuses the rest rather than computing something else.
    """

    def __init__(self, chunk: int):
        if chunk < 1:
            raise ValueError(f"attention chunk must be at least 1 token (got {chunk})")
        self.chunk = int(chunk)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None \
                or attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("ChunkedAttnProcessor covers Stable Diffusion's attention only "
                                      "(no mask, spatial/group norm or q/k norm)")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        tokens = query.shape[2]
        # same call as AttnProcessor2_0 (default scale 1/sqrt(head_dim)), once per query chunk
        parts = [F.scaled_dot_product_attention(query[:, :, s:s + self.chunk], key, value, dropout_p=0.0,
                                                is_causal=False)
                 for s in range(0, tokens, self.chunk)]
        hidden_states = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_layers(net: torch.nn.Module) -> dict:
    """name -> diffusers `Attention` module, for every attention layer in `net`."""
    from diffusers.models.attention_processor import Attention
    return {name: m for name, m in net.named_modules() if isinstance(m, Attention)}


@contextlib.contextmanager
def chunked_attention(net: torch.nn.Module, chunk: int | None):
    """Within the block, every attention of `net` uses ChunkedAttnProcessor(chunk); None: unchanged."""
    layers = attention_layers(net) if chunk else {}
    saved = {name: m.processor for name, m in layers.items()}
    try:
        for m in layers.values():
            m.set_processor(ChunkedAttnProcessor(chunk))
        yield len(layers)
    finally:
        for name, m in layers.items():
            m.set_processor(saved[name])
