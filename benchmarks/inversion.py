"""Whole inversions and an edit, ours beside the DPL authors' schedule in the same process.

Rows (50 steps, guidance 7.5, one image):
- NTI: null-text inversion (at most 10 Adam iterations per step, early stop);
- DPL: DDIM inversion, background mask, at most 21 token iterations (UNet forward stopped after the
  last layer the losses read, frozen weights) and 10 null iterations per step;
- DPL tokens with direct inversion (no null optimisation);
- P2P edit: source and one target, refine, 50 steps, both decoded;
- authors: DPL as their code runs it: fp32, full UNet forward, the weights their code leaves
  trainable (the UNet's but for self-attention, the token-embedding table: `authors.py`), 51 null
  iterations per step without early stop, the null reset to "" every step.

The worst case is when no loss meets its threshold: random weights (`--model sd14`, `tiny`) and
test scene 0 on `scenes` run every step to the iteration cap. Before each row a 2-step run of the
same work warms up (with `--compile` it compiles, with `--cuda-graphs` it captures: its time is the
cold cost). Peak GPU memory is
torch.cuda.max_memory_allocated per row; reconstruction PSNR is meaningful on the scene models only.

    python benchmarks/inversion.py                                        # scene model, CPU
    python benchmarks/inversion.py --model sd14 --device cuda --cuda-graphs   # SD-1.4 size, captured eager kernels
    python benchmarks/inversion.py --model sd14 --device cuda --compile       # torch.compile's CUDA graphs
    python benchmarks/inversion.py --model sd14 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch
import torch._dynamo  # (its counters: graphs_made)
from authors import authors_trainable
from PIL import Image
from timing import machine

from dpl_edit import edit, invert, reconstruct
from dpl_edit.cuda_graphs import capture_cuda_graph
from dpl_edit.editing import EditConfig
from dpl_edit.images import psnr
from dpl_edit.inversion.dynamic_prompt import capped_steps
from dpl_edit.pipeline import model_dpl_config
from dpl_edit.random_models import sd14_sized_model
from dpl_edit.registry import load_model
from dpl_edit.scenes.render import WordSwap, render, split_scene, swap_word

RANDOM_PROMPT, RANDOM_TARGET = "a {cat} and a {dog} on the grass", "a cat and a tiger on the grass"


def load(name: str, device: str, dtype: torch.dtype):
    if name == "sd14":
        return sd14_sized_model().to(device, dtype)
    return load_model(name, device=device, dtype=dtype, cuda_graphs=False)  # --cuda-graphs decides


def subject(model, name: str) -> tuple[Image.Image, str, str]:
    """The image, its marked prompt and an edit's target prompt."""
    if name.startswith("scenes"):
        scene = split_scene("test", 0, num_objects=2)
        target = swap_word(scene, WordSwap("shape", "triangle" if scene.objects[0].shape != "triangle" else "circle", 0))
        return render(scene)[0], scene.marked_caption(), target.caption
    pixels = np.random.default_rng(0).integers(0, 256, (model.image_size, model.image_size, 3), dtype=np.uint8)
    return Image.fromarray(pixels), RANDOM_PROMPT, RANDOM_TARGET


CAPTURED = [0]  # CUDA graphs captured so far (use_cuda_graphs(capture=counted_capture))


def counted_capture(function, samples):
    """``capture_cuda_graph``, counted."""
    CAPTURED[0] += 1
    return capture_cuda_graph(function, samples)


def graphs_made() -> int:
    """The CUDA graphs captured and the graphs dynamo compiled so far."""
    return CAPTURED[0] + torch._dynamo.utils.counters["stats"]["unique_graphs"]


