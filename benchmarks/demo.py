"""`dpl demo` as a user runs it, timed from the shell: wall time, first run and later runs.

Each run is a fresh `python -m dpl_edit.cli demo` process (imports, model load, both inversions,
both edits, figures). Printed per run: the wall time, the demo's own total (from its summary.txt),
the start-up part (wall minus the demo's total: interpreter, imports, loading the model, and the
interpreter's exit), each method's inversion and edit seconds, and the wall time over issue 11's
30 s target. With
``--compile`` the same runs follow with `--compile`, the first of them with an empty inductor cache
(its compilation included, as a first run on a new machine pays it) and the later ones with that
cache warm. The eager "first" run is the first in this benchmark: the operating system's file cache
may already hold torch's libraries from an earlier process.

This shared CPU's speed moves from day to day, and a large matmul's rate does not follow it: on
2026-11-28 the matmul ran at its usual rate while 2026-11-26's code ran the demo's DPL inversion at
0.5-0.6 times the speed it had on 2026-11-26. So the title gives the demo's own kernels' time, a
scene-UNet forward and backward at batch 1 (``timing.scene_unet_ms``), before and after the runs,
beside the matmul rate that the older tables name; and ``--against REV`` times another revision of
this repository (a temporary git worktree) in the same run, alternating with this checkout, with
the ratios of their medians: a comparison that holds whatever the day's speed.

    python benchmarks/demo.py                         # eager, 1 first + 2 later runs
    python benchmarks/demo.py --against 2589792       # this checkout against an earlier revision
    python benchmarks/demo.py --compile --json benchmarks/results/speed/cpu-demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from timing import cpu_label, scene_unet_ms, timed

ROOT = Path(__file__).resolve().parent.parent
THIS = "this checkout"  # the code of ROOT, as the rows name it
TARGET_S = 30.0  # issue 11: `dpl demo` at most 30 s wall on a warm machine (this project's 2-core CPU)
METHOD_ROW = re.compile(r"^\| (NTI|DPL) \+ P2P \| [^|]+\| [^|]+\| [^|]+\| ([\d.]+) \| ([\d.]+) \|$", re.MULTILINE)


def run_demo(extra: list[str], env: dict[str, str]) -> dict:
    """One `dpl demo` process: its wall time and what its summary reports."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dpl_edit.cli", "demo", "--out", out, "--quiet", *extra],
                              check=False, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"dpl demo failed ({done.returncode}):\n{done.stderr}")
        summary = (Path(out) / "summary.txt").read_text()
    total = float(re.search(r"^total time: ([\d.]+) s$", summary, re.MULTILINE).group(1))
    row = {"wall s": wall, "demo's total s": total, "start-up s": wall - total}
    for method, inversion, edit in METHOD_ROW.findall(summary):
        row[f"{method} inversion s"], row[f"{method} edit s"] = float(inversion), float(edit)
    row["wall / 30 s target"] = wall / TARGET_S
    return row


def matmul_rate() -> float:
    """GFLOP/s of a 1024x1024 float32 matmul (median of 20) on torch's threads (the README's older tables name
    the day's speed by it; ``timing.scene_unet_ms`` follows the demo's speed, which this rate does not)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / timed(lambda: a @ b, torch.device("cpu"), repeats=20, warmup=3) / 1e9


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """The ``src`` folder of a temporary git worktree of revision ``rev`` (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="dpl-demo-") as parent:
        folder = Path(parent) / "tree"
        added = subprocess.run(["git", "worktree", "add", "--detach", "-q", str(folder), rev], cwd=ROOT,
                               capture_output=True, text=True, check=False)
        if added.returncode != 0:
            raise SystemExit(f"--against {rev}: git could not check it out ({added.stderr.strip()})")
        try:
            yield folder / "src"
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, check=False)


def medians(rows: list[dict], code: str, mode: str) -> dict:
    """A code's median per column over its later runs of a mode (its first run where there are none)."""
    runs = [row for row in rows if row["code"] == code and row["mode"] == mode]
    later = [row for row in runs if row["run"] != "first"] or runs
    return {k: statistics.median(row[k] for row in later) for k in later[0] if k not in ("code", "mode", "run")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--later-runs", type=int, default=2, help="runs after the first of each mode (default: 2)")
    parser.add_argument("--compile", action="store_true", help="also time `dpl demo --compile` (minutes on a CPU)")
    parser.add_argument("--against", metavar="REV",
                        help="also time revision REV of this repository, alternating with this checkout")
    parser.add_argument("--json")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rate, gauge = matmul_rate(), [scene_unet_ms()]
    modes = {"eager": []} | ({"compiled": ["--compile"]} if args.compile else {})
    rows = []
    with tempfile.TemporaryDirectory() as caches, (checkout(args.against) if args.against else nullcontext()) as other:
        codes = list(enumerate([(THIS, ROOT / "src")] + ([(args.against, other)] if args.against else [])))
        for mode, extra in modes.items():
            for run in range(1 + args.later_runs):
                # alternating, the order reversed every other round, so a drift in the machine's speed
                # falls on both codes
                for k, (code, src) in (codes if run % 2 == 0 else codes[::-1]):
                    code_env = {**env, "PYTHONPATH": str(src)}
                    if extra:  # each code's compiled runs with a cache of their own, empty at first
                        code_env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(caches) / f"{mode}-{k}")
                    row = {"code": code, "mode": mode, "run": "first" if run == 0 else f"later {run}",
                           **run_demo(extra, code_env)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    gauge.append(scene_unet_ms())
    title = (f"`dpl demo` (scene model, 20 steps), {cpu_label(gauge[0])} before the runs and in {gauge[1]:.1f} ms "
             f"after, {os.cpu_count()} CPUs, torch {torch.__version__}, matmul {rate:.0f} GFLOP/s")
    columns = [k for k in rows[0] if k not in ("code", "mode", "run")]
    print(f"\n{title}\n\n| code | mode | run | " + " | ".join(columns) + " |\n|---|---|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['code']} | {row['mode']} | {row['run']} | "
              + " | ".join(f"{row.get(k, float('nan')):.2f}" for k in columns) + " |")
    if args.against:
        times = [k for k in columns if k.endswith(" s")]
        print(f"\nmedians of the later runs, {args.against} / this checkout:\n\n| mode | " + " | ".join(times)
              + " |\n|---|" + "---|" * len(times))
        for mode in modes:
            ours, theirs = medians(rows, THIS, mode), medians(rows, args.against, mode)
            print(f"| {mode} | " + " | ".join(f"{theirs[k] / ours[k]:.2f}x" for k in times) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "unet ms": gauge, "matmul GFLOP/s": rate, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
