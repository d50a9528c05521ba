"""The background mask from self-attention clustering (DPL paper section 3.3; REFERENCE
section 4).

Pixels are clustered by their rows of the inversion-averaged self-attention map; a cluster whose
agreement with every noun's cross-attention map is below a threshold is background. Agreement and
the mask's size change are computed as the authors' code computes them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROUND_TRIP_SIZE = 512  # the authors save the mask as a 512x512 PNG and read it back at the map size
# the authors' code seeds numpy's global generator with 1 before a KMeans without random_state, which
# draws what random_state=1 draws
AUTHORS_CLUSTER_SEED = 1
logger = logging.getLogger(__name__)


@dataclass
class BackgroundMask:
    """The mask and how it was found."""

    mask: torch.Tensor  # (res_cross, res_cross) float, 1 = background
    clusters: torch.Tensor  # (res_self, res_self) int64 cluster label of each pixel
    agreement: torch.Tensor  # (V, K) sigma of cluster c with word k
    background_clusters: list[int]
    fallback: bool  # no cluster was below the threshold: the least-agreeing one was taken


def cluster_self_attention(self_maps: torch.Tensor, num_clusters: int = 5, seed: int = AUTHORS_CLUSTER_SEED
                           ) -> torch.Tensor:
    """KMeans labels (res, res) of the rows of a self-attention map (res, res, res*res), clustered as the
    authors' code clusters them: float32 rows, 10 initialisations, their seed by default."""
    from sklearn.cluster import KMeans  # scikit-learn loads when a mask is made (`dpl --help` without it)
    from threadpoolctl import threadpool_limits  # (scikit-learn's own dependency)

    res = self_maps.shape[0]
    rows = self_maps.reshape(res * res, -1).float().cpu().numpy()  # (res*res, res*res) float32, as theirs
    # In one thread: each Lloyd iteration over SD's 1,024 rows is a few MFLOP, and synchronising
    # OpenMP's and OpenBLAS' threads costs more. On a 2-core CPU the tiny random model's clustering
    # took 0.29-0.38 s so against 0.67-0.97 s on both cores, with the same labels; on the H200
    # machine's 16-core host it took 1.55 s of a 2.1 s 1-step DPL inversion (README, Benchmarks).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")  # degenerate maps of random models give fewer distinct points
        labels = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(rows)
    return torch.from_numpy(labels).long().view(res, res)


def cluster_agreement(clusters: torch.Tensor, word_maps: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """sigma (V, K): sum(mask_c * A_k) / sum(mask_c).

    A_k is brought to the clusters' size by nearest (pixel repeat) and normalised as the authors
    do, (A_k - |min A_k|) / max A_k.
    """
    res = clusters.shape[0]
    maps = F.interpolate(word_maps[:, None].double().cpu(), size=(res, res), mode="nearest")[:, 0]  # (K, res, res)
    low = maps.flatten(1).amin(dim=1).abs()[:, None, None]
    high = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    maps = ((maps - low) / high).float()
    masks = F.one_hot(clusters, num_clusters).permute(2, 0, 1).float()  # (V, res, res)
    overlap = torch.einsum("vhw,khw->vk", masks, maps)
    return overlap / masks.flatten(1).sum(dim=1).clamp_min(1)[:, None]


def background_mask(
    self_maps: torch.Tensor,
    word_maps: torch.Tensor,
    *,
    num_clusters: int = 5,
    threshold: float = 0.2,
    seed: int = AUTHORS_CLUSTER_SEED,
) -> BackgroundMask:
    """The background mask at the word maps' size.

    ``self_maps`` (res_s, res_s, res_s*res_s) and ``word_maps`` (K, res_c, res_c) are averaged
    over the DDIM inversion. Clusters whose agreement is under ``threshold`` for every word are
    background. If none is, the cluster with the lowest highest agreement is taken and a warning
    logged (the authors' code crashes there). The mask is brought to the words' size by the
    authors' PNG round trip (:func:`round_trip`).
    """
    clusters = cluster_self_attention(self_maps, num_clusters, seed)
    agreement = cluster_agreement(clusters, word_maps, num_clusters)
    chosen = [c for c in range(num_clusters) if bool((agreement[c] < threshold).all())]
    fallback = not chosen
    if fallback:
        chosen = [int(agreement.amax(dim=1).argmin())]
        logger.warning(
            "No self-attention cluster agrees less than %.2f with every word; taking cluster %d "
            "(highest agreement %.2f) as the background.", threshold, chosen[0], float(agreement[chosen[0]].max()),
        )
    full = torch.isin(clusters, torch.tensor(chosen))  # (res_s, res_s) bool
    return BackgroundMask(round_trip(full, word_maps.shape[-1]), clusters, agreement, chosen, fallback)


def round_trip(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A boolean mask (res, res) at ``size`` as the authors' PNG round trip gives it (float, 1 = set).

    Nearest up to 512x512, an 8-bit greyscale image (0 / 255), PIL's default (bicubic) resize to
    ``size``, nonzero. Bicubic's support reaches past a region's edge, so the result is slightly
    dilated compared with plain pooling.
    """
    big = F.interpolate(mask[None, None].float(), size=ROUND_TRIP_SIZE, mode="nearest")[0, 0]
    image = Image.fromarray(big.numpy().astype(np.uint8) * 255)  # mode "L"
    small = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(small != 0).float()
