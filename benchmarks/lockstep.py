"""Several images inverted one by one (`invert`) and in lockstep (`invert_many`), in the same process.

For each method, N images (the scene model's first N two-object test scenes; random images on
`sd14` and `tiny`) are inverted one after the other, then all at once. Printed per method: both
times, their ratio, the iterations the images took both ways (Adam steps of the null text, and
DPL's token steps), and the largest difference between an image's reconstruction PSNR both ways
(a batched UNet call rounds differently from a call for one image, so an early stop near its
threshold can fall an iteration apart), and on a GPU the lockstep run's peak memory. A 2-step run of
each warms up first, both ways (with CUDA graphs an image alone and a batch capture graphs of their
own; a lockstep DPL inversion still captures its batch's token step once, as every such inversion does).

    python benchmarks/lockstep.py                                   # scene model, CPU, 4 images, 20 steps
    python benchmarks/lockstep.py --model sd14 --device cuda --images 8 --steps 10 [--cuda-graphs] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from timing import machine

from dpl_edit import invert, invert_many, reconstruct
from dpl_edit.images import psnr
from dpl_edit.random_models import sd14_sized_model
from dpl_edit.registry import load_model
from dpl_edit.scenes.render import render, split_scene

RANDOM_PROMPTS = ["a {cat} and a {dog} on the grass", "a {house} by a {tree}", "a red {car} on a {road}",
                  "a {bird} on a {branch}"]


def subjects(model, name: str, count: int) -> tuple[list[Image.Image], list[str]]:
    if name.startswith("scenes"):
        scenes = [split_scene("test", k, num_objects=2) for k in range(count)]
        return [render(scene)[0] for scene in scenes], [scene.marked_caption() for scene in scenes]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (model.image_size, model.image_size, 3), dtype=np.uint8))
              for _ in range(count)]
    return images, [RANDOM_PROMPTS[k % len(RANDOM_PROMPTS)] for k in range(count)]


class Iterations:
    """A per-step callback that counts the Adam steps of the null text and DPL's token steps."""

    def __init__(self):
        self.null = self.tokens = 0

    def __call__(self, step) -> None:
        self.null += getattr(step, "null_iterations", getattr(step, "iterations", 0))
        self.tokens += step.iterations if hasattr(step, "null_iterations") else 0

    def __str__(self) -> str:
        return f"{self.null} + {self.tokens}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="scenes, scenes-plain, tiny or sd14 (random, SD-1.4 size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="nti,dpl")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the inner loops as CUDA graphs (use_cuda_graphs; the warm-up captures them)")
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = (sd14_sized_model().to(args.device, dtype) if args.model == "sd14"
             else load_model(args.model, device=args.device, dtype=dtype, cuda_graphs=False))
    if args.cuda_graphs:
        model.use_cuda_graphs()
    images, prompts = subjects(model, args.model, args.images)
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter()

    rows = {}
    for method in args.methods.split(","):
        # warm-up, both ways: each image alone captures graphs of its own (batch 1, its prompt's layout)
        invert_many(model, images, prompts, method=method, num_steps=2, progress=False)
        for image, prompt in zip(images, prompts, strict=True):
            invert(model, image, prompt, method=method, num_steps=2, progress=False)
        counts = Iterations(), Iterations()
        started = clock()
        alone = [invert(model, image, prompt, method=method, num_steps=args.steps, callback=counts[0], progress=False)
                 for image, prompt in zip(images, prompts, strict=True)]
        alone_s = clock() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = clock()
        together = invert_many(model, images, prompts, method=method, num_steps=args.steps, callback=counts[1],
                               progress=False)
        together_s = clock() - started
        psnrs = [(psnr(reconstruct(model, a, progress=False), image), psnr(reconstruct(model, b, progress=False), image))
                 for a, b, image in zip(alone, together, images, strict=True)]
        rows[method] = {
            "one by one s": alone_s, "lockstep s": together_s, "one by one / lockstep": alone_s / together_s,
            "null + token iterations, one by one (lockstep)": f"{counts[0]} ({counts[1]})",
            "largest PSNR difference dB": float(max(abs(a - b) for a, b in psnrs)),
            "mean reconstruction PSNR dB": float(np.mean([a for a, _ in psnrs])),
        }
        if cuda:
            rows[method]["lockstep peak GB"] = torch.cuda.max_memory_allocated() / 2**30
        print(method, rows[method], flush=True)
    title = (f"{args.images} images, model {args.model}, {args.dtype}, {args.steps} steps, "
             f"{'CUDA graphs' if model.graphed_unet is not None else 'eager'}, {machine(model.device)}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    columns = list(next(iter(rows.values())))
    print(f"\n{title}\n\n| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for method, row in rows.items():
        print(f"| {method} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
