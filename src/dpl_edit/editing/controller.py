"""The Prompt-to-Prompt controller: an attention observer that edits the target branches.

Batch layout (explicit): the UNet batch holds B = 1 + n branches twice, unconditional rows
0 .. B-1 then conditional rows B .. 2B-1; branch 0 is the source, branches 1 .. n the targets.
Where sampling keeps the source on a known trajectory (the inversion's own latents) or steps it
unguided (negative-prompt inversion), the source has no unconditional row (``source_uncond=False``):
unconditional rows 0 .. n-1 are the targets', and conditional rows n .. n+B-1 the branches'. Only
conditional rows are edited (as in Prompt-to-Prompt). The controller also accumulates the
conditional cross-attention maps at one map size, for local blending and for views: the maps as
edited, as Prompt-to-Prompt stores them (it edits the stored tensor in place), so inside the
cross-replace window a target's map of a swapped word is the source word's.

What changes from step to step (the replacement window, whether self-attention is injected) is
held in tensors that ``step_end`` updates in place, so a compiled UNet forward traces the
controller once for all steps, and nothing it reads depends on the number of steps, so edits of
any length share that graph. The maps of a step are written in place into one slot per layer, so a
CUDA graph of the forward (``StableDiffusion.use_cuda_graphs``), which replays the kernels and not
the Python, edits and records every step as the eager forward does. Such a capture reads and writes
the controller's state tensors where they are, so a later edit of the same layout (``graph_layout``:
as many targets and unconditional rows, the same layers and switches) replays it once it has taken
over those tensors with its own values copied in (``share_state``): one capture serves every edit of
a layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attention import AttentionLayer, execution_order
from .attention_edits import blend_mask, edit_cross_attention, inject_self_attention, local_blend
from .plan import EditPlan


class PromptToPrompt:
    """Edits attention per :class:`EditPlan`; ``step_end`` closes each sampling step.

    ``map_layers``: the hooked layers (those that are not cross-attention at ``map_resolution`` are
    ignored); their conditional maps are kept for local blending and views.
    """

    def __init__(
        self,
        plan: EditPlan,
        map_resolution: int,
        self_max_resolution: int,
        blend_thresholds: tuple[float, float] = (0.3, 0.3),
        device: torch.device | str = "cpu",
        *,
        source_uncond: bool = True,
        map_layers: Sequence[AttentionLayer] = (),
        dtype: torch.dtype = torch.float32,
    ):
        self.plan = plan
        self.branches = 1 + len(plan.targets)
        self.map_resolution = map_resolution
        self.self_max_resolution = self_max_resolution
        self.blend_thresholds = blend_thresholds  # (blend words, subtract words), P2P's th
        self.uncond_rows = self.branches if source_uncond else self.branches - 1  # rows before the conditional ones
        self.mapper, self.mapped, self.windows = (x.to(device) for x in (plan.mapper, plan.mapped, plan.windows))
        self.equalizer = None if plan.equalizer is None else plan.equalizer.to(device)
        # a bool, not the step count: a compiled forward specialises on the ints it reads, and edits of
        # other lengths or self_replace_steps would each compile again
        self.injects_self = plan.self_steps > 0
        self.step = 0
        # this step's conditional maps (B, Q, 77), one slot per map layer in the order the forward runs them
        recorded = sorted((layer for layer in map_layers if layer.kind == "cross" and layer.resolution == map_resolution),
                          key=execution_order)
        self._slot = {layer.name: k for k, layer in enumerate(recorded)}
        self._step_maps = torch.zeros(len(recorded), self.branches, map_resolution**2, self.windows.shape[-1],
                                      device=device, dtype=dtype)
        self.maps: torch.Tensor | None = None  # (B, res, res, 77) conditional maps summed over steps
        self.blend_masks: torch.Tensor | None = None
        self.window = self.windows[0].clone()  # this step's replacement window (n, 77)
        self.inject_self = torch.zeros((), dtype=torch.bool, device=device)  # this step's self-attention switch
        self._begin_step()

    def _begin_step(self) -> None:
        """Set this step's window and switch, in place (a CUDA graph reads them where they are)."""
        self.window.copy_(self.windows[min(self.step, len(self.windows) - 1)])
        self.inject_self.fill_(self.step < self.plan.self_steps)

    def _state(self) -> dict[str, torch.Tensor]:
        """The tensors a forward under this controller reads (mappings, window, switch) and writes (maps)."""
        state = {"mapper": self.mapper, "mapped": self.mapped, "window": self.window, "inject_self": self.inject_self,
                 "_step_maps": self._step_maps}
        if self.equalizer is not None:
            state["equalizer"] = self.equalizer
        return state

    @property
    def graph_layout(self) -> tuple:
        """What a captured forward under this controller depends on besides its state tensors' values:
        the numbers of branches and unconditional rows, the layers it edits and records, its switches,
        the tensors' shapes."""
        return (self.branches, self.uncond_rows, self.map_resolution, self.self_max_resolution, self.injects_self,
                tuple(self._slot), *((name, tuple(t.shape), t.dtype, t.device) for name, t in self._state().items()))

    def share_state(self, owner: PromptToPrompt) -> None:
        """Take over the state tensors of ``owner`` (an earlier controller of the same
        ``graph_layout``, whose forward was captured) with this controller's values copied into them,
        so that the capture replays this edit."""
        theirs = owner._state()
        for name, tensor in self._state().items():
            if theirs[name] is not tensor:
                setattr(self, name, theirs[name].copy_(tensor))

    @property
    def cond_rows(self) -> slice:
        return slice(self.uncond_rows, self.uncond_rows + self.branches)

    def __call__(self, layer: AttentionLayer, probs: torch.Tensor) -> torch.Tensor | None:
        edited = self._edit(layer, probs)
        if layer.name in self._slot:
            stored = probs if edited is None else edited
            self._step_maps[self._slot[layer.name]].copy_(stored[self.cond_rows].mean(dim=1).detach())
        return edited

    def _edit(self, layer: AttentionLayer, probs: torch.Tensor) -> torch.Tensor | None:
        """The probabilities with the target rows edited, or None where this layer and step edit nothing."""
        if not self.plan.targets:
            return None
        cond = probs[self.cond_rows]  # (B, heads, Q, K)
        base, target = cond[0], cond[1:]
        if layer.kind == "cross":
            edited = edit_cross_attention(base, target, self.mapper, self.mapped, self.window, self.equalizer)
        elif self.injects_self and layer.resolution <= self.self_max_resolution:
            edited = torch.where(self.inject_self, inject_self_attention(base, target), target)
        else:
            return None
        probs = probs.clone()
        probs[self.uncond_rows + 1 : self.uncond_rows + self.branches] = edited
        return probs

    def step_end(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """After sampling step i (the source's latent already the trajectory's where sampling keeps it
        there): accumulate maps, then local-blend from ``plan.blend_start`` on (PnP-Inversion's order)."""
        if self._slot:
            maps = self._step_maps.mean(dim=0)  # (B, Q, 77)
            res = self.map_resolution
            maps = maps.view(self.branches, res, res, -1)
            self.maps = maps if self.maps is None else self.maps + maps
        plan = self.plan
        if plan.targets and (any(plan.blend_positions) or any(plan.subtract_positions)) and i >= plan.blend_start:
            self.blend_masks = self._blend_masks(latents.shape[-1])
            latents = local_blend(latents, self.blend_masks)
        self.step += 1
        self._begin_step()
        return latents

    def _blend_masks(self, size: int) -> torch.Tensor:
        """(n, 1, size, size) float: the blend words' region less the subtract words' (P2P's LocalBlend)."""
        blend_th, subtract_th = self.blend_thresholds
        mask = torch.ones(self.branches - 1, 1, size, size, dtype=torch.bool, device=self.maps.device)
        if any(self.plan.blend_positions):
            mask = blend_mask(self._word_maps(self.plan.blend_positions), size, blend_th)
        if any(self.plan.subtract_positions):
            mask = mask & ~blend_mask(self._word_maps(self.plan.subtract_positions), size, subtract_th, pool=False)
        return mask.float()

    def _word_maps(self, positions: list[list[int]]) -> torch.Tensor:
        """(B, res, res): per branch, the sum of the given token columns of the accumulated maps."""
        return torch.stack([self.maps[b, ..., p].sum(dim=-1) for b, p in enumerate(positions)])
