"""`dpl demo`: DPL and NTI editing of a bundled scene, side by side, with the bundled model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..demo import DEMO_SCENE, DEMO_STEPS, check_demo_settings, run_demo
from ..registry import SCENE_MODEL_ID
from . import COMMANDS
from .common import add_model_options, load


def register(commands) -> None:
    p = commands.add_parser(
        "demo",
        help=COMMANDS["demo"].help,
        description="Invert a rendered two-object scene with DPL and with null-text inversion, swap one "
        "object's shape with Prompt-to-Prompt from each, and write the edits, attention grids (NTI vs "
        "DPL) and a summary with each method's background PSNR and time.",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default: outputs/demo)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"DDIM steps for both methods (default: {DEMO_STEPS}; the paper uses 50)")
    p.add_argument("--scene", type=scene_index, default=DEMO_SCENE,
                   help=f"which two-object test scene of the renderer (default: {DEMO_SCENE})")
    add_model_options(p, required_default=SCENE_MODEL_ID)
    p.set_defaults(run=demo)


def scene_index(text: str) -> int:
    """A test-scene index for argparse (a clear message for anything else)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a scene number 0, 1, 2, ..., got {text!r}")
    return int(text)


def demo(args: argparse.Namespace) -> int:
    check_demo_settings(args.out, args.scene, args.steps)
    model = load(args, args.model)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    report = run_demo(args.out, model, scene_index=args.scene, num_steps=args.steps, progress=not args.quiet, log=log)
    print(report.summary)
    print(f"Wrote {report.folder}/ (open demo.png)")
    return 0
