import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dpl_edit.background import background_mask, cluster_agreement, cluster_self_attention, round_trip
from dpl_edit.images import to_pil
from dpl_edit.inversion import DynamicPromptConfig
from dpl_edit.pipeline import background_of, invert
from dpl_edit.registry import SCENE_MODEL_ID, load_model
from dpl_edit.scenes import quality


def _scene_self_attention(res=8):
    """Self-attention of a scene with an object in the top-left quarter: pixels attend within their region."""
    region = torch.zeros(res, res, dtype=torch.long)
    region[: res // 2, : res // 2] = 1
    flat = region.flatten()
    attn = (flat[:, None] == flat[None, :]).float()
    attn = attn / attn.sum(dim=1, keepdim=True)
    return attn.view(res, res, res * res), region


def test_background_is_the_region_no_word_attends_to():
    self_maps, region = _scene_self_attention()
    word = region.float()[None]  # the word attends exactly to the object
    result = background_mask(self_maps, word, num_clusters=2, threshold=0.2)
    assert not result.fallback
    assert torch.equal(result.clusters == result.background_clusters[0], region == 0)
    torch.testing.assert_close(result.mask, round_trip(region == 0, 8))
    assert bool((result.mask >= 1 - region.float()).all())  # the round trip only adds to the background


# A port of the authors' computation (cluster2noun_ in tools/sd_study_utils.py, the mask saved by
# save_mask and read back by read_segfile), written here from its description, in numpy and PIL.
def authors_agreement(clusters: np.ndarray, noun_maps: np.ndarray, num_segments: int) -> np.ndarray:
    repeat = clusters.shape[0] // noun_maps.shape[1]
    scores = np.zeros((num_segments, len(noun_maps)))
    for i, noun in enumerate(noun_maps):
        big = noun.repeat(repeat, axis=0).repeat(repeat, axis=1)
        normalised = (big - np.abs(big.min())) / big.max()
        for c in range(num_segments):
            cluster_mask = (clusters == c).astype(np.float32)
            scores[c, i] = (cluster_mask * normalised).sum() / cluster_mask.sum()
    return scores


def authors_mask(background: np.ndarray, size: int) -> np.ndarray:
    up = 512 // background.shape[0]
    big = background.repeat(up, axis=0).repeat(up, axis=1)
    image = Image.fromarray((big.astype(np.float32) * 255).astype(np.uint8))
    return np.asarray(image.resize((size, size))).astype(bool)


def authors_clusters(self_attention: np.ndarray, num_segments: int = 5) -> np.ndarray:
    """The authors' ``cluster``: numpy's global generator seeded with 1, then KMeans with 10
    initialisations and no random_state on the (res*res, res*res) rows as they are (float32)."""
    from sklearn.cluster import KMeans

    state = np.random.get_state()
    try:
        np.random.seed(1)
        resolution = self_attention.shape[0]
        rows = self_attention.reshape(resolution**2, self_attention.shape[-1])
        return KMeans(n_clusters=num_segments, n_init=10).fit(rows).labels_.reshape(resolution, resolution)
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("seed", range(2))
def test_clusters_equal_the_authors_on_full_size_maps(seed):
    """SD 1.x's 32x32 self-attention (1024 rows of 1024), random but with regions, as the averaged
    maps have: our labels are the authors', label for label, with DPL's default seed."""
    g = torch.Generator().manual_seed(seed)
    regions = F.interpolate(torch.randint(0, 6, (1, 1, 4, 4), generator=g).float(), size=32, mode="nearest").flatten()
    logits = 4 * (regions[:, None] == regions[None, :]).float() + torch.randn(1024, 1024, generator=g)
    self_maps = torch.softmax(logits, dim=-1).view(32, 32, 1024)
    ours = cluster_self_attention(self_maps, 5, DynamicPromptConfig().cluster_seed)
    assert np.array_equal(ours.numpy(), authors_clusters(self_maps.numpy()))
    assert len(np.unique(ours.numpy())) == 5


@pytest.mark.parametrize("seed", range(4))
def test_agreement_and_mask_equal_the_authors_on_random_maps(seed):
    g = torch.Generator().manual_seed(seed)
    clusters = torch.randint(0, 5, (32, 32), generator=g)
    noun_maps = torch.rand(2, 16, 16, generator=g) * 0.1 - 0.02  # negative entries exercise |min|
    ours = cluster_agreement(clusters, noun_maps, 5)
    theirs = authors_agreement(clusters.numpy(), noun_maps.numpy(), 5)
    torch.testing.assert_close(ours, torch.from_numpy(theirs).float())
    blocks = F.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=32, mode="nearest")[0, 0] > 0.5
    for background in (torch.rand(32, 32, generator=g) > 0.7, blocks):
        mask = round_trip(background, 16)
        assert torch.equal(mask.bool(), torch.from_numpy(authors_mask(background.numpy(), 16)))
        pooled = F.adaptive_max_pool2d(background[None, None].float(), 16)[0, 0]
        assert bool((mask >= pooled).all())  # a superset of "any overlap"


