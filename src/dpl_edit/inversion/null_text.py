"""Null-text inversion (Mokady et al. 2023, "Null-text Inversion for Editing Real Images using
Guided Diffusion Models", Alg. 1; REFERENCE section 3).

For each step the unconditional text states are optimised so that one guided DDIM step from the
current latent lands on the DDIM-inversion pivot; the UNet stays frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import checks
from ..diffusion import DDIMSchedule, denoise_step, guided_noise
from ..models import StableDiffusion
from ..text_free_prefix import TextFreePrefix


@dataclass(frozen=True)
class NullTextConfig:
    """Null-text inversion settings; the defaults are the published ones."""

    max_iterations: int = 10  # Adam steps per timestep at most
    learning_rate: float = 1e-2  # at step i the rate is learning_rate * (1 - i / 100)
    early_stop: bool = True  # stop a step's optimisation once its loss is small
    early_stop_epsilon: float = 1e-5  # ... below epsilon + i * epsilon_growth
    early_stop_growth: float = 2e-5
    reset_each_step: bool = False  # start every step from "" instead of the previous optimum

    def __post_init__(self) -> None:
        checks.count("null-text max_iterations", self.max_iterations)
        checks.finite("null-text learning_rate", self.learning_rate, 0.0, above=True)
        checks.finite("null-text early_stop_epsilon", self.early_stop_epsilon, 0.0)
        checks.finite("null-text early_stop_growth", self.early_stop_growth, 0.0)

    @classmethod
    def authors(cls) -> NullTextConfig:
        """The DPL authors' schedule: 51 iterations, no early stop, null reset to "" every step."""
        return cls(max_iterations=51, early_stop=False, reset_each_step=True)

    def learning_rate_at(self, step: int) -> float:
        """Adam's rate at step i: learning_rate * (1 - i / 100)."""
        return self.learning_rate * (1 - step / 100)

    def stop_threshold(self, step: int) -> float:
        """The loss under which step i stops early: epsilon + i * growth."""
        return self.early_stop_epsilon + step * self.early_stop_growth


@dataclass(frozen=True)
class NullTextStep:
    """What the per-step callback receives after each timestep (once per image of a batch)."""

    step: int  # 0 .. num_steps-1, 0 the noisiest
    timestep: int
    loss: float  # the last loss computed (before the last Adam step)
    iterations: int  # Adam steps taken
    image: int = 0  # which image of a batch inverted in lockstep


@dataclass
class NullTextResult:
    """Null-text inversion's output, in sampling order (step 0 the noisiest)."""

    null_states: list[torch.Tensor]  # per step (B, 77, D): the optimised unconditional states
    trajectory: list[torch.Tensor]  # z_bar_T ... z_bar_0 (B, C, h, w): num_steps + 1 latents, what sampling
    # with the states gives (z_bar_T = z*_T; an edit's source branch follows it)


