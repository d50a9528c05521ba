"""The real CLIP tokenizer, built offline from the BPE merges that ship in `open_clip_torch`.

Stable Diffusion 1.x uses OpenAI CLIP's byte-level BPE (49408 tokens; 49406 is the start token
``<|startoftext|>``, 49407 the end/padding token ``<|endoftext|>``). Model folders carry their own
tokenizer files; this module serves the places that have no folder (tiny random models in tests
and benchmarks, training a scene model from scratch). The vocabulary is rebuilt exactly as CLIP
builds it: 256 byte symbols, the same with ``</w>``, one entry per merge, then the two specials.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the file (vocab size 49408).


class TokenizerUnavailableError(RuntimeError):
    """The CLIP BPE vocabulary could not be found on this machine."""


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in CLIP's vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes follow, mapped to
    code points 256, 257, ... in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def bpe_vocabulary_path() -> str:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip_torch`` (not imported)."""
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError as err:
        raise TokenizerUnavailableError(
            "The CLIP BPE vocabulary comes from the open_clip_torch wheel, which is not installed. "
            "Install it with: pip install --no-deps open_clip_torch"
        ) from err
    return str(dist.locate_file(BPE_FILE))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(bpe_vocabulary_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a header
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (the one of Stable Diffusion 1.x), with prompts padded to 77 tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
