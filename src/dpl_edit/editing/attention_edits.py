"""Prompt-to-Prompt's attention edits as pure functions (Hertz et al. 2022, "Prompt-to-Prompt
Image Editing with Cross Attention Control"; REFERENCE section 6).

``base`` is the source branch's attention (heads, queries, keys); ``target`` the target
branches' (n, heads, queries, keys). Token tables are (n, 77): one row per target prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def take_source_maps(base: torch.Tensor, mapper: torch.Tensor) -> torch.Tensor:
    """(n, heads, Q, 77): column p of target j is the source's column mapper[j, p] (clamped for new tokens)."""
    return torch.stack([base[..., row.clamp_min(0)] for row in mapper])


def edit_cross_attention(
    base: torch.Tensor,
    target: torch.Tensor,
    mapper: torch.Tensor,
    mapped: torch.Tensor,
    window: torch.Tensor,
    equalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The edited target cross-attention (n, heads, Q, 77), as Prompt-to-Prompt composes it.

    Inside the edit, columns with ``mapped`` (n, 77) = 1 take the mapped source column (a word
    swap when the mapper is the identity, refinement when it aligns two prompts) and new tokens
    (mapped = 0) keep their own; an ``equalizer`` (n, 77) then scales columns (re-weighting, no
    renormalisation). ``window`` (n, 77) says per column whether the edit is on at this step;
    where it is off the target keeps its own attention.
    """
    inner_weight = mapped[:, None, None, :].to(target.dtype)
    inner = take_source_maps(base, mapper) * inner_weight + target * (1 - inner_weight)
    if equalizer is not None:
        inner = inner * equalizer[:, None, None, :].to(inner.dtype)
    weight = window[:, None, None, :].to(target.dtype)
    return inner * weight + target * (1 - weight)


def inject_self_attention(base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Self-attention injection: every target branch takes the source's map (n, heads, Q, Q)."""
    return base.unsqueeze(0).expand_as(target)


def blend_mask(word_maps: torch.Tensor, size: int, threshold: float = 0.3, pool: bool = True) -> torch.Tensor:
    """Prompt-to-Prompt's LocalBlend masks (n, 1, size, size) bool from accumulated word maps (1 + n, res, res).

    Each branch's map is dilated by a 3x3 max pool (``pool``; P2P pools the blend words' maps, not
    the subtract words'), brought to the latent size by nearest interpolation, divided by its maximum
    and thresholded; a target's mask is the union of its own and the source's.
    """
    maps = word_maps[:, None].float()
    if pool:
        maps = F.max_pool2d(maps, 3, stride=1, padding=1)
    maps = F.interpolate(maps, size=(size, size), mode="nearest")
    maps = maps / maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None, None]
    masks = maps > threshold  # (1 + n, 1, size, size)
    return masks[:1] | masks[1:]


def local_blend(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the source branch's latents (row 0) outside each target's mask (rows 1..n)."""
    source = latents[:1]
    return torch.cat([source, source + mask.to(latents.dtype) * (latents[1:] - source)])
