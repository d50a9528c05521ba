import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from dpl_edit import NullTextConfig, invert, reconstruct_latents
from dpl_edit.attention import attention_layers, select_layers
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.images import to_pil
from dpl_edit.inversion import ddim_inversion, null_text
from dpl_edit.inversion.null_text import optimize_null


def test_ddim_inversion_trajectory_and_maps(model, image):
    schedule = DDIMSchedule.from_scheduler(model.scheduler, 50)
    z0 = model.encode_image(image)
    layers = attention_layers(model.unet)
    record = select_layers(layers, kinds=["cross"], resolutions=[16]) + select_layers(
        layers, kinds=["self"], resolutions=[32]
    )
    result = ddim_inversion(model, z0, model.encode_prompt("a cat"), schedule, record=record, progress=False)
    assert len(result.trajectory) == 51 and torch.equal(result.trajectory[0], z0)
    assert torch.equal(result.pivot[0], result.trajectory[-1])
    assert result.attention.steps == 50
    assert result.attention.average_maps("cross", 16).shape == (1, 16, 16, 77)
    assert result.attention.average_maps("self", 32).shape == (1, 32, 32, 1024)
    assert model.unet.attn_processors.keys() == {l.name for l in layers}


def test_null_text_inversion_beats_ddim_at_guidance_7_5(model, image):
    steps = []
    errors = {}
    for method in ("ddim", "nti"):
        inversion = invert(
            model, to_pil(image), "a cat and a dog", method=method, num_steps=10,
            callback=steps.append, progress=False,
        )
        z0 = reconstruct_latents(model, inversion, progress=False)
        errors[method] = torch.mean((z0 - inversion.source_latent) ** 2).item()
    assert errors["nti"] < 0.5 * errors["ddim"], errors
    assert [s.step for s in steps] == list(range(10))
    assert all(1 <= s.iterations <= 10 and s.loss >= 0 for s in steps)
    assert all(p.grad is None for p in model.unet.parameters())


def test_early_stop_and_authors_preset(model, image):
    loose = NullTextConfig(early_stop_epsilon=1e3)
    steps = []
    inversion = invert(model, to_pil(image), "a cat", method="nti", num_steps=5, null_text=loose,
                       callback=steps.append, progress=False)
    assert [s.iterations for s in steps] == [1] * 5
    assert inversion.null_states.shape == (5, 77, 32)
    authors = NullTextConfig.authors()
    assert (authors.max_iterations, authors.early_stop, authors.reset_each_step) == (51, False, True)


def published_ddim_loop(unet, scheduler, latent, cond):
    """The public null-text inversion's ``ddim_loop`` with its ``next_step`` (DDIM inversion with
    the conditional states only, from the least noisy timestep up), ported from its description:
    returns its list of latents, z_0 first."""
    all_latent = [latent]
    for i in range(scheduler.num_inference_steps):
        t = scheduler.timesteps[len(scheduler.timesteps) - i - 1]
        noise_pred = unet(latent, t, encoder_hidden_states=cond).sample
        timestep, next_timestep = min(t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps, 999), t
        alpha_prod_t = scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod
        alpha_prod_t_next = scheduler.alphas_cumprod[next_timestep]
        beta_prod_t = 1 - alpha_prod_t
        next_original_sample = (latent - beta_prod_t**0.5 * noise_pred) / alpha_prod_t**0.5
        next_sample_direction = (1 - alpha_prod_t_next) ** 0.5 * noise_pred
        latent = alpha_prod_t_next**0.5 * next_original_sample + next_sample_direction
        all_latent.append(latent)
    return all_latent


def test_ddim_inversion_equals_the_published_loop(model, image):
    schedule = DDIMSchedule.from_scheduler(model.scheduler, 50)
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(50)
    cond, z0 = model.encode_prompt("a cat and a dog"), model.encode_image(image)
    ours = ddim_inversion(model, z0, cond, schedule, progress=False).trajectory
    with torch.no_grad():
        theirs = published_ddim_loop(model.unet, scheduler, z0, cond)
    assert len(ours) == len(theirs) == 51
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        # DDIM's coefficients from float64 scalars here, float32 tensors there: a few float32 ulps a
        # step, carried through 50 UNet calls (they agree to 4e-6 of the largest value); the
        # timesteps one off (t - 1 for t) are 1.07 of it away
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item(), msg=f"latent {k}")


