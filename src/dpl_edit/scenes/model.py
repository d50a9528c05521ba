"""The scene model: Stable Diffusion's architecture, small enough to train from scratch.

64x64 images; an AutoencoderKL with a 2x downsampling (32x32x4 latents); a 3-layer, width-64 CLIP
text encoder with the real CLIP tokenizer (its 49408-row embedding table is most of its weights, so
the width keeps the fp16 model under 25 MB); a UNet2DConditionModel with channels 64/128/128 whose
cross- and self-attention run at 16x16 and 8x8 (no attention at 32x32, which would cost more than
half of the UNet's time). DPL reads its 16x16 cross-attention maps and clusters its 16x16
self-attention maps.
"""

from __future__ import annotations

import json

from diffusers import AutoencoderKL, UNet2DConditionModel

from ..models import StableDiffusion
from ..random_models import assemble, clip_text_encoder, seeded
from .render import SIZE

# What the method should read on this model (written next to the weights as dpl_edit.json).
SCENE_MODEL_SETTINGS = {"dpl": {"cross_resolution": 16, "self_resolution": 16}}


def scene_model(seed: int = 0) -> StableDiffusion:
    """The scene model with freshly initialised weights (deterministic in ``seed``)."""
    with seeded(seed):
        text_encoder = clip_text_encoder(hidden_size=64, intermediate_size=256, layers=3, heads=4)
        unet = UNet2DConditionModel(
            sample_size=SIZE // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=4,  # diffusers' name for the number of heads
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=SIZE,
            mid_block_add_attention=False,
        )
    return assemble(text_encoder, unet, vae, "scenes", json.loads(json.dumps(SCENE_MODEL_SETTINGS)))
