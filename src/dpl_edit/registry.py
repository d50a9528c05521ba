"""Models by name: ``scenes`` (the bundled scene model), ``scenes-plain`` (the same without the
grounding loss: its attention leaks, as Stable Diffusion's does), ``tiny`` (random weights, built on
the fly), or any diffusers folder / hub id."""

from __future__ import annotations

from importlib.resources import files

import torch

from . import checks
from .errors import ModelLoadError, SettingError
from .models import StableDiffusion

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
SCENE_MODEL_ID = "scenes"
PLAIN_SCENE_MODEL_ID = "scenes-plain"
TINY_MODEL_ID = "tiny"
SCENE_MODEL_FOLDERS = {SCENE_MODEL_ID: "weights", PLAIN_SCENE_MODEL_ID: "weights_plain"}
NAMED_MODELS = {
    SCENE_MODEL_ID: "the bundled 64x64 scene model (coloured shapes on textured grounds; works offline)",
    PLAIN_SCENE_MODEL_ID: "the bundled scene model trained without the grounding loss (its nouns' attention leaks)",
    TINY_MODEL_ID: "a tiny random-weight model built on the fly (tests, trying the tools; images are noise)",
}


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               compile: bool = False, cuda_graphs: bool | None = None, variant: str | None = None) -> StableDiffusion:
    """Load a named model (``scenes``, ``scenes-plain``, ``tiny`` or ``tiny:SEED``), a diffusers
    folder, or a hub id; ``compile=True`` compiles its UNet (:meth:`StableDiffusion.compile`),
    ``cuda_graphs`` replays its inner loops as CUDA graphs (:meth:`StableDiffusion.use_cuda_graphs`),
    by default wherever the model is on a CUDA device and not compiled (on an H200 every inversion
    took less time so, its captures included, and an edit as long in float32 and a third of it in
    bfloat16: README, Benchmarks). ``device`` and ``dtype`` may be named (``"cuda"``, ``"bfloat16"``);
    ``variant`` chooses the weight files (:meth:`StableDiffusion.from_pretrained`)."""
    device, dtype = checks.device("device", device), checks.dtype("dtype", dtype)
    base, _, seed = name.partition(":")
    if name in SCENE_MODEL_FOLDERS:
        folder = scene_model_folder(name)
        try:
            model = StableDiffusion.from_pretrained(folder, device=device, dtype=dtype, variant=variant)
        except ModelLoadError as err:  # named as the person named it, not as the package's folder
            raise ModelLoadError(str(err).replace(repr(folder), f"{name!r} (the bundled model in {folder})", 1)) from None
        model.model_id = name
    elif base == TINY_MODEL_ID and (seed == "" or seed.isdigit()):
        from .random_models import tiny_model  # diffusers' model classes: only when one is built

        if variant is not None:
            raise SettingError(f"variant {variant!r}: the tiny model is built in memory and has no weight files")
        model = tiny_model(seed=int(seed or 0)).to(device, dtype)
    else:
        model = StableDiffusion.from_pretrained(name, device=device, dtype=dtype, variant=variant)
    if cuda_graphs is None:
        cuda_graphs = cuda_graphs_by_default(model.device, compile)
    if cuda_graphs:
        return model.use_cuda_graphs()
    return model.compile() if compile else model


def cuda_graphs_by_default(device: torch.device, compile: bool) -> bool:
    """Whether a model on ``device`` replays CUDA graphs when not told: on CUDA, unless compiled."""
    return device.type == "cuda" and not compile


def scene_model_folder(name: str = SCENE_MODEL_ID) -> str:
    """A bundled scene model's folder (inside the installed package; its README is the model card)."""
    return str(files("dpl_edit.scenes") / SCENE_MODEL_FOLDERS[name])
