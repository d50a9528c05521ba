"""Inversions of a real image into a diffusion model: DDIM inversion and null-text inversion."""

from .ddim import DDIMInversion, ddim_inversion
from .null_text import NullTextConfig, NullTextStep, null_text_inversion

__all__ = [
    "DDIMInversion",
    "NullTextConfig",
    "NullTextStep",
    "ddim_inversion",
    "null_text_inversion",
]
