"""Our sampling loop against diffusers' StableDiffusionPipeline."""

import torch
from diffusers import StableDiffusionPipeline

from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.sampling import sample


def test_sampling_equals_stable_diffusion_pipeline(model):
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
    cond = model.encode_prompt("a cat and a dog")
    null = model.encode_prompt("")
    theirs = pipe(
        latents=z_T.clone(),
        prompt_embeds=cond,
        negative_prompt_embeds=null,
        num_inference_steps=50,
        guidance_scale=7.5,
        output_type="latent",
    ).images
    schedule = DDIMSchedule.from_scheduler(model.scheduler, 50)
    ours = sample(model, z_T, schedule, cond, [null] * 50, 7.5, progress=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
