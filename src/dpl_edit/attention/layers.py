"""Attention layers of a UNet2DConditionModel, identified by their processor names.

A name such as ``down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor`` says where a
layer sits: place (down/mid/up), block, attention module, transformer block, and kind (attn1 =
self-attention, attn2 = cross-attention). The map side of a layer follows from its block: down
block i and up block (n-1-i) run at latent_size / 2**i, the mid block at the smallest size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


_NAME = re.compile(
    r"^(?P<place>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\.attentions\.(?P<attention>\d+)"
    r"\.transformer_blocks\.(?P<transformer>\d+)\.attn(?P<kind>[12])\.processor$"
)


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer: where it sits and the side of the square map it attends over."""

    name: str  # the processor name in ``unet.attn_processors``
    place: str  # "down", "mid" or "up"
    block: int  # index within its place (0 for the mid block)
    attention: int  # index of the Transformer2DModel within the block
    transformer: int  # index of the transformer block within it
    kind: str  # "self" or "cross"
    resolution: int  # the side of the (resolution x resolution) query map

    @property
    def queries(self) -> int:
        return self.resolution * self.resolution


def attention_layers(unet: UNet2DConditionModel, latent_size: int | None = None) -> list[AttentionLayer]:
    """All attention layers of the UNet, in processor order, for latents of side ``latent_size``.

    ``latent_size`` defaults to ``unet.config.sample_size``. Raises ValueError for a processor
    name that is not a standard UNet2DConditionModel attention layer.
    """
    latent_size = latent_size or unet.config.sample_size
    levels = len(unet.config.block_out_channels)
    layers = []
    for name in unet.attn_processors:
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"Unrecognised attention processor name {name!r}")
        place = match["place"].split("_")[0]
        block = int(match["block"] or 0)
        level = {"down": block, "mid": levels - 1, "up": levels - 1 - block}[place]
        layers.append(
            AttentionLayer(
                name=name,
                place=place,
                block=block,
                attention=int(match["attention"]),
                transformer=int(match["transformer"]),
                kind="self" if match["kind"] == "1" else "cross",
                resolution=latent_size // 2**level,
            )
        )
    return layers


def select_layers(
    layers: Iterable[AttentionLayer],
    *,
    kinds: Iterable[str] = ("self", "cross"),
    resolutions: Iterable[int] | None = None,
    places: Iterable[str] = ("down", "mid", "up"),
) -> list[AttentionLayer]:
    """The layers of the given kinds, map sides and places (``resolutions=None``: any side)."""
    kinds, places = set(kinds), set(places)
    sides = None if resolutions is None else set(resolutions)
    return [
        layer
        for layer in layers
        if layer.kind in kinds and layer.place in places and (sides is None or layer.resolution in sides)
    ]


SD1_LATENT_SIZE = 64  # the latent side of Stable Diffusion 1.x at 512 pixels, for which the papers give map sides


def same_level_resolution(unet: UNet2DConditionModel, kind: str, sd1_resolution: int) -> int:
    """The side of this UNet's ``kind`` attention maps at the level where Stable Diffusion 1.x's
    are ``sd1_resolution`` (the papers' map sizes: DPL's 16x16 cross- and 32x32 self-attention,
    Prompt-to-Prompt's 16x16): that side itself where the UNet has such maps (SD 1.x, SD 2.x at 512
    pixels, the tiny test model), else the side scaled by the latent size where that exists (SD 2.x at
    768 pixels, latents of 96: 16 -> 24, 32 -> 48), else ``sd1_resolution`` unchanged (whose layers
    are then missing, which the caller reports)."""
    sides = {layer.resolution for layer in attention_layers(unet) if layer.kind == kind}
    scaled, exact = divmod(sd1_resolution * unet.config.sample_size, SD1_LATENT_SIZE)
    if sd1_resolution not in sides and not exact and scaled in sides:
        return scaled
    return sd1_resolution
