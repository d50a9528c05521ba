"""Parity of our DDIM steps with diffusers' DDIMScheduler and DDIMInverseScheduler."""

import pytest
import torch
from diffusers import DDIMInverseScheduler

from dpl_edit import SettingError
from dpl_edit.diffusion import DDIMSchedule, denoise_step, guided_noise, invert_step
from dpl_edit.models import ddim_scheduler
from dpl_edit.random_models import SD_SCHEDULE


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoise_step_equals_ddim_scheduler(prediction_type):
    scheduler = ddim_scheduler({**SD_SCHEDULE, "prediction_type": prediction_type})
    schedule = DDIMSchedule.from_scheduler(scheduler, 50)
    scheduler.set_timesteps(50)
    assert schedule.timesteps == tuple(scheduler.timesteps.tolist())
    assert schedule.timesteps[0] == 981 and schedule.timesteps[-1] == 1
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        z, out = torch.randn(2, 1, 4, 8, 8, generator=g)
        ours = denoise_step(schedule, i, z, out)
        theirs = scheduler.step(out, t, z, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_invert_step_equals_ddim_inverse_scheduler(prediction_type):
    config = {**SD_SCHEDULE, "prediction_type": prediction_type}
    schedule = DDIMSchedule.from_scheduler(ddim_scheduler(config), 50)
    inverse = DDIMInverseScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    inverse.set_timesteps(50)
    assert tuple(inverse.timesteps.tolist()) == schedule.timesteps[::-1]
    g = torch.Generator().manual_seed(1)
    for j, t in enumerate(inverse.timesteps):
        i = schedule.num_steps - 1 - j
        z, out = torch.randn(2, 1, 4, 8, 8, generator=g)
        ours = invert_step(schedule, i, z, out)
        theirs = inverse.step(out, t, z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_invert_then_denoise_is_identity_for_fixed_noise():
    schedule = DDIMSchedule.from_scheduler(ddim_scheduler(SD_SCHEDULE), 50)
    z, eps = torch.randn(2, 1, 4, 8, 8).double()
    for i in range(50):
        torch.testing.assert_close(denoise_step(schedule, i, invert_step(schedule, i, z, eps), eps), z)


def test_a_schedule_stays_on_the_trained_noise_levels():
    """SD's scheduler (1000 levels, steps_offset 1) would step from level 1000 with 1000 steps, one
    past its last (diffusers' DDIMScheduler then fails with an IndexError): at most 999 steps."""
    scheduler = ddim_scheduler(SD_SCHEDULE)
    assert DDIMSchedule.from_scheduler(scheduler, 999).timesteps[0] == 999
    for steps in (1000, 5000):
        with pytest.raises(SettingError, match=f"num_steps must be at most 999 .*got {steps}"):
            DDIMSchedule.from_scheduler(scheduler, steps)


def test_guidance():
    u, c = torch.zeros(3), torch.ones(3)
    assert torch.equal(guided_noise(u, c, 7.5), torch.full((3,), 7.5))
    assert torch.equal(guided_noise(u, c, 1.0), c)
