"""Synthetic scenes with exact ground truth: coloured shapes on textured backgrounds.

A :class:`Scene` is a small description (background, objects with shape, colour, centre and size)
drawn deterministically from a seed. Rendering gives the RGB image, one exact mask per object and
the caption ("a red circle and a blue square on grass"). :func:`swap_word` is the edit oracle: the
scene as it should look after swapping one word of its caption (an object's shape or colour, or
the background). Shapes come in look-alike pairs (circle/oval, square/rectangle) so that attention
can leak onto a distractor object.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from ..errors import SettingError

if TYPE_CHECKING:
    from ..models import StableDiffusion

SIZE = 64  # image side in pixels
SHAPES = ("circle", "oval", "square", "rectangle", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 70, 225),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 195),
    "white": (245, 245, 245),
}
BACKGROUNDS = ("grass", "sand", "water", "brick")
CLASHES = {("blue", "water"), ("red", "brick"), ("yellow", "sand")}  # colour too close to the ground
SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}  # disjoint seed ranges
SPLIT_SIZE = 10_000_000
OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_WEIGHTS = (0.3, 0.5, 0.2)


@dataclass(frozen=True)
class SceneObject:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    x: int  # centre, pixels
    y: int
    size: int  # width in pixels (height follows from the shape)

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the shape's bounding box."""
        height = self.size * (0.6 if self.shape in ("oval", "rectangle") else 1.0)
        width = self.size * (0.85 if self.shape == "square" else 1.0)
        height = width if self.shape == "square" else height
        return (self.x - width / 2, self.y - height / 2, self.x + width / 2, self.y + height / 2)


@dataclass(frozen=True)
class Scene:
    background: str  # one of BACKGROUNDS
    objects: tuple[SceneObject, ...]  # left to right
    seed: int  # drives the background texture

    @property
    def caption(self) -> str:
        """"a red circle and a blue square on grass" (objects left to right)."""
        names = [f"a {o.colour} {o.shape}" for o in self.objects]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on {self.background}"

    def marked_caption(self) -> str:
        """The caption with the object nouns in braces, as DPL takes it."""
        names = [f"a {o.colour} {{{o.shape}}}" for o in self.objects]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} on {self.background}"


@dataclass(frozen=True)
class WordSwap:
    """An edit of one caption word: an object's ``shape`` or ``colour``, or the ``background``."""

    kind: str  # "shape", "colour" or "background"
    new: str
    index: int = 0  # which object (ignored for the background)

    def source_word(self, scene: Scene) -> str:
        if self.kind == "background":
            return scene.background
        return getattr(scene.objects[self.index], self.kind)


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of a split; the splits' seed ranges are disjoint."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"Scene index must be in [0, {SPLIT_SIZE}), got {index}")
    return SPLIT_SEEDS[split] + index


