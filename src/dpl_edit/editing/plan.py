"""What an edit does, worked out once from the prompts: token mappings, per-step windows,
re-weighting, local-blend words and which target tokens reuse DPL's learned vectors."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import checks
from ..errors import PromptError
from ..prompts import MarkedPrompt, align_tokens, parse_marked_prompt, replacement_mapper, text_list

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MODES = ("replace", "refine")
TARGET_TOKENS = ("keep", "plain", "auto")  # which learned DPL vectors a target keeps
P2P_SELF_MAX_RESOLUTION = 16  # Prompt-to-Prompt injects self-attention in SD 1.x's layers of 16x16 maps and below


@dataclass(frozen=True)
class EditConfig:
    """Prompt-to-Prompt settings; the defaults are the paper's."""

    mode: str = "replace"  # "replace" (word swap, same token count) or "refine" (aligned prompts)
    cross_replace_steps: float = 0.8  # share of the steps whose cross-attention comes from the source
    word_cross_replace_steps: dict[str, float] = field(default_factory=dict)  # per target word
    self_replace_steps: float = 0.4  # share of the steps whose self-attention comes from the source
    self_max_resolution: int | None = None  # ... in layers with maps of this side and below (None: P2P's 16 at SD 1.x's level)
    reweight: dict[str, float] = field(default_factory=dict)  # target word -> factor on its column
    blend: tuple[str, ...] = ()  # source regions (and their targets') that may change: "word", "word@2", "a {word}"
    blend_threshold: float = 0.3
    blend_start: float = 0.2  # share of the steps before local blending starts (the null-text + P2P notebook)
    subtract: tuple[str, ...] = ()  # regions taken out of the blend mask (P2P's subtract words)
    subtract_threshold: float = 0.3
    target_tokens: str = "keep"  # keep (the authors'), plain, or auto (drop a noun's vector when its attribute changes)

    def __post_init__(self) -> None:
        for name in ("blend", "subtract"):  # one word may be given as a string
            object.__setattr__(self, name, tuple(text_list(getattr(self, name), f"{name} words")))
        if self.mode not in MODES:
            raise PromptError(f"Unknown edit mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.target_tokens not in TARGET_TOKENS:
            raise PromptError(f"Unknown target_tokens {self.target_tokens!r}; choose one of {', '.join(TARGET_TOKENS)}")
        for name, value in [("cross_replace_steps", self.cross_replace_steps),
                            ("self_replace_steps", self.self_replace_steps), ("blend_start", self.blend_start),
                            ("blend_threshold", self.blend_threshold), ("subtract_threshold", self.subtract_threshold),
                            *((f"cross_replace_steps of {w!r}", v) for w, v in self.word_cross_replace_steps.items())]:
            checks.fraction(name, value)
        for word, factor in self.reweight.items():
            checks.finite(f"re-weighting factor of {word!r}", factor)
        if self.self_max_resolution is not None:
            checks.count("self_max_resolution", self.self_max_resolution)
        if not self.blend:  # no local blend: its settings would do nothing
            idle = [name for name in ("subtract", "blend_threshold", "blend_start", "subtract_threshold")
                    if getattr(self, name) != type(self).__dataclass_fields__[name].default]
            if idle:
                raise PromptError(f"{', '.join(idle)}: settings of local blending, which no blend words turn on; "
                                  "give the words whose regions may change (blend, --blend), or leave those out.")


RECOMMENDABLE = ("target_tokens",)  # EditConfig fields a model's dpl_edit.json may recommend ("edit" section)


def recommended_edit_config(config: EditConfig, model_settings: dict, chosen: Iterable[str] = ()) -> EditConfig:
    """``config`` with the model's recommended editing settings (the ``edit`` section of its
    dpl_edit.json, chosen on validation scenes) in every field the user did not choose."""
    recommended = {k: v for k, v in model_settings.get("edit", {}).items() if k in RECOMMENDABLE and k not in set(chosen)}
    return dataclasses.replace(config, **recommended)


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
    subtract_positions: list[list[int]]  # per branch: token positions of the subtract words
    blend_start: int  # first step that blends
    kept_tokens: list[tuple[list[int], list[int]]]  # per target: (target positions, rows of the source vectors)


def region_positions(prompt: MarkedPrompt, spec: str, tokenizer: CLIPTokenizer) -> set[int]:
    """Token positions of the words a region spec names in a prompt.

    ``spec`` is a word (its first whole-word occurrence), ``word@N`` (its N-th occurrence, from 1),
    or the prompt itself with braces around the words meant (``"a red square and a {square}"``).
    Raises :class:`PromptError` when the word or occurrence is not there.
    """
    if "{" in spec:
        marked = parse_marked_prompt(spec, tokenizer)
        if marked.text != prompt.text:
            raise PromptError(f"{spec!r} is not the prompt {prompt.text!r} with braces around words.")
        return set(marked.positions)
    word, occurrence = spec, 1
    if "@" in spec:
        word, _, number = spec.rpartition("@")
        if not number.isdigit() or int(number) < 1:
            raise PromptError(f"{spec!r}: write an occurrence as word@N with N = 1, 2, ... (e.g. rectangle@2).")
        occurrence = int(number)
    matches = list(re.finditer(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt.text, flags=re.IGNORECASE))
    if not word.strip() or len(matches) < occurrence:
        raise PromptError(f"{prompt.text!r} has {len(matches)} occurrence(s) of {word.strip()!r}, not {occurrence}; "
                          "check the word and its @N.")
    start, end = matches[occurrence - 1].span()
    braced = f"{prompt.text[:start]}{{{prompt.text[start:end]}}}{prompt.text[end:]}"
    return set(parse_marked_prompt(braced, tokenizer).positions)


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
    # the steps counted as Prompt-to-Prompt counts them: its cross-attention windows are the first
    # int(share * (steps + 1)) rows of a table of steps + 1 (get_time_words_attention_alpha), its
    # self-attention window the first int(share * steps) steps
    windows = torch.zeros(num_steps, len(targets), mapper.shape[1])
    windows[: int(config.cross_replace_steps * (num_steps + 1))] = 1.0
    for word, share in config.word_cross_replace_steps.items():
        for j, positions in _in_targets(targets, word, tokenizer):
            windows[:, j, positions] = 0.0
            windows[: int(share * (num_steps + 1)), j, positions] = 1.0
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
        self_steps=int(config.self_replace_steps * num_steps),
        equalizer=equalizer,
        blend_positions=_region_positions(source, targets, mapper, config.blend, tokenizer, "blend"),
        subtract_positions=_region_positions(source, targets, mapper, config.subtract, tokenizer, "subtract"),
        blend_start=int(config.blend_start * num_steps),
        kept_tokens=[_kept_tokens(source, target, row, dynamic_positions, config.target_tokens)
                     for target, row in zip(targets, mapper)],
    )


