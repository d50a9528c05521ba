"""Inversions with the UNet's text-free prefix reused within each timestep, beside the same
inversions computing it at every forward (`StableDiffusion.reuse_text_free_prefix`), in the same
process.

For each method (NTI; DPL; DPL's tokens with direct inversion) and each of N scenes (the scene
model's two-object test scenes; random images on `tiny`, as `lockstep.py` picks them), the two
settings alternate `--rounds` times (so that a drift in the machine's speed falls on both);
printed per method: the median total time over the scenes of each setting, their ratio, and
whether every inversion's tensors were bit-identical both ways (they must be: the reused outputs
are those the same inputs give); and under the table DPL's time over NTI's in each setting (issue
11's CPU target: at most 2x).
`--only reused` times the default setting alone (no comparison: half the time).

    python benchmarks/prefix.py                      # scene model, CPU, 2 scenes, 20 steps, 3 rounds
    python benchmarks/prefix.py --scenes 4 --steps 50 --json out.json
    python benchmarks/prefix.py --scenes 8 --steps 50 --rounds 1 --only reused   # DPL / NTI over 8 scenes
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
from lockstep import subjects
from timing import machine

from dpl_edit import invert
from dpl_edit.registry import load_model

METHODS = {"NTI": ("nti", "optimized"), "DPL": ("dpl", "optimized"), "DPL tokens, direct inversion": ("dpl", "direct")}
TENSORS = ("latent_T", "null_states", "token_vectors", "cross_maps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="scenes, scenes-plain, tiny or a folder")
    parser.add_argument("--scenes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["reused", "every"], help="time one setting alone")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.getLogger("dpl_edit").setLevel(logging.ERROR)  # the steps-at-the-cap warning of every DPL run

    model = load_model(args.model)
    pictures = list(zip(*subjects(model, args.model, args.scenes), strict=True))
    print(f"# {args.model}, {machine(model.device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.scenes} images, {args.steps} steps, {args.rounds} rounds")

    def run(method: str, null: str, reuse: bool, images: int = args.scenes, steps: int = args.steps
            ) -> tuple[float, list]:
        model.reuse_text_free_prefix = reuse
        started = time.perf_counter()
        results = [invert(model, image, prompt, method=method, null=null, num_steps=steps, progress=False)
                   for image, prompt in pictures[:images]]
        return time.perf_counter() - started, results

    settings = {"every": [False], "reused": [True], None: [False, True]}[args.only]
    label = {False: "computed every forward s", True: "reused s"}
    rows = []
    for name, (method, null) in METHODS.items():
        run(method, null, True, images=1, steps=2)  # warm-up
        times = {reuse: [] for reuse in settings}
        identical = True
        for _ in range(args.rounds):
            outputs = {}
            for reuse in settings:
                seconds, outputs[reuse] = run(method, null, reuse)
                times[reuse].append(seconds)
            if len(settings) == 2:
                for a, b in zip(outputs[True], outputs[False], strict=True):
                    identical &= all(_same(getattr(a, k), getattr(b, k)) for k in TENSORS)
        row = {"method": name} | {label[reuse]: statistics.median(times[reuse]) for reuse in settings}
        if len(settings) == 2:
            row |= {"every / reused": row[label[False]] / row[label[True]], "bit-identical": identical}
        rows.append(row)
    model.reuse_text_free_prefix = True

    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    ratios = {label[reuse]: rows[1][label[reuse]] / rows[0][label[reuse]] for reuse in settings}
    print("DPL / NTI: " + ", ".join(f"{ratio:.2f}x ({name})" for name, ratio in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(model.device), "threads": torch.get_num_threads(), "args": vars(args),
                       "rows": rows,
                       "DPL / NTI": ratios}, f, indent=1)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


if __name__ == "__main__":
    main()
