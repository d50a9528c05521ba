"""Reading and writing images: any size and mode in, a square model-sized tensor out.

Tensors are (1, 3, H, W) float in [-1, 1]; PIL images are RGB uint8.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

Fit = Literal["crop", "resize", "pad"]
FITS: tuple[str, ...] = ("crop", "resize", "pad")


def load_image(path: str | os.PathLike, size: int, fit: Fit = "crop") -> Image.Image:
    """Open an image file as an RGB ``size`` x ``size`` PIL image.

    EXIF orientation is applied and any mode (palette, greyscale, alpha, 16-bit) becomes RGB
    (transparent pixels on white). ``fit`` decides how a non-square image becomes square:
    ``crop`` takes the centred square (null-text inversion's loader), ``resize`` stretches it (the
    DPL authors' loader; distorts the aspect ratio), ``pad`` letterboxes it on white.
    """
    if fit not in FITS:
        raise ImageLoadError(f"Unknown fit {fit!r}; choose one of {', '.join(FITS)}")
    return fit_square(open_image(path), size, fit)


def open_image(path: str | os.PathLike) -> Image.Image:
    """An image file as an RGB PIL image of its own size (EXIF orientation applied, any mode made
    RGB as :func:`load_image` says); an ImageLoadError that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"No image file at {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as err:  # PIL's guard against huge decompressed sizes
        raise ImageLoadError(f"{path} is too large to open safely ({err}). Scale it down first: it is "
                             "resized to the model's size anyway (512x512 for Stable Diffusion 1.x).") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageLoadError(
            f"Could not read {path} as an image ({err}). Use a PNG, JPEG, WebP, BMP or TIFF file."
        ) from err
    return to_rgb(image)


def from_array(array: np.ndarray) -> Image.Image:
    """An RGB PIL image from a numpy picture: (H, W) greyscale or (H, W, 3) RGB or (H, W, 4) RGBA,
    uint8 (0-255) or float (0-1 as numpy, scikit-image and diffusers' image processors keep it, or 0-255
    once a value exceeds 1); an ImageLoadError for any other shape or type."""
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if not shape_ok or not (array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)) or not array.size:
        raise ImageLoadError(f"Expected a picture as a numpy array of shape (H, W), (H, W, 3) or (H, W, 4), uint8 "
                             f"or float, got shape {array.shape} of {array.dtype}")
    if array.dtype != np.uint8:
        array = _float_levels(array)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _float_levels(array: np.ndarray) -> np.ndarray:
    """A float picture as uint8 levels: from 0-1 where nothing exceeds 1 (numpy's and scikit-image's
    scale), else from 0-255; NaN as 0."""
    array = np.nan_to_num(np.asarray(array, dtype=np.float64))
    return (array * (255 if array.max() <= 1 else 1)).clip(0, 255).round().astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL image; transparency is composited on white, 16-bit greyscale is read
    from its full scale (65535), float greyscale from 0-1 unless a value exceeds 1 (then 0-255)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale ("I": as older Pillows open it)
        array = np.asarray(image, dtype=np.float64).clip(0, 65535)
        return Image.fromarray((array * (255 / 65535)).round().astype(np.uint8)).convert("RGB")
    if image.mode == "F":  # 32-bit float: 0-1 where nothing exceeds 1, else 0-255
        return Image.fromarray(_float_levels(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of the centred square that ``fit="crop"`` keeps."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def fit_square(image: Image.Image, size: int, fit: Fit, *, fill: int | tuple[int, ...] = (255, 255, 255),
               resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Make an image ``size`` x ``size`` by centre crop, stretch or pad with ``fill`` (white; see
    :func:`load_image`), resampled as null-text inversion's ``load_512`` (crop) and the DPL authors'
    loader (stretch) resample: PIL's default, bicubic. A mask takes the same geometry with ``fill=0``
    and nearest resampling."""
    width, height = image.size
    if fit == "crop":
        image = image.crop(centre_square(width, height))
    elif fit == "pad":
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    return image.resize((size, size), resample)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1] from an RGB PIL image."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """An RGB PIL image from a (1, 3, H, W) or (3, H, W) tensor in [-1, 1]."""
    image = image.detach().float().cpu()
    if image.ndim == 4:
        image = image[0]
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def psnr(a: Image.Image, b: Image.Image, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two RGB images of the same size (uint8 range),
    over the pixels of a (H, W) bool ``mask`` if one is given."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if mask is not None:
        x, y = x[mask], y[mask]
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
