"""The token grounding loss the scene model is trained with (TokenCompose's token loss, Wang et
al., CVPR 2024): for each object noun of a caption, the share of its cross-attention (mean over
heads) that falls outside the object's mask, squared, at the layers DPL reads.

Large pretrained models learn to put a noun's attention on its object from billions of images; a
small model trained for minutes on synthetic scenes learns to draw the right things where they
belong long before its attention maps show it. This loss asks it for the localisation a
pretrained model has, from the renderer's exact masks, so that the methods built on those maps
(DPL, local blending) can be studied on it.
"""

from __future__ import annotations

import torch

from ..attention.layers import AttentionLayer


def token_grounding_loss(probs: torch.Tensor, noun_tokens: torch.Tensor, object_masks: torch.Tensor) -> torch.Tensor:
    """Mean over the nouns present of (1 - attention inside the object / attention in all)^2.

    probs (B, heads, Q, 77) cross-attention probabilities; noun_tokens (B, K, 77) token weights of
    each object's noun (zero rows: no object); object_masks (B, K, Q) the share of each query cell
    the object covers.
    """
    maps = torch.einsum("bhqt,bkt->bkq", probs.float(), noun_tokens.float()) / probs.shape[1]
    inside = (maps * object_masks.float()).sum(-1) / maps.sum(-1).clamp_min(1e-8)
    present = (noun_tokens.sum(-1) > 0).float()
    return ((1 - inside) ** 2 * present).sum() / present.sum().clamp_min(1.0)


class GroundingObserver:
    """An attention observer that collects the grounding loss of each hooked layer for one batch."""

    def __init__(self):
        self.noun_tokens: torch.Tensor | None = None
        self.object_masks: torch.Tensor | None = None
        self.losses: list[torch.Tensor] = []

    def begin(self, noun_tokens: torch.Tensor, object_masks: torch.Tensor) -> None:
        self.noun_tokens, self.object_masks, self.losses = noun_tokens, object_masks, []

    def __call__(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        self.losses.append(token_grounding_loss(probs, self.noun_tokens, self.object_masks))

    def loss(self) -> torch.Tensor:
        """The mean over the hooked layers of this batch's losses."""
        return torch.stack(self.losses).mean()
