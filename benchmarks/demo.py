"""`dpl demo` as a user runs it, timed from the shell: wall time, first run and later runs.

Each run is a fresh `python -m dpl_edit.cli demo` process (imports, model load, both inversions,
both edits, figures). Printed per run: the wall time, the demo's own total (from its summary.txt),
the start-up part (wall minus the demo's total: interpreter, imports, loading the model), each
method's inversion and edit seconds, and the wall time over issue 11's 30 s target; the title
gives the machine's float32 matmul rate measured first (this project's shared CPU ran the demo at
half the speed of the day before on 2026-11-27: compare walls only at like rates). With
``--compile`` the same runs follow with `--compile`, the first of them with an empty inductor cache
(its compilation included, as a first run on a new machine pays it) and the later ones with that
cache warm. The eager "first" run is the first in this benchmark: the operating system's file cache
may already hold torch's libraries from an earlier process.

    python benchmarks/demo.py                         # eager, 1 first + 2 later runs
    python benchmarks/demo.py --compile --json benchmarks/results/speed/cpu-demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import machine, timed

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
    """GFLOP/s of a 1024x1024 float32 matmul (median of 20) on torch's threads: how fast this machine runs today
    (a shared cloud CPU's rate moves from day to day; the README's tables name theirs)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / timed(lambda: a @ b, torch.device("cpu"), repeats=20, warmup=3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--later-runs", type=int, default=2, help="runs after the first of each mode (default: 2)")
    parser.add_argument("--compile", action="store_true", help="also time `dpl demo --compile` (minutes on a CPU)")
    parser.add_argument("--json")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rate = matmul_rate()
    modes = {"eager": []} | ({"compiled": ["--compile"]} if args.compile else {})
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for mode, extra in modes.items():
            mode_env = {**env, "TORCHINDUCTOR_CACHE_DIR": cache} if extra else env  # a cache of its own, empty at first
            for run in range(1 + args.later_runs):
                row = {"mode": mode, "run": "first" if run == 0 else f"later {run}", **run_demo(extra, mode_env)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    title = (f"`dpl demo` (scene model, 20 steps), {machine(torch.device('cpu'))}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, matmul {rate:.0f} GFLOP/s on {torch.get_num_threads()} threads")
    columns = [k for k in rows[0] if k not in ("mode", "run")]
    print(f"\n{title}\n\n| mode | run | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['mode']} | {row['run']} | " + " | ".join(f"{row.get(k, float('nan')):.2f}" for k in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
