"""What an edit does, worked out once from the prompts: token mappings, per-step windows,
re-weighting, local-blend words and which target tokens reuse DPL's learned vectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import CLIPTokenizer

from ..errors import PromptError
from ..prompts import MarkedPrompt, align_tokens, parse_marked_prompt, replacement_mapper

MODES = ("replace", "refine")


@dataclass(frozen=True)
class EditConfig:
    """Prompt-to-Prompt settings; the defaults are the paper's."""

    mode: str = "replace"  # "replace" (word swap, same token count) or "refine" (aligned prompts)
    cross_replace_steps: float = 0.8  # share of the steps whose cross-attention comes from the source
    word_cross_replace_steps: dict[str, float] = field(default_factory=dict)  # per target word
    self_replace_steps: float = 0.4  # share of the steps whose self-attention comes from the source
    self_max_resolution: int = 16  # ... in layers with maps of this side and below
    reweight: dict[str, float] = field(default_factory=dict)  # target word -> factor on its column
    blend: tuple[str, ...] = ()  # source words whose region (and their target's) may change
    blend_threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PromptError(f"Unknown edit mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name, value in [("cross_replace_steps", self.cross_replace_steps),
                            ("self_replace_steps", self.self_replace_steps), *self.word_cross_replace_steps.items()]:
            if not 0.0 <= value <= 1.0:
                raise PromptError(f"{name} must be a fraction of the steps in [0, 1], got {value}")


@dataclass
class EditPlan:
    """The edit as tensors (n targets, 77 tokens, T steps)."""

    source: MarkedPrompt
    targets: list[MarkedPrompt]
    mapper: torch.Tensor  # (n, 77) long: source position of each target position (-1: new)
    mapped: torch.Tensor  # (n, 77): 1 where the column takes the source's map
    windows: torch.Tensor  # (T, n, 77): 1 where cross-attention replacement is on at step i
    self_steps: int
    equalizer: torch.Tensor | None  # (n, 77) re-weighting factors
    blend_positions: list[list[int]]  # per branch (source, targets): token positions of the blend words
    kept_tokens: list[tuple[list[int], list[int]]]  # per target: (target positions, rows of the source vectors)


def word_positions(prompt: MarkedPrompt, word: str, tokenizer: CLIPTokenizer) -> tuple[int, ...]:
    """Token positions of a word in a prompt (its first whole-word occurrence); PromptError if absent."""
    return parse_marked_prompt(prompt.text, tokenizer, [word]).words[-1].positions


def swap_mode(word: str, new: str, tokenizer: CLIPTokenizer) -> str:
    """The edit mode for swapping one word for another: "replace" when both are as many tokens
    (a word swap), else "refine" (the prompts are aligned)."""
    return "replace" if len(tokenizer(word).input_ids) == len(tokenizer(new).input_ids) else "refine"


def make_plan(
    source: MarkedPrompt,
    targets: Sequence[MarkedPrompt],
    dynamic_positions: Sequence[int],
    config: EditConfig,
    num_steps: int,
    tokenizer: CLIPTokenizer,
) -> EditPlan:
    mapper_of = replacement_mapper if config.mode == "replace" else align_tokens
    mapper = torch.tensor([mapper_of(source, target) for target in targets])  # (n, 77)
    mapped = (mapper >= 0).float()
    windows = torch.zeros(num_steps, len(targets), mapper.shape[1])
    windows[: round(config.cross_replace_steps * num_steps)] = 1.0
    for word, share in config.word_cross_replace_steps.items():
        for j, positions in _in_targets(targets, word, tokenizer):
            windows[:, j, positions] = 0.0
            windows[: round(share * num_steps), j, positions] = 1.0
    equalizer = None
    if config.reweight:
        equalizer = torch.ones(len(targets), mapper.shape[1])
        for word, factor in config.reweight.items():
            for j, positions in _in_targets(targets, word, tokenizer):
                equalizer[j, positions] = factor
    return EditPlan(
        source=source,
        targets=list(targets),
        mapper=mapper,
        mapped=mapped,
        windows=windows,
        self_steps=round(config.self_replace_steps * num_steps),
        equalizer=equalizer,
        blend_positions=_blend_positions(source, targets, mapper, config.blend, tokenizer),
        kept_tokens=[_kept_tokens(source, target, row, dynamic_positions) for target, row in zip(targets, mapper)],
    )


def _in_targets(targets, word, tokenizer) -> list[tuple[int, list[int]]]:
    """(target index, token positions) of each target that has the word; PromptError if none has."""
    found = []
    for j, target in enumerate(targets):
        try:
            found.append((j, list(word_positions(target, word, tokenizer))))
        except PromptError:
            continue
    if not found:
        raise PromptError(f"The word {word!r} is in none of the target prompts; check its spelling.")
    return found


def _blend_positions(source, targets, mapper, words, tokenizer) -> list[list[int]]:
    """Per branch, the token positions of the blend words.

    A blend word names a region of the source: its first occurrence there. In a target, that
    region's word is found through the mapper (the positions mapped onto it, and the new tokens that
    took its place), never by spelling, so that a look-alike elsewhere in the target ("a purple
    oval and a yellow rectangle" after "rectangle" -> "oval") is not blended. A word only the
    target has is taken where it occurs there.
    """

    def find(prompt: MarkedPrompt, word: str) -> set[int]:
        try:
            return set(word_positions(prompt, word, tokenizer))
        except PromptError:
            return set()

    in_source = {word: find(source, word) for word in words}
    branches = [sorted(set().union(*in_source.values()))]
    for target, row in zip(targets, mapper):
        positions: set[int] = set()
        for word in words:
            if in_source[word]:
                positions |= _counterpart(row.tolist(), in_source[word], target.end_position)
            elif own := find(target, word):
                positions |= own
            else:
                raise PromptError(f"The blend word {word!r} is neither in {source.text!r} nor in {target.text!r}.")
        branches.append(sorted(positions))
    return branches


def _counterpart(row: list[int], span: set[int], end: int) -> set[int]:
    """Target positions (before ``end``) standing for the source positions ``span``: those mapped
    onto them, and the unmapped (new) ones between the targets of their neighbours."""
    first, last = min(span), max(span)
    mapped = {p for p in range(end) if row[p] in span}
    before = max((p for p in range(end) if 0 <= row[p] < first), default=0)
    after = min((p for p in range(end) if row[p] > last), default=end)
    return mapped | {p for p in range(before + 1, after) if row[p] < 0}


def _kept_tokens(source, target, row, dynamic_positions) -> tuple[list[int], list[int]]:
    """Target positions that keep a dynamic source token (same token id), and the vectors' rows."""
    positions, rows = [], []
    for p, s in enumerate(row.tolist()):
        if s in dynamic_positions and target.token_ids[p] == source.token_ids[s]:
            positions.append(p)
            rows.append(list(dynamic_positions).index(s))
    return positions, rows
