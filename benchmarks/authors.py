"""The DPL authors' setup as their code runs it, for the benchmarks' "authors" rows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def authors_trainable(model) -> Iterator[None]:
    """The weights the authors' code leaves trainable, so that every backward computes their
    gradients: the UNet's but for its self-attention modules (their pipeline's ``prepare_unet``
    turns those off and the cross-attention ones on; the rest keep ``from_pretrained``'s default),
    and of the text encoder only the token-embedding table (their DPL.py turns off the encoder, the
    final norm and the position embeddings). Everything is frozen again afterwards."""
    model.unet.requires_grad_(True)
    for name, module in model.unet.named_modules():
        if name.endswith(".attn1"):
            module.requires_grad_(False)
    model.text_encoder.get_input_embeddings().requires_grad_(True)
    try:
        yield
    finally:
        model.unet.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
