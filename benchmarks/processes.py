"""`dpl batch` as one process against `--processes P` (and lockstep `--batch-size B`) on the same items.

At batch 1 a diffusion model's kernels scale poorly over a CPU's threads, and processes with a
thread each run side by side at nearly their full speed. This measures both, in one run:

1. a scene-UNet forward + backward at batch 1 (``timing.scene_unet_ms``): one process on all of
   torch's threads, one process on one thread, and P one-thread processes at once (each process's
   median), as forward + backward passes a second;
2. `dpl batch` on exported test scenes of the bundled scene model (`dpl scenes export`: three word
   swaps per scene), once per run of ``--runs`` (PROCESSESxBATCH_SIZE: `--processes`, `--batch-size`;
   the first is the baseline), each into a fresh folder, alternating R rounds (the order reversed
   every other round): wall seconds, items (edits, all methods) an hour, the ratio to the baseline,
   and the largest pixel difference from the baseline's edits (one and several threads, one image
   and a batch, round differently).

    python benchmarks/processes.py                            # 4 scenes, nti,dpl, 20 steps, 1 round: 1x1,2x1
    python benchmarks/processes.py --rounds 2 --json benchmarks/results/speed/cpu-batch-processes.json
    python benchmarks/processes.py --runs 1x1,2x1,1x4,2x2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import cpu_label, scene_unet_ms

HERE = Path(__file__).resolve().parent
GAUGE = "import timing; print(timing.scene_unet_ms())"


def gauge(threads: int, processes: int) -> float:
    """Median over ``processes`` processes run at once, each on ``threads`` threads, of their scene-UNet
    forward + backward milliseconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running = [subprocess.Popen([sys.executable, "-c", GAUGE], cwd=HERE, env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(processes)]
    return statistics.median(float(process.communicate()[0]) for process in running)


def dpl(*argv: str) -> float:
    """Seconds of one `dpl` command (it must succeed)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dpl_edit.cli", *argv], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"dpl {' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - started


def largest_difference(a: Path, b: Path) -> int:
    """The largest pixel difference between the edits of two batch folders (the same files in both)."""
    names = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*.png")), "the two runs wrote different files"
    return max(int(np.abs(np.asarray(Image.open(a / n), np.int16) - np.asarray(Image.open(b / n), np.int16)).max())
               for n in names)


def label(run: tuple[int, int], threads: int) -> str:
    processes, batch = run
    who = f"1 process, {threads} threads" if processes == 1 else \
        f"--processes {processes}, {max(1, threads // processes)} thread(s) each"
    return who + (f", --batch-size {batch}" if batch > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="1x1,2x1",
                        help="comma-separated PROCESSESxBATCH_SIZE runs, the first the baseline (default: 1x1,2x1)")
    parser.add_argument("--scenes", type=int, default=4, help="two-object test scenes, three edits each (default: 4)")
    parser.add_argument("--methods", default="nti,dpl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [tuple(int(n) for n in run.split("x")) for run in args.runs.split(",")]
    threads, p = torch.get_num_threads(), max(processes for processes, _ in runs)
    print(f"# `dpl batch` in processes and lockstep batches, {cpu_label(scene_unet_ms())}\n")

    unet = {f"1 process, {threads} threads": gauge(threads, 1), "1 process, 1 thread": gauge(1, 1),
            f"{p} processes at once, 1 thread each": gauge(1, p)}
    print("| scene-UNet forward + backward, batch 1 | ms (median) | passes a second, all processes |")
    print("|---|---|---|")
    for (name, ms), count in zip(unet.items(), (1, 1, p), strict=True):
        print(f"| {name} | {ms:.1f} | {1000 * count / ms:.1f} |")

    methods = [m for m in args.methods.split(",") if m]
    names = [label(run, threads) for run in runs]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    differences: dict[str, list[int]] = {name: [] for name in names[1:]}
    with tempfile.TemporaryDirectory(prefix="dpl-processes-") as tmp:
        data = Path(tmp) / "data"
        dpl("scenes", "export", str(data), "--split", "test", "--objects", "2", "--count", str(args.scenes), "--quiet")
        items = len(json.loads((data / "mapping_file.json").read_text())) * len(methods)
        common = ["batch", str(data), "--model", "scenes", "--methods", args.methods, "--steps", str(args.steps),
                  "--device", "cpu", "--quiet"]
        for round_ in range(args.rounds):
            order = list(enumerate(runs)) if round_ % 2 == 0 else list(enumerate(runs))[::-1]
            for k, (processes, batch) in order:
                out = Path(tmp) / f"{k}-{round_}"
                seconds[names[k]].append(dpl(*common, "--processes", str(processes), "--batch-size", str(batch),
                                             "--out", str(out)))
                print(f"round {round_ + 1}, {names[k]}: {seconds[names[k]][-1]:.1f} s", file=sys.stderr)
            for k, name in enumerate(names[1:], start=1):
                differences[name].append(largest_difference(Path(tmp) / f"0-{round_}", Path(tmp) / f"{k}-{round_}"))

    wall = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\n{args.scenes} scenes x 3 edits x {len(methods)} methods = {items} items, {args.steps} steps, "
          f"medians of {args.rounds} round(s), the runs alternating\n")
    print(f"| `dpl batch` | wall s | items an hour | {names[0]} / run | largest pixel difference from {names[0]} |")
    print("|---|---|---|---|---|")
    for name in names:
        difference = max(differences[name]) if name in differences else ""
        print(f"| {name} | {wall[name]:.1f} | {3600 * items / wall[name]:.0f} | {wall[names[0]] / wall[name]:.2f}x | "
              f"{difference} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": cpu_label(scene_unet_ms()), "date": time.strftime("%Y-%m-%d"), "threads": threads,
            "scenes": args.scenes, "methods": methods, "steps": args.steps, "items": items, "unet ms": unet,
            "batch s": seconds, "largest pixel difference": differences,
        }, indent=1))


if __name__ == "__main__":
    main()
