"""An attention processor that computes the attention probabilities explicitly and shows them to
an observer, which may read them (recording) or return edited ones (Prompt-to-Prompt).

It computes what diffusers' ``AttnProcessor`` computes, so a UNet with it installed gives the same
output as with the default processor (up to the rounding of fused kernels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .layers import AttentionLayer

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention


class AttentionObserver(Protocol):
    def __call__(self, layer: AttentionLayer, probs: torch.Tensor) -> torch.Tensor | None:
        """See probs (batch, heads, queries, keys); return None to keep them, or a replacement."""


class InspectingProcessor:
    """Explicit-softmax attention that passes each layer's probabilities to an observer."""

    def __init__(self, layer: AttentionLayer, observer: AttentionObserver):
        self.layer = layer
        self.observer = observer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, Q, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, keys, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, Q, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B*heads, K, d)
        value = attn.head_to_batch_dim(attn.to_v(context))  # (B*heads, K, d)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Q, K)

        probs = probs.view(batch, attn.heads, *probs.shape[1:])  # (B, heads, Q, K)
        edited = self.observer(self.layer, probs)
        if edited is not None:
            probs = edited
        probs = probs.reshape(batch * attn.heads, *probs.shape[2:])  # (B*heads, Q, K)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, Q, C)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
