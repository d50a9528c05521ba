"""A caption checker for scene images, written against the renderer's known looks.

Objects are found as connected regions of pixels close to one of the palette colours; a region's
shape follows from how much of its bounding box it fills (triangles about 1/2, ellipses about
pi/4, boxes all of it) and its aspect ratio (ovals and rectangles are 0.6 as tall as wide). The
background is the nearest of the backgrounds' mean colours, over the pixels outside objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .render import BACKGROUNDS, COLOURS, Scene, background_texture

COLOUR_DISTANCE = 70.0  # max RGB distance of an object pixel from its palette colour
MIN_AREA = 25  # pixels of the smallest object region counted (the smallest object has ~100)


@dataclass(frozen=True)
class Region:
    colour: str
    shape: str
    area: int
    mask: np.ndarray  # (H, W) bool


@dataclass(frozen=True)
class CaptionCheck:
    """How well an image follows a scene's caption."""

    background: bool
    colours: list[bool]  # per caption object: a region of its colour was found
    shapes: list[bool]  # per caption object: a region of its colour and shape was found


def _background_means() -> dict[str, np.ndarray]:
    return {b: np.mean([background_texture(b, s).reshape(-1, 3).mean(0) for s in range(8)], axis=0) for b in BACKGROUNDS}


_BACKGROUND_MEANS = _background_means()


def shape_of(mask: np.ndarray) -> str:
    """The shape name of a region (bool mask) from its fill ratio and aspect ratio."""
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = mask.sum() / (height * width)
    elongated = max(height, width) / min(height, width) >= 1.3
    if fill < 0.66:
        return "triangle"
    if fill < 0.89:
        return "oval" if elongated else "circle"
    return "rectangle" if elongated else "square"


def find_regions(image: Image.Image) -> list[Region]:
    """Object regions of an RGB scene image, largest first."""
    from scipy import ndimage  # SciPy loads when a scene is checked (`dpl --help` without it)

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    regions = []
    for name, rgb in COLOURS.items():
        close = np.linalg.norm(pixels - np.array(rgb), axis=-1) < COLOUR_DISTANCE
        close = ndimage.binary_opening(close, iterations=1)  # drop texture speckles
        labels, count = ndimage.label(close)
        for index in range(1, count + 1):
            mask = labels == index
            if mask.sum() >= MIN_AREA:
                regions.append(Region(name, shape_of(mask), int(mask.sum()), mask))
    return sorted(regions, key=lambda r: -r.area)


def classify_background(image: Image.Image, regions: list[Region]) -> str:
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    outside = np.ones(pixels.shape[:2], dtype=bool)
    for region in regions:
        outside &= ~ndimage.binary_dilation(region.mask, iterations=2)
    mean = pixels[outside].mean(axis=0) if outside.any() else pixels.reshape(-1, 3).mean(axis=0)
    return min(BACKGROUNDS, key=lambda b: np.linalg.norm(mean - _BACKGROUND_MEANS[b]))


def check_caption(image: Image.Image, scene: Scene) -> CaptionCheck:
    """Does ``image`` show ``scene``'s caption? Regions are matched to objects without reuse."""
    regions = find_regions(image)
    unused_colour = list(regions)
    unused_shape = list(regions)
    colours, shapes = [], []
    for obj in scene.objects:
        match = next((r for r in unused_colour if r.colour == obj.colour), None)
        colours.append(match is not None)
        if match is not None:
            unused_colour.remove(match)
        match = next((r for r in unused_shape if r.colour == obj.colour and r.shape == obj.shape), None)
        shapes.append(match is not None)
        if match is not None:
            unused_shape.remove(match)
    return CaptionCheck(classify_background(image, regions) == scene.background, colours, shapes)
