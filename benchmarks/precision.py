"""What a lower precision does to inversions and edits on a scene model: float32 beside another
dtype, in the same process, over several test scenes (issue 11's precision question).

For each of the first SCENES two-object test scenes (or those named by --only) and each dtype,
the demo's work (:func:`dpl_edit.demo.run_demo`: NTI and DPL inversions, each followed by a
Prompt-to-Prompt word swap of the first object's shape, compared with the renderer's oracle) plus
each inversion's reconstruction. Per method, the means over the scenes and the lower dtype's differences from
float32, scene by scene:

- reconstruction PSNR (the source branch sampled back, against the source image);
- background and other-object PSNR of the edit against the source (leakage; higher is better);
- edited-object PSNR against the oracle;
- DPL steps at its iteration cap, and the inversion's seconds.

One scene's difference says little: DPL's token vectors follow the losses' gradients, and where a
step's losses sit at a threshold a rounding difference decides whether it stops, after which the
two runs learn different vectors. The spread over scenes is the measure.

    python benchmarks/precision.py                      # scenes model, bfloat16 against float32, 8 scenes
    python benchmarks/precision.py --scenes 4 --steps 20 --json out.json
    python benchmarks/precision.py --device cuda --dtype float16 --scenes 4 --steps 20   # CUDA graphs
    python benchmarks/precision.py --dtype bfloat16 float16 --only 0,6 --steps 20   # float16 on a CPU: slow
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from timing import machine

from dpl_edit import reconstruct
from dpl_edit.demo import METHODS, run_demo
from dpl_edit.images import psnr
from dpl_edit.inversion.dynamic_prompt import capped_steps
from dpl_edit.registry import load_model
from dpl_edit.scenes.render import render, split_scene

MEASURES = {  # row label -> its value from a method's result on one scene, the reconstruction and the image
    "reconstruction PSNR": lambda result, reconstruction, image: psnr(reconstruction, image),
    "background PSNR": lambda result, reconstruction, image: result.background_psnr,
    "other object PSNR": lambda result, reconstruction, image: result.other_object_psnr,
    "edited object PSNR vs oracle": lambda result, reconstruction, image: result.edited_object_psnr,
    "DPL steps at the cap": lambda result, reconstruction, image: dpl_capped_steps(result.inversion),
    "inversion s": lambda result, reconstruction, image: result.inversion_seconds,
}


def dpl_capped_steps(inversion) -> int:
    """A DPL inversion's steps at its iteration cap (0 for another method)."""
    if inversion.method != "dpl":
        return 0
    return capped_steps(inversion.dpl_log, inversion.settings["dpl"]["max_iterations"])


def measure(model_name: str, device: torch.device, dtype: torch.dtype, scenes: list[int],
            steps: int) -> dict[str, dict[str, list[float]]]:
    """Per method, per measure: one value per scene (on CUDA with the model's default CUDA graphs)."""
    model = load_model(model_name, device=device, dtype=dtype)
    values: dict[str, dict[str, list[float]]] = {m: {k: [] for k in MEASURES} for m in METHODS}
    for index in scenes:
        image, _ = render(split_scene("test", index, num_objects=2))
        with tempfile.TemporaryDirectory() as out:
            report = run_demo(out, model=model, scene_index=index, num_steps=steps, progress=False)
        for method, result in report.results.items():
            reconstruction = reconstruct(model, result.inversion, progress=False)
            for name, of in MEASURES.items():
                values[method][name].append(float(of(result, reconstruction, image)))
        print(f"{str(dtype).removeprefix('torch.')} scene {index}: " + ", ".join(
            f"{m} recon. {values[m]['reconstruction PSNR'][-1]:.2f} dB" for m in METHODS), flush=True)
    return values


def table(results: dict[str, dict], low: str) -> str:
    header = f"| method | measure | float32 mean | {low} mean | {low} - float32 mean (min .. max over scenes) |"
    lines = [header, "|---|---|---|---|---|"]
    for method, label in METHODS.items():
        for name in MEASURES:
            if name == "DPL steps at the cap" and method != "dpl":
                continue
            a, b = results["float32"][method][name], results[low][method][name]
            diffs = [y - x for x, y in zip(a, b, strict=True)]
            lines.append(f"| {label} | {name} | {statistics.mean(a):.2f} | {statistics.mean(b):.2f} "
                         f"| {statistics.mean(diffs):+.2f} ({min(diffs):+.2f} .. {max(diffs):+.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="a scene model (default: the bundled one)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"],
                        help="the precisions set beside float32, each in its own table (float16 is about 35 times "
                        "slower than float32 on this project's CPU, which has no float16 kernels)")
    parser.add_argument("--scenes", type=int, default=8, help="the first SCENES two-object test scenes (default: 8)")
    parser.add_argument("--only", type=lambda text: [int(k) for k in text.split(",")], default=None,
                        help="these two-object test scenes instead, e.g. 0,6")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", default=None, help="also write the per-scene values here")
    args = parser.parse_args()
    started, device = time.perf_counter(), torch.device(args.device)
    scenes = args.only if args.only is not None else list(range(args.scenes))
    results = {name: measure(args.model, device, getattr(torch, name), scenes, args.steps)
               for name in ("float32", *args.dtype)}
    print(f"\n{args.model}, two-object test scenes {scenes}, {args.steps} steps, "
          f"{machine(device)}, {torch.get_num_threads()} threads, {time.perf_counter() - started:.0f} s")
    for dtype in args.dtype:
        print(f"\n{table(results, dtype)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": machine(device), "dtypes": args.dtype, "scenes": scenes,
                       "steps": args.steps, "values": results}, f, indent=1)


if __name__ == "__main__":
    main()
