"""Inversions of a real image into a diffusion model: DDIM, null-text and dynamic prompt learning."""

from .ddim import DDIMInversion, ddim_inversion
from .dynamic_prompt import (
    DynamicPromptConfig,
    DynamicPromptResult,
    DynamicPromptStep,
    dynamic_prompt_inversion,
    dynamic_prompt_inversion_many,
)
from .null_text import NullTextConfig, NullTextResult, NullTextStep, null_text_inversion

__all__ = [
    "DDIMInversion",
    "DynamicPromptConfig",
    "DynamicPromptResult",
    "DynamicPromptStep",
    "NullTextConfig",
    "NullTextResult",
    "NullTextStep",
    "ddim_inversion",
    "dynamic_prompt_inversion",
    "dynamic_prompt_inversion_many",
    "null_text_inversion",
]
