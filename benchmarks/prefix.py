"""Inversions with the UNet's text-free prefix reused within each timestep, beside the same
inversions computing it at every forward (`StableDiffusion.reuse_text_free_prefix`), in the same
process.

For each method (NTI; DPL; DPL's tokens with direct inversion) and each of N scenes (the scene
model's two-object test scenes; a random image on `tiny`), the two settings alternate `--rounds`
times (so that a drift in the machine's speed falls on both); printed per method: the median total
time over the scenes of each setting, their ratio, and whether every inversion's tensors were
bit-identical both ways (they must be: the reused outputs are those the same inputs give).

    python benchmarks/prefix.py                      # scene model, CPU, 2 scenes, 20 steps, 3 rounds
    python benchmarks/prefix.py --scenes 4 --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import torch
from PIL import Image
from timing import machine

from dpl_edit import invert
from dpl_edit.registry import load_model
from dpl_edit.scenes.render import render, split_scene

METHODS = {"NTI": ("nti", "optimized"), "DPL": ("dpl", "optimized"), "DPL tokens, direct inversion": ("dpl", "direct")}
TENSORS = ("latent_T", "null_states", "token_vectors", "cross_maps")


def subjects(model, name: str, count: int) -> list[tuple[Image.Image, str]]:
    if name.startswith("scenes"):
        scenes = [split_scene("test", k, num_objects=2) for k in range(count)]
        return [(render(scene)[0], scene.marked_caption()) for scene in scenes]
    rng = np.random.default_rng(0)
    side = model.image_size
    return [(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "a {cat} and a {dog}")
            for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="scenes, scenes-plain, tiny or a folder")
    parser.add_argument("--scenes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.getLogger("dpl_edit").setLevel(logging.ERROR)  # the steps-at-the-cap warning of every DPL run

    model = load_model(args.model)
    pictures = subjects(model, args.model, args.scenes)
    print(f"# {args.model}, {machine(model.device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.scenes} images, {args.steps} steps, {args.rounds} rounds")

    def run(method: str, null: str, reuse: bool) -> tuple[float, list]:
        model.reuse_text_free_prefix = reuse
        started = time.perf_counter()
        results = [invert(model, image, prompt, method=method, null=null, num_steps=args.steps, progress=False)
                   for image, prompt in pictures]
        return time.perf_counter() - started, results

    rows = []
    for name, (method, null) in METHODS.items():
        run(method, null, True)  # warm-up
        times = {True: [], False: []}
        identical = True
        for _ in range(args.rounds):
            outputs = {}
            for reuse in (False, True):
                seconds, outputs[reuse] = run(method, null, reuse)
                times[reuse].append(seconds)
            for a, b in zip(outputs[True], outputs[False], strict=True):
                identical &= all(_same(getattr(a, k), getattr(b, k)) for k in TENSORS)
        every, reused = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"method": name, "computed every forward s": every, "reused s": reused,
                     "every / reused": every / reused, "bit-identical": identical})
    model.reuse_text_free_prefix = True

    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(model.device), "threads": torch.get_num_threads(), "args": vars(args),
                       "rows": rows}, f, indent=1)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


if __name__ == "__main__":
    main()