def test_fallback_when_every_cluster_agrees_with_a_word(caplog):
    self_maps, _ = _scene_self_attention()
    word = torch.ones(1, 8, 8)  # the word is everywhere (but one pixel, its minimum): no cluster is background
    word[0, -1, -1] = 0.0
    with caplog.at_level(logging.WARNING):
        result = background_mask(self_maps, word, num_clusters=2)
    assert result.fallback and len(result.background_clusters) == 1
    assert "taking cluster" in caplog.text


def test_agreement_formula():
    clusters = torch.tensor([[0, 1], [1, 1]])
    maps = torch.tensor([[[2.0, 1.0], [0.0, 0.0]]])  # max-scaled: [[1, .5], [0, 0]]
    agreement = cluster_agreement(clusters, maps, 2)
    torch.testing.assert_close(agreement, torch.tensor([[1.0], [0.5 / 3]]))


def test_background_of_is_the_mask_a_dpl_inversion_finds(model, image):
    image = to_pil(image)
    inversion = invert(model, image, "a {cat} and a {dog}", method="dpl", num_steps=2, progress=False)
    found = background_of(model, image, "a {cat} and a {dog}", num_steps=2, progress=False)
    assert torch.equal(found.mask.cpu(), inversion.background_mask)
    assert torch.equal(found.clusters.cpu(), inversion.clusters)


def test_the_scene_checks_measure_the_background_mask_beside_the_paper(monkeypatch):
    scene_model = load_model(SCENE_MODEL_ID)
    ious = quality.background_iou(scene_model, 1, progress=False)
    assert list(ious) == [1, 2]
    assert all(0 <= value <= 1 for values in ious.values() for value in values)
    report = quality.QualityReport(1, 1, 1, 30, 30, 0.5, 0.1, 0.6, 0.05, ious)
    assert report.rows()[-2][0].startswith("DPL background mask IoU, 2 objects (paper: 0.749; everything: ")
    assert report.rows()[-4][0].startswith("DPL background mask IoU, 1 object (paper: 0.803; everything: ")
    # a mask of everything: its IoU is the background's share of the image, and its rest holds no object
    monkeypatch.setattr(quality, "background_of", lambda *args, **kwargs: SimpleNamespace(mask=torch.ones(16, 16)))
    for iou, everything, objects in quality.background_iou(scene_model, 2, progress=False).values():
        assert iou == pytest.approx(everything) and objects == 0 and 0.5 < everything < 1


def test_check_scenes_prints_every_check_of_the_bundled_model(capsys):
    from dpl_edit.cli import main

    assert main(["check-scenes", "--samples", "2", "--reconstructions", "1", "--localisations", "1", "--steps", "4",
                 "--quiet"]) == 0  # the bundled model by default
    out = capsys.readouterr().out
    assert "Scene model scenes, 4 DDIM steps: 2 samples, 1 reconstruction, 1 two-object scene" in out
    assert "The bars were set at 50 DDIM steps: at 4 a check may pass or fail for the schedule's sake." in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names[:9] == ["background right", "object colour right", "object shape right", "VAE reconstruction PSNR",
                         "NTI reconstruction PSNR", "noun attention mass on own object",
                         "noun attention mass on other object", "noun map best IoU, own object",
                         "noun map best IoU, other object"]
    assert len(rows) == 13 and all(row.endswith(("| yes |", "| no |", "|  |")) for row in rows)
    assert "nan" not in out


def test_clustering_runs_in_one_thread(monkeypatch):
    """scikit-learn's KMeans runs with one OpenMP and one BLAS thread (synchronising more costs more
    than its iterations' arithmetic: README, Benchmarks), and the limit ends with it."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info

    seen = []
    fit_predict = KMeans.fit_predict

    def spying(self, rows, *args, **kwargs):
        seen.append({pool["num_threads"] for pool in threadpool_info()})
        return fit_predict(self, rows, *args, **kwargs)

    monkeypatch.setattr(KMeans, "fit_predict", spying)
    before = [pool["num_threads"] for pool in threadpool_info()]
    cluster_self_attention(torch.softmax(torch.randn(8, 8, 64), dim=-1))
    assert seen == [{1}]
    assert [pool["num_threads"] for pool in threadpool_info()] == before
