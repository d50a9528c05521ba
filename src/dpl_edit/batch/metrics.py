"""`dpl metrics`: PIE-Bench's metrics, computed as its evaluation script (``evaluation/evaluate.py``
and ``matrics_calculator.py`` of cure-lab/PnPInversion) computes them.

- **Unedited part** (no weights): PSNR, MSE and SSIM (torchmetrics, data range 1) of the source and
  the edit, both multiplied by (1 - mask) with PIE-Bench's mask (its border pixels set), images in
  [0, 1]; the source is the first argument, as there.
- **Structure distance** (DINO ViT-B/8, ``--dino DIR`` or ``DPL_DINO``): the MSE between the
  cosine self-similarity matrices of the last layer's keys (all tokens, CLS included) of the two
  whole images, each resized to 224 on its short side (at most 480 on the long one) and normalised
  with ImageNet's mean and std. As in PIE-Bench the pixels enter in 0..255, not 0..1.
- **CLIP similarity** (CLIP ViT-L/14, ``--clip DIR`` or ``DPL_CLIP``): torchmetrics' CLIPScore
  (100 x the cosine, at least 0; computed here as it computes it) of the edit with the target prompt, whole and with the pixels
  outside the mask set to 0 (the edited part).
- **LPIPS** (SqueezeNet 1.1, ``--lpips FILE`` or ``DPL_LPIPS``, else torchvision's file in the torch hub
  cache): torchmetrics' LPIPS (net_type "squeeze", as PIE-Bench) of the unedited parts mapped to
  [-1, 1] (see ``lpips.py``).
- **Edited part vs oracle** and **distractors** (scenes only): PSNR of the edit against the renderer's
  true edit inside the mask, and against the source on the other objects (``distractor_mask``):
  what an edit did where it should, and what it leaked onto look-alikes.

Metrics whose weights are missing are left out with a note naming what is missing; the others run.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.regression import mean_squared_error
from tqdm.auto import tqdm

from ..errors import DplEditError
from ..images import centre_square
from ..published import PIE_BENCH_ITEMS, PIE_BENCH_P2P
from .lpips import Lpips, default_weights
from .piebench import EDIT_TYPES, IMAGES, EditItem, decode_mask, edit_path
from .runner import METHOD_FOLDERS

PIXEL_METRICS = ("psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def unit(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def at_source_size(edited: Image.Image, source: Image.Image, path: str | Path = "the edit") -> Image.Image:
    """The edit as the metrics compare it with the source image: as it is at the source's size; resized
    to the source's size where it has the source's shape at another size (a model's own: SD 2.x's 768
    pixels against PIE-Bench's 512, the scene model's 64, the tiny model's 128 against a scene's 64);
    its last panel where it is PIE-Bench's strip of panels (text, source, reconstruction, edit side by
    side: a multiple of the source's size); else a DplEditError."""
    (width, height), (side_w, side_h) = edited.size, source.size
    if (width, height) == (side_w, side_h):
        return edited
    if width * side_h == height * side_w:
        return edited.resize(source.size, Image.Resampling.LANCZOS)
    if width % side_w == 0 and height % side_h == 0:
        return edited.crop((width - side_w, height - side_h, width, height))
    raise DplEditError(f"{path} is {width}x{height}, its source image {side_w}x{side_h}: neither the source's "
                       "shape nor a strip of panels of its size, so it cannot be compared with it.")


def inverted_square(edited: Image.Image, source: Image.Image) -> tuple[int, int, int, int] | None:
    """The box of ``source`` that ``dpl batch`` inverted for ``edited``: a square edit of a non-square
    source (not a strip of its panels) was made from its centre square (``fit="crop"``); None where
    the edit is of the whole source."""
    (width, height), (side_w, side_h) = edited.size, source.size
    if width != height or side_w == side_h or (width % side_w == 0 and height % side_h == 0):
        return None
    return centre_square(side_w, side_h)


def cropped(box: tuple[int, int, int, int] | None, picture: Image.Image | np.ndarray | None):
    """An image, or a mask (rows, columns), cut to ``box``; as it is where ``box`` or it is None."""
    if box is None or picture is None:
        return picture
    if isinstance(picture, Image.Image):
        return picture.crop(box)
    left, top, right, bottom = box
    return picture[top:bottom, left:right]


