"""The ``dpl`` command line: the only module that prints."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .artifacts import Inversion
from .errors import DplEditError
from .images import FITS, load_image, psnr
from .inversion import NullTextConfig
from .pipeline import METHODS, invert, reconstruct
from .registry import DEFAULT_MODEL, NAMED_MODELS, load_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.seed is not None:
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
    p.add_argument("--prompt", required=True, help='a caption of the image, e.g. "a cat and a dog"')
    p.add_argument("--out", type=Path, required=True, help="folder to write the inversion into")
    p.add_argument(
        "--method", choices=METHODS, default="nti",
        help="ddim: DDIM inversion only (fast, poor reconstruction under guidance); "
        "nti: null-text inversion (Mokady et al. 2023), near-exact reconstruction. Default: nti",
    )
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
    model = _load(args, args.model)
    image = load_image(args.image, model.image_size, fit=args.fit)
    started = time.perf_counter()
    inversion = invert(
        model, image, args.prompt, method=args.method, num_steps=args.steps,
        guidance_scale=args.guidance, null_text=NullTextConfig(max_iterations=args.nti_iterations),
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


if __name__ == "__main__":
    sys.exit(main())
