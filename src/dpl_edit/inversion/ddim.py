"""DDIM inversion (DPL paper Alg. 1 line 4; REFERENCE section 2).

Runs DDIM backwards from z_0 to z_T with the conditional source prompt only (guidance 1) and
returns the pivot trajectory z*_0 ... z*_T, optionally with attention maps averaged over the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..attention import AttentionLayer, AttentionStore, attention_hook
from ..diffusion import DDIMSchedule, invert_step
from ..models import StableDiffusion


@dataclass
class DDIMInversion:
    """The pivot trajectory and, when layers were recorded, their run-averaged maps."""

    trajectory: list[torch.Tensor]  # z*_0 (clean) ... z*_T (noisiest): num_steps + 1 latents (1, C, h, w)
    attention: AttentionStore | None  # maps averaged over heads, layers and all steps

    @property
    def pivot(self) -> list[torch.Tensor]:
        """The trajectory in sampling order: pivot[i] is the latent at timesteps[i] (i = 0 noisiest), pivot[-1] = z*_0."""
        return self.trajectory[::-1]


@torch.no_grad()
def ddim_inversion(
    model: StableDiffusion,
    latents: torch.Tensor,
    text_states: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    record: Sequence[AttentionLayer] = (),
    store: AttentionStore | None = None,
    progress: bool = True,
) -> DDIMInversion:
    """Invert scaled latents z_0 (1, C, h, w) with conditional text states (1, 77, D).

    ``record`` names the attention layers whose maps go to ``store`` (by default an
    :class:`AttentionStore` averaging over the run), e.g. the 16x16 cross-attention and 32x32
    self-attention layers the background mask reads. Steps are closed in inversion order (least
    noisy first).
    """
    if record and store is None:
        store = AttentionStore()
    trajectory = [latents]
    z = latents
    steps = range(schedule.num_steps - 1, -1, -1)  # from the least noisy timestep up
    with attention_hook(model.unet, record, store) if record else contextlib.nullcontext():
        for i in tqdm(steps, desc="DDIM inversion", disable=not progress, leave=False):
            output = model.predict(z, schedule.timesteps[i], text_states)
            z = invert_step(schedule, i, z, output.to(z.dtype))
            trajectory.append(z)
            if store is not None:
                store.end_step()
    return DDIMInversion(trajectory=trajectory, attention=store)