def published_prev_step(scheduler, model_output, timestep, sample):
    """The public null-text inversion's ``prev_step``: a DDIM step with the scheduler's tensors."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
    return alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction


def published_null_step(unet, scheduler, i, latent_cur, latent_prev, uncond, cond, guidance, num_inner_steps=10,
                        epsilon=1e-5):
    """Step i of the public null-text inversion's ``NullInversion.null_optimization`` loop, ported
    here from its description: Adam on the unconditional states (a fresh optimiser, rate
    1e-2 (1 - i/100)), each iteration stepping before its early-stop check, then the step's guided
    DDIM step with both branches as one batch (``get_noise_pred``). Returns the optimised states, the
    iterations run and the next latent."""
    uncond = uncond.clone().detach()
    uncond.requires_grad = True
    optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
    t = scheduler.timesteps[i]
    with torch.no_grad():
        noise_pred_cond = unet(latent_cur, t, encoder_hidden_states=cond).sample
    for j in range(num_inner_steps):
        noise_pred_uncond = unet(latent_cur, t, encoder_hidden_states=uncond).sample
        noise_pred = noise_pred_uncond + guidance * (noise_pred_cond - noise_pred_uncond)
        latents_prev_rec = published_prev_step(scheduler, noise_pred, t, latent_cur)
        loss = F.mse_loss(latents_prev_rec, latent_prev)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < epsilon + i * 2e-5:
            break
    with torch.no_grad():
        context = torch.cat([uncond, cond])
        noise_pred_uncond, noise_pred_text = unet(torch.cat([latent_cur] * 2), t, encoder_hidden_states=context).sample.chunk(2)
        latent_next = published_prev_step(scheduler, noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond),
                                          t, latent_cur)
    return uncond[:1].detach(), j + 1, latent_next


def test_null_text_inversion_equals_the_published_loop_step_by_step(model, image, monkeypatch):
    """Every step of ours from its own inputs against the published step from the same inputs
    (teacher forcing: Adam's per-element normalisation lets float32 rounding grow along a whole
    run); the loop's wiring (the step index, the pivot latent aimed at, the states carried over,
    the next latent) checked on the way. The early-stop epsilon is raised from 1e-5 (never met on
    random weights) so that some steps stop early and others run all 10 iterations."""
    steps, epsilon = 6, 0.1
    schedule = DDIMSchedule.from_scheduler(model.scheduler, steps)
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == list(schedule.timesteps)
    cond, uncond = model.encode_prompt("a cat and a dog"), model.encode_prompt("")
    pivot = ddim_inversion(model, model.encode_image(image), cond, schedule, progress=False).pivot
    calls = []

    def recording(model, schedule, i, z, target, eps_cond, null, guidance, config):
        result = optimize_null(model, schedule, i, z, target, eps_cond, null, guidance, config)
        calls.append((i, z, target, null, *result))
        return result

    monkeypatch.setattr(null_text, "optimize_null", recording)
    config = NullTextConfig(early_stop_epsilon=epsilon)
    result = null_text.null_text_inversion(model, pivot, cond, uncond, schedule, 7.5, config, progress=False)
    nulls = result.null_states
    latents = list(reversed(pivot))  # the published DDIM loop's order: z_0 first
    z_next = latents[-1]
    iterations_seen = set()
    for k, (i, z, target, start, null, _, iterations) in enumerate(calls):
        assert i == k and torch.equal(target, latents[len(latents) - i - 2])
        assert torch.equal(result.trajectory[i], z)  # the latents each step started from
        assert torch.equal(start, uncond if i == 0 else calls[i - 1][4])  # carried over, not reset
        # the differences: DDIM's coefficients from float64 scalars here, float32 tensors there, and
        # the step's last forward run as two calls here, one batch there: float32 rounding (the
        # states agree to 8e-7 of their largest value, the next latents to 1e-5, through 10 Adam
        # steps and a guided step: x7.5, / sqrt(alpha)); a learning rate 1% off moves the first
        # step's states by 3e-4
        torch.testing.assert_close(z, z_next, rtol=0, atol=5e-5 * z_next.abs().max().item())
        theirs, taken, z_next = published_null_step(model.unet, scheduler, i, z, target, start, cond, 7.5,
                                                    epsilon=epsilon)
        assert iterations == [taken]
        torch.testing.assert_close(null, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())
        assert torch.equal(nulls[i], null)
        iterations_seen.add(taken)
    assert len(result.trajectory) == steps + 1
    torch.testing.assert_close(result.trajectory[-1], z_next, rtol=0, atol=5e-5 * z_next.abs().max().item())
    assert len(calls) == steps and 10 in iterations_seen and min(iterations_seen) < 10
