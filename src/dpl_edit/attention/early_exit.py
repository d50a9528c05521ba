"""Stopping the UNet forward right after the last attention layer a loss reads.

DPL's losses read only the 16x16 cross-attention maps (SD 1.x: down_blocks.2 and up_blocks.1), so
the rest of the up path (the 32x32 and 64x64 blocks, the costliest) need not run: the gradient of
the losses is the same without it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .layers import AttentionLayer
from .processor import AttentionObserver

_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2}


class ForwardStopped(Exception):
    """Raised inside the UNet to end its forward after the last layer that was needed."""


def execution_order(layer: AttentionLayer) -> tuple[int, int, int, int, int]:
    """Sort key of the order in which UNet2DConditionModel runs its attention layers."""
    return (
        _PLACE_ORDER[layer.place],
        layer.block,
        layer.attention,
        layer.transformer,
        0 if layer.kind == "self" else 1,
    )


def last_layer(layers: Iterable[AttentionLayer]) -> AttentionLayer:
    """The attention layer that runs last in a forward pass."""
    return max(layers, key=execution_order)


class StopAfter:
    """An observer that passes maps on to ``observer`` and stops the forward after ``last``."""

    def __init__(self, observer: AttentionObserver, last: AttentionLayer):
        self.observer = observer
        self.last = last

    def __call__(self, layer: AttentionLayer, probs: torch.Tensor) -> torch.Tensor | None:
        edited = self.observer(layer, probs)
        if layer == self.last:
            raise ForwardStopped
        return edited
