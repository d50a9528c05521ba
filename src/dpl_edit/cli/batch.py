"""`dpl batch`, `dpl metrics` and `dpl scenes export`: datasets in PIE-Bench's layout, edited and scored."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import checks
from ..editing.plan import TARGET_TOKENS
from ..errors import DplEditError
from . import COMMANDS
from .common import add_model_options, counted, load, load_options


def register(commands) -> None:
    p = commands.add_parser(
        "batch",
        help=COMMANDS["batch"].help,
        description="Run each method's inversion and Prompt-to-Prompt edit (PIE-Bench's P2P settings) on the items "
        "of DATASET (mapping_file.json + annotation_images/), writing the edits in PIE-Bench's output layout under "
        "OUT and a record per item. A rerun skips finished items; a failing item is recorded and the run goes on. "
        "--processes N shares the images between N worker processes on this machine; under `accelerate launch dpl "
        "batch ...` the items are split between the processes.",
    )
    p.add_argument("dataset", type=Path, help="a PIE-Bench folder")
    p.add_argument("--methods", default="nti,dpl",
                   help="comma-separated of ddim,nti,npi,direct,dpl,dpl-negative,dpl-direct (the last two: DPL's token "
                   "steps ended by negative-prompt or direct inversion, --method dpl --null ...; default: nti,dpl)")
    p.add_argument("--out", type=Path, required=True, help="output folder (PIE-Bench layout: OUT/<method>/annotation_images/)")
    add_selection(p)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50, as PIE-Bench)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images inverted at once, in lockstep: the same inversions with batched UNet calls, "
                   "faster where the hardware has room (a GPU above all); at 1 (the default) an image's result does not "
                   "depend on the images beside it")
    p.add_argument("--processes", type=int, default=1,
                   help="worker processes on this machine, each with its share of the CPU's threads, each taking the "
                   "next images no other has taken (default: 1); on a CPU, one per core gets through more items an "
                   "hour than one process with every core (1.43x with 2 on a 2-core CPU: see README)")
    p.add_argument("--target-tokens", choices=TARGET_TOKENS, default=None,
                   help="which learned DPL vectors the target prompts keep (default: the model's recommendation, "
                   "else keep, the authors')")
    add_model_options(p, required_default="CompVis/stable-diffusion-v1-4")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # I/N: worker I of N of a --processes run
    p.add_argument("--claims", type=Path, help=argparse.SUPPRESS)  # that run's claims folder
    p.set_defaults(run=batch_command)

    p = commands.add_parser(
        "metrics",
        help=COMMANDS["metrics"].help,
        description="Score the edits in OUT against DATASET as PIE-Bench's evaluation script does: PSNR, MSE and "
        "SSIM of the unedited part (no weights needed), its LPIPS (SqueezeNet 1.1: --lpips), Structure distance "
        "(DINO ViT-B/8: --dino), CLIP similarity of the whole edit and of its edited part (CLIP ViT-L/14: --clip), and for rendered scenes the PSNR of the "
        "edited part against the oracle. Writes OUT/metrics.md and OUT/metrics.json; on PIE-Bench both also give "
        "the published results of those methods PIE-Bench reports (NTI+P2P, direct inversion+P2P; SD 1.4, 700 items) "
        "beside ours.",
    )
    p.add_argument("out", type=Path, help="a folder written by dpl batch")
    p.add_argument("--dataset", type=Path, help="the PIE-Bench folder it was run on (default: the one its records name)")
    p.add_argument("--methods", help="comma-separated methods to score (default: those OUT holds edits of)")
    add_selection(p)
    p.add_argument("--dino", help="local transformers folder of facebook/dino-vitb8 (or set DPL_DINO)")
    p.add_argument("--clip", help="local transformers folder of openai/clip-vit-large-patch14 (or set DPL_CLIP)")
    p.add_argument("--lpips", help="torchvision's SqueezeNet 1.1 weights, squeezenet1_1-b8a52dc0.pth (or set DPL_LPIPS; "
                   "default: that file in the torch hub cache if it is there)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=metrics_command)

    p = commands.add_parser("scenes", help=COMMANDS["scenes"].help)
    scene_commands = p.add_subparsers(title="scene commands", required=True, metavar="COMMAND")
    p = scene_commands.add_parser(
        "export",
        help="write rendered scenes and their edits as a PIE-Bench folder (with the oracle edits)",
        description="Write COUNT scenes per object count, three word swaps each (shape, colour, ground), as a "
        "PIE-Bench folder: images, prompts with [brackets], edit masks, and the renderer's true edits.",
    )
    p.add_argument("folder", type=Path, help="the folder to write (new, or an earlier export, which is replaced)")
    p.add_argument("--split", choices=("validation", "test"), default="test",
                   help="the scenes' split: validation (to choose settings on) or test (to report; default: test)")
    p.add_argument("--objects", default="2,3", help="comma-separated object counts (default: 2,3)")
    p.add_argument("--count", type=int, default=8, help="scenes per object count (default: 8)")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=export_command)


def add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--types", help="comma-separated editing_type_id values to keep (default: all)")
    p.add_argument("--range", dest="index_range", metavar="START:STOP",
                   help="items START..STOP-1 of the mapping file (default: all)")


def selection(args: argparse.Namespace):
    from ..batch.piebench import read_dataset

    start, stop = 0, None
    if args.index_range:
        first, sep, last = args.index_range.partition(":")
        try:
            start, stop = int(first or 0), (int(last) if last else None)
        except ValueError:
            sep = ""
        if not sep or start < 0 or (stop is not None and stop <= start):
            raise DplEditError(f"--range takes START:STOP with 0 <= START < STOP, got {args.index_range!r}")
    types = {t.strip() for t in args.types.split(",") if t.strip()} if args.types else None
    items = read_dataset(args.dataset, types, start, stop)
    if not items:
        raise DplEditError(f"No items of {args.dataset} match --types/--range")
    return items


def methods_of(args: argparse.Namespace) -> list[str]:
    from ..batch.runner import METHOD_FOLDERS

    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))  # each once, in order
    if not methods or set(methods) - set(METHOD_FOLDERS):
        raise DplEditError(f"--methods takes a comma-separated subset of {','.join(METHOD_FOLDERS)}, got {args.methods!r}")
    return methods


def batch_command(args: argparse.Namespace) -> int:
    from ..batch.processes import Worker
    from ..batch.runner import BatchSummary, run_batch

    methods = methods_of(args)
    checks.count("--steps", args.steps)
    checks.count("--batch-size", args.batch_size)
    checks.count("--processes", args.processes)
    checks.output_folder("--out", args.out)
    items = selection(args)
    if args.processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DplEditError("--processes starts its own worker processes: under accelerate launch or torchrun, which "
                           "split the items between their processes already, leave it out")
    if args.processes > 1 and args.worker is None:
        counts = run_processes(args, items, methods)
        summary = BatchSummary(**counts)
        print(f"dpl batch: {args.processes} processes: {summary.line()} -> {args.out}")
        return 0
    worker = None
    if args.worker is not None:
        index, count = (int(n) for n in args.worker.split("/"))
        worker = Worker(index, count, args.claims)
    model = load(args, args.model)
    summary = run_batch(model, args.dataset, items, methods, args.out, num_steps=args.steps, progress=not args.quiet,
                        target_tokens=args.target_tokens, batch_size=args.batch_size, worker=worker)
    if worker is None:
        print(f"dpl batch: {summary.line()} -> {args.out}")
    return 0


def run_processes(args: argparse.Namespace, items, methods: list[str]) -> dict[str, int]:
    """``dpl batch`` as ``args.processes`` workers (:mod:`dpl_edit.batch.processes`); their counts added up."""
    from ..batch.processes import run_workers
    from ..batch.runner import PIE_GUIDANCE, check_same_run, is_done

    # what is known before a worker loads the model (they check the model and its weight files too)
    check_same_run(args.out, {"dtype": load_options(args)["dtype"], "steps": args.steps, "guidance": PIE_GUIDANCE},
                   items)

    left = [(method, item) for method in methods for item in items if not is_done(args.out, method, item)]
    if not left:
        return {"done": 0, "skipped": len(methods) * len(items), "failed": 0}

    def not_done() -> int:
        left[:] = [(method, item) for method, item in left if not is_done(args.out, method, item)]
        return len(left)

    return run_workers(lambda worker: worker_argv(args, worker), args.processes, args.out, not_done,
                       total=len(methods) * len(items), progress=not args.quiet)


def worker_argv(args: argparse.Namespace, worker) -> list[str]:
    """The command line of one worker of a ``--processes`` run: the same batch, quiet, as ``worker``."""
    argv = ["batch", str(args.dataset), "--out", str(args.out), "--methods", args.methods, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--model", str(args.model), "--device", args.device,
            "--quiet", "--worker", f"{worker.index}/{worker.count}", "--claims", str(worker.claims)]
    for flag, value in (("--types", args.types), ("--range", args.index_range), ("--target-tokens", args.target_tokens),
                        ("--dtype", args.dtype), ("--variant", args.variant), ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    if args.compile:
        argv.append("--compile")
    if args.cuda_graphs is not None:
        argv.append("--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs")
    return argv


def metrics_command(args: argparse.Namespace) -> int:
    from ..batch.metrics import evaluate, write_tables
    from ..batch.runner import METHOD_FOLDERS, recorded_dataset

    if not args.out.is_dir():
        raise DplEditError(f"There is no folder {args.out}: give the --out folder of a `dpl batch` run.")
    if args.methods is None:  # the methods the run holds edits of (none: the message below)
        args.methods = ",".join(m for m, folder in METHOD_FOLDERS.items() if (args.out / folder).is_dir()) or "nti,dpl"
    methods = methods_of(args)
    if not any((args.out / METHOD_FOLDERS[method]).is_dir() for method in methods):
        raise DplEditError(f"{args.out} holds no edits of {', '.join(methods)} (no "
                           f"{', '.join(METHOD_FOLDERS[m] + '/' for m in methods)}): give the --out folder of a "
                           "`dpl batch` run, and --methods as that run had them.")
    if args.dataset is None:
        args.dataset = recorded_dataset(args.out)
        print(f"Dataset: {args.dataset} (from the run's records)", file=sys.stderr)
    items = selection(args)
    result = evaluate(args.dataset, args.out, items, methods, dino=args.dino, clip=args.clip, lpips=args.lpips,
                      progress=not args.quiet)
    paths = write_tables(result, args.out)
    print(paths[0].read_text())  # the tables as written
    print(f"Written: {paths[0]}, {paths[1]}", file=sys.stderr)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from ..scenes.export import export_scenes

    try:
        objects = tuple(dict.fromkeys(int(n) for n in args.objects.split(",")))  # each once, in order
    except ValueError:
        objects = ()
    if not objects or set(objects) - {2, 3}:
        raise DplEditError(f"--objects takes a comma-separated subset of 2,3 (a colour swap needs a second "
                           f"object), got {args.objects!r}")
    checks.count("--count", args.count)
    checks.output_folder("folder", args.folder)
    args.folder.mkdir(parents=True, exist_ok=True)
    entries = export_scenes(args.folder, args.split, objects, args.count)
    print(f"Wrote {counted(entries, 'edit')} of {counted(args.count * len(objects), f'{args.split} scene')} "
          f"to {args.folder}")
    return 0