def null_text_inversion(
    model: StableDiffusion,
    pivot: Sequence[torch.Tensor],
    cond_states: torch.Tensor,
    null_init: torch.Tensor,
    schedule: DDIMSchedule,
    guidance_scale: float,
    config: NullTextConfig = NullTextConfig(),
    *,
    callback: Callable[[NullTextStep], None] | None = None,
    progress: bool = True,
) -> NullTextResult:
    """Per-step unconditional states (B, 77, D), one per timestep in sampling order, and the latents
    that one guided DDIM step with each gives (the trajectory).

    ``pivot`` is the DDIM-inversion trajectory in sampling order (pivot[0] = z*_T, pivot[-1] =
    z*_0) of B images, latents (B, C, h, w), and ``cond_states`` their prompts' states (B, 77, D):
    the images are inverted in lockstep, each exactly as alone (its own Adam, its own early stop;
    see :func:`optimize_null`), with one batched UNet forward per iteration. ``null_init`` is the
    states of "" (1, 77, D).
    """
    batch = pivot[0].shape[0]
    nulls = []
    null = null_init.expand(batch, -1, -1)
    z = pivot[0]
    trajectory = [z]
    bar = tqdm(range(schedule.num_steps), desc="Null-text inversion", disable=not progress, leave=False)
    with TextFreePrefix(model):  # a step's forwards share the latent: its text-free layers run once
        for i in bar:
            t = schedule.timesteps[i]
            with torch.no_grad():
                eps_cond = model.predict(z, t, cond_states)
            start = null_init.expand(batch, -1, -1) if config.reset_each_step else null
            null, losses, iterations = optimize_null(
                model, schedule, i, z, pivot[i + 1], eps_cond, start, guidance_scale, config
            )
            nulls.append(null)
            with torch.no_grad():
                eps = guided_noise(model.predict(z, t, null), eps_cond, guidance_scale)
                z = denoise_step(schedule, i, z, eps)
            trajectory.append(z)
            bar.set_postfix(loss=f"{max(losses):.2e}", iters=max(iterations))
            if callback is not None:
                for image, (loss, taken) in enumerate(zip(losses, iterations, strict=True)):
                    callback(NullTextStep(step=i, timestep=t, loss=loss, iterations=taken, image=image))
    return NullTextResult(nulls, trajectory)


def optimize_null(
    model: StableDiffusion,
    schedule: DDIMSchedule,
    i: int,
    z: torch.Tensor,
    target: torch.Tensor,
    eps_cond: torch.Tensor,
    null: torch.Tensor,
    guidance_scale: float,
    config: NullTextConfig,
) -> tuple[torch.Tensor, list[float], list[int]]:
    """Adam on the unconditional states of step i: min ||DDIM(z, guided eps) - z*_{t-1}||^2.

    As in the published code, each iteration takes its Adam step and then stops if the loss it
    computed was under ``epsilon + i * growth``. The parameter is kept in fp32 whatever the
    model's dtype. A batch of B images (latents (B, C, h, w), states (B, 77, D)) runs in
    lockstep: each image has its own states, Adam and loss (the batch's backward is that of the
    sum of the losses, so each image gets its own gradient), and an image that stops leaves the
    batch with its states as they are (on a model with CUDA graphs or a compiled backward it stays in
    the forward, its loss left out, so that one capture or compilation serves the batch). Returns
    (states (B, 77, D) in the model's dtype, each image's last loss, each image's iterations).
    """
    params = [row.detach().float().clone().requires_grad_(True) for row in null.split(1)]
    optimizers = [torch.optim.Adam([param], lr=config.learning_rate_at(i)) for param in params]
    threshold = config.stop_threshold(i)
    t = schedule.timesteps[i]
    losses, iterations = [float("nan")] * len(params), [0] * len(params)
    active = list(range(len(params)))
    # CUDA graphs or a compiled backward (static shapes): the whole batch in every forward, so that it
    # is one capture or compilation, with a stopped image's loss left out
    static = model.graphed_unet is not None or model.compiled_backward
    for iteration in range(1, config.max_iterations + 1):
        forward = list(range(len(params))) if static else active
        rows = slice(None) if len(forward) == len(params) else forward  # a view while no image has stopped
        eps_uncond = model.predict(z[rows], t, torch.cat([params[b] for b in forward]).to(model.dtype))
        z_prev = denoise_step(schedule, i, z[rows], guided_noise(eps_uncond, eps_cond[rows], guidance_scale))
        loss = torch.stack([F.mse_loss(z_prev[forward.index(b)].float(), target[b].float()) for b in active])
        for b in active:
            optimizers[b].zero_grad(set_to_none=True)
        loss.sum().backward()
        for b in active:
            optimizers[b].step()
        values = loss.tolist()  # one host sync
        for k, b in enumerate(active):
            losses[b], iterations[b] = values[k], iteration
        if config.early_stop:
            active = [b for k, b in enumerate(active) if values[k] >= threshold]
            if not active:
                break
    return torch.cat(params).detach().to(model.dtype), losses, iterations
