"""Models by name: ``tiny`` (random weights, built on the fly), or any diffusers folder / hub id."""

from __future__ import annotations

import torch

from .models import StableDiffusion
from .random_models import TINY_MODEL_ID, tiny_model

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
NAMED_MODELS = {
    TINY_MODEL_ID: "a tiny random-weight model built on the fly (tests, trying the tools; images are noise)",
}


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load a named model (``tiny`` or ``tiny:SEED``), a diffusers folder, or a hub id."""
    base, _, seed = name.partition(":")
    if base == TINY_MODEL_ID and (seed == "" or seed.isdigit()):
        return tiny_model(seed=int(seed or 0)).to(device, dtype)
    return StableDiffusion.from_pretrained(name, device=device, dtype=dtype)
