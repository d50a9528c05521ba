"""The ``dpl`` command line: the only module that prints."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .artifacts import Inversion
from .errors import DplEditError
from .images import FITS, load_image, psnr
from .inversion import DynamicPromptConfig, NullTextConfig
from .inversion.dynamic_prompt import LOSSES
from .localisation import THRESHOLDS, iou_curve, load_mask, plot_curves
from .pipeline import METHODS, PRESETS, invert, model_dpl_config, reconstruct
from .registry import DEFAULT_MODEL, NAMED_MODELS, load_model
from .scenes.quality import check_scene_model
from .scenes.train import SceneTrainer, TrainConfig
from .views import inversion_words, word_map, write_attention_views

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.seed is not None and args.run is not _train_scenes:
        torch.manual_seed(args.seed)
    try:
        return args.run(args)
    except DplEditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written for the step in progress", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpl",
        description="Text-based editing of real images with diffusion models (Dynamic Prompt Learning).",
    )
    parser.add_argument("--version", action="version", version=f"dpl-edit {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "invert",
        help="invert an image into the model once, for reconstruction and editing",
        description="Invert IMAGE with its PROMPT and save the result in OUT (inversion.safetensors, "
        "inversion.json, source.png) for `dpl reconstruct` and editing.",
    )
    p.add_argument("image", type=Path, help="the image file (PNG, JPEG, WebP, ...; any size and mode)")
    p.add_argument(
        "--prompt", required=True,
        help='a caption of the image; for dpl mark the nouns to learn in braces: "a {cat} and a {dog}"',
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the inversion into")
    p.add_argument(
        "--method", choices=METHODS, default="nti",
        help="ddim: DDIM inversion only (fast, poor reconstruction under guidance); "
        "nti: null-text inversion (Mokady et al. 2023), near-exact reconstruction; "
        "dpl: dynamic prompt learning (Wang et al. 2023) + null-text inversion, attention kept "
        "on each marked word's object. Default: nti",
    )
    p.add_argument(
        "--words", nargs="+", default=(), metavar="WORD",
        help="dpl: words to learn, instead of (or besides) marking them with braces in --prompt",
    )
    p.add_argument(
        "--preset", choices=PRESETS, default="paper",
        help="paper: published null-text inversion settings (default); authors: the DPL authors' "
        "schedule (51 null-text iterations per step, no early stop, null reset each step)",
    )
    dpl = DynamicPromptConfig()
    p.add_argument("--dpl-iterations", type=int, default=dpl.max_iterations,
                   help=f"dpl: AdamW steps on the tokens per timestep at most (default: {dpl.max_iterations})")
    p.add_argument("--losses", default=",".join(dpl.losses),
                   help="dpl: comma-separated losses to use: at (attention balancing), dj (disjoint "
                   "object), bg (background leakage) (default: at,dj,bg)")
    p.add_argument("--lambda-dj", type=float, default=dpl.lambda_dj,
                   help=f"dpl: weight of the disjoint object loss (default: {dpl.lambda_dj}; the authors' demo uses 0.005)")
    p.add_argument("--lambda-bg", type=float, default=dpl.lambda_bg,
                   help=f"dpl: weight of the background leakage loss (default: {dpl.lambda_bg})")
    p.add_argument("--cross-res", type=int,
                   help="side of the cross-attention maps the losses and views read (default: the model's "
                   f"recommendation, else {dpl.cross_resolution} as for SD 1.x)")
    p.add_argument("--self-res", type=int,
                   help="dpl: side of the self-attention maps clustered for the background mask (default: "
                   f"the model's recommendation, else {dpl.self_resolution})")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument(
        "--fit", choices=FITS, default="crop",
        help="how a non-square image is made square: crop the centre (default), resize "
        "(stretches, distorting the aspect ratio, as the DPL authors do) or pad with white",
    )
    p.add_argument(
        "--nti-iterations", type=int, default=NullTextConfig.max_iterations,
        help="null-text inversion: Adam steps per timestep at most (default: 10)",
    )
    _add_model_options(p, required_default=DEFAULT_MODEL)
    p.set_defaults(run=_invert)

    p = commands.add_parser(
        "reconstruct",
        help="sample the image back from an inversion",
        description="Sample the image back from the inversion in DIR, write DIR/reconstruction.png "
        "and print its PSNR against the source image.",
    )
    p.add_argument("dir", type=Path, help="a folder written by `dpl invert`")
    p.add_argument("--out", type=Path, help="where to write the image (default: DIR/reconstruction.png)")
    _add_model_options(p, required_default=None)
    p.set_defaults(run=_reconstruct)

    p = commands.add_parser(
        "attention",
        help="draw the attention maps of an inversion as PNG grids",
        description="Write PNG grids of each word's cross-attention over the source image (averaged "
        "over all steps and over step ranges), and for DPL the self-attention clusters and background "
        "mask; with --compare, two inversions of the same image side by side (NTI vs DPL).",
    )
    p.add_argument("dir", type=Path, help="a folder written by `dpl invert`")
    p.add_argument("--compare", type=Path, help="another inversion of the same image and prompt")
    p.add_argument("--out", type=Path, help="folder for the PNGs (default: DIR)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=_attention, seed=None)

    p = commands.add_parser(
        "localisation",
        help="IoU of words' attention maps with ground-truth masks, against the threshold",
        description="For each inversion and word, threshold the step-averaged, max-normalised "
        "cross-attention map at 0.0, 0.1, ..., 1.0 and compute the IoU with the word's mask (the DPL "
        "paper's Fig. 5a). Prints a table and plots the curves.",
    )
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="inversions of the same image")
    p.add_argument("--mask", action="append", required=True, metavar="WORD=FILE",
                   help="a word and its ground-truth mask image (white = object); repeat per word")
    p.add_argument("--out", type=Path, default=Path("localisation.png"), help="the plot (default: localisation.png)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=_localisation, seed=None)

    defaults = TrainConfig()
    p = commands.add_parser(
        "train-scenes",
        help="train the scene model (VAE, then UNet + text encoder) from rendered scenes",
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
    p.add_argument("--time-limit", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--weights-only", type=Path,
                   help="also write fp16 EMA weights here when stopping (small; resumable with a fresh optimiser)")
    p.add_argument("--compile", action="store_true", help="CUDA: torch.compile the UNet")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="do not train: write the current EMA model (from OUT's checkpoint) as a diffusers folder")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"training seed (default: {defaults.seed})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_train_scenes)

    p = commands.add_parser(
        "check-scenes",
        help="quality table of a scene model: caption following, reconstruction, localisation",
        description="Judge a scene model on test scenes: caption following of generated samples (by a "
        "checker of the renderer's looks), VAE and null-text-inversion reconstruction PSNR, and the IoU "
        "of each noun's map with its own and with the other object. Prints a table with the bars.",
    )
    p.add_argument("--samples", type=int, default=64, help="generated samples judged (default: 64)")
    p.add_argument("--reconstructions", type=int, default=4, help="scenes inverted with NTI (default: 4)")
    p.add_argument("--localisations", type=int, default=16, help="two-object scenes for localisation (default: 16)")
    _add_model_options(p, required_default=None)
    p.set_defaults(run=_check_scenes)
    return parser


def _add_model_options(p: argparse.ArgumentParser, required_default: str | None) -> None:
    named = "; ".join(f"{k}: {v}" for k, v in NAMED_MODELS.items())
    default = f"default: {required_default}" if required_default else "default: the model the inversion was made with"
    p.add_argument(
        "--model", default=required_default,
        help=f"a diffusers Stable Diffusion folder, a Hugging Face hub id, or a named model ({named}); {default}",
    )
    p.add_argument(
        "--device", default="auto",
        help="cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu (default: auto)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model precision (default: float32)")
    p.add_argument("--seed", type=int, default=None, help="seed for torch's random generator")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DplEditError(f"Unknown device {name!r} ({err}); use cpu, cuda, cuda:N, mps or auto") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DplEditError("--device cuda was asked for but this torch build sees no CUDA GPU; use --device cpu")
    return device


def _load(args: argparse.Namespace, name: str):
    device = _device(args.device)
    if not args.quiet:
        print(f"Loading model {name} on {device} ({args.dtype})", file=sys.stderr)
    return load_model(name, device=device, dtype=DTYPES[args.dtype])


def _invert(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise DplEditError(f"--steps must be at least 1, got {args.steps}")
    losses = tuple(name.strip() for name in args.losses.split(",") if name.strip())
    if not losses or set(losses) - set(LOSSES):
        raise DplEditError(f"--losses takes a comma-separated subset of {','.join(LOSSES)}, got {args.losses!r}")
    null_text = NullTextConfig.authors() if args.preset == "authors" else NullTextConfig()
    if args.nti_iterations != NullTextConfig.max_iterations:
        null_text = dataclasses.replace(null_text, max_iterations=args.nti_iterations)
    model = _load(args, args.model)
    sizes = {k: v for k, v in (("cross_resolution", args.cross_res), ("self_resolution", args.self_res)) if v}
    dpl = model_dpl_config(
        model, max_iterations=args.dpl_iterations, losses=losses, lambda_dj=args.lambda_dj,
        lambda_bg=args.lambda_bg, **sizes,
    )
    image = load_image(args.image, model.image_size, fit=args.fit)
    started = time.perf_counter()
    inversion = invert(
        model, image, args.prompt, method=args.method, words=args.words, num_steps=args.steps,
        guidance_scale=args.guidance, preset=args.preset, null_text=null_text, dpl=dpl,
        progress=not args.quiet,
    )
    inversion.settings["fit"] = args.fit
    inversion.save(args.out)
    print(f"Inverted {args.image} with {args.method} in {time.perf_counter() - started:.1f} s -> {args.out}/")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    inversion = Inversion.load(args.dir)
    model = _load(args, args.model or inversion.model_id)
    image = reconstruct(model, inversion, progress=not args.quiet)
    out = args.out or args.dir / "reconstruction.png"
    image.save(out)
    quality = f", PSNR {psnr(image, inversion.source_image):.2f} dB against the source" if inversion.source_image else ""
    print(f"Reconstructed {args.dir} ({inversion.method}) -> {out}{quality}")
    return 0


def _train_scenes(args: argparse.Namespace) -> int:
    config = TrainConfig(
        seed=args.seed, train_scenes=args.train_scenes, vae_steps=args.vae_steps, vae_batch_size=args.vae_batch_size,
        diffusion_steps=args.steps, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
    )
    trainer = SceneTrainer(config, args.out, device=_device(args.device), compile=args.compile)
    limit = None if args.time_limit is None else 60 * args.time_limit
    if args.export:
        trainer.resume()
        trainer.export(args.export)
        print(f"Exported the {trainer.stage} step {trainer.step} model to {args.export}")
        return 0
    try:
        finished = trainer.run(time_limit=limit, progress=not args.quiet)
    except ValueError as err:
        raise DplEditError(str(err)) from err
    if args.weights_only:
        trainer.save_weights_only(args.weights_only)
    if finished:
        print(f"Training finished: the model is in {args.out / 'model'} (use --model {args.out / 'model'})")
    else:
        print(f"Stopped at {trainer.stage} step {trainer.step}; run the same command again to continue.")
    return 0


def _check_scenes(args: argparse.Namespace) -> int:
    if not args.model:
        raise DplEditError("check-scenes needs --model: a scene model folder (or scenes once it is bundled)")
    model = _load(args, args.model)
    started = time.perf_counter()
    report = check_scene_model(model, args.samples, args.reconstructions, args.localisations, progress=not args.quiet)
    print(f"\nScene model {args.model}: {args.samples} samples, {args.reconstructions} reconstructions, "
          f"{args.localisations} two-object scenes ({time.perf_counter() - started:.0f} s)\n")
    print("| check | value | bar | passed |")
    print("|---|---|---|---|")
    for check, value, bar, passed in report.rows():
        print(f"| {check} | {value} | {bar} | {('yes' if passed else 'no') if bar else ''} |")
    return 0


def _attention(args: argparse.Namespace) -> int:
    written = write_attention_views(args.dir, compare=args.compare, out=args.out)
    if not args.quiet:
        print("Wrote " + ", ".join(str(path) for path in written))
    return 0


def _localisation(args: argparse.Namespace) -> int:
    masks = {}
    for item in args.mask:
        word, sep, path = item.partition("=")
        if not sep or not word or not path:
            raise DplEditError(f"--mask takes WORD=FILE, got {item!r}")
        masks[word.strip()] = load_mask(path)
    curves = {}
    for folder in args.dirs:
        inversion = Inversion.load(folder)
        words = dict(inversion_words(inversion))
        for word, mask in masks.items():
            if word not in words:
                raise DplEditError(f"{folder}: no word {word!r} in its prompt {inversion.prompt!r}")
            curves[f"{folder.name} {inversion.method} {word}"] = iou_curve(word_map(inversion, words[word]), mask)
    plot_curves(curves, args.out, title="IoU of word attention with its mask")
    if not args.quiet:
        print("| inversion, word | " + " | ".join(f"{t:.1f}" for t in THRESHOLDS) + " | mean |")
        print("|---" * (len(THRESHOLDS) + 2) + "|")
        for label, curve in curves.items():
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in curve.tolist()) + f" | {curve.mean():.3f} |")
        print(f"Plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
