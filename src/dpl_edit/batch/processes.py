"""`dpl batch --processes N`: one batch shared by N worker processes on this machine.

At batch 1 a diffusion model's kernels (small convolutions, matmuls and attention) scale poorly over
a CPU's threads, while processes with a thread each run side by side at nearly their full speed: on
this project's 2-core CPU a scene-UNet forward + backward ran 1.2-1.6 times as fast on 2 threads as
on 1, and two processes of one thread each got through 1.43 times as many scene items an hour as one
process of two (README, Batch editing; ``benchmarks/processes.py``). Each worker is ``python -m
dpl_edit.cli batch`` with its share of the CPU's threads. It takes the next chunk of images that no
other worker has claimed (by creating a file in the run's claims folder), so every worker stays busy
whatever each image costs, and writes its counts there when it ends. The parent shows one progress
bar over the run's items, passes the workers' messages on above it (an error that several print,
once), adds the counts up, and passes an interrupt on to the workers that it did not reach.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..artifacts import write_atomic
from ..errors import INTERRUPTED, DplEditError

POLL_S = 2.0  # how often the parent counts the finished items for its progress bar
GRACE_S = 2.0  # how long an interrupted parent waits before passing the interrupt on to its workers
STOP_S = 60.0  # how long it waits in all for them to stop before killing them
COUNTS = ("done", "skipped", "failed")
ERRORS_LOCK = threading.Lock()  # the workers' readers check and note error lines under it


@dataclass(frozen=True)
class Worker:
    """One worker process of a batch: its number (from 0), how many share the batch, the claims folder."""

    index: int
    count: int
    claims: Path

    def claim(self, chunk: int) -> bool:
        """Whether this worker takes chunk ``chunk`` of the batch's images (no other worker took it first)."""
        try:
            os.close(os.open(self.claims / f"chunk-{chunk}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def report(self, counts: dict[str, int]) -> None:
        """What this worker did, for the parent to add up."""
        write_atomic(self.claims / f"worker-{self.index}.json", json.dumps(counts))


def threads_per_process(count: int) -> int:
    """The CPU threads each of ``count`` processes gets: the cores this process may use, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // count)


def run_workers(argv: Callable[[Worker], list[str]], count: int, out: Path, left: Callable[[], int], total: int,
                progress: bool = True) -> dict[str, int]:
    """Run ``count`` workers, ``python -m dpl_edit.cli`` with ``argv(worker)``, to the end, with a progress
    bar of the ``total`` items (``left()`` counts those not done yet); returns their counts added up. Each
    gets ``OMP_NUM_THREADS`` threads if that is set, else its share of the cores. A worker that fails
    raises :class:`DplEditError` once all have ended (its own message is above it); what the others
    finished is kept."""
    out.mkdir(parents=True, exist_ok=True)
    claims = Path(tempfile.mkdtemp(prefix=".claims-", dir=out))
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads_per_process(count))
    workers = [Worker(index, count, claims) for index in range(count)]
    bar = tqdm(total=total, initial=total - left(), desc="Items", unit="item", disable=not progress)
    processes, readers, errors = [], [], set()
    try:
        for worker in workers:
            process = subprocess.Popen([sys.executable, "-m", "dpl_edit.cli", *argv(worker)], env=env,
                                       stderr=subprocess.PIPE, text=True, bufsize=1)
            processes.append(process)
            readers.append(threading.Thread(target=_pass_on, args=(process, errors), daemon=True))
            readers[-1].start()
        while any(process.poll() is None for process in processes):
            time.sleep(POLL_S)
            bar.update(total - left() - bar.n)
        for reader in readers:
            reader.join()
        bar.update(total - left() - bar.n)
        counts = dict.fromkeys(COUNTS, 0)
        for worker in workers:
            report = claims / f"worker-{worker.index}.json"
            if report.is_file():
                for name, value in json.loads(report.read_text()).items():
                    counts[name] += value
        failed = [str(k + 1) for k, process in enumerate(processes) if process.returncode != 0]
        if failed:
            which = f"process {failed[0]}" if len(failed) == 1 else f"processes {', '.join(failed)}"
            raise DplEditError(f"worker {which} of {count} stopped early, with the error above; "
                               f"what the workers finished is kept ({counts['done']} items done), and the same "
                               "command run again goes on from there")
        return counts
    except KeyboardInterrupt:
        _stop(processes)
        raise
    finally:
        bar.close()
        for process, reader in zip(processes, readers, strict=False):
            reader.join(timeout=1.0)  # an ended worker's last lines; a reader still reading keeps its pipe
            if not reader.is_alive():
                process.stderr.close()
        shutil.rmtree(claims, ignore_errors=True)


def _pass_on(process: subprocess.Popen, errors: set[str]) -> None:
    """A worker's messages, each printed above the progress bar; left out: an error line that another
    worker printed already, and the line of an interrupted worker (the parent, interrupted, says it)."""
    for line in process.stderr:
        line = line.rstrip("\n")
        if line == INTERRUPTED:
            continue
        with ERRORS_LOCK:
            if line.startswith("error: "):
                if line in errors:
                    continue
                errors.add(line)
        tqdm.write(line, file=sys.stderr)


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop the workers of an interrupted parent: interrupted too where the interrupt did not reach them
    (a terminal's Ctrl-C does; a ``kill`` of the parent does not), by a SIGTERM, which a worker takes as
    a Ctrl-C (``dpl_edit.cli.terminate_as_interrupt``) even where it was started with SIGINT ignored (a
    shell script's background job), and killed where they have not ended after ``STOP_S``."""
    started = time.monotonic()
    _wait(processes, started + GRACE_S)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in _wait(processes, started + STOP_S):
        process.kill()
        process.wait()


def _wait(processes: list[subprocess.Popen], deadline: float) -> list[subprocess.Popen]:
    """Wait for the processes until ``deadline`` (``time.monotonic``); those still running."""
    running = []
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            running.append(process)
    return running
