"""The attention store: maps averaged over heads and layers, per step and over steps.

Step boundaries are explicit: the loop calls :meth:`AttentionStore.end_step` after each step.
Maps come out as (batch, res, res, keys) for cross-attention (keys = 77 tokens) and
(batch, res, res, res*res) for self-attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layers import AttentionLayer

Key = tuple[str, int]  # (kind, resolution)


class AttentionStore:
    """Accumulates head-averaged attention probabilities of the hooked layers.

    Args:
        rows: batch rows to keep (e.g. only the conditional rows); None keeps all.
        keep_grad: keep the autograd graph (for losses on maps); otherwise maps are detached.
        average_steps: also keep the running sum over steps for :meth:`average_maps`.
        history: (kind, resolution) keys whose per-step maps are kept in ``self.history``.
    """

    def __init__(
        self,
        rows: Sequence[int] | None = None,
        keep_grad: bool = False,
        average_steps: bool = True,
        history: Sequence[Key] = (),
    ):
        self.rows = list(rows) if rows is not None else None
        self.keep_grad = keep_grad
        self.average_steps = average_steps
        self._step: dict[Key, list[torch.Tensor]] = {}
        self._total: dict[Key, torch.Tensor] = {}
        self.history: dict[Key, list[torch.Tensor]] = {key: [] for key in history}
        self.steps = 0

    def __call__(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        if self.rows is not None:
            probs = probs[self.rows]
        if not self.keep_grad:
            probs = probs.detach()
        self._step.setdefault((layer.kind, layer.resolution), []).append(probs.mean(dim=1))  # (B, Q, K)

    def step_maps(self, kind: str, resolution: int) -> torch.Tensor:
        """This step's maps (B, res, res, K), averaged over heads and layers."""
        key = (kind, resolution)
        if key not in self._step:
            raise KeyError(f"No {kind}-attention maps of side {resolution} were recorded this step")
        maps = torch.stack(self._step[key]).mean(dim=0)  # (B, Q, K)
        return maps.view(maps.shape[0], resolution, resolution, maps.shape[-1])

    def end_step(self) -> None:
        """Close a step: add its layer averages to the running sums and history, and clear it."""
        for key in self._step:
            if not (self.average_steps or key in self.history):
                continue
            maps = self.step_maps(*key).detach()
            if self.average_steps:
                self._total[key] = self._total[key] + maps if key in self._total else maps
            if key in self.history:
                self.history[key].append(maps)
        self._step.clear()
        self.steps += 1

    def mark(self) -> dict[Key, int]:
        """Where this step's maps end now (for :meth:`take_since`)."""
        return {key: len(maps) for key, maps in self._step.items()}

    def take_since(self, mark: dict[Key, int]) -> list[tuple[Key, torch.Tensor]]:
        """Remove and return the maps recorded since ``mark`` (per key in recording order)."""
        taken = []
        for key, maps in self._step.items():
            start = mark.get(key, 0)
            taken += [(key, m) for m in maps[start:]]
            del maps[start:]
        return taken

    def give_back(self, maps: list[tuple[Key, torch.Tensor]]) -> None:
        """Add maps as if recorded now, in their order (what :meth:`take_since` returned)."""
        for key, m in maps:
            self._step.setdefault(key, []).append(m)

    def discard_step(self) -> None:
        """Drop this step's maps without closing a step (a loss's forward, not a step of a run)."""
        self._step.clear()

    def average_maps(self, kind: str, resolution: int) -> torch.Tensor:
        """Maps (B, res, res, K) averaged over heads, layers and all closed steps."""
        key = (kind, resolution)
        if key not in self._total:
            raise KeyError(f"No {kind}-attention maps of side {resolution} were stored")
        return self._total[key] / self.steps
