import logging

import torch

from dpl_edit.background import background_mask, cluster_agreement


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
    torch.testing.assert_close(result.mask, 1 - region.float())


def test_mask_is_pooled_to_the_word_map_size_by_any_overlap():
    self_maps, region = _scene_self_attention(res=8)
    word = torch.nn.functional.avg_pool2d(region.float()[None, None], 2)[0]  # (1, 4, 4)
    result = background_mask(self_maps, word, num_clusters=2)
    assert result.mask.shape == (4, 4) and result.clusters.shape == (8, 8)
    torch.testing.assert_close(result.mask, 1 - word[0])


def test_fallback_when_every_cluster_agrees_with_a_word(caplog):
    self_maps, region = _scene_self_attention()
    word = torch.ones(1, 8, 8)  # the word is everywhere: no cluster is background
    with caplog.at_level(logging.WARNING):
        result = background_mask(self_maps, word, num_clusters=2)
    assert result.fallback and len(result.background_clusters) == 1
    assert "taking cluster" in caplog.text


def test_agreement_formula():
    clusters = torch.tensor([[0, 1], [1, 1]])
    maps = torch.tensor([[[2.0, 1.0], [0.0, 0.0]]])  # max-scaled: [[1, .5], [0, 0]]
    agreement = cluster_agreement(clusters, maps, 2)
    torch.testing.assert_close(agreement, torch.tensor([[1.0], [0.5 / 3]]))
