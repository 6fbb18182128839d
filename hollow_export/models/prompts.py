"""Prompt text to the embeddings the U-Net is conditioned on.

In:  a `StableDiffusionPipeline` (its tokenizer and text encoder) and a prompt.
Out: the text encoder's last hidden state, [1, 77, D]: what the bundle stores, what the
     trainer, merge and the generator feed the U-Net.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompt(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's last hidden state for `prompt`, [1, 77, D]."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
