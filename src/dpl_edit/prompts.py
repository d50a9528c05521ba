"""Prompts with marked words: ``"a {cat} and a {dog}"`` as the DPL paper writes them.

A marked (dynamic) word may be several BPE tokens ("hummingbird" is one, "sunflowerpot" is more):
every token of the word gets its own dynamic vector, initialised from that token's own embedding
(so a one-token word starts from its word-final token, e.g. ``cat</w>``), and the word's
attention map is the mean of its tokens' maps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import PromptError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

_BRACED = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class DynamicWord:
    """A marked word and the positions of its tokens in the 77 token ids (0 is the start token)."""

    word: str
    positions: tuple[int, ...]


@dataclass(frozen=True)
class MarkedPrompt:
    """A prompt with its braces removed, its token ids and its dynamic words."""

    text: str
    token_ids: tuple[int, ...]  # 77 ids: start, prompt, end, padding
    words: tuple[DynamicWord, ...]
    end_position: int  # position of the end token; the prompt's own tokens are 1 .. end_position - 1

    @property
    def positions(self) -> list[int]:
        """All dynamic token positions, word by word."""
        return [p for word in self.words for p in word.positions]


def text_list(texts: str | Sequence[str], what: str = "texts") -> list[str]:
    """Prompts or words as a list: one given as a string is a list of that one, not of its letters
    (what the entry points take where a user may give one or several); a :class:`PromptError` naming
    ``what`` for anything but a string or a sequence of strings (None, a number, a list with None)."""
    if isinstance(texts, str):
        return [texts]
    try:
        items = None if isinstance(texts, bytes) else list(texts)
    except TypeError:  # not iterable
        items = None
    if items is None or not all(isinstance(text, str) for text in items):
        raise PromptError(f"Expected {what} as a string or a list of strings, got {texts!r}")
    return items


def parse_marked_prompt(
    prompt: str, tokenizer: CLIPTokenizer, words: str | Sequence[str] = (), require_words: bool = True
) -> MarkedPrompt:
    """Find the dynamic words of a prompt, marked with braces and/or listed in ``words``.

    A listed word marks its first whole-word, case-insensitive occurrence. Raises
    :class:`PromptError` for unbalanced braces, a listed word not in the prompt, a prompt over the
    tokenizer's length, or (with ``require_words``) no marked word at all.
    """
    check_marks(prompt, words, require_words)
    text, spans = _strip_braces(prompt)
    for word in text_list(words or (), "words"):
        match = re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, flags=re.IGNORECASE)
        if not word.strip() or match is None:
            raise PromptError(f"The word {word!r} is not in the prompt {text!r}; check its spelling.")
        if match.span() not in spans:
            spans.append(match.span())
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded.input_ids, encoded.offset_mapping
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise PromptError(
            f"The prompt {text!r} is {len(ids)} tokens long (start and end included); the model reads "
            f"at most {limit}. Shorten it."
        )
    dynamic = []
    for start, end in sorted(spans):
        positions = tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start)
        if not positions:
            raise PromptError(f"The marked word {text[start:end]!r} has no tokens; mark a word, not a symbol.")
        dynamic.append(DynamicWord(text[start:end], positions))
    end = len(ids) - 1
    ids = ids + [tokenizer.pad_token_id] * (limit - len(ids))
    return MarkedPrompt(text=text, token_ids=tuple(ids), words=tuple(dynamic), end_position=end)


def check_marks(prompt: str, words: str | Sequence[str] = (), require_words: bool = True) -> None:
    """The checks of :func:`parse_marked_prompt` that need no tokenizer (run before loading a model)."""
    if not isinstance(prompt, str):
        raise PromptError(f"Expected the prompt as a string, got {prompt!r}")
    _, spans = _strip_braces(prompt)
    if require_words and not spans and not text_list(words or (), "words"):  # (None: no words)
        raise PromptError(
            f"No dynamic word in {prompt!r}: mark the nouns to learn in curly brackets, "
            'e.g. "a {cat} and a {dog}" (or list them: --words on the command line, words= in Python).'
        )


def _strip_braces(prompt: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove ``{...}`` marks; return the text and the character spans of the marked words."""
    text, spans, last = "", [], 0
    for match in _BRACED.finditer(prompt):
        text += prompt[last : match.start()]
        word = match.group(1).strip()
        if not word:
            raise PromptError(f"Empty braces in {prompt!r}; put the word to learn inside them.")
        lead = len(match.group(1)) - len(match.group(1).lstrip())
        start = len(text) + lead
        text += match.group(1)
        spans.append((start, start + len(word)))
        last = match.end()
    text += prompt[last:]
    if "{" in text or "}" in text:
        raise PromptError(f"Unbalanced or nested braces in {prompt!r}; write words as {{word}}.")
    return text, spans


def align_tokens(source: MarkedPrompt, target: MarkedPrompt) -> list[int]:
    """For each of the target's 77 positions, the source position whose map it takes, or -1 (new token):
    Prompt-to-Prompt's refinement mapper (its ``seq_aligner.get_mapper``).

    The two prompts' tokens, start and end tokens included, are aligned globally (Needleman-Wunsch
    on token ids: match +1, mismatch -1, gap 0). Where alignments tie (a repeated token), the trace
    back from the ends takes, at each cell, a new target token first, then a dropped source token,
    then a pair, as P2P's does. Every position after the target's end token takes the source's same
    position, as in P2P (so where the target is two or more tokens shorter, its first padding
    positions take the source's last words).
    """
    a = source.token_ids[: source.end_position + 1]
    b = target.token_ids[: target.end_position + 1]
    score = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            pair = score[i - 1][j - 1] + (1 if a[i - 1] == b[j - 1] else -1)
            score[i][j] = max(score[i][j - 1], score[i - 1][j], pair)
    mapper = list(range(len(target.token_ids)))
    i, j = len(a), len(b)
    while j > 0:  # trace back; the source tokens left over when j reaches 0 are dropped
        if i == 0 or score[i][j] == score[i][j - 1]:  # target token j - 1 is new
            j -= 1
            mapper[j] = -1
        elif score[i][j] == score[i - 1][j]:  # source token i - 1 is dropped
            i -= 1
        else:  # a pair (only ever a match: with gap 0 a mismatch never scores best)
            i, j = i - 1, j - 1
            mapper[j] = i
    return mapper


def replacement_mapper(source: MarkedPrompt, target: MarkedPrompt) -> list[int]:
    """Word swap: position p of the target takes position p of the source (same token count needed)."""
    if source.end_position != target.end_position:
        raise PromptError(
            f"{source.text!r} and {target.text!r} have different token counts ({source.end_position - 1} "
            f"and {target.end_position - 1}), so a word swap (replace) cannot map their attention one to "
            "one. Use the refine mode (mode=\"refine\"; --mode refine on the command line)."
        )
    return list(range(len(target.token_ids)))
