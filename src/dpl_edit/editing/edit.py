"""Editing an inverted image with Prompt-to-Prompt: one sampling run with the source branch and
one branch per target prompt (REFERENCE section 6).

The source branch uses the source prompt with the step's learned DPL tokens; a target keeps the
learned vector of every dynamic word it keeps (same token, aligned position), and a swapped word
has its plain embedding. The unconditional states are the inversion's (per-step null states for
NTI and DPL, the source prompt's own for negative-prompt inversion, "" otherwise).

Where the inversion knows the source branch's latent at every step (its ``trajectory``: the
null-text trajectory of NTI and DPL, which sampling the source would compute again up to rounding,
and direct inversion's pivot, where editing keeps the source by definition), the source follows it
and its unconditional row is not run: an edit with one target runs 3 UNet rows a step, not 4.
So does negative-prompt inversion's source, whose unconditional states are its own conditional
ones: guidance cancels on it, and it steps with its conditional prediction.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from .. import checks
from ..artifacts import Inversion
from ..attention import attention_hook, attention_layers, same_level_resolution
from ..diffusion import DDIMSchedule
from ..errors import InversionFileError, PromptError
from ..images import to_pil
from ..models import StableDiffusion
from ..prompts import parse_marked_prompt, text_list
from ..sampling import sample
from .controller import PromptToPrompt
from .plan import P2P_SELF_MAX_RESOLUTION, EditConfig, EditPlan, make_plan


@dataclass
class EditResult:
    """The source branch (the reconstruction) and one image per target."""

    reconstruction: Image.Image
    edits: list[Image.Image]
    targets: list[str]
    maps: torch.Tensor  # (1 + n, res, res, 77) conditional cross-attention averaged over steps
    plan: EditPlan
    blend_masks: torch.Tensor | None  # (n, 1, h, w) the last local-blend masks
    latents: torch.Tensor  # (1 + n, C, h, w) final latents, source first
    target_tokens: list[list[str]]  # each target's 77 BPE tokens (for labels)


EDIT_FILE = "edit.json"


def edit_record(inversion: Inversion, result: EditResult, config: EditConfig, inversion_folder: str) -> dict:
    """What ``edit.json`` says of an edit, beside its images: where its inversion is (``inversion_folder``,
    relative to the edit's folder), the inversion's method and prompt, the targets in the order of the
    edit images and every setting as applied."""
    return {"inversion": inversion_folder, "method": inversion.method, "source_prompt": inversion.prompt,
            "targets": list(result.targets), "settings": asdict(config)}


def edit(
    model: StableDiffusion,
    inversion: Inversion | str | os.PathLike,
    targets: str | Sequence[str],
    config: EditConfig | dict | None = None,
    *,
    callback: Callable[[int], None] | None = None,
    progress: bool = True,
) -> EditResult:
    """Edit the inverted image (an :class:`Inversion` or its folder) towards each target prompt (one
    prompt or several; braces in them are allowed and ignored). ``config``: an :class:`EditConfig`, a
    dict of its fields (over the defaults), or None (the defaults). ``callback(step)`` runs after
    each sampling step (0 to the inversion's ``num_steps`` - 1): to show progress, or to stop the
    edit by raising."""
    inversion = Inversion.of(inversion)
    targets = text_list(targets, "target prompts")
    config = checks.settings("config", EditConfig, config)
    inversion.check_compatible(model)
    plan = plan_edit(model, inversion.prompt, inversion.token_positions, targets, config, inversion.num_steps)
    if list(plan.source.token_ids) != inversion.token_ids:
        raise InversionFileError("The model's tokenizer reads the inversion's prompt differently; use its model.")
    resolution = inversion.settings.get("cross_resolution", 16)
    self_max = config.self_max_resolution or same_level_resolution(model.unet, "self", P2P_SELF_MAX_RESOLUTION)
    layers = [layer for layer in attention_layers(model.unet) if layer.kind == "cross" or layer.resolution <= self_max]
    trajectory = _source_trajectory(model, inversion)
    unguided = trajectory is None and inversion.null == "negative"  # the source's null states are its own
    controller = PromptToPrompt(plan, resolution, self_max, (config.blend_threshold, config.subtract_threshold),
                                model.device, source_uncond=trajectory is None and not unguided, map_layers=layers,
                                dtype=model.dtype)

    def step_end(i: int, latents: torch.Tensor) -> torch.Tensor | None:
        blended = controller.step_end(i, latents)  # local blend's latents, or None
        if callback is not None:
            callback(i)
        return blended

    with attention_hook(model.unet, layers, controller):
        latents = _sample_branches(model, inversion, plan, trajectory, step_end, progress, unguided)
    images = [to_pil(model.decode_latents(latents[b : b + 1])) for b in range(latents.shape[0])]
    return EditResult(images[0], images[1:], list(targets), controller.maps / inversion.num_steps, plan,
                      controller.blend_masks, latents,
                      [model.tokenizer.convert_ids_to_tokens(list(p.token_ids)) for p in plan.targets])


def plan_edit(model: StableDiffusion, source: str, token_positions: Sequence[int], targets: str | Sequence[str],
              config: EditConfig, num_steps: int) -> EditPlan:
    """The Prompt-to-Prompt plan of editing ``source`` (its dynamic words at ``token_positions``)
    towards ``targets`` (one prompt or several); a :class:`PromptError` for no target, an empty
    one, or targets the mode cannot map. It needs no inversion, so a caller can check an edit
    before inverting."""
    targets = text_list(targets, "target prompts")
    if not targets:
        raise PromptError("Give at least one target prompt to edit towards.")
    for target in targets:
        if not target.replace("{", "").replace("}", "").strip():
            raise PromptError("A target prompt is empty: give the prompt the edited image should match, "
                              "for example the source prompt with one word changed.")
    marked = parse_marked_prompt(source, model.tokenizer, require_words=False)
    prompts = [parse_marked_prompt(t, model.tokenizer, require_words=False) for t in targets]
    return make_plan(marked, prompts, token_positions, config, num_steps, model.tokenizer)


def reconstruct_latents(model: StableDiffusion, inversion: Inversion | str | os.PathLike, *,
                        callback: Callable[[int], None] | None = None, progress: bool = True) -> torch.Tensor:
    """Sample z_0 (1, C, h, w) back from an inversion (or its folder): the source branch alone.
    ``callback(step)`` runs after each sampling step, as :func:`edit`'s does."""
    inversion = Inversion.of(inversion)
    inversion.check_compatible(model)
    if inversion.null == "direct":  # its source is its pivot, by definition: nothing to sample
        for i in range(inversion.num_steps):
            if callback is not None:
                callback(i)
        return inversion.trajectory[-1:].to(model.device, model.dtype)

    def step_end(i: int, latents: torch.Tensor) -> None:
        if callback is not None:
            callback(i)

    # The others are sampled (what a reconstruction checks), not read back from their trajectories;
    # negative-prompt inversion's source unguided (its null states are its conditional ones).
    return _sample_branches(model, inversion, None, None, step_end, progress, inversion.null == "negative")


def _sample_branches(model, inversion: Inversion, plan: EditPlan | None, trajectory: torch.Tensor | None, step_end,
                     progress: bool, unguided: bool = False) -> torch.Tensor:
    schedule = DDIMSchedule.from_scheduler(model.scheduler, inversion.num_steps)
    source = inversion.cond_at(model)  # per step (1, 77, D)
    cond = source if plan is None else _branch_states(model, inversion, plan, source)
    branches = 1 if plan is None else 1 + len(plan.targets)
    latent_T = inversion.latent_T.to(model.device, model.dtype).expand(branches, -1, -1, -1)
    return sample(model, latent_T, schedule, cond, inversion.null_at(model, source), inversion.guidance_scale,
                  source_trajectory=trajectory, source_unguided=unguided, step_end=step_end, progress=progress)


@torch.no_grad()
def _branch_states(model: StableDiffusion, inversion: Inversion, plan: EditPlan,
                   source: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per step (1 + n, 77, D): the source's states, then each target's with the learned vectors it keeps.

    A target that keeps no learned vector has the same states at every step: encoded once; one
    that keeps some is encoded for all steps in one batch.
    """
    per_target = []
    for target, (positions, rows) in zip(plan.targets, plan.kept_tokens):
        ids = torch.tensor([target.token_ids], device=model.device)
        if inversion.token_vectors is None or not positions:
            per_target.append([model.encode_tokens(ids)] * inversion.num_steps)
        else:
            vectors = inversion.token_vectors[:, rows].to(model.device, model.dtype)  # (T, k, D_in)
            per_target.append(list(model.encode_tokens(ids.expand(len(vectors), -1), vectors, positions).split(1)))
    return [torch.cat([source[i], *(states[i] for states in per_target)]) for i in range(inversion.num_steps)]


def _source_trajectory(model: StableDiffusion, inversion: Inversion) -> torch.Tensor | None:
    """The source branch's latents at each step where the inversion knows them (direct inversion's
    pivot, the null-text trajectory of NTI and DPL), on the model's device; None where it does not."""
    if inversion.trajectory is None:
        return None
    return inversion.trajectory.to(model.device, model.dtype)
