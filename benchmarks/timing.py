"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (CUDA synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def scene_unet_ms() -> float:
    """Milliseconds of one scene-UNet forward and backward to the text states at batch 1 (median of 20) on
    the CPU: the kernels of this project's CPU runs (small convolutions and attention). This shared CPU's
    speed for them moves from day to day, up to twice, and a large matmul's rate does not follow it."""
    from dpl_edit.registry import SCENE_MODEL_ID, load_model

    model = load_model(SCENE_MODEL_ID)
    z = torch.randn(1, 4, model.latent_size, model.latent_size, generator=torch.Generator().manual_seed(0))
    states = model.encode_prompt("").requires_grad_(True)
    return 1000 * timed(lambda: model.predict(z, 501, states).square().mean().backward(), torch.device("cpu"),
                        repeats=20, warmup=3)


def cpu_label(unet_ms: float) -> str:
    """The CPU named with the day's speed (:func:`scene_unet_ms`)."""
    return (f"{platform.processor() or 'CPU'} (a scene-UNet forward + backward in {unet_ms:.1f} ms at batch 1, "
            f"{torch.get_num_threads()} threads)")


@functools.cache
def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the day's speed (measured once per process)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_label(scene_unet_ms())
