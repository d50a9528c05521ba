"""`dpl train-scenes` and `dpl check-scenes`: the scene model's training and quality table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import checks
from ..errors import DplEditError
from ..registry import SCENE_MODEL_ID
from ..scenes.quality import BAR_STEPS, check_counts, check_scene_model
from ..scenes.train import SceneTrainer, TrainConfig
from . import COMMANDS
from .common import add_model_options, counted, load, named_as_options, pick_device


def register(commands) -> None:
    defaults = TrainConfig()
    p = commands.add_parser(
        "train-scenes",
        help=COMMANDS["train-scenes"].help,
        description="Train a small Stable-Diffusion-architecture model on synthetic scenes into OUT "
        "(resumable: run the same command again to continue). When done, OUT/model is a diffusers "
        "folder usable as --model OUT/model.",
    )
    p.add_argument("--out", type=Path, required=True, help="training folder (checkpoints, loss log, model)")
    p.add_argument("--steps", type=int, default=defaults.diffusion_steps, help=f"UNet steps (default: {defaults.diffusion_steps})")
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help=f"VAE steps (default: {defaults.vae_steps})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"UNet batch (default: {defaults.batch_size})")
    p.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size,
                   help=f"VAE batch (default: {defaults.vae_batch_size})")
    p.add_argument("--train-scenes", type=int, default=defaults.train_scenes,
                   help=f"scenes rendered for training (default: {defaults.train_scenes})")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help=f"steps between checkpoints (default: {defaults.checkpoint_every})")
    p.add_argument("--grounding-weight", type=float, default=defaults.grounding_weight,
                   help=f"weight of the token grounding loss (0: off; default: {defaults.grounding_weight})")
    p.add_argument("--time-limit", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--compile", action="store_true", help="CUDA: torch.compile the UNet")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="do not train: write the current EMA model (from OUT's checkpoint) as a diffusers folder in "
                        "fp16; put one at OUT/weights to resume from it")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"training seed (default: {defaults.seed})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=train_scenes)

    p = commands.add_parser(
        "check-scenes",
        help=COMMANDS["check-scenes"].help,
        description="Judge a scene model on test scenes: caption following of generated samples (by a "
        "checker of the renderer's looks), VAE and null-text-inversion reconstruction PSNR, and the IoU "
        "of each noun's map with its own and with the other object, and DPL's background mask against the "
        "true background (beside the paper's IoU). Prints a table with the bars.",
    )
    p.add_argument("--samples", type=int, default=64, help="generated samples judged (default: 64)")
    p.add_argument("--reconstructions", type=int, default=4, help="scenes inverted with NTI (default: 4)")
    p.add_argument("--localisations", type=int, default=16, help="two-object scenes for localisation, and as many "
                   "one- and two-object scenes for the background mask (default: 16)")
    p.add_argument("--steps", type=int, default=BAR_STEPS, help="DDIM steps of the samples and inversions "
                   f"(default: {BAR_STEPS}, the steps the bars were set at; fewer for a quick look)")
    add_model_options(p, required_default=SCENE_MODEL_ID)
    p.set_defaults(run=check_scenes)


# TrainConfig's names of the settings train-scenes takes, as its options (named_as_options)
TRAIN_OPTIONS = {"seed": "--seed", "train scenes": "--train-scenes", "vae steps": "--vae-steps",
                 "vae batch size": "--vae-batch-size", "diffusion steps": "--steps", "batch size": "--batch-size",
                 "checkpoint every": "--checkpoint-every", "grounding weight": "--grounding-weight"}


def train_scenes(args: argparse.Namespace) -> int:
    with named_as_options(TRAIN_OPTIONS):
        config = TrainConfig(
            seed=args.seed, train_scenes=args.train_scenes, vae_steps=args.vae_steps,
            vae_batch_size=args.vae_batch_size, diffusion_steps=args.steps, batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every, grounding_weight=args.grounding_weight,
        )
    checks.output_folder("--out", args.out)
    if args.export:
        checks.output_folder("--export", args.export)
    if args.time_limit is not None:
        checks.finite("--time-limit", args.time_limit, 0.0, above=True)
    trainer = SceneTrainer(config, args.out, device=pick_device(args.device), compile=args.compile)
    limit = None if args.time_limit is None else 60 * args.time_limit
    if args.export:
        if trainer.saved_progress() is None:
            raise DplEditError(f"{args.out} holds no training run to export (no checkpoint/ or weights/ in it): give "
                               "the --out of a `dpl train-scenes` run.")
        trainer.resume()
        trainer.export(args.export)
        print(f"Exported the {trainer.stage} step {trainer.step} model to {args.export}")
        return 0
    try:
        finished = trainer.run(time_limit=limit, progress=not args.quiet)
    except ValueError as err:
        raise DplEditError(str(err)) from err
    if finished:
        print(f"Training finished: the model is in {args.out / 'model'} (use --model {args.out / 'model'})")
    else:
        print(f"Stopped at {trainer.stage} step {trainer.step}; run the same command again to continue.")
    return 0


def check_scenes(args: argparse.Namespace) -> int:
    check_counts(args.samples, args.reconstructions, args.localisations, args.steps)
    model = load(args, args.model)
    started = time.perf_counter()
    report = check_scene_model(model, args.samples, args.reconstructions, args.localisations, args.steps,
                               progress=not args.quiet)
    print(f"\nScene model {args.model}, {counted(args.steps, 'DDIM step')}: {counted(args.samples, 'sample')}, "
          f"{counted(args.reconstructions, 'reconstruction')}, {counted(args.localisations, 'two-object scene')}, "
          f"background masks of {args.localisations} one- and {counted(args.localisations, 'two-object scene')} "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("| check | value | bar | passed |")
    print("|---|---|---|---|")
    for check, value, bar, passed in report.rows():
        print(f"| {check} | {value} | {bar} | {('yes' if passed else 'no') if bar else ''} |")
    if args.steps != BAR_STEPS:
        print(f"\nThe bars were set at {BAR_STEPS} DDIM steps: at {args.steps} a check may pass or fail for the "
              f"schedule's sake. Judge a model with the default --steps.")
    return 0
