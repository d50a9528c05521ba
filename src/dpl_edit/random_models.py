"""Stable Diffusion models with random weights, built from configs.

``tiny_model``: Stable Diffusion's architecture (CLIP text encoder, UNet2DConditionModel with
cross-attention, AutoencoderKL, DDIM) at a few million parameters, with
the real CLIP tokenizer. It exercises every code path on a CPU in seconds, the way diffusers' own
tests do; its images are noise and its attention maps are not meaningful.

``sd14_sized_model``: the exact shapes of Stable Diffusion v1.4 (860 M-parameter UNet, 123 M text
encoder, 84 M VAE) with random weights, for honest timings without the real weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .models import StableDiffusion, ddim_scheduler
from .registry import TINY_MODEL_ID
from .tokenizer import clip_tokenizer

# Stable Diffusion 1.x's noise schedule (REFERENCE section 1).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise weights from ``seed`` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def clip_text_encoder(hidden_size: int, intermediate_size: int, layers: int, heads: int, **extra) -> CLIPTextModel:
    """A fresh CLIP text encoder over the 49408-token CLIP vocabulary and 77 positions."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            **{"pad_token_id": 49407, **extra},
        )
    )


def assemble(text_encoder: CLIPTextModel, unet: UNet2DConditionModel, vae: AutoencoderKL, model_id: str,
             settings: dict | None = None) -> StableDiffusion:
    """Components with the real CLIP tokenizer and Stable Diffusion 1.x's DDIM schedule."""
    return StableDiffusion(
        tokenizer=clip_tokenizer(),
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=ddim_scheduler(SD_SCHEDULE),
        model_id=model_id,
        settings=settings or {},
    )


def tiny_model(seed: int = 0, image_size: int = 128) -> StableDiffusion:
    """A random-weight model: ``image_size`` pixels, a 4x VAE, latents of ``image_size // 4``.

    At 128 pixels the latent is 32x32 and the UNet has self- and cross-attention at 32x32 and
    16x16, so the map sizes DPL reads on SD 1.x (cross 16x16, self 32x32) exist here too.
    """
    with seeded(seed):
        text_encoder = clip_text_encoder(hidden_size=32, intermediate_size=37, layers=2, heads=4)
        unet = UNet2DConditionModel(
            sample_size=image_size // 4,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,  # two heads per layer: 8 made attention 78% of a step
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=image_size,
        )
    return assemble(text_encoder, unet, vae, f"{TINY_MODEL_ID}:{seed}")


def sd14_sized_model(seed: int = 0) -> StableDiffusion:
    """Random weights in the shapes of Stable Diffusion v1.4 (512 px images, 64x64x4 latents)."""
    with seeded(seed):
        text_encoder = clip_text_encoder(768, 3072, layers=12, heads=12, hidden_act="quick_gelu", pad_token_id=1)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD 1.x's
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
    return assemble(text_encoder, unet, vae, f"sd14-sized-random:{seed}")
