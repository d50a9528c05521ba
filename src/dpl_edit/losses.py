"""The three DPL losses on cross-attention maps and their gradual thresholds (DPL paper
section 3.2, Eq. 6-10; REFERENCE section 5). Pure functions on tensors.

``maps`` are one step's cross-attention maps (res, res, 77) of the conditional branch, averaged
over heads and layers; a word is the list of its token positions (the start token is position 0),
and the words may be given as a matrix (:func:`word_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Word = Sequence[int]
# Words as token positions, or as a (K, 77) 0/1 matrix (row k marks word k's token columns): the
# matrix is a tensor, so a compiled token step takes it as an input and serves every prompt with
# the same number of words instead of compiling again for other positions.
Words = Sequence[Word] | torch.Tensor
SPANS = ("padded", "prompt")  # token columns re-softmaxed by the attention balancing loss


def word_matrix(words: Sequence[Word], num_columns: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(K, num_columns) float: 1 at each word's token columns."""
    matrix = torch.zeros(len(words), num_columns, device=device)
    for k, word in enumerate(words):
        matrix[k, list(word)] = 1.0
    return matrix


def word_maps(maps: torch.Tensor, words: Words) -> torch.Tensor:
    """Raw maps (K, res, res) of K words: the sum of each word's token columns (its share of the
    attention, bounded by 1 like a one-token word's)."""
    matrix = words if isinstance(words, torch.Tensor) else word_matrix(words, maps.shape[-1], maps.device)
    return torch.einsum("...c,kc->k...", maps, matrix.to(maps.dtype))


def softmax_columns(num_columns: int, end_position: int | torch.Tensor, span: str = "padded",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """(num_columns,) bool: the token columns that Attend-and-Excite re-softmaxes. ``"padded"``
    drops the start token and the last column (``1:-1`` on all 77, end-of-text and padding
    included: the DPL authors' code and Attend-and-Excite for SD 1.x, on which the paper's
    thresholds were tuned); ``"prompt"`` keeps the prompt's own tokens 1 .. end_position - 1
    (Attend-and-Excite for SD 2.1). ``end_position`` may be a 0-d tensor (a compiled step's input).
    """
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    columns = torch.arange(num_columns, device=device)
    return (columns >= 1) & (columns < (num_columns - 1 if span == "padded" else end_position))


def attend_and_excite_kernel(sigma: float = 0.5, size: int = 3, device: torch.device | str | None = None
                             ) -> torch.Tensor:
    """Attend-and-Excite's (size x size) smoothing kernel.

    Coded there as exp(-((x - mean) / (2 sigma))^2), i.e. a Gaussian of standard deviation
    sigma * sqrt(2) (about 0.71 for sigma = 0.5), normalised to sum 1. Made on ``device`` (no copy
    from the host: none may happen while a CUDA graph is captured) in float32, as there (and as
    Apple's MPS devices allow: they have no float64).
    """
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-((x / (2 * sigma)) ** 2))  # their factors, in their order
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def attention_balancing_loss(
    maps: torch.Tensor, words: Words, end_position: int | torch.Tensor, span: str = "padded"
) -> torch.Tensor:
    """L_at = max_k (1 - m_k) (Attend-and-Excite, Chefer et al. 2023; DPL Eq. 8).

    The token columns of ``span`` (see :func:`softmax_columns`) are re-softmaxed at temperature
    1/100 over the token axis (the others masked out); each word's map (the sum of its tokens'
    columns: its share of the distribution) is smoothed with the 3x3 kernel under reflect padding;
    m_k is its maximum.
    """
    inside = softmax_columns(maps.shape[-1], end_position, span, maps.device)
    text = torch.softmax((100 * maps.float()).masked_fill(~inside, -math.inf), dim=-1)  # (res, res, 77)
    shares = word_maps(text, words)[:, None]  # (K, 1, res, res)
    kernel = attend_and_excite_kernel(device=text.device)[None, None]  # (1, 1, 3, 3)
    smoothed = F.conv2d(F.pad(shares, (1, 1, 1, 1), mode="reflect"), kernel)
    return (1 - smoothed.flatten(1).max(dim=1).values).max()


def disjoint_object_loss(word_maps: torch.Tensor) -> torch.Tensor:
    """L_dj: mean over pairs i > j of cos(A^i, A^j) on raw word maps (K, res, res) (DPL Eq. 7)."""
    flat = F.normalize(word_maps.flatten(1).float(), dim=1)  # (K, res*res)
    cosine = flat @ flat.T  # (K, K)
    i, j = torch.tril_indices(len(flat), len(flat), offset=-1, device=flat.device)
    return cosine[i, j].mean()


def background_leakage_loss(word_maps: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """L_bg: mean over k of cos(A^k, B), B the background mask (res, res) (DPL Eq. 9)."""
    flat = word_maps.flatten(1).float()  # (K, res*res)
    b = background.flatten().to(flat).expand_as(flat)
    return F.cosine_similarity(flat, b, dim=1).mean()


def gradual_threshold(initial: float, decay: float, step: int) -> float:
    """TH(i) = initial * exp(-i / decay) (DPL Eq. 10), i = 0 the noisiest step."""
    return initial * math.exp(-step / decay)
