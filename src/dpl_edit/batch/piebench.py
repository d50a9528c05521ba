"""PIE-Bench's dataset layout (Ju et al., "Direct Inversion", ICLR 2024), read and written.

A dataset folder holds ``mapping_file.json`` and the images under ``annotation_images/``. Each
entry of the mapping file::

    "000000000000": {"image_path": "0_random_140/000000000000.jpg",
                     "original_prompt": "a slanted [mountain bicycle] on the road in front of a building",
                     "editing_prompt": "a slanted [rusty] [mountain bicycle] on the road ...",
                     "editing_instruction": "...", "editing_type_id": "0",
                     "blended_word": "bicycle bicycle", "mask": [start, length, start, length, ...]}

Brackets mark the edited words; the mask is a run-length list of (flat start index, run length)
pairs over a 512x512 image, and PIE-Bench's decoder also sets the image's border pixels (its
"annotation errors in boundary" guard). Methods write their edits to
``OUT/<method>/annotation_images/<image_path>``, which PIE-Bench's own evaluation reads.

Three optional fields are dpl-edit's (PIE-Bench's scripts ignore them): ``dpl_prompt`` (the source
prompt with DPL's words in braces, when the bracketed words are not the nouns to learn), and two
that only rendered scenes have: ``oracle_image_path`` (the edit's true result) and
``distractor_mask`` (run-length, as ``mask``, no border: the other objects, which the edit must
leave alone).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import write_atomic
from ..errors import DplEditError

MAPPING_FILE = "mapping_file.json"
IMAGES = "annotation_images"
MASK_SIZE = (512, 512)
EDIT_TYPES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
    "5": "change pose", "6": "change colour", "7": "change material", "8": "change background", "9": "change style",
}
_BRACKETS = re.compile(r"\[([^\[\]]*\S[^\[\]]*)\]")  # a bracketed span with a word in it


@dataclass(frozen=True)
class EditItem:
    """One PIE-Bench entry."""

    key: str
    image_path: str  # under annotation_images/
    original_prompt: str  # with [brackets] on the edited words
    editing_prompt: str
    editing_type_id: str
    blended_word: tuple[str, ...]  # (source word, target word), or () when none
    mask_rle: tuple[int, ...]
    dpl_prompt: str | None = None
    oracle_image_path: str | None = None
    distractor_rle: tuple[int, ...] = ()

    @property
    def source_prompt(self) -> str:
        return self.original_prompt.replace("[", "").replace("]", "")

    @property
    def target_prompt(self) -> str:
        return self.editing_prompt.replace("[", "").replace("]", "")

    def marked_prompt(self) -> str:
        """The source prompt as DPL takes it: ``dpl_prompt`` if given, else the bracketed words in braces."""
        # brackets with no word in them ("[]") are dropped, as source_prompt drops them
        return self.dpl_prompt or _BRACKETS.sub(r"{\1}", self.original_prompt).replace("[", "").replace("]", "")

    def mask(self, shape: tuple[int, int] = MASK_SIZE) -> np.ndarray:
        return decode_mask(self.mask_rle, shape)


def decode_mask(rle, shape: tuple[int, int] = MASK_SIZE, border: bool = True) -> np.ndarray:
    """A PIE-Bench mask (H, W) bool from its run-length list, border pixels set as PIE-Bench sets them
    (unless ``border`` is False)."""
    if len(rle) % 2:
        raise DplEditError(f"A PIE-Bench mask is a list of (start, length) pairs; got {len(rle)} numbers")
    length = shape[0] * shape[1]
    flat = np.zeros(length, dtype=bool)
    for start, run in zip(rle[0::2], rle[1::2]):
        flat[start : start + max(0, min(run, length - start))] = True
    mask = flat.reshape(shape)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """The run-length list of a bool mask (H, W): (flat start, length) of every run of True."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def read_dataset(folder: str | Path, types: set[str] | None = None, start: int = 0, stop: int | None = None,
                 ) -> list[EditItem]:
    """The entries of a PIE-Bench folder (in the mapping file's order), filtered by edit type ids and
    an index range [start, stop)."""
    folder = Path(folder)
    path = folder / MAPPING_FILE
    if not path.is_file():
        raise DplEditError(f"No {MAPPING_FILE} in {folder}: give a PIE-Bench folder (mapping_file.json and "
                           f"{IMAGES}/), or write one with `dpl scenes export`.")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DplEditError(f"Could not read {path} ({err})") from err
    if not isinstance(mapping, dict):
        raise DplEditError(f"{path} holds no JSON object of items by key (found {type(mapping).__name__}), as "
                           "PIE-Bench's mapping_file.json does")
    items = []
    for key, entry in list(mapping.items())[start:stop]:
        if not isinstance(entry, dict):
            raise DplEditError(f"Entry {key!r} of {path} is no JSON object of PIE-Bench's fields (found "
                               f"{type(entry).__name__})")
        try:
            item = EditItem(
                key=str(key), image_path=entry["image_path"], original_prompt=entry["original_prompt"],
                editing_prompt=entry["editing_prompt"], editing_type_id=str(entry["editing_type_id"]),
                blended_word=tuple(entry.get("blended_word", "").split()), mask_rle=tuple(entry.get("mask", [])),
                dpl_prompt=entry.get("dpl_prompt"), oracle_image_path=entry.get("oracle_image_path"),
                distractor_rle=tuple(entry.get("distractor_mask", [])),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise DplEditError(f"Entry {key!r} of {path} lacks a field PIE-Bench has ({err})") from err
        if types is None or item.editing_type_id in types:
            items.append(item)
    return items


def write_dataset(folder: str | Path, entries: dict[str, dict]) -> Path:
    """Write ``mapping_file.json`` (entries as PIE-Bench's, keys in order)."""
    path = Path(folder) / MAPPING_FILE
    write_atomic(path, json.dumps(entries, indent=1))
    return path


def edit_path(out: str | Path, method: str, item: EditItem) -> Path:
    """Where a method's edit of an item goes (PIE-Bench's output layout)."""
    return Path(out) / method / IMAGES / item.image_path
