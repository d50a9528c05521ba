"""Localisation of words by their cross-attention maps (DPL paper Fig. 5a; REFERENCE section 7).

A word's step-averaged map is upsampled to the mask's size, divided by its maximum, and
thresholded at 0.0, 0.1, ..., 1.0; each threshold gives an IoU with the word's ground-truth mask.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageLoadError

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))


def iou_curve(
    attention: torch.Tensor, mask: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS
) -> torch.Tensor:
    """IoU (len(thresholds),) of a map (res, res) thresholded after max-normalisation, with a mask (H, W) bool."""
    height, width = mask.shape
    heat = F.interpolate(attention[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    heat = heat / heat.max().clamp_min(1e-12)
    mask = mask.bool()
    ious = []
    for threshold in thresholds:
        predicted = heat >= threshold
        union = (predicted | mask).sum()
        ious.append((predicted & mask).sum() / union.clamp_min(1))
    return torch.stack(ious).float()


def load_mask(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """A ground-truth mask (H, W) bool from an image file: pixels brighter than half are the object."""
    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except (OSError, SyntaxError) as err:
        raise ImageLoadError(f"Could not read the mask {path} ({err}); use a black-and-white PNG.") from err
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(grey) > 127)


def plot_curves(curves: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = "") -> None:
    """Plot IoU-vs-threshold curves (label -> (11,) tensor) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, curve in curves.items():
        ax.plot(THRESHOLDS, curve.numpy(), marker="o", label=f"{label} (mean {curve.mean():.3f})")
    ax.set_xlabel("threshold on the max-normalised map")
    ax.set_ylabel("IoU with the ground-truth mask")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
