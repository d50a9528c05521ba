"""Rendered scene sets for training and evaluation (images and token ids as tensors)."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..tokenizer import clip_tokenizer
from .render import render, split_scene


@dataclass
class SceneSet:
    """``count`` scenes of a split: images (N, 3, 64, 64) uint8, token ids (N, 77), captions."""

    split: str
    images: torch.Tensor
    token_ids: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def batch_images(self, index: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, 64, 64) in [-1, 1]."""
        return self.images[index].float() / 127.5 - 1


def _render_one(args: tuple[str, int]) -> tuple[np.ndarray, str]:
    scene = split_scene(*args)
    image, _ = render(scene)
    return np.asarray(image), scene.caption


def render_scene_set(split: str, count: int, workers: int = 0, progress: bool = True) -> SceneSet:
    """Render scenes 0 .. count-1 of a split (in ``workers`` processes; 0 = one per CPU)."""
    jobs = [(split, i) for i in range(count)]
    workers = workers or multiprocessing.cpu_count()
    bar = dict(total=count, desc=f"Rendering {split} scenes", disable=not progress, leave=False)
    if workers > 1 and count >= 2000:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render_one, jobs, chunksize=256), **bar))
    else:
        results = [_render_one(job) for job in tqdm(jobs, **bar)]
    images = torch.from_numpy(np.stack([r[0] for r in results])).permute(0, 3, 1, 2).contiguous()
    captions = [r[1] for r in results]
    tokenizer = clip_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids
    return SceneSet(split, images, torch.tensor(ids), captions)
