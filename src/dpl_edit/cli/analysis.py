"""`dpl attention` and `dpl localisation`: attention views and the IoU-vs-threshold evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import checks
from ..artifacts import Inversion
from ..errors import DplEditError
from ..localisation import THRESHOLDS, attention_shares, best_iou, iou_curve, load_mask, mean_iou, plot_curves
from ..views import inversion_words, word_map, write_attention_views
from . import COMMANDS


def register(commands) -> None:
    p = commands.add_parser(
        "attention",
        help=COMMANDS["attention"].help,
        description="Write PNG grids of each word's cross-attention over the source image (averaged "
        "over all steps and over step ranges), and for DPL the self-attention clusters and background "
        "mask and its per-step losses, thresholds and AdamW steps (dpl_log.png); with --compare, two inversions of the same image side by side (NTI vs DPL).",
    )
    p.add_argument("dir", type=Path, help="a folder written by `dpl invert`")
    p.add_argument("--compare", type=Path, help="another inversion of the same image and prompt")
    p.add_argument("--out", type=Path, help="folder for the PNGs (default: DIR)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=attention, seed=None)

    p = commands.add_parser(
        "localisation",
        help=COMMANDS["localisation"].help,
        description="For each inversion and word: the share of the step-averaged cross-attention map's "
        "mass inside the word's mask, inside the other words' masks and outside them all (leakage is "
        "mass off its own mask); and the IoU with the word's mask of the max-normalised map thresholded at "
        "0.0, 0.1, ..., 1.0 (the DPL paper's Fig. 5a), summarised (mean, best) over 0.1 .. 1.0 since 0.0 "
        "switches every pixel on. Prints a table and plots the curves.",
    )
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="inversions of the same image")
    p.add_argument("--mask", action="append", required=True, metavar="WORD=FILE",
                   help="a word and its ground-truth mask image (white = object); repeat per word; WORD@N names "
                   "the N-th occurrence of a word the prompt holds more than once (rectangle@2)")
    p.add_argument("--out", type=Path, default=Path("localisation.png"), help="the plot (default: localisation.png)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=localisation, seed=None)


def attention(args: argparse.Namespace) -> int:
    written = write_attention_views(args.dir, compare=args.compare, out=args.out)
    if not args.quiet:
        print("Wrote " + ", ".join(str(path) for path in written))
    return 0


def localisation(args: argparse.Namespace) -> int:
    checks.output_file("--out", args.out, checks.PLOT_SUFFIXES)
    paths = {}
    for item in args.mask:
        word, sep, path = item.partition("=")
        if not sep or not word.strip() or not path:
            raise DplEditError(f"--mask takes WORD=FILE, got {item!r}")
        if word.strip() in paths:
            raise DplEditError(f"--mask names {word.strip()!r} twice; give one mask per word.")
        paths[word.strip()] = path
    fitted = {}  # per fit: each word's mask made square as the inverted image was
    curves, shares = {}, {}
    for folder in args.dirs:
        inversion = Inversion.load(folder)
        fit = inversion.settings.get("fit", "crop")
        if fit not in fitted:
            fitted[fit] = {word: load_mask(path, fit) for word, path in paths.items()}
            shapes = {mask.shape for mask in fitted[fit].values()}
            if len(shapes) > 1:
                raise DplEditError(f"The masks have different sizes ({sorted(shapes)}); give masks of one image.")
        masks = fitted[fit]
        words = dict(inversion_words(inversion))
        for word, mask in masks.items():
            if word not in words:
                named = [label for label in words if label.partition("@")[0].lower() == word.lower()]
                if len(named) > 1:
                    raise DplEditError(f"{folder}: {word!r} is in its prompt {inversion.prompt!r} more than once; "
                                       f"name the one the mask is of ({', '.join(named)}).")
                raise DplEditError(f"{folder}: no word {word!r} in its prompt {inversion.prompt!r} (its words: "
                                   f"{', '.join(words)})")
            label = f"{folder.name} {inversion.method} {word}"
            attention = word_map(inversion, words[word])
            curves[label] = iou_curve(attention, mask)
            others = [m for w, m in masks.items() if w != word]
            shares[label] = attention_shares(attention, [mask, torch.stack(others).any(dim=0)] if others else [mask])
    plot_curves(curves, args.out, title="IoU of word attention with its mask")
    if not args.quiet:
        print("| inversion, word | mass on own mask | on other masks | elsewhere | "
              + " | ".join(f"IoU {t:.1f}" for t in THRESHOLDS) + " | mean IoU 0.1-1 | best IoU 0.1-1 |")
        print("|---" * (len(THRESHOLDS) + 6) + "|")
        for label, curve in curves.items():
            share = shares[label].tolist()
            own, other, rest = share if len(share) == 3 else (share[0], None, share[1])  # one mask: no other
            print(f"| {label} | {own:.3f} | {'-' if other is None else f'{other:.3f}'} | {rest:.3f} | "
                  + " | ".join(f"{v:.3f}" for v in curve.tolist())
                  + f" | {mean_iou(curve):.3f} | {best_iou(curve):.3f} |")
        print(f"Plot: {args.out}")
    return 0
