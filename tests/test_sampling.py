"""Our sampling loop against diffusers' StableDiffusionPipeline.

Tolerances are in float32 ulps of the latents' scale (max |z|, about 60 on the tiny random model):
kernels on another CPU order float sums differently, so exact agreement is not to be had, but a
step computed by the same formula agrees to a few ulps. One step from the pipeline's own latent
(teacher forcing) must agree to 4 ulps (1 ulp is seen); the whole 50-step loop to 2 ulps per step
(100 ulps; about 15 are seen). A wrong level or end alpha is off by about 10^4 ulps per step.
"""

import dataclasses

import pytest
import torch
from diffusers import StableDiffusionPipeline

import dpl_edit.sampling
from dpl_edit.diffusion import DDIMSchedule, ddim_move
from dpl_edit.sampling import sample

ULP = torch.finfo(torch.float32).eps
STEPS = 50


@pytest.fixture(scope="module")
def pipeline_run(model):
    """(z_T, cond, null, the pipeline's latents after each step (51, z_T first))."""
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=model.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(1, 4, 32, 32, generator=g)
    cond, null = model.encode_prompt("a cat and a dog"), model.encode_prompt("")
    latents = [z_T]

    def record(pipe, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    final = pipe(
        latents=z_T.clone(),
        prompt_embeds=cond,
        negative_prompt_embeds=null,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        output_type="latent",
        callback_on_step_end=record,
    ).images
    assert torch.equal(final, latents[-1])
    return z_T, cond, null, torch.stack(latents)


def step_errors(model, pipeline_run, schedule=None) -> torch.Tensor:
    """Max |ours - theirs| of each step when our step starts from the pipeline's latent."""
    z_T, cond, null, theirs = pipeline_run
    schedule = schedule or DDIMSchedule.from_scheduler(model.scheduler, STEPS)
    errors = []

    def teacher_forced(i, z):
        errors.append((z - theirs[i + 1]).abs().max())
        return theirs[i + 1]

    sample(model, z_T, schedule, cond, [null] * STEPS, 7.5, step_end=teacher_forced, progress=False)
    return torch.stack(errors)


def test_each_step_equals_stable_diffusion_pipeline(model, pipeline_run):
    scale = pipeline_run[3].abs().max()
    errors = step_errors(model, pipeline_run)
    assert len(errors) == STEPS
    assert errors.max() <= 4 * ULP * scale, errors


def test_sampling_equals_stable_diffusion_pipeline(model, pipeline_run):
    z_T, cond, null, theirs = pipeline_run
    schedule = DDIMSchedule.from_scheduler(model.scheduler, STEPS)
    ours = sample(model, z_T, schedule, cond, [null] * STEPS, 7.5, progress=False)
    assert (ours - theirs[-1]).abs().max() <= 2 * STEPS * ULP * theirs.abs().max()


def _off_by_one_level(schedule, i, z, output):
    t = schedule.timesteps[i]
    return ddim_move(z, output, schedule.alpha_cumprod(t), schedule.alpha_cumprod(t - schedule.step_ratio + 1))


@pytest.mark.parametrize("wrong", ["level off by one", "final alpha one"])
def test_a_wrong_step_fails_the_comparison(model, pipeline_run, monkeypatch, wrong):
    schedule = DDIMSchedule.from_scheduler(model.scheduler, STEPS)
    if wrong == "level off by one":
        monkeypatch.setattr(dpl_edit.sampling, "denoise_step", _off_by_one_level)
    else:
        schedule = dataclasses.replace(schedule, final_alpha_cumprod=1.0)
    errors = step_errors(model, pipeline_run, schedule)
    assert errors.max() > 100 * 4 * ULP * pipeline_run[3].abs().max()


def test_an_unguided_source_row_steps_on_its_conditional_prediction(model, one_at_a_time):
    """Negative-prompt inversion's source has its own states as null states, so guidance cancels on
    it: ``source_unguided`` leaves its unconditional row out (3 rows a step for a source and a target,
    not 4) and changes nothing, bit for bit with the UNet called one image at a time (guided_noise(e, e)
    is e)."""
    schedule = DDIMSchedule.from_scheduler(model.scheduler, 4)
    source, target = model.encode_prompt("a cat and a dog"), model.encode_prompt("a cat and a tiger")
    z_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    args = (model, z_T, schedule, torch.cat([source, target]), source, 7.5)
    guided = sample(*args, progress=False)
    one_at_a_time.clear()
    unguided = sample(*args, source_unguided=True, progress=False)
    assert torch.equal(unguided, guided)
    assert one_at_a_time == [3] * 4
    with pytest.raises(ValueError, match="not both"):
        sample(*args, source_trajectory=torch.zeros(5, 4, 32, 32), source_unguided=True, progress=False)