def _in_targets(targets, word, tokenizer) -> list[tuple[int, list[int]]]:
    """(target index, token positions) of each target that has the word; PromptError if none has."""
    found = []
    for j, target in enumerate(targets):
        try:
            found.append((j, sorted(region_positions(target, word, tokenizer))))
        except PromptError:
            continue
    if not found:
        raise PromptError(f"The word {word!r} is in none of the target prompts; check its spelling.")
    return found


def _region_positions(source, targets, mapper, specs, tokenizer, role: str) -> list[list[int]]:
    """Per branch, the token positions of the regions that ``specs`` name (see :func:`region_positions`).

    A spec names a region of the source. In a target, that region's word is found through the
    mapper (the positions mapped onto it, and the new tokens that took their place), never by
    spelling, so that a look-alike elsewhere in the target ("a purple oval and a yellow rectangle"
    after "rectangle" -> "oval") is not blended. A plain word only the target has is taken where it
    occurs there.
    """
    in_source = {}
    for spec in specs:
        try:
            in_source[spec] = region_positions(source, spec, tokenizer)
        except PromptError:
            if "{" in spec or "@" in spec:  # names a place in the source: no fallback to the targets
                raise
            in_source[spec] = set()
    branches = [sorted(set().union(*in_source.values()))]
    for target, row in zip(targets, mapper):
        positions: set[int] = set()
        for spec in specs:
            if in_source[spec]:
                positions |= _counterpart(row.tolist(), in_source[spec], target.end_position)
                continue
            try:
                positions |= region_positions(target, spec, tokenizer)
            except PromptError:
                raise PromptError(
                    f"The {role} word {spec!r} is neither in {source.text!r} nor in {target.text!r}."
                ) from None
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


def _kept_tokens(source, target, row, dynamic_positions, mode: str) -> tuple[list[int], list[int]]:
    """Target positions that keep a dynamic source token (same token id), and the vectors' rows.

    ``mode`` "keep" keeps every such token (the authors'), "plain" none, and "auto" drops a word
    whose attribute the target changes: a token between the previous dynamic word (or the start)
    and this word that is swapped, deleted or has a new token inserted beside it. Dynamic words are
    runs of consecutive dynamic positions.
    """
    row = row.tolist()
    kept = {s: p for p, s in enumerate(row) if s in dynamic_positions and target.token_ids[p] == source.token_ids[s]}
    if mode == "plain":
        kept = {}
    elif mode == "auto":
        words, previous = _runs(sorted(dynamic_positions)), 0
        for word in words:
            if _changed_between(source, target, row, previous, word[0]):
                for s in word:
                    kept.pop(s, None)
            previous = word[-1]
    order = list(dynamic_positions)
    pairs = sorted((p, order.index(s)) for s, p in kept.items())
    return [p for p, _ in pairs], [r for _, r in pairs]


def _runs(positions: list[int]) -> list[list[int]]:
    """Consecutive positions grouped: [2, 3, 7] -> [[2, 3], [7]]."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _changed_between(source, target, row: list[int], start: int, end: int) -> bool:
    """Whether the target swaps or deletes a source token strictly between positions ``start`` and
    ``end``, or inserts a new token between their counterparts."""
    same = {s for p, s in enumerate(row) if s >= 0 and target.token_ids[p] == source.token_ids[s]}
    if any(s not in same for s in range(start + 1, end)):
        return True
    where = {s: p for p, s in enumerate(row) if s >= 0}
    low, high = where.get(start, 0), where.get(end, len(row))
    return any(row[p] < 0 for p in range(low + 1, high))
