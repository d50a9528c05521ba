"""Tiny Stable Diffusion models with random weights, built from configs.

The architecture is Stable Diffusion's (CLIP text encoder, UNet2DConditionModel with
cross-attention, AutoencoderKL with an 8x downsampling, DDIM) at a few million parameters, with
the real CLIP tokenizer. They exercise every code path on a CPU in seconds, the way diffusers' own
tests do; their images are noise, their attention maps are not meaningful.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .models import StableDiffusion, ddim_scheduler
from .tokenizer import clip_tokenizer

TINY_MODEL_ID = "tiny"

# Stable Diffusion 1.x's noise schedule (REFERENCE section 1).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def tiny_model(seed: int = 0, image_size: int = 128) -> StableDiffusion:
    """A random-weight model: ``image_size`` pixels, latents of ``image_size // 8``.

    At 128 pixels the latent is 16x16 and the UNet has cross- and self-attention at 16x16 and 8x8
    (down and up blocks), like SD 1.x has at 64..16.
    """
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )
    return StableDiffusion(
        tokenizer=clip_tokenizer(),
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=ddim_scheduler(SD_SCHEDULE),
        model_id=f"{TINY_MODEL_ID}:{seed}",
    )
