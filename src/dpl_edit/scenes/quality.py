"""Quality checks of a scene model on test scenes (issue bars in brackets):

- caption following: generated samples of test captions judged by the caption checker (background
  >= 90%, each object's colour >= 80%, shape >= 70%);
- reconstruction: VAE and null-text inversion PSNR (NTI within 1 dB of the VAE);
- noun localisation: where each noun's DDIM-inversion map puts its mass in two-object scenes (at
  least half on its own object, at most a tenth on the other), and its best IoU over thresholds
  0.1 .. 1.0 with its own object and with the other (own at least 0.15 above other);
- DPL's background mask: its IoU with the true background in one- and two-object scenes, beside
  the paper's on SD 1.4 and a mask of the whole image's (no bar: the objects are small, so the
  background is most of a scene, and the maps are 16x16 for 64x64 images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import checks
from ..diffusion import DDIMSchedule
from ..images import psnr, to_pil, to_tensor
from ..localisation import attention_shares, best_iou, iou_curve
from ..models import StableDiffusion
from ..pipeline import background_of, invert, reconstruct
from ..published import DPL_BACKGROUND_MASK_IOU
from ..sampling import sample
from ..views import word_map
from .classify import check_caption
from .render import check_scene_model_size, render, split_scene

BAR_STEPS = 50  # the DDIM steps the bars were set at (the paper's)


@dataclass
class QualityReport:
    background: float  # share of samples with the right background
    colour: float  # share of caption objects whose colour is found
    shape: float  # share of caption objects whose colour and shape are found
    vae_psnr: float
    nti_psnr: float
    own_iou: float  # mean best IoU (thresholds 0.1 .. 1.0) of a noun's map with its own object
    other_iou: float  # ... with the other object
    own_share: float  # mean share of a noun's attention mass on its own object
    other_share: float  # ... on the other object
    # by number of objects: IoU of DPL's background mask with the background, of a mask of everything
    # with it, and of the mask's complement with the objects
    background_iou: dict[int, tuple[float, float, float]]

    def rows(self) -> list[tuple[str, str, str, bool]]:
        """(check, value, bar, passed)."""
        return [
            ("background right", f"{100 * self.background:.1f}%", ">= 90%", self.background >= 0.9),
            ("object colour right", f"{100 * self.colour:.1f}%", ">= 80%", self.colour >= 0.8),
            ("object shape right", f"{100 * self.shape:.1f}%", ">= 70%", self.shape >= 0.7),
            ("VAE reconstruction PSNR", f"{self.vae_psnr:.2f} dB", "", True),
            ("NTI reconstruction PSNR", f"{self.nti_psnr:.2f} dB", ">= VAE - 1 dB", self.nti_psnr >= self.vae_psnr - 1),
            ("noun attention mass on own object", f"{self.own_share:.3f}", ">= 0.5", self.own_share >= 0.5),
            ("noun attention mass on other object", f"{self.other_share:.3f}", "<= 0.1", self.other_share <= 0.1),
            ("noun map best IoU, own object", f"{self.own_iou:.3f}", "", True),
            ("noun map best IoU, other object", f"{self.other_iou:.3f}", "<= own - 0.15",
             self.own_iou - self.other_iou >= 0.15),
            *self._background_rows(),
        ]

    def _background_rows(self) -> list[tuple[str, str, str, bool]]:
        rows = []
        for n, (iou, everything, objects) in self.background_iou.items():
            scenes = f"{n} object{'s' * (n > 1)}"
            check = f"DPL background mask IoU, {scenes} (paper: {DPL_BACKGROUND_MASK_IOU[n]:.3f}; everything: {everything:.3f})"
            rows.append((check, f"{iou:.3f}", "", True))
            rows.append((f"the rest of the mask's IoU with the objects, {scenes}", f"{objects:.3f}", "", True))
        return rows


def check_counts(samples: int, reconstructions: int, localisations: int, num_steps: int = BAR_STEPS) -> None:
    """The numbers of scenes and steps the checks use, checked (before any model is loaded)."""
    checks.count("--samples", samples)
    checks.count("--reconstructions", reconstructions)
    checks.count("--localisations", localisations)
    checks.count("--steps", num_steps)


@torch.no_grad()
def caption_following(model: StableDiffusion, count: int, guidance_scale: float = 7.5, batch: int = 16,
                      seed: int = 0, num_steps: int = BAR_STEPS, progress: bool = True) -> tuple[float, float, float]:
    """Shares of (background, object colour, object shape) right over ``count`` test captions."""
    schedule = DDIMSchedule.from_scheduler(model.scheduler, num_steps)
    generator = torch.Generator().manual_seed(seed)
    null = model.encode_prompt("")
    backgrounds, colours, shapes = [], [], []
    for start in tqdm(range(0, count, batch), desc="Caption following", disable=not progress, leave=False):
        scenes = [split_scene("test", i) for i in range(start, min(count, start + batch))]
        cond = torch.cat([model.encode_prompt(s.caption) for s in scenes])
        shape = (len(scenes), model.unet.config.in_channels, model.latent_size, model.latent_size)
        z = torch.randn(shape, generator=generator).to(model.device, model.dtype)
        images = model.decode_latents(sample(model, z, schedule, cond, null, guidance_scale, progress=False))
        for scene, image in zip(scenes, images):
            check = check_caption(to_pil(image), scene)
            backgrounds.append(check.background)
            colours += check.colours
            shapes += check.shapes
    return sum(backgrounds) / len(backgrounds), sum(colours) / len(colours), sum(shapes) / len(shapes)


def reconstruction(model: StableDiffusion, count: int, num_steps: int = BAR_STEPS, progress: bool = True) -> tuple[float, float]:
    """Mean PSNR of the VAE's reconstruction and of NTI's, over ``count`` test scenes."""
    vae, nti = [], []
    for i in tqdm(range(count), desc="Reconstruction", disable=not progress, leave=False):
        scene = split_scene("test", i)
        image, _ = render(scene)
        vae.append(psnr(to_pil(model.decode_latents(model.encode_image(to_tensor(image)))), image))
        inversion = invert(model, image, scene.caption, method="nti", num_steps=num_steps, progress=False)
        nti.append(psnr(reconstruct(model, inversion, progress=False), image))
    return sum(vae) / count, sum(nti) / count


def localisation(model: StableDiffusion, count: int, num_steps: int = BAR_STEPS,
                 progress: bool = True) -> tuple[float, float, float, float]:
    """Noun maps of DDIM inversions: mean best IoU (thresholds 0.1 .. 1.0) with their own and with the
    other object, and mean share of their mass on their own and on the other object."""
    own, other, own_share, other_share = [], [], [], []
    for i in tqdm(range(count), desc="Localisation", disable=not progress, leave=False):
        scene = split_scene("test", i, num_objects=2)
        image, masks = render(scene)
        inversion = invert(model, image, scene.marked_caption(), method="ddim", num_steps=num_steps, progress=False)
        nouns = [word_map(inversion, word["positions"]) for word in inversion.words]
        for k, noun in enumerate(nouns):
            mine, theirs = torch.from_numpy(masks[k]), torch.from_numpy(masks[1 - k])
            own.append(best_iou(iou_curve(noun, mine)).item())
            other.append(best_iou(iou_curve(noun, theirs)).item())
            shares = attention_shares(noun, [mine, theirs])
            own_share.append(shares[0].item())
            other_share.append(shares[1].item())
    return tuple(sum(v) / len(v) for v in (own, other, own_share, other_share))


def background_iou(model: StableDiffusion, count: int, num_steps: int = BAR_STEPS,
                   progress: bool = True) -> dict[int, tuple[float, float, float]]:
    """Mean IoU of DPL's background mask (:func:`dpl_edit.pipeline.background_of`, brought to the
    image's size bilinearly and cut at one half) with the true background, over ``count`` test scenes
    of one object and ``count`` of two (the measure of the paper's supplementary material), each
    beside the IoU of a mask of the whole image (the background's share of it: most of a scene), and
    the IoU of the rest of the image with the objects (0 for a mask of everything)."""
    ious = {}
    for objects in DPL_BACKGROUND_MASK_IOU:
        values, everything, objects_iou = [], [], []
        for i in tqdm(range(count), desc=f"Background masks, {objects} object(s)", disable=not progress, leave=False):
            scene = split_scene("test", i, num_objects=objects)
            image, masks = render(scene)
            found = background_of(model, image, scene.marked_caption(), num_steps=num_steps, progress=False).mask
            truth = ~torch.from_numpy(np.logical_or.reduce(masks))
            values.append(iou_curve(found, truth, thresholds=(0.5,)).item())
            everything.append(truth.float().mean().item())
            objects_iou.append(iou_curve(1 - found, ~truth, thresholds=(0.5,)).item())
        ious[objects] = (sum(values) / count, sum(everything) / count, sum(objects_iou) / count)
    return ious


def check_scene_model(model: StableDiffusion, samples: int = 64, reconstructions: int = 4,
                      localisations: int = 16, num_steps: int = BAR_STEPS, progress: bool = True) -> QualityReport:
    """The quality table's numbers; its bars were set at :data:`BAR_STEPS` DDIM steps (``num_steps``)."""
    check_counts(samples, reconstructions, localisations, num_steps)
    check_scene_model_size(model, "check_scene_model (dpl check-scenes)")
    background, colour, shape = caption_following(model, samples, num_steps=num_steps, progress=progress)
    vae_psnr, nti_psnr = reconstruction(model, reconstructions, num_steps, progress=progress)
    own, other, own_share, other_share = localisation(model, localisations, num_steps, progress=progress)
    backgrounds = background_iou(model, localisations, num_steps, progress=progress)
    return QualityReport(background, colour, shape, vae_psnr, nti_psnr, own, other, own_share, other_share, backgrounds)
