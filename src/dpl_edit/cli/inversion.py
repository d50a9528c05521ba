"""`dpl invert`, `dpl reconstruct`, `dpl edit` and `dpl run`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from pathlib import Path

from PIL import Image

from .. import checks
from ..artifacts import METADATA_FILE, SOURCE_FILE, TENSORS_FILE, Inversion, inversion_folder, write_atomic
from ..editing import (
    EDIT_FILE,
    MODES,
    EditConfig,
    EditResult,
    edit,
    edit_record,
    plan_edit,
    recommended_edit_config,
)
from ..editing.plan import TARGET_TOKENS
from ..errors import DplEditError
from ..images import FITS, fit_square, open_image, psnr
from ..inversion import DynamicPromptConfig, NullTextConfig
from ..inversion.dynamic_prompt import LOSSES, NULL_STRATEGIES, mostly_capped, saturation
from ..losses import SPANS
from ..pipeline import METHODS, PRESETS, invert, model_dpl_config, reconstruct
from ..prompts import check_marks, parse_marked_prompt
from ..registry import DEFAULT_MODEL
from ..views import ATTENTION_VIEWS, edit_grid, save_figure
from . import COMMANDS
from .common import add_model_options, load, load_for, named_as_options, pairs


def register(commands) -> None:
    p = commands.add_parser(
        "invert",
        help=COMMANDS["invert"].help,
        description="Invert IMAGE with its PROMPT and save the result in OUT (inversion.safetensors, "
        "inversion.json, source.png) for `dpl reconstruct` and editing.",
    )
    p.add_argument("image", type=Path, help="the image file (PNG, JPEG, WebP, ...; any size and mode)")
    p.add_argument(
        "--prompt", required=True,
        help='a caption of the image; for dpl mark the nouns to learn in braces: "a {cat} and a {dog}"',
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the inversion into")
    add_inversion_options(p)
    add_model_options(p, required_default=DEFAULT_MODEL)
    p.set_defaults(run=invert_command)

    p = commands.add_parser(
        "reconstruct",
        help=COMMANDS["reconstruct"].help,
        description="Sample the image back from the inversion in DIR, write DIR/reconstruction.png "
        "and print its PSNR against the source image.",
    )
    p.add_argument("dir", type=Path, help="a folder written by `dpl invert`")
    p.add_argument("--out", type=Path, help="where to write the image (default: DIR/reconstruction.png)")
    add_model_options(p, required_default=None)
    p.set_defaults(run=reconstruct_command)

    p = commands.add_parser(
        "edit",
        help=COMMANDS["edit"].help,
        description="Edit the inversion in DIR towards each --target (one sampling run for all), writing "
        "OUT/edit_N.png, OUT/reconstruction.png (the source branch), OUT/edit_grid.png (source, "
        "reconstruction, edit, and the attention maps of the edited words) and OUT/edit.json (the inversion, "
        "the targets in the order of edit_N.png, the settings).",
    )
    p.add_argument("dir", type=Path, help="a folder written by `dpl invert`")
    add_edit_options(p)
    p.add_argument("--out", type=Path, help="folder for the images (default: DIR/edits, or DIR/edits-2, -3, ... "
                   "when that holds an earlier edit)")
    add_model_options(p, required_default=None)
    p.set_defaults(run=edit_command)

    p = commands.add_parser(
        "run",
        help=COMMANDS["run"].help,
        description="`dpl invert` then `dpl edit`: the inversion goes to OUT, the edits to OUT/edits. "
        "The inversion method defaults to dpl here.",
    )
    p.add_argument("image", type=Path, help="the image file (PNG, JPEG, WebP, ...; any size and mode)")
    p.add_argument("--source", required=True,
                   help='a caption of the image; for dpl mark the nouns in braces: "a {cat} and a {dog}"')
    p.add_argument("--out", type=Path, required=True, help="folder for the inversion and the edits")
    add_edit_options(p)
    add_inversion_options(p, method="dpl", prompt_option="--source")
    add_model_options(p, required_default=DEFAULT_MODEL)
    p.set_defaults(run=run_command)


def add_inversion_options(p: argparse.ArgumentParser, method: str = "nti", prompt_option: str = "--prompt") -> None:
    """The inversion's options; ``method`` is the command's default method, ``prompt_option`` the option
    that takes the image's caption."""
    p.add_argument(
        "--method", choices=METHODS, default=method,
        help="ddim: DDIM inversion only (fast, poor reconstruction under guidance); "
        "nti: null-text inversion (Mokady et al. 2023), near-exact reconstruction; "
        "npi: negative-prompt inversion (no optimisation); direct: direct inversion (no "
        "optimisation, exact reconstruction, editing keeps the source on the DDIM pivot); "
        "dpl: dynamic prompt learning (Wang et al. 2023) + the --null step, attention kept "
        f"on each marked word's object. Default: {method}",
    )
    p.add_argument(
        "--null", choices=NULL_STRATEGIES, default="optimized",
        help="dpl: how each step's unconditional states are made: optimized (null-text inversion, the "
        "paper; default), negative (the source prompt's states, no optimisation: fastest) or direct "
        "(\"\", with the source branch kept on the DDIM pivot while editing: exact reconstruction)",
    )
    p.add_argument(
        "--words", nargs="+", action="extend", default=[], metavar="WORD",
        help=f"dpl: words to learn, instead of (or besides) marking them with braces in {prompt_option}",
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
    p.add_argument("--span", choices=SPANS,
                   help="dpl: token columns the attention balancing loss re-softmaxes: padded (1:-1 of all 77, "
                   "end-of-text and padding included, as the authors and Attend-and-Excite for SD 1.x) or "
                   "prompt (the prompt's own tokens, as Attend-and-Excite for SD 2.1) (default: the model's "
                   f"recommendation, else {dpl.balancing_span})")
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


def add_edit_options(p: argparse.ArgumentParser) -> None:
    edit = EditConfig()
    p.add_argument("--target", action="append", required=True, metavar="PROMPT",
                   help='a target prompt, e.g. "a leopard and a tiger"; repeat for several edits of one inversion')
    p.add_argument("--mode", choices=MODES, default=edit.mode,
                   help="replace: word swap (same token count); refine: prompts aligned token by token, "
                   "new words keep their own attention (default: replace)")
    p.add_argument("--reweight", nargs="+", action="extend", default=[], metavar="WORD=FACTOR",
                   help="scale target words' cross-attention, e.g. --reweight fluffy=2.0")
    p.add_argument("--blend", nargs="+", action="extend", default=[], metavar="WORD",
                   help="local blend: only the region of these source words (and what replaces them in each "
                        "target) may change; WORD@N names the N-th occurrence (rectangle@2), or give the source "
                        "prompt with braces around the words meant; a word only a target has is taken there")
    p.add_argument("--subtract", nargs="+", action="extend", default=[], metavar="WORD",
                   help="local blend: take these words' regions out of the blend mask (Prompt-to-Prompt's "
                        "subtract words; e.g. the objects when the background is edited); same forms as --blend")
    p.add_argument("--blend-threshold", type=float, default=edit.blend_threshold,
                   help=f"local blend threshold on the max-normalised maps (default: {edit.blend_threshold})")
    p.add_argument("--blend-start", type=float, default=edit.blend_start,
                   help=f"share of the steps before local blending starts (default: {edit.blend_start})")
    p.add_argument("--target-tokens", choices=TARGET_TOKENS, default=None,
                   help="which learned DPL vectors the targets keep: keep (every kept marked word, as the "
                        "authors), plain (none), auto (not a word whose attribute the target changes, e.g. its "
                        "colour); default: the model's recommendation (dpl_edit.json), else keep")
    p.add_argument("--cross-steps", type=float, default=edit.cross_replace_steps,
                   help=f"share of the steps whose cross-attention comes from the source (default: {edit.cross_replace_steps})")
    p.add_argument("--cross-steps-word", nargs="+", action="extend", default=[], metavar="WORD=SHARE",
                   help="per-word override of --cross-steps, e.g. --cross-steps-word tiger=0.4")
    p.add_argument("--self-steps", type=float, default=edit.self_replace_steps,
                   help=f"share of the steps whose self-attention comes from the source (default: {edit.self_replace_steps})")


def edit_config(args: argparse.Namespace) -> EditConfig:
    defaults = EditConfig()
    return EditConfig(
        mode=args.mode, cross_replace_steps=args.cross_steps,
        word_cross_replace_steps=pairs(args.cross_steps_word, "--cross-steps-word"),
        self_replace_steps=args.self_steps, reweight=pairs(args.reweight, "--reweight"),
        blend=tuple(args.blend), blend_threshold=args.blend_threshold, blend_start=args.blend_start,
        subtract=tuple(args.subtract), target_tokens=args.target_tokens or defaults.target_tokens,
    )


def model_edit_config(args: argparse.Namespace, config: EditConfig, model) -> EditConfig:
    """The checked config with the model's recommendations where the command line chose nothing."""
    return recommended_edit_config(config, model.settings, chosen=["target_tokens"] if args.target_tokens else [])


def write_edits(result: EditResult, inversion: Inversion, source: Path, config: EditConfig, out: Path) -> None:
    """The images, the grid and ``edit.json`` (the inversion's folder relative to ``out``, its method and
    prompt, the targets in the order of edit_N.png, the edit's settings). The edit_N.png beyond this
    edit's targets that an earlier edit.json in ``out`` names are removed: the folder holds this edit
    only, never some of another's; files no edit.json names stay."""
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_edit_count(out / EDIT_FILE)
    result.reconstruction.save(out / "reconstruction.png")
    for j, image in enumerate(result.edits, start=1):
        image.save(out / f"edit_{j}.png")
    for j in range(len(result.edits) + 1, earlier + 1):  # only images an earlier edit.json names
        (out / f"edit_{j}.png").unlink(missing_ok=True)
    save_figure(edit_grid(result, inversion.source_image), out / "edit_grid.png")
    # the inversion's folder relative to this one ("..", DIR/edits), which stays right when both move together
    record = edit_record(inversion, result, config, os.path.relpath(source.resolve(), out.resolve()))
    write_atomic(out / EDIT_FILE, json.dumps(record, indent=2, default=str))
    for j, target in enumerate(result.targets, start=1):
        print(f"{out / f'edit_{j}.png'}: {target}")
    print(f"Grid: {out / 'edit_grid.png'}")


def _earlier_edit_count(path: Path) -> int:
    """How many edit images the edit.json at ``path`` says its edit wrote (0 without a readable one)."""
    try:
        return len(json.loads(path.read_text())["targets"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def set_aside_previous(folder: Path) -> Path | None:
    """Move the inversion saved in ``folder``, with what was made from it there (its reconstruction,
    attention views and ``edits`` folders), into ``folder/previous`` (``previous-2``, ... once that is
    taken), so that the inversion about to replace it has no edits beside it that it did not make;
    returns where they went, or None where ``folder`` holds no inversion. Other files stay."""
    if not (folder / METADATA_FILE).is_file():
        return None
    made = [TENSORS_FILE, METADATA_FILE, SOURCE_FILE, "reconstruction.png", *ATTENTION_VIEWS]
    made += [p.name for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"edits(-\d+)?", p.name)]
    previous = _unused_folder(folder / "previous")
    previous.mkdir(exist_ok=True)
    for name in made:
        if (folder / name).exists():
            (folder / name).rename(previous / name)
    return previous


def _unused_folder(base: Path) -> Path:
    """``base``, or the first of base-2, base-3, ... that is missing or empty: a later edit of an
    inversion keeps the earlier edits' images where no --out is given."""
    folder, n = base, 1
    while folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


# the library's names of the settings these commands take, as their options (named_as_options)
OPTION_NAMES = {
    "num_steps": "--steps", "guidance_scale": "--guidance", "null-text max_iterations": "--nti-iterations",
    "DPL max_iterations": "--dpl-iterations", "DPL lambda_dj": "--lambda-dj", "DPL lambda_bg": "--lambda-bg",
    "DPL cross_resolution": "--cross-res", "DPL self_resolution": "--self-res", "cross_replace_steps of": "--cross-steps-word",
    "cross_replace_steps": "--cross-steps", "self_replace_steps": "--self-steps", "blend_threshold": "--blend-threshold",
    "blend_start": "--blend-start", "subtract": "--subtract", "re-weighting factor of": "--reweight",
}


def edit_command(args: argparse.Namespace) -> int:
    with named_as_options(OPTION_NAMES):
        config = edit_config(args)
        inversion = Inversion.load(args.dir)
        out = checks.output_folder("--out", args.out or _unused_folder(args.dir / "edits"))
        model = load_for(args, inversion)
        config = model_edit_config(args, config, model)
        started = time.perf_counter()
        result = edit(model, inversion, args.target, config, progress=not args.quiet)
    print(f"Edited {args.dir} ({inversion.method}) in {time.perf_counter() - started:.1f} s")
    write_edits(result, inversion, args.dir, config, out)
    return 0


def run_command(args: argparse.Namespace) -> int:
    with named_as_options(OPTION_NAMES):
        config = edit_config(args)
        args.prompt = args.source
        settings = inversion_settings(args)
        model = load(args, args.model)
        config = model_edit_config(args, config, model)
        # the targets checked against the source before minutes of inversion, not after
        source = parse_marked_prompt(args.source, model.tokenizer, args.words, require_words=False)
        plan_edit(model, args.source, source.positions, args.target, config, args.steps)
        inversion = invert_from_args(args, model, settings)
        started = time.perf_counter()
        result = edit(model, inversion, args.target, config, progress=not args.quiet)
    print(f"Edited in {time.perf_counter() - started:.1f} s")
    write_edits(result, inversion, args.out, config, _unused_folder(args.out / "edits"))
    return 0


def invert_command(args: argparse.Namespace) -> int:
    with named_as_options(OPTION_NAMES):
        settings = inversion_settings(args)
        invert_from_args(args, load(args, args.model), settings)
    return 0


def inversion_settings(args: argparse.Namespace) -> tuple[NullTextConfig, dict, Image.Image]:
    """Everything about an inversion that can be checked before loading a model: the image (read,
    so that a wrong path or a file that is no image is said at once, not after the model's load),
    the marks, the output folder, the step count and guidance, the null-text settings and the DPL
    settings chosen on the command line (checked by building a config from them)."""
    image = open_image(args.image)
    check_marks(args.prompt, args.words, require_words=args.method == "dpl")
    inversion_folder("--out", args.out)
    checks.count("--steps", args.steps)
    checks.finite("--guidance", args.guidance, 0.0)
    losses = tuple(name.strip() for name in args.losses.split(",") if name.strip())
    if not losses or set(losses) - set(LOSSES):
        raise DplEditError(f"--losses takes a comma-separated subset of {','.join(LOSSES)}, got {args.losses!r}")
    null_text = NullTextConfig.authors() if args.preset == "authors" else NullTextConfig()
    if args.nti_iterations != NullTextConfig.max_iterations:
        null_text = dataclasses.replace(null_text, max_iterations=args.nti_iterations)
    chosen = {k: v for k, v in (("cross_resolution", args.cross_res), ("self_resolution", args.self_res),
                                ("balancing_span", args.span)) if v is not None}
    overrides = dict(max_iterations=args.dpl_iterations, losses=losses, lambda_dj=args.lambda_dj,
                     lambda_bg=args.lambda_bg, **chosen)
    DynamicPromptConfig(**overrides)  # checks the values
    _check_settings_have_effect(args)
    return null_text, overrides, image


def _check_settings_have_effect(args: argparse.Namespace) -> None:
    """A DPL option given with another method, or a null-text option with a method that optimises
    no null text, would be ignored: said before any work, since the user meant something by it."""
    parser = argparse.ArgumentParser()
    add_inversion_options(parser)
    defaults = parser.parse_args([])  # what each option is when not given
    dpl_only = ("null", "dpl_iterations", "losses", "lambda_dj", "lambda_bg", "span", "self_res")
    null_text_only = ("preset", "nti_iterations")
    method = f"--method {args.method}" + (f" --null {args.null}" if args.method == "dpl" else "")
    for options, applies, what in (
        (dpl_only, args.method == "dpl", "a DPL setting: --method dpl only"),
        (null_text_only, args.method == "nti" or (args.method == "dpl" and args.null == "optimized"),
         "a null-text optimisation setting: --method nti, or dpl with --null optimized"),
    ):
        idle = ["--" + name.replace("_", "-") for name in options if getattr(args, name) != getattr(defaults, name)]
        if idle and not applies:
            raise DplEditError(f"{', '.join(idle)}: no effect with {method} ({what}); "
                               f"drop {'it' if len(idle) == 1 else 'them'} or change the method.")


def invert_from_args(args: argparse.Namespace, model, settings: tuple[NullTextConfig, dict, Image.Image]) -> Inversion:
    null_text, overrides, image = settings
    dpl = model_dpl_config(model, **overrides)
    image = fit_square(image, model.image_size, args.fit)
    started = time.perf_counter()
    inversion = invert(
        model, image, args.prompt, method=args.method, null=args.null, words=args.words, num_steps=args.steps,
        guidance_scale=args.guidance, preset=args.preset, null_text=null_text, dpl=dpl,
        progress=not args.quiet,
    )
    inversion.settings["fit"] = args.fit
    previous = set_aside_previous(args.out)
    inversion.save(args.out)
    print(f"Inverted {args.image} with {args.method} in {time.perf_counter() - started:.1f} s -> {args.out}/")
    if previous is not None:
        print(f"The inversion this replaces, and what was made from it here, is now in {previous}/")
    if inversion.dpl_log and not mostly_capped(inversion.dpl_log, dpl.max_iterations):
        print(saturation(inversion.dpl_log, dpl.max_iterations))  # (mostly capped, the warning said it)
    return inversion


def reconstruct_command(args: argparse.Namespace) -> int:
    inversion = Inversion.load(args.dir)
    out = checks.output_file("--out", args.out or args.dir / "reconstruction.png", checks.IMAGE_SUFFIXES)
    model = load_for(args, inversion)
    image = reconstruct(model, inversion, progress=not args.quiet)
    image.save(out)
    quality = f", PSNR {psnr(image, inversion.source_image):.2f} dB against the source" if inversion.source_image else ""
    print(f"Reconstructed {args.dir} ({inversion.method}) -> {out}{quality}")
    return 0
