"""The user-facing entry points: invert an image once, reconstruct (and later edit) from it.

    model = StableDiffusion.from_pretrained("CompVis/stable-diffusion-v1-4", device="cuda")
    image = load_image("cat.jpg", model.image_size)
    inversion = invert(model, image, "a cat sitting on a wall", method="nti")
    inversion.save("cat-inversion")
    reconstruct(model, inversion).save("reconstruction.png")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from PIL import Image

from .artifacts import Inversion, library_versions
from .diffusion import DDIMSchedule
from .errors import DplEditError, ImageLoadError
from .images import to_pil, to_tensor
from .inversion import NullTextConfig, NullTextStep, ddim_inversion, null_text_inversion
from .models import StableDiffusion
from .sampling import sample

METHODS = ("ddim", "nti")


def invert(
    model: StableDiffusion,
    image: Image.Image,
    prompt: str,
    *,
    method: str = "nti",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    null_text: NullTextConfig = NullTextConfig(),
    callback: Callable[[NullTextStep], None] | None = None,
    progress: bool = True,
) -> Inversion:
    """Invert a square RGB image of the model's size (see :func:`dpl_edit.images.load_image`).

    ``method``: ``"ddim"`` (DDIM inversion only; sampling then uses the "" embedding) or
    ``"nti"`` (null-text inversion on top of it, REFERENCE section 3).
    """
    if method not in METHODS:
        raise DplEditError(f"Unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    if image.size != (model.image_size, model.image_size):
        raise ImageLoadError(
            f"The image is {image.size[0]}x{image.size[1]} but the model takes "
            f"{model.image_size}x{model.image_size}; load it with load_image(path, model.image_size)."
        )
    started = time.perf_counter()
    token_ids = model.tokenize(prompt)
    schedule = DDIMSchedule.from_scheduler(model.scheduler, num_steps)
    with torch.no_grad():
        cond = model.encode_tokens(token_ids)
    source_latent = model.encode_image(to_tensor(image))
    pivot = ddim_inversion(model, source_latent, cond, schedule, progress=progress).pivot
    null_states, settings = None, {}
    if method == "nti":
        nulls = null_text_inversion(
            model, pivot, cond, model.encode_prompt(""), schedule, guidance_scale, null_text,
            callback=callback, progress=progress,
        )
        null_states = torch.cat(nulls)  # (num_steps, 77, D)
        settings["null_text"] = asdict(null_text)
    settings["seconds"] = round(time.perf_counter() - started, 3)
    return Inversion(
        method=method,
        model_id=model.model_id,
        model_fingerprint=model.fingerprint(),
        prompt=prompt,
        token_ids=token_ids[0].tolist(),
        latent_T=pivot[0],
        source_latent=source_latent,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        null_states=null_states,
        settings=settings,
        versions=library_versions(),
        source_image=image,
    )


def reconstruct_latents(model: StableDiffusion, inversion: Inversion, *, progress: bool = True) -> torch.Tensor:
    """Sample z_0 (1, C, h, w) back from an inversion with its prompt and null states."""
    inversion.check_compatible(model)
    schedule = DDIMSchedule.from_scheduler(model.scheduler, inversion.num_steps)
    token_ids = torch.tensor([inversion.token_ids], device=model.device)
    with torch.no_grad():
        cond = model.encode_tokens(token_ids)
    latent_T = inversion.latent_T.to(model.device, model.dtype)
    return sample(
        model, latent_T, schedule, cond, inversion.null_at(model), inversion.guidance_scale,
        progress=progress,
    )


def reconstruct(model: StableDiffusion, inversion: Inversion, *, progress: bool = True) -> Image.Image:
    """The image sampled back from an inversion (RGB, the model's size)."""
    return to_pil(model.decode_latents(reconstruct_latents(model, inversion, progress=progress)))
