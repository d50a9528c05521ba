"""Every published number the method rests on, pinned: the DPL paper's (and its authors'
validated values), null-text inversion's and Prompt-to-Prompt's, and the evaluation results ours
are read beside (DPL's Table 1 and background-mask IoU, PIE-Bench's P2P rows). Each is checked by
name, so swapping two of them fails."""

import inspect
import math

import pytest

from dpl_edit import EditConfig, NullTextConfig, invert, published
from dpl_edit.batch import runner
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.editing.plan import P2P_SELF_MAX_RESOLUTION
from dpl_edit.inversion import DynamicPromptConfig
from dpl_edit.models import ddim_scheduler
from dpl_edit.random_models import SD_SCHEDULE


def test_stable_diffusion_setting():
    """REFERENCE section 1: SD 1.x's noise schedule, DDIM without clipping and with the final alpha from
    the schedule, 50 steps at 981, 961, ..., 1, guidance 7.5 (and PIE-Bench's P2P run on top of it)."""
    assert SD_SCHEDULE == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                           "beta_schedule": "scaled_linear"}
    scheduler = ddim_scheduler(SD_SCHEDULE)
    assert not scheduler.config.clip_sample and not scheduler.config.set_alpha_to_one
    assert DDIMSchedule.from_scheduler(scheduler, 50).timesteps == tuple(range(981, 0, -20))
    defaults = inspect.signature(invert).parameters
    assert (defaults["num_steps"].default, defaults["guidance_scale"].default) == (50, 7.5)
    assert (runner.PIE_STEPS, runner.PIE_GUIDANCE) == (50, 7.5)
    assert (runner.PIE_CROSS_STEPS, runner.PIE_SELF_STEPS, runner.PIE_REWEIGHT) == (0.4, 0.6, 2.0)


def test_dpl_loss_weights_thresholds_and_optimiser():
    c = DynamicPromptConfig()
    assert (c.lambda_at, c.lambda_dj, c.lambda_bg) == (1.0, 0.05, 0.05)
    assert (c.threshold_at, c.threshold_dj, c.threshold_bg) == (0.3, 0.9, 0.7)
    assert (c.decay_at, c.decay_dj, c.decay_bg) == (25.0, 25.0, 50.0)
    assert (c.learning_rate, c.weight_decay, c.max_iterations) == (1e-3, 0.01, 21)
    assert (c.cross_resolution, c.self_resolution, c.num_clusters, c.agreement_threshold) == (16, 32, 5, 0.2)
    assert c.balancing_span == "padded" and c.losses == ("at", "dj", "bg")
    assert c.weights == {"at": 1.0, "dj": 0.05, "bg": 0.05}
    at_10 = c.thresholds(10)
    assert at_10["at"] == pytest.approx(0.3 * math.exp(-10 / 25))
    assert at_10["dj"] == pytest.approx(0.9 * math.exp(-10 / 25))
    assert at_10["bg"] == pytest.approx(0.7 * math.exp(-10 / 50))


def test_null_text_inversion_schedule():
    c = NullTextConfig()
    assert c.max_iterations == 10 and c.early_stop and not c.reset_each_step
    assert c.learning_rate_at(0) == pytest.approx(1e-2) and c.learning_rate_at(49) == pytest.approx(1e-2 * 0.51)
    assert c.stop_threshold(0) == pytest.approx(1e-5) and c.stop_threshold(49) == pytest.approx(1e-5 + 49 * 2e-5)
    authors = NullTextConfig.authors()
    assert (authors.max_iterations, authors.early_stop, authors.reset_each_step) == (51, False, True)


def test_prompt_to_prompt_defaults():
    c = EditConfig()
    assert (c.cross_replace_steps, c.self_replace_steps) == (0.8, 0.4)
    assert (c.blend_threshold, c.subtract_threshold, c.blend_start) == (0.3, 0.3, 0.2)
    assert c.self_max_resolution is None and P2P_SELF_MAX_RESOLUTION == 16  # None: 16 at SD 1.x's level
    assert c.mode == "replace" and c.target_tokens == "keep"


def test_evaluation_results_of_the_papers():
    table_1 = published.DPL_WORD_SWAP
    assert table_1["cat -> leopard, dog -> tiger"] == {
        "original images": {"clip_score": 32.50},
        "nti": {"clip_score": 31.50, "structure_dist": 0.0800},
        "dpl": {"clip_score": 32.23, "structure_dist": 0.0312},
    }
    assert table_1["book -> box, clock -> sunflower"] == {
        "original images": {"clip_score": 16.46},
        "nti": {"clip_score": 12.91, "structure_dist": 0.0191},
        "dpl": {"clip_score": 14.29, "structure_dist": 0.0163},
    }
    assert published.DPL_USER_STUDY == {"nti": 12.8, "dpl": 87.2}
    assert published.DPL_BACKGROUND_MASK_IOU == {1: 0.803, 2: 0.749}
    assert published.PIE_BENCH_ITEMS == 700
    assert published.PIE_BENCH_P2P == {
        "nti": {"structure_distance": 13.44, "psnr_unedit_part": 27.03, "lpips_unedit_part": 60.67,
                "mse_unedit_part": 35.86, "ssim_unedit_part": 84.11, "clip_similarity_target_image": 24.75,
                "clip_similarity_target_image_edit_part": 21.86},
        "direct": {"structure_distance": 11.65, "psnr_unedit_part": 27.22, "lpips_unedit_part": 54.55,
                   "clip_similarity_target_image": 25.02, "clip_similarity_target_image_edit_part": 22.10},
    }
