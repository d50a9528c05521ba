"""`dpl batch` as one process against `dpl batch --processes P` on the same items: throughput on this machine.

At batch 1 a diffusion model's kernels scale poorly over a CPU's threads, and processes with a
thread each run side by side at nearly their full speed. This measures both, in one run:

1. a scene-UNet forward + backward at batch 1 (``timing.scene_unet_ms``): one process on all of
   torch's threads, one process on one thread, and P one-thread processes at once (each process's
   median), as forward + backward passes a second;
2. `dpl batch` on exported test scenes of the bundled scene model (`dpl scenes export`: three word
   swaps per scene), once as one process on all of torch's threads and once with `--processes P`,
   each into a fresh folder, alternating R rounds (the order reversed every other round): wall
   seconds, items (edits, all methods) an hour, the ratio, and the largest pixel difference between
   the two runs' edits (one and several threads round differently).

    python benchmarks/processes.py                            # 4 scenes, nti,dpl, 20 steps, 1 round, P = 2
    python benchmarks/processes.py --rounds 2 --json benchmarks/results/speed/cpu-batch-processes.json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="P (default: 2)")
    parser.add_argument("--scenes", type=int, default=4, help="two-object test scenes, three edits each (default: 4)")
    parser.add_argument("--methods", default="nti,dpl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads, p = torch.get_num_threads(), args.processes
    print(f"# `dpl batch`: 1 process against {p} processes, {cpu_label(scene_unet_ms())}\n")

    unet = {f"1 process, {threads} threads": gauge(threads, 1), "1 process, 1 thread": gauge(1, 1),
            f"{p} processes at once, 1 thread each": gauge(1, p)}
    print("| scene-UNet forward + backward, batch 1 | ms (median) | passes a second, all processes |")
    print("|---|---|---|")
    for (name, ms), count in zip(unet.items(), (1, 1, p), strict=True):
        print(f"| {name} | {ms:.1f} | {1000 * count / ms:.1f} |")

    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="dpl-processes-") as tmp:
        data = Path(tmp) / "data"
        dpl("scenes", "export", str(data), "--split", "test", "--objects", "2", "--count", str(args.scenes), "--quiet")
        items = len(json.loads((data / "mapping_file.json").read_text())) * len(methods)
        common = ["batch", str(data), "--model", "scenes", "--methods", args.methods, "--steps", str(args.steps),
                  "--device", "cpu", "--quiet"]
        runs = {"one": ("1 process", []), "many": (f"{p} processes", ["--processes", str(p)])}
        seconds: dict[str, list[float]] = {key: [] for key in runs}
        differences = []
        for round_ in range(args.rounds):
            for key in (("one", "many") if round_ % 2 == 0 else ("many", "one")):
                seconds[key].append(dpl(*common, *runs[key][1], "--out", str(Path(tmp) / f"{key}-{round_}")))
                print(f"round {round_ + 1}, {runs[key][0]}: {seconds[key][-1]:.1f} s", file=sys.stderr)
            differences.append(largest_difference(Path(tmp) / f"one-{round_}", Path(tmp) / f"many-{round_}"))

    wall = {key: statistics.median(values) for key, values in seconds.items()}
    print(f"\n{args.scenes} scenes x 3 edits x {len(methods)} methods = {items} items, {args.steps} steps, "
          f"medians of {args.rounds} round(s); largest pixel difference between the runs' edits: {max(differences)}\n")
    print("| `dpl batch` | wall s | items an hour |")
    print("|---|---|---|")
    print(f"| 1 process, {threads} threads | {wall['one']:.1f} | {3600 * items / wall['one']:.0f} |")
    print(f"| --processes {p}, {max(1, threads // p)} thread(s) each | {wall['many']:.1f} | "
          f"{3600 * items / wall['many']:.0f} |")
    print(f"| --processes {p} / 1 process | {wall['one'] / wall['many']:.2f}x | |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": cpu_label(scene_unet_ms()), "date": time.strftime("%Y-%m-%d"), "processes": p,
            "threads": threads, "scenes": args.scenes, "methods": methods, "steps": args.steps, "items": items,
            "unet ms": unet, "batch s": seconds, "largest pixel difference": differences,
        }, indent=1))


if __name__ == "__main__":
    main()
