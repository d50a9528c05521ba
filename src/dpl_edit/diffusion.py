"""DDIM steps in both directions and classifier-free guidance: pure functions on tensors.

DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 with eta = 0. Inversion
is the same update run from level t-Δ to level t with the noise evaluated at (z, t), as null-text
inversion's ``next_step`` does (REFERENCE section 2). Latents are Stable Diffusion's scaled latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import SettingError

if TYPE_CHECKING:
    from diffusers import DDIMScheduler


@dataclass(frozen=True)
class DDIMSchedule:
    """The discrete schedule of a DDIM run.

    ``timesteps`` are in sampling order (981, 961, ..., 1 for SD with 50 steps); step i goes from
    level ``timesteps[i]`` to ``timesteps[i] - step_ratio``. Level < 0 is the clean image, whose
    cumulative alpha is ``final_alpha_cumprod``.
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]  # (num_train_timesteps,) as Python floats: read without touching a tensor
    final_alpha_cumprod: float
    step_ratio: int
    prediction_type: str  # "epsilon" or "v_prediction"

    @classmethod
    def from_scheduler(cls, scheduler: DDIMScheduler, num_steps: int) -> DDIMSchedule:
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        config = scheduler.config
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unsupported prediction type {config.prediction_type!r}")
        from diffusers import DDIMScheduler

        probe = DDIMScheduler.from_config(config)
        if not _fits(probe, num_steps):  # a level beyond the trained ones (1000 steps of SD 1.x: level 1000)
            limit = next(n for n in range(min(num_steps, config.num_train_timesteps), 0, -1) if _fits(probe, n))
            raise SettingError(f"num_steps must be at most {limit} with this model's DDIM scheduler "
                               f"({config.num_train_timesteps} noise levels), got {num_steps}")
        # _fits left the probe's timesteps set for num_steps
        acp = probe.alphas_cumprod.double()
        return cls(
            timesteps=tuple(probe.timesteps.tolist()),
            alphas_cumprod=tuple(acp.tolist()),
            final_alpha_cumprod=float(acp[0]) if not config.set_alpha_to_one else 1.0,
            step_ratio=config.num_train_timesteps // num_steps,
            prediction_type=config.prediction_type,
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha_cumprod(self, level: int) -> float:
        """Cumulative alpha at a level; levels below 0 are the clean image."""
        return self.alphas_cumprod[level] if level >= 0 else self.final_alpha_cumprod


def _fits(scheduler: DDIMScheduler, num_steps: int) -> bool:
    """Whether a run of ``num_steps`` stays on the scheduler's trained noise levels."""
    if num_steps > scheduler.config.num_train_timesteps:
        return False
    scheduler.set_timesteps(num_steps)
    return int(scheduler.timesteps.max()) < scheduler.config.num_train_timesteps


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u) (Ho & Salimans 2022)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def to_epsilon(output: torch.Tensor, z: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    """The noise prediction from a model output (identity for epsilon models).

    v-prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1-a) x0, so eps = sqrt(a) v + sqrt(1-a) z.
    """
    if prediction_type == "epsilon":
        return output
    return alpha**0.5 * output + (1 - alpha) ** 0.5 * z


def ddim_move(z: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """DDIM (eta = 0) from the level with cumulative alpha ``alpha_from`` to ``alpha_to``.

    Song et al. Eq. 12: x0 = (z - sqrt(1-a) eps) / sqrt(a); z' = sqrt(a') x0 + sqrt(1-a') eps.
    """
    x0 = (z - (1 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    return alpha_to**0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


def denoise_step(schedule: DDIMSchedule, i: int, z: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Step i of sampling: from level t = timesteps[i] to t - step_ratio, given the model output at (z, t)."""
    t = schedule.timesteps[i]
    alpha_t = schedule.alpha_cumprod(t)
    eps = to_epsilon(output, z, alpha_t, schedule.prediction_type)
    return ddim_move(z, eps, alpha_t, schedule.alpha_cumprod(t - schedule.step_ratio))


def invert_step(schedule: DDIMSchedule, i: int, z: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Step i of inversion: from level t - step_ratio up to t = timesteps[i], given the output at (z, t).

    The reverse of :func:`denoise_step` with the noise taken at the lower level's latent (the
    approximation DDIM inversion rests on).
    """
    t = schedule.timesteps[i]
    alpha_from = schedule.alpha_cumprod(t - schedule.step_ratio)
    eps = to_epsilon(output, z, alpha_from, schedule.prediction_type)
    return ddim_move(z, eps, alpha_from, schedule.alpha_cumprod(t))
