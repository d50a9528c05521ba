"""dpl-edit: text-based editing of real images with diffusion models (Dynamic Prompt Learning)."""

__version__ = "0.1.0"

from .artifacts import Inversion
from .editing import EditConfig, EditResult, edit
from .errors import (
    DplEditError,
    ImageLoadError,
    InversionFileError,
    ModelLoadError,
    PromptError,
    SettingError,
)
from .images import load_image
from .inversion import NullTextConfig, NullTextStep
from .models import StableDiffusion
from .pipeline import invert, invert_many, reconstruct, reconstruct_latents

__all__ = [
    "DplEditError",
    "EditConfig",
    "EditResult",
    "ImageLoadError",
    "Inversion",
    "InversionFileError",
    "ModelLoadError",
    "NullTextConfig",
    "NullTextStep",
    "PromptError",
    "SettingError",
    "StableDiffusion",
    "edit",
    "invert",
    "invert_many",
    "load_image",
    "reconstruct",
    "reconstruct_latents",
]
