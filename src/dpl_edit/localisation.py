"""Localisation of words by their cross-attention maps (DPL paper Fig. 5a; REFERENCE section 7).

A word's step-averaged map is upsampled to the mask's size, divided by its maximum, and
thresholded at 0.0, 0.1, ..., 1.0; each threshold gives an IoU with the word's ground-truth mask.
At 0.0 every pixel is on, so the IoU there is the mask's share of the image whatever the map:
summaries (mean and best IoU) are taken over the thresholds from 0.1 on. The direct leakage
measure is :func:`attention_shares`: where a map's mass lies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageLoadError
from .images import Fit, fit_square, to_rgb

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))
SUMMARY_FROM = 1  # index of the first threshold (0.1) that summaries use: 0.0 switches every pixel on


def best_iou(curve: torch.Tensor) -> torch.Tensor:
    """The best IoU of a curve (..., 11) over the thresholds 0.1 .. 1.0."""
    return curve[..., SUMMARY_FROM:].amax(dim=-1)


def mean_iou(curve: torch.Tensor) -> torch.Tensor:
    """The mean IoU of a curve (..., 11) over the thresholds 0.1 .. 1.0."""
    return curve[..., SUMMARY_FROM:].mean(dim=-1)


def upsampled(attention: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A map (res, res) brought bilinearly to a mask's (H, W)."""
    return F.interpolate(attention[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def attention_shares(attention: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Where a map's mass lies: its share (len(masks) + 1,) inside each (H, W) bool mask, then outside
    them all (the background).

    The map (res, res) is upsampled bilinearly to the masks' size, not thresholded; the masks should
    not overlap (the shares then sum to 1).
    """
    heat = upsampled(attention, masks[0].shape).clamp_min(0)
    total = heat.sum().clamp_min(1e-12)
    inside = [heat[mask.bool()].sum() / total for mask in masks]
    union = torch.stack([mask.bool() for mask in masks]).any(dim=0)
    return torch.stack([*inside, heat[~union].sum() / total])


def iou_curve(
    attention: torch.Tensor, mask: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS
) -> torch.Tensor:
    """IoU (len(thresholds),) of a map (res, res) thresholded after max-normalisation, with a mask (H, W) bool."""
    heat = upsampled(attention, mask.shape)
    heat = heat / heat.max().clamp_min(1e-12)
    mask = mask.bool()
    ious = []
    for threshold in thresholds:
        predicted = heat >= threshold
        union = (predicted | mask).sum()
        ious.append((predicted & mask).sum() / union.clamp_min(1))
    return torch.stack(ious).float()


def load_mask(path: str | os.PathLike, fit: Fit = "crop") -> torch.Tensor:
    """A ground-truth mask (S, S) bool from an image file: pixels brighter than half are the object,
    or, in a mask of 0s and 1s (as a boolean array saved with PIL is), the 1s; in an image with
    transparent pixels (a cut-out of the object), the pixels more than half opaque.

    A mask of a non-square image is made square as the image was (``fit``, the inversion's: centre
    crop, stretch, or pad with background), at its own resolution, so that it lies where the
    inverted image's pixels do. A mask with no object pixels left is an ImageLoadError: every IoU
    with it would be 0 whatever the map."""
    try:
        with Image.open(path) as image:
            alpha = None
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                alpha = image.convert("RGBA").getchannel("A")
            if alpha is not None and alpha.getextrema()[0] < 255:  # a cut-out: transparent pixels are background
                grey = alpha
            else:
                grey = (to_rgb(image) if image.mode.startswith("I") else image).convert("L")  # 16-bit: from 65535
    except (OSError, SyntaxError) as err:
        raise ImageLoadError(f"Could not read the mask {path} ({err}); use a black-and-white PNG.") from err
    side = min(grey.size) if fit == "crop" else max(grey.size)
    grey = np.asarray(fit_square(grey, side, fit, fill=0, resample=Image.Resampling.NEAREST))
    binary = int(grey.max()) <= 1  # 0/1, not 0/255
    mask = grey > (0 if binary else 127)
    if not mask.any():
        where = " in the centred square the image was cropped to" if fit == "crop" else ""
        raise ImageLoadError(f"The mask {path} has no object pixels{where} (the object is white, or 1 in a "
                             "mask of 0s and 1s, or opaque in a cut-out).")
    return torch.from_numpy(mask)


def plot_curves(curves: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = "") -> None:
    """Plot IoU-vs-threshold curves (label -> (11,) tensor) to a PNG."""
    from matplotlib.figure import Figure  # (not pyplot: no global state)

    fig = Figure(figsize=(5, 3.6), layout="constrained")
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(THRESHOLDS, curve.numpy(), marker="o", label=f"{label} (mean {curve.mean():.3f})")
    ax.set_xlabel("threshold on the max-normalised map")
    ax.set_ylabel("IoU with the ground-truth mask")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=100)
