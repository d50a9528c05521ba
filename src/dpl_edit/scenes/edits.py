"""How a word swap of a scene is edited with Prompt-to-Prompt: the blend that P2P would use.

A shape swap blends on the swapped noun, a colour swap on the object's noun (as P2P blends an
attribute edit on its noun: "a silver cat sculpture" on "cat"), a background swap on the
background word less the object nouns (P2P's subtract words). Nouns are named by position
(``square@2``), so a look-alike of the same shape is never blended by mistake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..editing import EditConfig
from ..editing.plan import swap_mode
from .render import Scene, WordSwap

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def noun_spec(scene: Scene, index: int) -> str:
    """Object ``index``'s noun as a blend word by position: ``shape@N``, its N-th occurrence."""
    shape = scene.objects[index].shape
    return f"{shape}@{sum(o.shape == shape for o in scene.objects[: index + 1])}"


def swap_config(scene: Scene, swap: WordSwap, tokenizer: CLIPTokenizer, target_tokens: str = "keep") -> EditConfig:
    """The Prompt-to-Prompt settings for a swap: replace when the words are as many tokens, else
    refine; the blend of the module doc."""
    mode = swap_mode(swap.source_word(scene), swap.new, tokenizer)
    if swap.kind == "background":
        nouns = tuple(noun_spec(scene, k) for k in range(len(scene.objects)))
        return EditConfig(mode=mode, blend=(scene.background,), subtract=nouns, target_tokens=target_tokens)
    return EditConfig(mode=mode, blend=(noun_spec(scene, swap.index),), target_tokens=target_tokens)