def sample_scene(seed: int, num_objects: int | None = None) -> Scene:
    """A random scene: background, 1-3 non-overlapping objects, colours that stand out."""
    rng = np.random.default_rng(seed)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    count = num_objects or int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_WEIGHTS))
    colours = [c for c in COLOURS if (c, background) not in CLASHES]
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < count:
        attempts += 1
        if attempts % 200 == 0:  # no room left for the next object: place them all again
            objects = []
        size = int(rng.integers(16, 25))
        candidate = SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=colours[rng.integers(len(colours))],
            x=int(rng.integers(size // 2 + 2, SIZE - size // 2 - 2)),
            y=int(rng.integers(size // 2 + 2, SIZE - size // 2 - 2)),
            size=size,
        )
        if all(_apart(candidate, other) for other in objects):
            objects.append(candidate)
    return Scene(background, tuple(sorted(objects, key=lambda o: (o.x, o.y))), seed)


def split_scene(split: str, index: int, num_objects: int | None = None) -> Scene:
    return sample_scene(scene_seed(split, index), num_objects)


def render(scene: Scene) -> tuple[Image.Image, list[np.ndarray]]:
    """The RGB image (SIZE x SIZE) and each object's mask (SIZE, SIZE) bool, exact to the pixel."""
    image = Image.fromarray(background_texture(scene.background, scene.seed))
    masks = []
    for obj in scene.objects:
        mask = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(mask), obj, 255)
        image.paste(Image.new("RGB", (SIZE, SIZE), COLOURS[obj.colour]), mask=mask)
        masks.append(np.asarray(mask) > 0)
    return image, masks


def swap_word(scene: Scene, edit: WordSwap) -> Scene:
    """The edit oracle: the scene after the swap, everything else (positions, texture) kept."""
    if edit.kind == "background":
        if edit.new not in BACKGROUNDS:
            raise ValueError(f"Unknown background {edit.new!r}")
        return replace(scene, background=edit.new)
    if edit.kind not in ("shape", "colour") or edit.new not in (SHAPES if edit.kind == "shape" else COLOURS):
        raise ValueError(f"Cannot swap {edit.kind} to {edit.new!r}")
    objects = list(scene.objects)
    objects[edit.index] = replace(objects[edit.index], **{edit.kind: edit.new})
    return replace(scene, objects=tuple(objects))


def check_scene_model_size(model: StableDiffusion, what: str) -> None:
    """``model`` makes images of the rendered scenes' size, which ``what`` (the demo, the scene
    checks) needs: a clear error, before any work, for a model of another world."""
    if model.image_size != SIZE:
        raise SettingError(f"{what} is for scene models, which make {SIZE}x{SIZE} images (scenes, scenes-plain or "
                           f"the model of a `dpl train-scenes` folder); {model.model_id} makes "
                           f"{model.image_size}x{model.image_size} images.")


def background_texture(background: str, seed: int) -> np.ndarray:
    """A (SIZE, SIZE, 3) uint8 texture of the background, deterministic in the seed."""
    rng = np.random.default_rng([seed, BACKGROUNDS.index(background)])
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    if background == "grass":
        base = np.array([60, 140, 50]) + rng.normal(0, 10, (SIZE, SIZE, 3))
        blades = rng.random((SIZE // 2 + 1, SIZE)) < 0.25
        base -= 35 * np.repeat(blades, 2, axis=0)[:SIZE, :, None]
    elif background == "sand":
        base = np.array([214, 188, 140]) + rng.normal(0, 6, (SIZE, SIZE, 3))
        base -= 40 * (rng.random((SIZE, SIZE)) < 0.06)[..., None]
    elif background == "water":
        phase = rng.uniform(0, 2 * np.pi)
        waves = 22 * np.sin(2 * np.pi * y / 9 + phase + 0.8 * np.sin(x / 7))
        base = np.array([35, 115, 165]) + waves[..., None] * np.array([0.5, 0.8, 1.0])
    else:  # brick
        row = (y // 8).astype(int)
        column = ((x + 8 * (row % 2)) // 16).astype(int)
        shade = rng.normal(0, 14, (SIZE // 8 + 1, SIZE // 16 + 2))[row, column]
        base = np.array([160, 78, 58]) + shade[..., None]
        mortar = (y % 8 == 0) | ((x + 8 * (row % 2)) % 16 == 0)
        base[mortar] = (190, 185, 175)
    return np.clip(base, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: int) -> None:
    left, top, right, bottom = obj.box()
    if obj.shape in ("circle", "oval"):
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif obj.shape in ("square", "rectangle"):
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:  # triangle, apex up
        draw.polygon([(obj.x, top), (left, bottom), (right, bottom)], fill=fill)


def _apart(a: SceneObject, b: SceneObject, margin: float = 6.0) -> bool:
    """True if the bounding boxes are ``margin`` pixels apart (room for an oval to become a circle)."""
    al, at, ar, ab = a.box()
    bl, bt, br, bb = b.box()
    return al > br + margin or bl > ar + margin or at > bb + margin or bt > ab + margin