def measure(model, work, steps: int) -> dict:
    """Run work for 2 steps (warm-up: compilation or capture; 1 when timing 1 step, whose edit has no
    self-attention injection and so another graph), then time it; seconds for 50 steps, peak memory.
    Timing fewer steps than 50, a 2-step run before the run of ``steps`` parts what a call costs
    once (DPL's background mask, the check of its token step) from what a step costs, and 50 steps
    cost the first plus 50 of the second (exact where every step costs the same: the worst case).
    ``work`` runs the ``steps`` run last. A capture or compilation inside the timed runs would count
    in the per-step cost: the row says how many there were, with a warning."""
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(n: int) -> tuple[float, dict]:
        sync()
        started = time.perf_counter()
        result = work(n)
        sync()
        return time.perf_counter() - started, result

    warmup, _ = timed(min(2, steps))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = graphs_made()
    short = timed(2)[0] if 2 < steps < 50 else None
    seconds, result = timed(steps)
    if short is None:
        seconds *= 50 / steps
    else:
        seconds += (50 - steps) * (seconds - short) / (steps - 2)  # the per-step cost, 50 - steps more times
    row = {"seconds": seconds, "warm-up s": warmup}
    if cuda:
        row["peak GB"] = torch.cuda.max_memory_allocated() / 2**30
    made = graphs_made() - before
    if made:
        row["graphs made while timed"] = made
        print(f"warning: {made} graphs were captured or compiled while timed; their cost is in the per-step time",
              flush=True)
    return row | result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="scenes, scenes-plain, tiny, sd14 (random, SD-1.4 size) or a folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    fast = parser.add_mutually_exclusive_group()
    fast.add_argument("--compile", action="store_true", help="ours with the compiled UNet")
    fast.add_argument("--cuda-graphs", action="store_true",
                      help="ours with CUDA graphs of the eager kernels (StableDiffusion.use_cuda_graphs; CUDA only)")
    parser.add_argument("--skip-authors", action="store_true", help="leave out the authors' row (the slowest)")
    parser.add_argument("--steps", type=int, default=50,
                        help="time a schedule of this many steps and one of 2, and extrapolate to 50 (exact in the "
                        "worst case, where every step runs the same iterations; default: 50)")
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = load(args.model, args.device, dtype)
    if args.compile:
        model.compile()
    if args.cuda_graphs:
        model.use_cuda_graphs(capture=counted_capture)
    image, prompt, target = subject(model, args.model)
    dpl = model_dpl_config(model)

    inversions = {}  # the inversions timed, by row: the edit row edits DPL's

    def inversion_row(method, null="optimized"):
        def work(steps):
            inversion = invert(model, image, prompt, method=method, null=null, num_steps=steps, dpl=dpl,
                               progress=False)
            work.inversion = inversion
            return {"capped": capped_steps(inversion.dpl_log, dpl.max_iterations) if inversion.dpl_log else None}
        row = measure(model, work, args.steps)
        row["reconstruction PSNR"] = psnr(reconstruct(model, work.inversion, progress=False), image)
        inversions[method, null] = work.inversion
        return row

    how = ", compiled" if args.compile else ", CUDA graphs" if args.cuda_graphs else ""
    title = (f"model {args.model}, {args.dtype}{how}, {machine(model.device)}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds for 50 steps"
             + (f" (measured on 2 and {args.steps} and extrapolated)" if 2 < args.steps < 50
                else f" (measured on {args.steps} and scaled)" if args.steps != 50 else ""))
    rows = {}

    def keep(name: str, measure_row: Callable[[], dict]) -> None:
        """Measure a row and keep it at once (printed, and in the JSON file), in case the run is cut
        short; a row that fails is kept as its error and the next rows still run."""
        try:
            row = measure_row()
        except Exception as err:  # noqa: BLE001 - one failing row (e.g. a CUDA-graph error) must not lose the others
            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]}
        rows[name] = row
        print(name + ": " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"title": title, "rows": rows}, f, indent=1)

    keep("NTI", lambda: inversion_row("nti"))
    keep("DPL", lambda: inversion_row("dpl"))
    keep("DPL tokens, direct inversion", lambda: inversion_row("dpl", null="direct"))

    def edit_row():
        source = inversions.get(("dpl", "optimized"))  # NTI's where DPL's row failed (not timed)
        sources = {args.steps: source or invert(model, image, prompt, method="nti", num_steps=args.steps,
                                                progress=False)}

        def edit_work(steps):
            if steps not in sources:  # the warm-up's and the 2-step run's source (not timed apart from them)
                sources[steps] = invert(model, image, prompt, method="nti", num_steps=steps, progress=False)
            edit(model, sources[steps], [target], EditConfig(mode="refine"), progress=False)
            return {}
        # A 2-step edit injects no self-attention (self_replace_steps 0.4 of 2 steps rounds down to 0), so
        # it replays another capture (or compiled graph) than an edit of more steps: the longer edit's is
        # made here, untimed, or the per-step cost extrapolated from the two runs would hold it 5 times
        if args.steps > 2:
            edit_work(args.steps)
        return measure(model, edit_work, args.steps)
    keep("P2P edit (source + 1 target)", edit_row)

    if not args.skip_authors:
        plain = dtype == torch.float32 and not (args.compile or args.cuda_graphs)
        authors = model if plain else load(args.model, args.device, torch.float32)
        authors_dpl = model_dpl_config(authors, early_exit=False)

        def authors_work(steps):
            with authors_trainable(authors):
                inversion = invert(authors, image, prompt, method="dpl", preset="authors", num_steps=steps,
                                   dpl=authors_dpl, progress=False)
            authors_work.inversion = inversion
            return {"capped": capped_steps(inversion.dpl_log, authors_dpl.max_iterations)}
        def authors_row():
            row = measure(authors, authors_work, args.steps)
            row["reconstruction PSNR"] = psnr(reconstruct(authors, authors_work.inversion, progress=False), image)
            return row
        keep("authors' DPL", authors_row)

    base = rows.get("authors' DPL", {}).get("seconds")
    columns = ["seconds", "warm-up s", "peak GB", "reconstruction PSNR", "capped", "error"]
    present = [c for c in columns if any(c in r and r[c] is not None for r in rows.values())]
    print(f"\n{title}\n")
    print("| row | " + " | ".join(present) + " | authors' DPL / row |")
    print("|---" * (len(present) + 2) + "|")
    for name, row in rows.items():
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else "" if row.get(c) is None else str(row[c])
                 for c in present]
        ratio = f"{base / row['seconds']:.1f}x" if base and "seconds" in row else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
