"""Dynamic Prompt Learning (Wang et al., NeurIPS 2023, Alg. 1; REFERENCE section 5).

For each timestep, from the noisiest: update the K dynamic token vectors with AdamW until the
attention balancing, disjoint object and background leakage losses are under their gradual
thresholds (at most 21 iterations), then run the null-text step of that timestep with the updated
tokens. Only the token vectors are parameters: the embedding table and all model weights are
untouched and get no gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import checks
from ..attention import (
    AttentionHook,
    AttentionLayer,
    AttentionStore,
    ForwardStopped,
    StopAfter,
    last_layer,
)
from ..background import AUTHORS_CLUSTER_SEED
from ..cuda_graphs import Capture, GraphedFunction
from ..diffusion import DDIMSchedule, denoise_step, guided_noise
from ..errors import SettingError
from ..losses import (
    SPANS,
    attention_balancing_loss,
    background_leakage_loss,
    disjoint_object_loss,
    gradual_threshold,
    word_maps,
    word_matrix,
)
from ..models import StableDiffusion, compile_failure, gradient_error, gradient_tolerance
from ..prompts import MarkedPrompt
from ..text_free_prefix import TextFreePrefix
from .null_text import NullTextConfig, optimize_null

logger = logging.getLogger(__name__)
LOSSES = ("at", "dj", "bg")  # attention balancing, disjoint object, background leakage
# prompt layouts (counts of tokens and words) whose graphed token step a model keeps for later
# inversions; each capture holds the memory of a forward to the early exit and its backward
GRAPHED_LAYOUTS = 4
NULL_STRATEGIES = ("optimized", "negative", "direct")


@dataclass(frozen=True)
class DynamicPromptConfig:
    """DPL settings; the defaults are the paper's (the authors' validated values)."""

    cross_resolution: int = 16  # side of the cross-attention maps the losses read (SD 1.x: 16)
    self_resolution: int = 32  # side of the self-attention maps clustered for the background (SD 1.x: 32)
    max_iterations: int = 21  # AdamW steps per timestep at most
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    lambda_at: float = 1.0  # loss weights (the authors' demo uses lambda_dj = 0.005)
    lambda_dj: float = 0.05
    lambda_bg: float = 0.05
    threshold_at: float = 0.3  # gradual thresholds TH(i) = threshold * exp(-i / decay), Eq. 10
    threshold_dj: float = 0.9
    threshold_bg: float = 0.7
    decay_at: float = 25.0
    decay_dj: float = 25.0
    decay_bg: float = 50.0
    balancing_span: str = "padded"  # columns L_at re-softmaxes: "padded" (the authors', A&E SD 1.x) or "prompt"
    losses: tuple[str, ...] = LOSSES  # which losses are used (one alone for the Fig. 5a ablation)
    num_clusters: int = 5  # V, KMeans clusters of the self-attention map
    agreement_threshold: float = 0.2  # TH below which a cluster is background
    cluster_seed: int = AUTHORS_CLUSTER_SEED  # KMeans' seed: the authors'
    early_exit: bool = True  # stop the UNet forward after the last layer the losses read

    def __post_init__(self) -> None:
        unknown = set(self.losses) - set(LOSSES)
        if unknown or not self.losses:
            raise SettingError(f"losses must be a non-empty subset of {LOSSES}, got {self.losses}")
        if self.balancing_span not in SPANS:
            raise SettingError(f"balancing_span must be one of {SPANS}, got {self.balancing_span!r}")
        for name in ("cross_resolution", "self_resolution", "num_clusters"):
            checks.count(f"DPL {name}", getattr(self, name))
        checks.count("DPL max_iterations", self.max_iterations, 0)
        checks.count("DPL cluster_seed", self.cluster_seed, 0)
        checks.finite("DPL learning_rate", self.learning_rate, 0.0, above=True)
        checks.finite("DPL weight_decay", self.weight_decay, 0.0)
        for loss in LOSSES:
            checks.finite(f"DPL lambda_{loss}", getattr(self, f"lambda_{loss}"), 0.0)
            checks.finite(f"DPL threshold_{loss}", getattr(self, f"threshold_{loss}"), 0.0)
            checks.finite(f"DPL decay_{loss}", getattr(self, f"decay_{loss}"), 0.0, above=True)
        checks.fraction("DPL agreement_threshold", self.agreement_threshold)

    def thresholds(self, step: int) -> dict[str, float]:
        return {
            "at": gradual_threshold(self.threshold_at, self.decay_at, step),
            "dj": gradual_threshold(self.threshold_dj, self.decay_dj, step),
            "bg": gradual_threshold(self.threshold_bg, self.decay_bg, step),
        }

    @property
    def weights(self) -> dict[str, float]:
        return {"at": self.lambda_at, "dj": self.lambda_dj, "bg": self.lambda_bg}


@dataclass(frozen=True)
class DynamicPromptStep:
    """What the per-step callback receives after each timestep."""

    step: int  # 0 .. num_steps-1, 0 the noisiest
    timestep: int
    losses: dict[str, float]  # the last computed value of each active loss
    thresholds: dict[str, float]
    iterations: int  # AdamW steps taken on the tokens
    null_loss: float
    null_iterations: int
    image: int = 0  # which image of a batch (see ``pipeline.invert_many``)


@dataclass
class DynamicPromptResult:
    token_vectors: list[torch.Tensor]  # per step (K, D_in), sampling order
    null_states: list[torch.Tensor]  # per step (1, 77, D); empty unless null == "optimized"
    cross_maps: list[torch.Tensor]  # per step (res, res, 77): conditional maps with the learned tokens
    log: list[dict]  # per step: {"step", "losses", "thresholds", "iterations"} (losses as last computed)
    trajectory: list[torch.Tensor]  # z_bar_T ... z_bar_0 (1, C, h, w): the latent each step starts from, then
    # the last one (the pivot's where null is "direct")


class TokenLosses:
    """The DPL losses of one timestep as a function of the token vectors (a UNet forward each).

    On a compiled model (:meth:`StableDiffusion.compile`) the whole token step is compiled as one
    graph: the text encoder with the vectors, the hooked UNet forward up to the last layer the
    losses read (the early exit is an exception dynamo traces, not a graph break), the losses, and
    so the backward to the vectors. On a model with CUDA graphs (:meth:`StableDiffusion.use_cuda_graphs`)
    the same step is captured as CUDA graphs of its eager kernels (the maps the hook records stay
    inside the step), with the prompt's layout (token ids, positions, word matrix, end position,
    background mask) as inputs: the model keeps the captures (``graphed_steps``, for the last
    ``GRAPHED_LAYOUTS`` layouts), and every later inversion whose prompt has as many tokens and
    words, with the same layers and losses, replays them with its own layout and shares the store
    and hook they were captured with. Either fast step's gradient is checked once per inversion
    against eager, and the step runs eager (with a warning) where the two disagree or compilation
    or capture fails.
    """

    def __init__(
        self,
        model: StableDiffusion,
        prompt: MarkedPrompt,
        layers: Sequence[AttentionLayer],
        background: torch.Tensor,
        config: DynamicPromptConfig,
    ):
        self.model = model
        self.prompt = prompt
        # the prompt's layout as tensors (inputs of a compiled step, not constants: another prompt with
        # as many words and tokens reuses its graph)
        self.token_ids = torch.tensor([prompt.token_ids], device=model.device)
        self.positions = torch.tensor(prompt.positions, device=model.device)
        self.words = word_matrix([word.positions for word in prompt.words], model.max_tokens, model.device)
        self.end_position = torch.tensor(prompt.end_position, device=model.device)
        self.background = background.to(model.device)
        self.layout = (self.token_ids, self.positions, self.words, self.end_position, self.background)
        self.config = config
        self.active = [k for k in config.losses if k == "bg" or len(self.words) > 1]  # K=1: L_bg only
        self.store = AttentionStore(keep_grad=True, average_steps=False)
        self.observer = StopAfter(self.store, last_layer(layers)) if config.early_exit else self.store
        self.layers = list(layers)
        self.hook = AttentionHook(model.unet, self.layers, self.observer)
        # the compiled or graphed stacked_losses, while it is trusted (checked against eager at the first call)
        self.fast_step: Callable | None = None
        self.fast_kind = ""  # what made it, for the warnings
        self.checked = False
        self.graphed_key: tuple | None = None  # under which the model keeps the graphed step
        if model.compiled is not None:
            self.fast_step = torch.compile(self.stacked_losses, mode=model.compiled, dynamic=False)
            self.fast_kind = "torch.compile"
        elif model.graphed_unet is not None:
            self.graphed_key = ("DPL token step", tuple(layer.name for layer in self.layers), config.early_exit,
                                config.cross_resolution, config.balancing_span, tuple(self.active))
            graphed = model.graphed_steps.get(self.graphed_key)
            if graphed is None:
                graphed = model.graphed_steps[self.graphed_key] = GraphedFunction(
                    self.layout_losses, model.graphed_unet.capture, max_captures=GRAPHED_LAYOUTS)
            else:  # an earlier inversion's: its function reads the store its hook records into
                first = graphed.function.__self__
                self.store, self.observer, self.hook = first.store, first.observer, first.hook
            self.fast_step = lambda z, timestep, vectors: graphed(z, timestep, vectors, *self.layout)
            self.fast_kind = "CUDA graphs"

    def __call__(self, z: torch.Tensor, t: int, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Active losses (scalars with gradients to ``vectors``) at latent z, timestep t."""
        with self.hook:
            return dict(zip(self.active, self.values(z, self.model.timestep(t, self.model.device), vectors)))

    def values(self, z: torch.Tensor, timestep: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """The active losses stacked (in ``self.active``'s order); inside ``with self.hook``."""
        if self.fast_step is not None and not self.checked:
            self._check_fast_step(z, timestep, vectors)
        if self.fast_step is None:
            return self.stacked_losses(z, timestep, vectors)
        try:
            if self.model.compiled == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are no longer read
            return self.fast_step(z, timestep, vectors)
        except Exception as err:  # noqa: BLE001 - a compiler or CUDA-graph failure: the eager step is always right
            _fast_step_failed(self.fast_kind, "DPL's token step", err, self.store)
            self.fast_step = None
            self.model.graphed_steps.pop(self.graphed_key, None)  # later inversions capture afresh
            return self.stacked_losses(z, timestep, vectors)

    def stacked_losses(self, z: torch.Tensor, timestep: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """One forward: text encoder with the vectors, UNet to the last layer read, the losses."""
        return self.layout_losses(z, timestep, vectors, *self.layout)

    def layout_losses(self, z: torch.Tensor, timestep: torch.Tensor, vectors: torch.Tensor, token_ids: torch.Tensor,
                      positions: torch.Tensor, words: torch.Tensor, end_position: torch.Tensor,
                      background: torch.Tensor) -> torch.Tensor:
        """:meth:`stacked_losses` of any prompt with this one's layers and losses, its layout given
        (``self.layout``'s order): what a graphed model captures once for every prompt of a layout."""
        states = self.text_states(vectors, token_ids, positions)
        try:
            self.model.predict(z, timestep, states)
        except ForwardStopped:
            pass
        # (res, res, 77); the losses are computed in fp32 whatever the model's dtype
        maps = self.store.step_maps("cross", self.config.cross_resolution)[0].float()
        self.store.discard_step()
        losses = self.losses_of(maps, words, end_position, background)
        return torch.stack([losses[k] for k in self.active])

    def text_states(self, vectors: torch.Tensor, token_ids: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt's (or the given token ids') text-encoder states with the dynamic tokens'
        vectors (K, D_in) substituted at its (or the given) positions."""
        token_ids = self.token_ids if token_ids is None else token_ids
        positions = self.positions if positions is None else positions
        return self.model.encode_tokens(token_ids, vectors.to(self.model.dtype), positions)

    def losses_of(self, maps: torch.Tensor, words: torch.Tensor | None = None, end_position: torch.Tensor | None = None,
                  background: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The active losses of cross-attention maps (res, res, 77), for this prompt's layout or the one given."""
        words = self.words if words is None else words
        end_position = self.end_position if end_position is None else end_position
        background = self.background if background is None else background
        a = word_maps(maps, words)  # (K, res, res)
        compute = {
            "at": lambda: attention_balancing_loss(maps, words, end_position, self.config.balancing_span),
            "dj": lambda: disjoint_object_loss(a),
            "bg": lambda: background_leakage_loss(a, background),
        }
        return {k: compute[k]() for k in self.active}

    def weighted(self, losses: torch.Tensor) -> torch.Tensor:
        """The objective: the sum of the weighted active losses."""
        weights = self.config.weights
        return sum(weights[k] * losses[j] for j, k in enumerate(self.active))

    def _check_fast_step(self, z: torch.Tensor, timestep: torch.Tensor, vectors: torch.Tensor) -> None:
        """Compare the fast step's gradient with eager's once; fall back to eager if they differ."""
        self.checked = True
        if not _fast_step_agrees(self.fast_kind, "DPL's token step",
                                 lambda param: self.weighted(self.stacked_losses(z, timestep, param)),
                                 lambda param: self.weighted(self.fast_step(z, timestep, param)),
                                 vectors, self.store, self.model):
            self.fast_step = None


class LockstepTokenLosses:
    """The token losses of a lockstep batch of B images from one batched forward, as CUDA graphs.

    The graph is captured at the whole batch once per inversion (static shapes): an image that met
    its thresholds stays in the forward, its losses unread, its gradient zero (nothing reaches its
    rows of the backward) and its vectors unchanged (its AdamW does not step), so every iteration
    and timestep replays the same capture where a shrinking batch would capture each size it goes
    through. Each image's rows of a batched forward are its own computation, so its results are
    those of the eager lockstep's (to the rounding of the batched kernels). The graphed gradient is
    checked once against eager's; a capture that fails or disagrees leaves the batch eager, with a
    warning.
    """

    def __init__(self, losses_at: Sequence[TokenLosses], capture: Capture):
        self.losses_at = list(losses_at)
        self.sizes = [len(each.active) for each in self.losses_at]
        self.fast_step: GraphedFunction | None = GraphedFunction(self.every_loss, capture)
        self.checked = False

    def every_loss(self, z: torch.Tensor, timestep: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """Every image's stacked losses, one after the other, from one forward of the whole batch."""
        return torch.cat(_batched_losses(self.losses_at, list(range(len(params))), z, timestep, list(params)))

    def values(self, z: torch.Tensor, timestep: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's stacked losses (inside the first image's hook)."""
        if self.fast_step is not None and not self.checked:
            self._check_fast_step(z, timestep, params)
        if self.fast_step is not None:
            try:
                return list(self.fast_step(z, timestep, *params).split(self.sizes))
            except Exception as err:  # noqa: BLE001 - a capture or replay failure: the eager step is always right
                _fast_step_failed("CUDA graphs", "DPL's lockstep token step", err, self.losses_at[0].store)
                self.fast_step = None
        return list(self.every_loss(z, timestep, *params).split(self.sizes))

    def _objective(self, step: Callable, z: torch.Tensor, timestep: torch.Tensor,
                   params: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batch's objective (the sum of the images' weighted losses) as a function of all their
        vectors flattened into one tensor (what ``gradient_error`` differentiates)."""
        def objective(flat: torch.Tensor) -> torch.Tensor:
            chunks = flat.split([p.numel() for p in params])
            losses = step(z, timestep, *(c.view_as(p) for c, p in zip(chunks, params, strict=True))).split(self.sizes)
            return sum(each.weighted(l) for each, l in zip(self.losses_at, losses, strict=True))
        return objective

    def _check_fast_step(self, z: torch.Tensor, timestep: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        self.checked = True
        first = self.losses_at[0]
        if not _fast_step_agrees("CUDA graphs", "DPL's lockstep token step",
                                 self._objective(self.every_loss, z, timestep, params),
                                 self._objective(self.fast_step, z, timestep, params),
                                 torch.cat([p.detach().flatten() for p in params]), first.store, first.model):
            self.fast_step = None


def _fast_step_agrees(kind: str, what: str, eager: Callable[[torch.Tensor], torch.Tensor],
                      fast: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, store: AttentionStore,
                      model: StableDiffusion) -> bool:
    """Whether a compiled or graphed step's gradient at ``start`` agrees with eager's (each maps a
    parameter to a scalar objective). Where it fails to build (what it left in ``store`` dropped) or
    disagrees, a warning says so and the caller runs eager."""
    try:
        error = gradient_error(eager, fast, start, model.compiled == "reduce-overhead")
    except Exception as err:  # noqa: BLE001 - any compiler or capture failure: the eager step is always right
        store.discard_step()  # whatever the failed call recorded
        logger.warning("%s could not make %s (%s); it runs eager.", kind, what, compile_failure(err))
        return False
    tolerance = gradient_tolerance(model.dtype, model.device)
    if not error <= tolerance:
        logger.warning("%s's backward of %s disagrees with eager here (relative error %.2g > %.0e): it runs eager.",
                       kind, what, error, tolerance)
        return False
    return True


def _fast_step_failed(kind: str, what: str, err: Exception, store: AttentionStore) -> None:
    """A compiled or graphed step that failed at a later call: a warning, and what it left in ``store`` dropped."""
    logger.warning("%s failed on %s (%s); it runs eager from now on.", kind, what, compile_failure(err))
    store.discard_step()


def capped_steps(log: Sequence[dict], max_iterations: int) -> int:
    """How many steps of a DPL log used every AdamW iteration without meeting the thresholds."""
    return sum(entry["iterations"] >= max_iterations for entry in log)


def saturation(log: Sequence[dict], max_iterations: int) -> str:
    """One line on a DPL run: the steps at the iteration cap, and the losses against their
    thresholds at the last step."""
    capped = capped_steps(log, max_iterations)
    last = log[-1]
    losses = ", ".join(f"L_{k} {v:.3f}/{last['thresholds'][k]:.3f}" for k, v in last["losses"].items())
    return f"DPL: {capped} of {len(log)} steps at the {max_iterations}-iteration cap; last step {losses}"


def mostly_capped(log: Sequence[dict], max_iterations: int) -> bool:
    """True when more than half the steps ran out of iterations (the tokens are likely drifting)."""
    return capped_steps(log, max_iterations) > len(log) / 2


def optimize_tokens(
    losses_at: TokenLosses, z: torch.Tensor, t: int, step: int, vectors: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float], int]:
    """Alg. 1 lines 8-13: AdamW on the token vectors until every loss is under its threshold.

    A fresh optimiser each timestep; the vectors are fp32 whatever the model's dtype. Returns
    (vectors, last loss values, AdamW steps taken).
    """
    return optimize_tokens_many([losses_at], z, t, step, [vectors])[0]


def optimize_tokens_many(
    losses_at: Sequence[TokenLosses], z: torch.Tensor, t: int, step: int, vectors: Sequence[torch.Tensor],
    lockstep: LockstepTokenLosses | None = None,
) -> list[tuple[torch.Tensor, dict[str, float], int]]:
    """:func:`optimize_tokens` for B images (latents (B, C, h, w)) in lockstep: each iteration runs
    one batched forward for the images still learning (each with its own prompt's text states), and
    each image gets its own losses, AdamW, thresholds and exit, as alone. One image alone takes its
    compiled or graphed token step where the model has one (``TokenLosses.values``). A batch on a
    graphed model takes ``lockstep``'s graphed step (the whole batch in every forward; the eager
    batch if it failed); on a compiled model the images take their compiled steps in turn."""
    if len(losses_at) > 1 and lockstep is None and any(each.fast_step is not None for each in losses_at):
        return [optimize_tokens(each, z[b : b + 1], t, step, vectors[b]) for b, each in enumerate(losses_at)]
    first = losses_at[0]
    model, config = first.model, first.config
    params = [v.detach().float().clone().requires_grad_(True) for v in vectors]
    optimizers = [torch.optim.AdamW([param], lr=config.learning_rate, weight_decay=config.weight_decay)
                  for param in params]
    thresholds = config.thresholds(step)
    timestep = model.timestep(t, model.device)
    values: list[dict[str, float]] = [{} for _ in params]
    taken = [config.max_iterations] * len(params)
    active = list(range(len(params)))
    with first.hook:  # installed once per timestep; the same layers and early exit serve every image
        for iteration in range(config.max_iterations):
            if len(params) == 1:
                losses = (first.values(z, timestep, params[0]),)
            elif lockstep is not None and lockstep.fast_step is not None:
                every = lockstep.values(z, timestep, params)
                losses = [every[b] for b in active]
            else:
                losses = _batched_losses(losses_at, active, z, timestep, params)
            read = torch.cat(losses).tolist()  # one host sync for the batch
            learning = []
            for k, b in enumerate(active):
                values[b] = dict(zip(losses_at[b].active, read[: len(losses[k])], strict=True))
                read = read[len(losses[k]) :]
                if all(values[b][name] < thresholds[name] for name in values[b]):
                    taken[b] = iteration
                else:
                    learning.append(k)
            if not learning:
                break
            for k in learning:
                optimizers[active[k]].zero_grad(set_to_none=True)
            sum(losses_at[active[k]].weighted(losses[k]) for k in learning).backward()
            for k in learning:
                optimizers[active[k]].step()
            active = [active[k] for k in learning]
    return [(param.detach(), value, iterations) for param, value, iterations in zip(params, values, taken, strict=True)]


def _batched_losses(losses_at: Sequence[TokenLosses], active: list[int], z: torch.Tensor, timestep: torch.Tensor,
                    params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each active image's stacked losses from one forward of their batch (inside the first image's hook)."""
    first = losses_at[0]
    rows = slice(None) if len(active) == len(params) else active
    states = torch.cat([losses_at[b].text_states(params[b]) for b in active])
    try:
        first.model.predict(z[rows], timestep, states)
    except ForwardStopped:
        pass
    maps = first.store.step_maps("cross", first.config.cross_resolution).float()  # (B_active, res, res, 77)
    first.store.discard_step()
    return [torch.stack(list(losses_at[b].losses_of(maps[k]).values())) for k, b in enumerate(active)]


def dynamic_prompt_inversion(
    model: StableDiffusion,
    prompt: MarkedPrompt,
    pivot: Sequence[torch.Tensor],
    null_init: torch.Tensor,
    background: torch.Tensor,
    layers: Sequence[AttentionLayer],
    schedule: DDIMSchedule,
    guidance_scale: float,
    config: DynamicPromptConfig = DynamicPromptConfig(),
    null_text: NullTextConfig = NullTextConfig(),
    *,
    null: str = "optimized",
    callback: Callable[[DynamicPromptStep], None] | None = None,
    progress: bool = True,
) -> DynamicPromptResult:
    """Alg. 1 lines 5-19 on a DDIM-inversion pivot (sampling order, pivot[0] = z*_T).

    ``background`` is the mask (res, res) at the cross-attention size; ``layers`` the
    cross-attention layers of that size. ``null`` is how each step ends: ``"optimized"``
    (null-text inversion, the paper), ``"negative"`` (negative-prompt inversion: the null states
    are the step's conditional states, no optimisation; the next latent is the conditional DDIM
    step) or ``"direct"`` (direct inversion: no optimisation, the next latent is the pivot's,
    which editing restores on the source branch).
    """
    return dynamic_prompt_inversion_many(
        model, [prompt], pivot, null_init, [background], layers, schedule, guidance_scale, config, null_text,
        null=null, callback=callback, progress=progress,
    )[0]


def dynamic_prompt_inversion_many(
    model: StableDiffusion,
    prompts: Sequence[MarkedPrompt],
    pivot: Sequence[torch.Tensor],
    null_init: torch.Tensor,
    backgrounds: Sequence[torch.Tensor],
    layers: Sequence[AttentionLayer],
    schedule: DDIMSchedule,
    guidance_scale: float,
    config: DynamicPromptConfig = DynamicPromptConfig(),
    null_text: NullTextConfig = NullTextConfig(),
    *,
    null: str = "optimized",
    callback: Callable[[DynamicPromptStep], None] | None = None,
    progress: bool = True,
) -> list[DynamicPromptResult]:
    """:func:`dynamic_prompt_inversion` of B images in lockstep: pivot latents (B, C, h, w), a prompt
    and a background mask per image. At each step the token steps (:func:`optimize_tokens_many`), the
    recorded conditional forward and the null-text step (:func:`optimize_null`) run once for the
    batch; every image's result is what inverting it alone gives."""
    if null not in NULL_STRATEGIES:
        raise ValueError(f"null must be one of {NULL_STRATEGIES}, got {null!r}")
    losses_at = [TokenLosses(model, prompt, layers, background, config)
                 for prompt, background in zip(prompts, backgrounds, strict=True)]
    vectors = [model.token_embedding(each.token_ids[0, each.positions]).float() for each in losses_at]  # (K, D_in)
    graphed = len(prompts) > 1 and model.graphed_unet is not None
    lockstep = LockstepTokenLosses(losses_at, model.graphed_unet.capture) if graphed else None
    key = ("cross", config.cross_resolution)
    record = AttentionStore(average_steps=False, history=[key])
    record_hook = AttentionHook(model.unet, layers, record)
    batch = len(prompts)
    null_states, z = null_init.expand(batch, -1, -1), pivot[0]
    results = [DynamicPromptResult([], [], [], [], [z[b : b + 1]]) for b in range(batch)]
    bar = tqdm(range(schedule.num_steps), desc="DPL inversion", disable=not progress, leave=False)
    with TextFreePrefix(model):  # a step's forwards share the latent: its text-free layers run once
        for i in bar:
            t = schedule.timesteps[i]
            learned = optimize_tokens_many(losses_at, z, t, i, vectors, lockstep)
            vectors = [v for v, _, _ in learned]
            with torch.no_grad():
                cond = torch.cat([each.text_states(v) for each, v in zip(losses_at, vectors, strict=True)])
                with record_hook:
                    eps_cond = model.predict(z, t, cond)
                record.end_step()
            null_losses, null_iterations = [0.0] * batch, [0] * batch
            if null == "optimized":
                start = null_init.expand(batch, -1, -1) if null_text.reset_each_step else null_states
                null_states, null_losses, null_iterations = optimize_null(
                    model, schedule, i, z, pivot[i + 1], eps_cond, start, guidance_scale, null_text
                )
                with torch.no_grad():
                    eps = guided_noise(model.predict(z, t, null_states), eps_cond, guidance_scale)
                    z = denoise_step(schedule, i, z, eps)
            elif null == "negative":
                z = denoise_step(schedule, i, z, eps_cond)  # guidance cancels when null = cond
            else:
                z = pivot[i + 1]
            thresholds = config.thresholds(i)
            for b, (result, (v, losses, iterations)) in enumerate(zip(results, learned, strict=True)):
                if null == "optimized":
                    result.null_states.append(null_states[b : b + 1])
                result.token_vectors.append(v)
                result.trajectory.append(z[b : b + 1])
                result.log.append({"step": i, "losses": losses, "thresholds": {k: thresholds[k] for k in losses},
                                   "iterations": iterations})
                if callback is not None:
                    callback(DynamicPromptStep(i, t, losses, thresholds, iterations, null_losses[b], null_iterations[b], b))
            losses, iterations = learned[-1][1], max(each[2] for each in learned)
            bar.set_postfix({**{k: f"{v:.3f}/{thresholds[k]:.3f}" for k, v in losses.items()}, "it": iterations})
    for b, result in enumerate(results):
        result.cross_maps = [maps[b] for maps in record.history[key]]
    return results
