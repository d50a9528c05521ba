"""Rendered scene sets for training and evaluation: images, token ids, and for each object the
tokens of its noun and its mask at the attention resolution (for the grounding loss)."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..prompts import parse_marked_prompt
from ..tokenizer import clip_tokenizer
from .render import OBJECT_COUNTS, SIZE, render, split_scene

MASK_RESOLUTION = 16  # side of the object masks; the scene model's cross-attention maps DPL reads


@dataclass
class SceneSet:
    """``count`` scenes of a split.

    images (N, 3, 64, 64) uint8; token_ids (N, 77); noun_tokens (N, K, 77): for object k, weight
    1/n on each of the n tokens of its noun (zero rows for absent objects); object_masks
    (N, K, MASK_RESOLUTION**2): the share of each attention-map cell the object covers. K is the
    largest object count.
    """

    split: str
    images: torch.Tensor
    token_ids: torch.Tensor
    captions: list[str]
    noun_tokens: torch.Tensor
    object_masks: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)

    def batch_images(self, index: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, 64, 64) in [-1, 1]."""
        return self.images[index].float() / 127.5 - 1

    def to(self, device: torch.device | str) -> SceneSet:
        for name in ("images", "token_ids", "noun_tokens", "object_masks"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _render_one(args: tuple[str, int]) -> tuple[np.ndarray, str, str, np.ndarray]:
    scene = split_scene(*args)
    image, masks = render(scene)
    cell = SIZE // MASK_RESOLUTION
    pooled = np.zeros((max(OBJECT_COUNTS), MASK_RESOLUTION * MASK_RESOLUTION), np.float16)
    for k, mask in enumerate(masks):
        pooled[k] = mask.reshape(MASK_RESOLUTION, cell, MASK_RESOLUTION, cell).mean(axis=(1, 3)).ravel()
    return np.asarray(image), scene.caption, scene.marked_caption(), pooled


def render_scene_set(split: str, count: int, workers: int = 0, progress: bool = True) -> SceneSet:
    """Render scenes 0 .. count-1 of a split (in ``workers`` processes; 0 = one per CPU)."""
    jobs = [(split, i) for i in range(count)]
    workers = workers or multiprocessing.cpu_count()
    bar = {"total": count, "desc": f"Rendering {split} scenes", "disable": not progress, "leave": False}
    if workers > 1 and count >= 2000:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render_one, jobs, chunksize=256), **bar))
    else:
        results = [_render_one(job) for job in tqdm(jobs, **bar)]
    images = torch.from_numpy(np.stack([r[0] for r in results])).permute(0, 3, 1, 2).contiguous()
    captions = [r[1] for r in results]
    tokenizer = clip_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids
    noun_tokens = torch.zeros(count, max(OBJECT_COUNTS), 77, dtype=torch.float16)
    for n, (_, _, marked, _) in enumerate(results):
        for k, word in enumerate(parse_marked_prompt(marked, tokenizer).words):
            noun_tokens[n, k, list(word.positions)] = 1.0 / len(word.positions)
    masks = torch.from_numpy(np.stack([r[3] for r in results]))
    return SceneSet(split, images, torch.tensor(ids), captions, noun_tokens, masks)
