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
    source_trajectory: torch.Tensor | None = None,
    source_unguided: bool = False,
    step_end: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample z_0 from z_T (B, C, h, w) with classifier-free guidance.

    Each step runs one UNet batch [unconditional rows; conditional rows], like diffusers'
    StableDiffusionPipeline. With ``source_trajectory`` (num_steps + 1 latents (C, h, w) or (1, C, h, w),
    sampling order) row 0 follows it: after step i it is ``source_trajectory[i + 1]``, so its
    unconditional prediction is never needed and the batch is [unconditional rows 1 .. B-1;
    conditional rows 0 .. B-1] (an edit's source branch: its conditional row still runs, for the
    attention the targets take from it). ``source_unguided``: row 0's unconditional states are its
    conditional ones (negative-prompt inversion's source), where guidance cancels, so it steps with
    its conditional prediction alone, in the same batch layout. ``step_end(i, z)`` runs after step i
    and may return new latents (local blending uses it).
    """
    if source_trajectory is not None and source_unguided:
        raise ValueError("sample: row 0 follows source_trajectory or is unguided, not both")
    z = latents
    batch = z.shape[0]
    fixed = int(source_trajectory is not None or source_unguided)  # leading rows whose unconditional row is not run
    for i in tqdm(range(schedule.num_steps), desc="Sampling", disable=not progress, leave=False):
        null = states_at(null_states, i).expand(batch, -1, -1)[fixed:]
        cond = states_at(cond_states, i).expand(batch, -1, -1)
        output = model.predict(torch.cat([z[fixed:], z]), schedule.timesteps[i], torch.cat([null, cond]))
        eps_uncond, eps_cond = output.to(z.dtype).split([batch - fixed, batch])
        z_next = denoise_step(schedule, i, z[fixed:], guided_noise(eps_uncond, eps_cond[fixed:], guidance_scale))
        if source_trajectory is not None:
            z_next = torch.cat([source_trajectory[i + 1].to(z).view(1, *z.shape[1:]), z_next])
        elif source_unguided:  # guided_noise(e, e) is e
            z_next = torch.cat([denoise_step(schedule, i, z[:1], eps_cond[:1]), z_next])
        z = z_next
        if step_end is not None:
            replaced = step_end(i, z)
            z = z if replaced is None else replaced
    return z
