"""The user-facing entry points: invert an image once, reconstruct (and later edit) from it.

    model = StableDiffusion.from_pretrained("CompVis/stable-diffusion-v1-4", device="cuda")
    image = load_image("cat.jpg", model.image_size)
    inversion = invert(model, image, "a {cat} and a {dog}", method="dpl")
    inversion.save("cat-inversion")
    reconstruct(model, inversion).save("reconstruction.png")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from . import checks
from .artifacts import Inversion, library_versions
from .attention import AttentionLayer, AttentionStore, attention_layers, same_level_resolution, select_layers
from .background import BackgroundMask, background_mask
from .diffusion import DDIMSchedule
from .editing import reconstruct_latents
from .errors import DplEditError, ImageLoadError, PromptError
from .images import from_array, load_image, to_pil, to_rgb, to_tensor
from .inversion import (
    DynamicPromptConfig,
    DynamicPromptStep,
    NullTextConfig,
    NullTextStep,
    ddim_inversion,
    dynamic_prompt_inversion_many,
    null_text_inversion,
)
from .inversion.dynamic_prompt import NULL_STRATEGIES, mostly_capped, saturation
from .losses import word_maps
from .models import StableDiffusion
from .prompts import parse_marked_prompt, text_list

logger = logging.getLogger(__name__)
METHODS = ("ddim", "nti", "npi", "direct", "dpl")
METHOD_NULLS = {"ddim": "empty", "nti": "optimized", "npi": "negative", "direct": "direct"}
PRESETS = ("paper", "authors")


def invert(
    model: StableDiffusion,
    image: Image.Image | str | os.PathLike,
    prompt: str,
    *,
    method: str = "nti",
    null: str = "optimized",
    words: Sequence[str] = (),
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    preset: str = "paper",
    null_text: NullTextConfig | dict | None = None,
    dpl: DynamicPromptConfig | dict | None = None,
    callback: Callable[[NullTextStep | DynamicPromptStep], None] | None = None,
    progress: bool = True,
) -> Inversion:
    """Invert a square RGB image of the model's size, or an image file (read by
    :func:`dpl_edit.images.load_image`, its centre cropped).

    ``method``: ``"ddim"`` (DDIM inversion only; sampling then uses the "" embedding), ``"nti"``
    (null-text inversion, REFERENCE section 3), ``"npi"`` (negative-prompt inversion: the source
    prompt's states serve as null, no optimisation), ``"direct"`` (direct inversion: no
    optimisation, editing keeps the source branch on the DDIM pivot) or ``"dpl"`` (dynamic prompt
    learning, section 5; mark its words as ``"a {cat} and a {dog}"`` or pass ``words``), whose
    ``null`` step is ``"optimized"`` (NTI, the paper), ``"negative"`` or ``"direct"``.
    ``preset="authors"`` takes the DPL authors' null-text schedule (:meth:`NullTextConfig.authors`)
    unless ``null_text`` is given. ``dpl`` defaults to the paper's settings updated by the
    model's own (its map sizes, from ``dpl_edit.json``). ``null_text`` and ``dpl`` may also be dicts
    of their configs' fields, applied over those defaults.
    """
    if not isinstance(prompt, str):
        raise PromptError(f"Expected the prompt as a string, got {prompt!r}")
    return invert_many(
        model, [image], [prompt], method=method, null=null, words=words, num_steps=num_steps,
        guidance_scale=guidance_scale, preset=preset, null_text=null_text, dpl=dpl, callback=callback,
        progress=progress,
    )[0]


def invert_many(
    model: StableDiffusion,
    images: Sequence[Image.Image | str | os.PathLike],
    prompts: str | Sequence[str],
    *,
    method: str = "nti",
    null: str = "optimized",
    words: Sequence[str] = (),
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    preset: str = "paper",
    null_text: NullTextConfig | dict | None = None,
    dpl: DynamicPromptConfig | dict | None = None,
    callback: Callable[[NullTextStep | DynamicPromptStep], None] | None = None,
    progress: bool = True,
) -> list[Inversion]:
    """Invert several images (PIL images or image files), each with its prompt (or one prompt, a
    string, for all), in lockstep: one inversion per image, as :func:`invert` makes it (the same
    arguments; ``words`` apply to every prompt; the callbacks name the image), with each UNet forward of the DDIM inversions and of the null-text
    optimisations run once for the whole batch (DPL: its recorded forward and null-text step at each
    step; each image's tokens are learned in turn). A batch uses the hardware better than one image
    at a time (on a GPU, where one image leaves it idle between kernel launches, most of all); each
    image still keeps its own optimisers and its own early stops. ``settings["seconds"]`` is the batch's time and
    ``settings["batch"]`` its size.
    """
    one = isinstance(prompts, str)  # one prompt for all
    prompts = text_list(prompts, "prompts") * (len(images) if one else 1)
    if len(images) != len(prompts) or not images:
        raise DplEditError(f"invert_many needs as many prompts as images (at least one); got {len(images)} "
                           f"images and {len(prompts)} prompts")
    images = [_as_rgb(image, model) for image in images]
    for image in images:
        _check_arguments(model, image, method, null, preset)
    checks.count("num_steps", num_steps)
    checks.finite("guidance_scale", guidance_scale, 0.0)
    dpl = checks.settings("dpl", DynamicPromptConfig, dpl, model_dpl_config(model))
    null_text = checks.settings("null_text", NullTextConfig, null_text,
                                NullTextConfig.authors() if preset == "authors" else None)
    if method == "dpl" and model.dtype != torch.float32:
        measured = ("on the bundled scene model its token learning went astray on 3 of 8 scenes at 50 steps "
                    "(reconstruction 2-8 dB below float32's)" if model.dtype == torch.bfloat16 else
                    "measured on 2 scenes at 20 steps only, where bfloat16 did not go astray either")
        logger.warning("DPL in %s: %s; README, Benchmarks. float32 is DPL's reliable precision.",
                       checks.dtype_name(model.dtype), measured)
    if method == "dpl" and null == "negative":
        logger.warning("DPL with a negative-prompt null step: its learned vectors are in the null states of every "
                       "branch, and on the bundled scene model its edits damaged the other objects in 6 of 16 "
                       "swaps even with a local blend (README, Faster inversions); --null direct kept them.")
    started = time.perf_counter()
    marked = [parse_marked_prompt(prompt, model.tokenizer, words, require_words=method == "dpl") for prompt in prompts]
    schedule = DDIMSchedule.from_scheduler(model.scheduler, num_steps)
    cross_layers = _layers(model, "cross", dpl.cross_resolution)
    cond, source_latent, pivot, store = _recorded_ddim_inversion(model, images, marked, schedule, cross_layers, dpl,
                                                                 with_self=method == "dpl", progress=progress)
    null_init = model.encode_prompt("")
    fingerprint, versions = model.fingerprint(), library_versions()
    results = [
        Inversion(
            method=method,
            model_id=model.model_id,
            model_fingerprint=fingerprint,
            prompt=prompt,
            token_ids=list(m.token_ids),
            prompt_tokens=model.tokenizer.convert_ids_to_tokens(list(m.token_ids[1 : m.end_position])),
            latent_T=pivot[0][b : b + 1],
            source_latent=source_latent[b : b + 1],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            null=null if method == "dpl" else METHOD_NULLS[method],
            words=[{"word": w.word, "positions": list(w.positions)} for w in m.words],
            settings={"preset": preset, "cross_resolution": dpl.cross_resolution,
                      # for edits: the same weights, in the same precision
                      "dtype": checks.dtype_name(model.dtype),
                      **({"variant": model.variant} if model.variant else {})},
            versions=versions,
            source_image=image,
        )
        for b, (image, prompt, m) in enumerate(zip(images, prompts, marked, strict=True))
    ]
    if method == "nti":
        nti = null_text_inversion(
            model, pivot, cond, null_init, schedule, guidance_scale, null_text,
            callback=callback, progress=progress,
        )
        for b, result in enumerate(results):
            result.null_states = torch.stack([states[b] for states in nti.null_states])  # (num_steps, 77, D)
            result.trajectory = torch.cat([z[b : b + 1] for z in nti.trajectory])  # (num_steps + 1, C, h, w)
            result.settings["null_text"] = asdict(null_text)
    if method == "dpl":  # the maps of its learned tokens; the other methods keep the DDIM inversion's
        step_maps = _learn_tokens(results, model, marked, pivot, null_init, store, cross_layers, schedule, dpl,
                                  null_text, null, callback, progress)
    else:
        history = store.history[("cross", dpl.cross_resolution)][::-1]  # sampling order, (B, res, res, 77) each
        step_maps = [[maps[b] for maps in history] for b in range(len(images))]
    for b, (result, m) in enumerate(zip(results, marked, strict=True)):
        if method == "direct":
            result.trajectory = torch.cat([z[b : b + 1] for z in pivot])  # (num_steps + 1, C, h, w)
        # The maps are views for analysis (saved, drawn, scored against CPU masks): kept on the CPU.
        result.cross_maps = torch.stack(step_maps[b])[..., 1 : m.end_position].permute(0, 3, 1, 2).cpu()  # (T, n, res, res)
    seconds = round(time.perf_counter() - started, 3)
    for result in results:
        result.settings["seconds"] = seconds
        if len(results) > 1:
            result.settings["batch"] = len(results)
    return results


def _learn_tokens(results: list[Inversion], model, marked, pivot, null_init, store, cross_layers, schedule,
                  dpl: DynamicPromptConfig, null_text: NullTextConfig, null: str, callback, progress: bool):
    """DPL on top of the DDIM inversion of a batch: each image's background mask (from its row of
    ``store``'s maps), then Alg. 1 in lockstep; fills ``results``, returns each image's maps."""
    masks = _background_masks(store, marked, dpl)
    learned = dynamic_prompt_inversion_many(
        model, marked, pivot, null_init, [mask.mask for mask in masks], cross_layers, schedule,
        results[0].guidance_scale, dpl, null_text, null=null, callback=callback, progress=progress,
    )
    for result, m, mask, each in zip(results, marked, masks, learned, strict=True):
        if null == "optimized":
            result.null_states = torch.cat(each.null_states)  # (num_steps, 77, D)
        result.token_vectors = torch.stack(each.token_vectors)  # (num_steps, K, D_in)
        result.trajectory = torch.cat(each.trajectory)  # (num_steps + 1, C, h, w); the pivot where null is "direct"
        result.token_positions = m.positions
        result.dpl_log = each.log
        if mostly_capped(each.log, dpl.max_iterations):
            logger.warning("%s. The learned token vectors may drift from their words.",
                           saturation(each.log, dpl.max_iterations))
        result.background_mask, result.clusters = mask.mask.cpu(), mask.clusters.cpu()
        result.settings.update(
            null_text=asdict(null_text), dpl=asdict(dpl), background_fallback=mask.fallback,
            background_clusters=mask.background_clusters,
        )
    return [each.cross_maps for each in learned]


def background_of(model: StableDiffusion, image: Image.Image, prompt: str, *, words: Sequence[str] = (),
                  num_steps: int = 50, dpl: DynamicPromptConfig | None = None, progress: bool = True) -> BackgroundMask:
    """DPL's background mask of an image (paper section 3.3) as ``invert(method="dpl")`` finds it
    before learning its tokens: from the DDIM inversion's self-attention clusters and the marked
    words' cross-attention, at the word maps' size (1 = background)."""
    _check_arguments(model, image, "dpl", "optimized", "paper")
    checks.count("num_steps", num_steps)
    dpl = dpl or model_dpl_config(model)
    marked = [parse_marked_prompt(prompt, model.tokenizer, words, require_words=True)]
    schedule = DDIMSchedule.from_scheduler(model.scheduler, num_steps)
    cross_layers = _layers(model, "cross", dpl.cross_resolution)
    store = _recorded_ddim_inversion(model, [image], marked, schedule, cross_layers, dpl, with_self=True,
                                     progress=progress)[3]
    return _background_masks(store, marked, dpl)[0]


def _recorded_ddim_inversion(model: StableDiffusion, images: Sequence[Image.Image], marked, schedule: DDIMSchedule,
                             cross_layers: list[AttentionLayer], dpl: DynamicPromptConfig, with_self: bool,
                             progress: bool):
    """The DDIM inversion of a batch with its maps recorded: (text states, source latents, pivot, store);
    the store keeps the maps of ``cross_layers`` at every step and, ``with_self``, averages the
    self-attention maps DPL's background mask needs."""
    with torch.no_grad():  # each image and prompt encoded alone: the batch changes only the UNet's calls
        cond = torch.cat([model.encode_tokens(torch.tensor([m.token_ids], device=model.device)) for m in marked])
    source_latent = torch.cat([model.encode_image(to_tensor(image)) for image in images])
    self_layers = _layers(model, "self", dpl.self_resolution) if with_self else []
    store = AttentionStore(history=[("cross", dpl.cross_resolution)])
    pivot = ddim_inversion(
        model, source_latent, cond, schedule, record=cross_layers + self_layers, store=store, progress=progress
    ).pivot
    return cond, source_latent, pivot, store


def _background_masks(store: AttentionStore, marked, dpl: DynamicPromptConfig) -> list[BackgroundMask]:
    """Each image's background mask from its row of ``store``'s averaged maps."""
    self_maps = store.average_maps("self", dpl.self_resolution)  # (B, ...): averaged once for the batch
    cross_maps = store.average_maps("cross", dpl.cross_resolution)
    return [
        background_mask(
            self_maps[b], word_maps(cross_maps[b], [w.positions for w in m.words]),
            num_clusters=dpl.num_clusters, threshold=dpl.agreement_threshold, seed=dpl.cluster_seed,
        )
        for b, m in enumerate(marked)
    ]


def model_dpl_config(model: StableDiffusion, **overrides) -> DynamicPromptConfig:
    """The paper's DPL settings with its map sizes at this model's level of the UNet
    (:func:`~dpl_edit.attention.same_level_resolution`: SD 1.x's 16x16 and 32x32, SD 2.x's at 768
    pixels 24x24 and 48x48), updated by the model's recommended settings, then by ``overrides``."""
    paper = DynamicPromptConfig
    sizes = {"cross_resolution": same_level_resolution(model.unet, "cross", paper.cross_resolution),
             "self_resolution": same_level_resolution(model.unet, "self", paper.self_resolution)}
    return DynamicPromptConfig(**{**sizes, **model.settings.get("dpl", {}), **overrides})


def reconstruct(model: StableDiffusion, inversion: Inversion | str | os.PathLike, *,
                callback: Callable[[int], None] | None = None, progress: bool = True) -> Image.Image:
    """The image sampled back from an inversion or its folder (RGB, the model's size); ``callback(step)``
    runs after each sampling step (to show progress, or to stop by raising)."""
    return to_pil(model.decode_latents(reconstruct_latents(model, inversion, callback=callback, progress=progress)))


def _as_rgb(image, model: StableDiffusion):
    """An image argument as an RGB PIL image, read as the command line reads a file: a path by
    :func:`load_image` (its centre square at the model's size), a numpy picture by
    :func:`~dpl_edit.images.from_array`, a PIL image of any mode by :func:`~dpl_edit.images.to_rgb`
    (transparency on white, 16-bit and float greyscale from their full scales); anything else as it
    is, for :func:`_check_arguments` to refuse."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, model.image_size)
    if isinstance(image, np.ndarray):
        return from_array(image)
    return to_rgb(image) if isinstance(image, Image.Image) else image


def _check_arguments(model: StableDiffusion, image: Image.Image, method: str, null: str, preset: str) -> None:
    if method not in METHODS:
        raise DplEditError(f"Unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    if null not in NULL_STRATEGIES:
        raise DplEditError(f"Unknown null strategy {null!r}; choose one of {', '.join(NULL_STRATEGIES)}")
    if preset not in PRESETS:
        raise DplEditError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not isinstance(image, Image.Image):
        raise ImageLoadError(f"Expected a PIL image, a numpy picture or an image file's path, got {type(image).__name__}; "
                             "load one with load_image(path, model.image_size).")
    if image.size != (model.image_size, model.image_size):
        raise ImageLoadError(
            f"The image is {image.size[0]}x{image.size[1]} but the model takes "
            f"{model.image_size}x{model.image_size}; load it with load_image(path, model.image_size)."
        )


def _layers(model: StableDiffusion, kind: str, resolution: int) -> list[AttentionLayer]:
    """The model's attention layers of one kind and map side; a clear error if there are none."""
    layers = attention_layers(model.unet)
    chosen = select_layers(layers, kinds=[kind], resolutions=[resolution])
    if not chosen:
        sides = sorted({layer.resolution for layer in layers if layer.kind == kind}, reverse=True)
        raise DplEditError(
            f"This model has no {kind}-attention layers with {resolution}x{resolution} maps "
            f"(it has {', '.join(map(str, sides))}); choose one of those sizes (--{kind}-res on the command line; "
            f"in Python, DynamicPromptConfig({kind}_resolution=...), or model_dpl_config(model, ...), which "
            "starts from the sizes of the model's own level)."
        )
    return chosen
