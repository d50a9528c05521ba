"""Guided DDIM sampling with per-step text states (the reconstruction and editing loop)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .diffusion import DDIMSchedule, denoise_step, guided_noise
from .models import StableDiffusion

States = torch.Tensor | Sequence[torch.Tensor]  # one (B, 77, D) tensor, or one per step


def states_at(states: States, i: int) -> torch.Tensor:
    """The text states of step i: the tensor itself, or the i-th of a per-step sequence."""
    return states if isinstance(states, torch.Tensor) else states[i]


@torch.no_grad()
def sample(
    model: StableDiffusion,
    latents: torch.Tensor,
    schedule: DDIMSchedule,
    cond_states: States,
    null_states: States,
    guidance_scale: float,
    *,
    step_end: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample z_0 from z_T (B, C, h, w) with classifier-free guidance.

    Each step runs one UNet batch [unconditional rows; conditional rows], like diffusers'
    StableDiffusionPipeline. ``step_end(i, z)`` runs after step i and may return new latents
    (local blending uses it).
    """
    z = latents
    batch = z.shape[0]
    for i in tqdm(range(schedule.num_steps), desc="Sampling", disable=not progress, leave=False):
        null = states_at(null_states, i).expand(batch, -1, -1)
        cond = states_at(cond_states, i).expand(batch, -1, -1)
        output = model.predict(torch.cat([z, z]), schedule.timesteps[i], torch.cat([null, cond]))
        eps_uncond, eps_cond = output.to(z.dtype).chunk(2)  # (B, C, h, w) each
        z = denoise_step(schedule, i, z, guided_noise(eps_uncond, eps_cond, guidance_scale))
        if step_end is not None:
            replaced = step_end(i, z)
            z = z if replaced is None else replaced
    return z
