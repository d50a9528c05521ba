"""`dpl scenes export`: rendered scenes as a PIE-Bench folder, so that the scene world is evaluated by
the same `dpl batch` + `dpl metrics` path as real images (plus the oracle, which only scenes have).

Per scene, three word swaps (as the scene benchmark draws them): the first object's shape, the
second object's colour and the ground. Each becomes one PIE-Bench entry with its own copy of the
source image (PIE-Bench's output layout has one edit per image path), the edited words in
[brackets], the edit mask (the object before and after the swap, or the ground) as PIE-Bench's
run-length list at the image's size, ``blended_word`` as P2P would blend it, ``dpl_prompt`` (the
nouns in braces), ``oracle_image_path`` (the renderer's edit) and, for object swaps,
``distractor_mask`` (the other objects, less the edited one's pixels).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..batch.piebench import IMAGES, MAPPING_FILE, encode_mask, write_dataset
from ..errors import DplEditError
from .render import BACKGROUNDS, COLOURS, SHAPES, Scene, WordSwap, render, split_scene, swap_word

ORACLES = "oracle_images"
KIND_TYPES = {"shape": ("1", "1_change_object"), "colour": ("6", "6_change_attribute_color"),
              "background": ("8", "8_change_background")}


def scene_swaps(scene: Scene, rng: np.random.Generator) -> list[WordSwap]:
    """An object-noun swap (first object), a colour swap (second object) and a background swap."""
    shape = rng.choice([s for s in SHAPES if s != scene.objects[0].shape])
    colour = rng.choice([c for c in COLOURS if c not in (scene.objects[1].colour,)])
    background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
    return [WordSwap("shape", str(shape), 0), WordSwap("colour", str(colour), 1), WordSwap("background", str(background))]


def image_name(type_folder: str, split: str, objects: int, index: int) -> str:
    return f"{type_folder}/{split}_{objects}obj_{index:04d}.png"


def exported_scene(image_path: str) -> Scene:
    """The scene an exported image shows, from its name (``image_name``)."""
    found = re.fullmatch(r"(?:.*/)?(validation|test)_([23])obj_(\d{4})\.png", image_path)
    if not found:
        raise DplEditError(f"{image_path} is not the name of an exported scene")
    return split_scene(found[1], int(found[3]), num_objects=int(found[2]))


def bracketed(scene: Scene, swap: WordSwap) -> str:
    """The caption with the swapped word in [brackets] (at its own object, not a look-alike's)."""
    names = []
    for k, obj in enumerate(scene.objects):
        colour = f"[{obj.colour}]" if swap.kind == "colour" and k == swap.index else obj.colour
        shape = f"[{obj.shape}]" if swap.kind == "shape" and k == swap.index else obj.shape
        names.append(f"a {colour} {shape}")
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    ground = f"[{scene.background}]" if swap.kind == "background" else scene.background
    return f"{listed} on {ground}"


def _check_no_other_dataset(folder: Path) -> None:
    path = folder / MAPPING_FILE
    if not path.is_file():
        return
    try:
        mapping = json.loads(path.read_text())
        ours = isinstance(mapping, dict) and all(isinstance(entry, dict) and "oracle_image_path" in entry
                                                 for entry in mapping.values())
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        ours = False
    if not ours:
        raise DplEditError(f"{folder} holds a dataset that `dpl scenes export` did not write ({path}): exporting "
                           "would replace its mapping and mix scenes into its images; give a new folder.")


def export_scenes(folder: str | Path, split: str = "test", objects: tuple[int, ...] = (2, 3), count: int = 8,
                  seed: int = 0) -> int:
    """Write ``count`` scenes of each object count as a PIE-Bench folder; returns the number of entries.
    A folder that holds a dataset this did not write (a ``mapping_file.json`` with an item that has no
    oracle, PIE-Bench's own say) is refused before anything is written: its mapping would be replaced,
    and scenes mixed into its images. An earlier export is replaced."""
    folder = Path(folder)
    _check_no_other_dataset(folder)
    rng = np.random.default_rng(seed)
    entries = {}
    for n in objects:
        for index in range(count):
            scene = split_scene(split, index, num_objects=n)
            image, masks = render(scene)
            for swap in scene_swaps(scene, rng):
                target = swap_word(scene, swap)
                oracle, new_masks = render(target)
                type_id, type_folder = KIND_TYPES[swap.kind]
                name = image_name(type_folder, split, n, index)
                distractors = {}
                if swap.kind == "background":
                    mask = ~np.any(masks, axis=0)
                    words = (scene.background, swap.new)
                else:
                    mask = masks[swap.index] | new_masks[swap.index]
                    shape = scene.objects[swap.index].shape
                    words = (shape, swap.new if swap.kind == "shape" else shape)
                    others = np.any([m for j, m in enumerate(masks) if j != swap.index], axis=0) & ~mask
                    distractors = {"distractor_mask": encode_mask(others)}
                for root, picture in ((IMAGES, image), (ORACLES, oracle)):
                    (folder / root / name).parent.mkdir(parents=True, exist_ok=True)
                    picture.save(folder / root / name)
                entries[f"{n}{index:05d}{type_id}"] = {
                    "image_path": name, "original_prompt": bracketed(scene, swap),
                    "editing_prompt": bracketed(target, swap), "editing_instruction": f"{swap.kind} -> {swap.new}",
                    "editing_type_id": type_id, "blended_word": " ".join(words), "mask": encode_mask(mask),
                    "dpl_prompt": scene.marked_caption(), "oracle_image_path": name, **distractors,
                }
    write_dataset(folder, entries)
    return len(entries)
