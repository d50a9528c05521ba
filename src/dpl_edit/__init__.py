"""dpl-edit: text-based editing of real images with diffusion models (Dynamic Prompt Learning).

The public names below are imported on first use (PEP 562), so ``import dpl_edit`` and
``dpl --help`` answer without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DplEditError": "errors",
    "DynamicPromptConfig": "inversion",
    "DynamicPromptStep": "inversion",
    "EditConfig": "editing",
    "EditResult": "editing",
    "ImageLoadError": "errors",
    "Inversion": "artifacts",
    "InversionFileError": "errors",
    "ModelLoadError": "errors",
    "NullTextConfig": "inversion",
    "NullTextStep": "inversion",
    "PromptError": "errors",
    "SettingError": "errors",
    "StableDiffusion": "models",
    "edit": "editing",
    "invert": "pipeline",
    "invert_many": "pipeline",
    "load_image": "images",
    "load_model": "registry",
    "model_dpl_config": "pipeline",
    "reconstruct": "pipeline",
    "reconstruct_latents": "pipeline",
}
__all__ = [  # the keys of _EXPORTS, spelt out for linters
    "DplEditError",
    "DynamicPromptConfig",
    "DynamicPromptStep",
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
    "load_model",
    "model_dpl_config",
    "reconstruct",
    "reconstruct_latents",
]

if TYPE_CHECKING:  # what type checkers and editors read
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
    from .inversion import DynamicPromptConfig, DynamicPromptStep, NullTextConfig, NullTextStep
    from .models import StableDiffusion
    from .pipeline import invert, invert_many, model_dpl_config, reconstruct, reconstruct_latents
    from .registry import load_model


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
