"""The Prompt-to-Prompt controller: an attention observer that edits the target branches.

Batch layout (explicit): the UNet batch holds B = 1 + n branches twice, unconditional rows
0 .. B-1 then conditional rows B .. 2B-1; branch 0 is the source, branches 1 .. n the targets.
Only conditional rows are edited (as in Prompt-to-Prompt). The controller also accumulates the
conditional cross-attention maps at one map size, for local blending and for views.
"""

from __future__ import annotations

import torch

from ..attention import AttentionLayer
from .attention_edits import blend_mask, edit_cross_attention, inject_self_attention, local_blend
from .plan import EditPlan


class PromptToPrompt:
    """Edits attention per :class:`EditPlan`; ``step_end`` closes each sampling step."""

    def __init__(
        self,
        plan: EditPlan,
        map_resolution: int,
        self_max_resolution: int,
        blend_threshold: float = 0.3,
        source_trajectory: torch.Tensor | None = None,
    ):
        self.plan = plan
        self.branches = 1 + len(plan.targets)
        self.map_resolution = map_resolution
        self.self_max_resolution = self_max_resolution
        self.blend_threshold = blend_threshold
        self.source_trajectory = source_trajectory  # direct inversion: (T + 1, C, h, w), sampling order
        self.step = 0
        self._step_maps: list[torch.Tensor] = []
        self.maps: torch.Tensor | None = None  # (B, res, res, 77) conditional maps summed over steps
        self.blend_masks: torch.Tensor | None = None

    @property
    def cond_rows(self) -> slice:
        return slice(self.branches, 2 * self.branches)

    def __call__(self, layer: AttentionLayer, probs: torch.Tensor) -> torch.Tensor | None:
        cond = probs[self.cond_rows]  # (B, heads, Q, K)
        if layer.kind == "cross" and layer.resolution == self.map_resolution:
            self._step_maps.append(cond.mean(dim=1).detach())  # before editing, as P2P stores them
        if not self.plan.targets:
            return None
        base, target = cond[0], cond[1:]
        if layer.kind == "cross":
            plan = self.plan
            device = probs.device
            edited = edit_cross_attention(
                base, target, plan.mapper.to(device), plan.mapped.to(device), plan.windows[self.step].to(device),
                None if plan.equalizer is None else plan.equalizer.to(device),
            )
        elif self.step < self.plan.self_steps and layer.resolution <= self.self_max_resolution:
            edited = inject_self_attention(base, target)
        else:
            return None
        probs = probs.clone()
        probs[self.branches + 1 : 2 * self.branches] = edited
        return probs

    def step_end(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """After sampling step i: accumulate maps, local-blend, keep the source on its pivot (direct)."""
        if self._step_maps:
            maps = torch.stack(self._step_maps).mean(dim=0)  # (B, Q, 77)
            res = self.map_resolution
            maps = maps.view(self.branches, res, res, -1)
            self.maps = maps if self.maps is None else self.maps + maps
            self._step_maps.clear()
        if self.plan.targets and any(self.plan.blend_positions):
            word_maps = torch.stack([self.maps[b, ..., positions].sum(dim=-1)
                                     for b, positions in enumerate(self.plan.blend_positions)])
            self.blend_masks = blend_mask(word_maps, latents.shape[-1], self.blend_threshold)
            latents = local_blend(latents, self.blend_masks)
        if self.source_trajectory is not None:
            latents = latents.clone()
            latents[0] = self.source_trajectory[i + 1].to(latents)
        self.step += 1
        return latents
