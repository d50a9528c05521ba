"""The DPL losses on hand-built maps, and attention balancing against Attend-and-Excite."""

import math

import pytest
import torch
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
    StableDiffusionAttendAndExcitePipeline as AttendAndExcite,
)

from dpl_edit.losses import (
    attend_and_excite_kernel,
    attention_balancing_loss,
    background_leakage_loss,
    disjoint_object_loss,
    gradual_threshold,
    word_maps,
)


def _blob(res, rows, cols):
    m = torch.zeros(res, res)
    m[rows, cols] = 1.0
    return m


def test_disjoint_object_loss_known_values():
    a, b = _blob(8, slice(0, 4), slice(0, 4)), _blob(8, slice(4, 8), slice(4, 8))
    assert disjoint_object_loss(torch.stack([a, b])).item() == pytest.approx(0.0)
    assert disjoint_object_loss(torch.stack([a, a])).item() == pytest.approx(1.0)
    half = _blob(8, slice(0, 4), slice(0, 2))  # half of a's area inside a: cos = 8 / sqrt(16 * 8)
    c = torch.stack([a, half, b])  # pairs: (a,half)=1/sqrt2, (a,b)=0, (half,b)=0
    assert disjoint_object_loss(c).item() == pytest.approx((1 / math.sqrt(2)) / 3)


def test_background_leakage_loss_known_values():
    background = _blob(8, slice(0, 8), slice(0, 4))
    inside, outside = _blob(8, slice(0, 2), slice(0, 2)), _blob(8, slice(0, 2), slice(6, 8))
    assert background_leakage_loss(outside[None], background).item() == pytest.approx(0.0)
    # inside: 4 cells all in the 32-cell background: cos = 4 / sqrt(4 * 32)
    expected = (4 / math.sqrt(4 * 32) + 0.0) / 2
    assert background_leakage_loss(torch.stack([inside, outside]), background).item() == pytest.approx(expected)


def test_attention_balancing_loss_is_zero_for_a_peaked_token_and_high_for_a_flat_one():
    maps = torch.full((16, 16, 77), 1e-3)
    maps[4:9, 4:9, 2] = 1.0  # token 2 dominates a 5x5 area: softmax(100 A) there is ~1
    assert attention_balancing_loss(maps, [[2]], end_position=4).item() == pytest.approx(0.0, abs=1e-4)
    # token 3 never dominates anywhere: its softmax share is 1/3 outside the blob, ~0 inside
    assert attention_balancing_loss(maps, [[2], [3]], end_position=4).item() == pytest.approx(2 / 3, abs=1e-3)


def test_kernel_is_attend_and_excites():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
        GaussianSmoothing,
    )

    torch.testing.assert_close(attend_and_excite_kernel(), GaussianSmoothing().weight[0, 0])


@pytest.mark.parametrize("seed", range(5))
def test_attention_balancing_equals_attend_and_excite(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.softmax(torch.randn(16, 16, 77, generator=g) * 3, dim=-1)
    end = 8  # prompt tokens 1..7; A&E's 1:-1 slice on maps cut after the end token is the same slice
    indices = [2, 5]
    theirs_max = AttendAndExcite._compute_max_attention_per_index(maps[..., : end + 1].clone(), indices)
    theirs = AttendAndExcite._compute_loss(theirs_max)
    ours = attention_balancing_loss(maps, [[2], [5]], end_position=end)
    torch.testing.assert_close(ours, torch.as_tensor(theirs, dtype=ours.dtype))


def test_multi_token_words_average_their_columns():
    maps = torch.rand(4, 4, 77)
    torch.testing.assert_close(word_maps(maps, [[2, 3]])[0], (maps[..., 2] + maps[..., 3]) / 2)


def test_gradual_thresholds_eq_10():
    assert gradual_threshold(0.3, 25, 0) == 0.3
    assert gradual_threshold(0.7, 50, 50) == pytest.approx(0.7 / math.e)