def unedited_images(source: Image.Image, edited: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and edit in [0, 1] with the edited part (mask) zeroed, as PIE-Bench compares them."""
    keep = torch.from_numpy(1 - mask.astype(np.float32))
    return unit(source) * keep, unit(edited) * keep


def unedited_part(source: Image.Image, edited: Image.Image, mask: np.ndarray) -> dict[str, float]:
    """PSNR, MSE and SSIM of source and edit with the edited part (mask) zeroed, as PIE-Bench."""
    if mask.all():
        return dict.fromkeys(PIXEL_METRICS, math.nan)
    a, b = unedited_images(source, edited, mask)
    return {
        "psnr_unedit_part": peak_signal_noise_ratio(a, b, data_range=1.0).item(),
        "mse_unedit_part": mean_squared_error(a[0].contiguous(), b[0].contiguous()).item(),
        "ssim_unedit_part": structural_similarity_index_measure(a, b, data_range=1.0).item(),
    }


def region_psnr(edited: Image.Image, oracle: Image.Image, mask: np.ndarray) -> float:
    """PSNR of the edit against another image (the true edit, or the source) inside the mask (pixels in [0, 1])."""
    inside = torch.from_numpy(mask)
    if not inside.any():
        return math.nan
    error = ((unit(edited) - unit(oracle))[0].permute(1, 2, 0)[inside] ** 2).mean().item()
    return 10 * math.log10(1 / max(error, 1e-12))


class StructureDistance:
    """DINO ViT-B/8 key self-similarity distance (Splicing ViT Features; PIE-Bench's Structure distance)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import ViTModel

        try:
            self.model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False).to(device).eval()
        except OSError as err:
            raise DplEditError(f"Could not load the DINO ViT-B/8 weights from {folder} ({err}); give a local "
                               "transformers folder of facebook/dino-vitb8 with --dino or DPL_DINO") from err
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.model.layers[-1].attention.k_proj.register_forward_hook(
            lambda module, inputs, output: self.keys.append(output))

    def self_similarity(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        height, width = pixels.shape[-2:]
        scale = 224 / min(height, width)
        if max(height, width) * scale > 480:
            scale = 480 / max(height, width)
        size = (round(height * scale), round(width * scale))
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.keys.clear()
        with torch.no_grad():
            self.model(pixel_values=((pixels - mean) / std).to(self.device), interpolate_pos_encoding=True)
        keys = self.keys[-1][0]  # (tokens, heads x head size), head-major as PIE-Bench concatenates them
        norms = keys.norm(dim=-1, keepdim=True)
        return (keys @ keys.T) / (norms @ norms.T).clamp_min(1e-8)

    def __call__(self, source: Image.Image, edited: Image.Image) -> float:
        return F.mse_loss(self.self_similarity(edited), self.self_similarity(source)).item()


class ClipSimilarity:
    """CLIP score (torchmetrics' CLIPScore: 100 x the cosine of the projected image and text embeddings,
    at least 0) from a local CLIP folder. Computed here with transformers, as torchmetrics computes it:
    torchmetrics 1.9's CLIPScore takes hub names only and breaks on transformers 5's feature outputs."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(str(folder)).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            raise DplEditError(f"Could not load the CLIP weights from {folder} ({err}); give a local transformers "
                               "folder of openai/clip-vit-large-patch14 with --clip or DPL_CLIP") from err
        self.device = device

    def __call__(self, image: Image.Image, text: str, mask: np.ndarray | None = None) -> float:
        pixels = np.asarray(image.convert("RGB"))
        if mask is not None:
            pixels = np.uint8(pixels * mask[..., None])
        images = self.processor(images=[torch.from_numpy(pixels.copy()).permute(2, 0, 1)], return_tensors="pt")
        words = self.processor(text=[text], return_tensors="pt", padding=True)
        longest = self.model.config.text_config.max_position_embeddings  # torchmetrics cuts longer captions
        with torch.no_grad():
            out = self.model(input_ids=words["input_ids"][..., :longest].to(self.device),
                             attention_mask=words["attention_mask"][..., :longest].to(self.device),
                             pixel_values=images["pixel_values"].to(self.device))
        cosine = F.cosine_similarity(out.image_embeds, out.text_embeds).item()
        return max(100 * cosine, 0.0)


def unedited_lpips(lpips: Lpips, source: Image.Image, edited: Image.Image, mask: np.ndarray) -> float:
    """LPIPS of source and edit with the edited part zeroed, mapped to [-1, 1] as PIE-Bench does."""
    a, b = unedited_images(source, edited, mask)
    return lpips(a.to(lpips.shift.device) * 2 - 1, b.to(lpips.shift.device) * 2 - 1).item()


def weighted_metrics(dino: str | None, clip: str | None, lpips: str | None = None,
                     device="cpu") -> tuple[dict, list[str]]:
    """The metrics that need weights which are available, and a note for each one left out."""
    available, notes = {}, []
    lpips = lpips or default_weights()
    if lpips:
        available["lpips"] = Lpips.from_file(lpips, device)
    else:
        notes.append("lpips_unedit_part left out: no SqueezeNet 1.1 weights (give torchvision's "
                     "squeezenet1_1-b8a52dc0.pth with --lpips FILE or set DPL_LPIPS)")
    dino = dino or os.environ.get("DPL_DINO")
    clip = clip or os.environ.get("DPL_CLIP")
    if dino:
        available["structure_distance"] = StructureDistance(dino, device)
    else:
        notes.append("structure_distance left out: no DINO ViT-B/8 weights (give --dino DIR or set DPL_DINO)")
    if clip:
        available["clip"] = ClipSimilarity(clip, device)
    else:
        notes.append("clip_similarity left out: no CLIP ViT-L/14 weights (give --clip DIR or set DPL_CLIP)")
    return available, notes


def evaluate(dataset: str | Path, out: str | Path, items: Sequence[EditItem], methods: Sequence[str],
             dino: str | None = None, clip: str | None = None, lpips: str | None = None, device="cpu",
             progress: bool = True) -> dict:
    """Per-item metrics of each method's edits in ``out`` (PIE-Bench layout); returns
    {"rows": [...], "notes": [...]}. Missing edits are counted, not scored."""
    dataset, out = Path(dataset), Path(out)
    weighted, notes = weighted_metrics(dino, clip, lpips, device)
    rows, unreadable = [], []
    for item in tqdm(items, desc="Metrics", unit="item", disable=not progress):
        with Image.open(dataset / IMAGES / item.image_path) as opened:
            source = opened.convert("RGB")
        mask = decode_mask(item.mask_rle, (source.height, source.width))
        oracle = None
        if item.oracle_image_path and (dataset / "oracle_images" / item.oracle_image_path).is_file():
            with Image.open(dataset / "oracle_images" / item.oracle_image_path) as opened:
                oracle = opened.convert("RGB")
        for method in methods:
            path = edit_path(out, METHOD_FOLDERS.get(method, method), item)
            row = {"key": item.key, "method": method, "editing_type_id": item.editing_type_id,
                   **({"oracle": True} if item.oracle_image_path else {})}
            if not path.is_file():
                rows.append({**row, "missing": True})
                continue
            try:
                with Image.open(path) as opened:
                    edited = opened.convert("RGB")
            except (UnidentifiedImageError, OSError) as err:  # a damaged file: counted missing, and named
                unreadable.append(f"{path.relative_to(out)} ({err})")
                rows.append({**row, "missing": True})
                continue
            box = inverted_square(edited, source)
            inverted, region, truth = (cropped(box, picture) for picture in (source, mask, oracle))
            distractor = None
            if item.distractor_rle:
                distractor = cropped(box, decode_mask(item.distractor_rle, mask.shape, border=False))
            edited = at_source_size(edited, inverted, path)
            row.update(unedited_part(inverted, edited, region))
            if "lpips" in weighted:
                row["lpips_unedit_part"] = unedited_lpips(weighted["lpips"], inverted, edited, region)
            if truth is not None:
                row["psnr_edit_part_vs_oracle"] = region_psnr(edited, truth, region)
            if distractor is not None:
                row["psnr_distractors"] = region_psnr(edited, inverted, distractor)
            if "structure_distance" in weighted:
                row["structure_distance"] = weighted["structure_distance"](inverted, edited)
            if "clip" in weighted:
                row["clip_similarity_target_image"] = weighted["clip"](edited, item.target_prompt)
                row["clip_similarity_target_image_edit_part"] = weighted["clip"](edited, item.target_prompt, region)
            rows.append(row)
    if unreadable:
        notes.append(f"{len(unreadable)} edit image(s) could not be read and count as missing (run `dpl batch` "
                     f"again after removing them): {'; '.join(unreadable)}")
    return {"rows": rows, "notes": notes}


# PIE-Bench's table units: structure distance x 10^3, LPIPS x 10^3, MSE x 10^4, SSIM x 10^2.
SCALES = {"structure_distance": 1e3, "lpips_unedit_part": 1e3, "mse_unedit_part": 1e4, "ssim_unedit_part": 1e2}
ORDER = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part",
         "clip_similarity_target_image", "clip_similarity_target_image_edit_part", "psnr_edit_part_vs_oracle",
         "psnr_distractors")


def tables(result: dict) -> tuple[str, dict]:
    """A markdown table (methods side by side; overall, then per edit type) and the means as JSON."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for row in result["rows"]:
        for group in ("all", row["editing_type_id"]):
            counts[(group, row["method"])][1 if row.get("missing") else 0] += 1
            for name, value in row.items():
                if name in ORDER and not (isinstance(value, float) and math.isnan(value)):
                    groups[(group, row["method"])][name].append(value)
    present = [name for name in ORDER if any(name in g for g in groups.values())]
    methods = list(dict.fromkeys(row["method"] for row in result["rows"]))
    kinds = ["all"] + sorted({row["editing_type_id"] for row in result["rows"]}, key=str)
    header = ["edit type", "method", "items", *(_label(n) for n in present)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    means = {}
    for kind in kinds:
        for method in methods:
            if (kind, method) not in counts:
                continue
            scored, missing = counts[(kind, method)]
            values = {n: float(np.mean(groups[(kind, method)][n])) * SCALES.get(n, 1)
                      for n in present if groups[(kind, method)].get(n)}
            means.setdefault(kind, {})[method] = {"items": scored, "missing": missing, **values}
            name = "all" if kind == "all" else f"{kind} {EDIT_TYPES.get(kind, '')}".strip()
            cells = [name, method, f"{scored}" + (f" (+{missing} missing)" if missing else "")]
            lines.append("| " + " | ".join(cells + [f"{values[n]:.2f}" if n in values else "" for n in present]) + " |")
        if kind == "all":
            for method, values in published_means(result).items():
                cells = ["all", f"{method}, published (SD 1.4)", f"{values['items']}"]
                lines.append("| " + " | ".join(cells + [f"{values[n]:.2f}" if n in values else "" for n in present]) + " |")
    notes = "".join(f"\n- {note}" for note in result["notes"])
    return "\n".join(lines) + ("\n" + notes if notes else "") + "\n", means


def published_means(result: dict) -> dict[str, dict]:
    """PIE-Bench's published means (:data:`dpl_edit.published.PIE_BENCH_P2P`) of the methods in a
    run on PIE-Bench (not on exported scenes, whose rows have an oracle), to be read beside ours."""
    if any(row.get("oracle") or "psnr_edit_part_vs_oracle" in row for row in result["rows"]):
        return {}
    methods = dict.fromkeys(row["method"] for row in result["rows"])
    return {method: {"items": PIE_BENCH_ITEMS, **PIE_BENCH_P2P[method]} for method in methods if method in PIE_BENCH_P2P}


def _label(name: str) -> str:
    scale = {1e3: " x10^3", 1e4: " x10^4", 1e2: " x10^2"}.get(SCALES.get(name, 1), "")
    return name.replace("_", " ") + scale


def write_tables(result: dict, folder: str | Path) -> tuple[Path, Path]:
    markdown, means = tables(result)
    folder = Path(folder)
    (folder / "metrics.md").write_text(markdown)
    (folder / "metrics.json").write_text(json.dumps({"means": means, "published": published_means(result),
                                                     "rows": result["rows"], "notes": result["notes"]}, indent=1))
    return folder / "metrics.md", folder / "metrics.json"
