"""What the commands share: model options, device choice, loading, WORD=VALUE pairs."""

from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager

import torch

from .. import checks
from ..artifacts import Inversion
from ..errors import DplEditError, ModelLoadError
from ..models import StableDiffusion
from ..registry import NAMED_MODELS, cuda_graphs_by_default, load_model
from . import collector


def add_model_options(p: argparse.ArgumentParser, required_default: str | None) -> None:
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
    p.add_argument("--dtype", choices=checks.DTYPES, default=None,
                   help="model precision (default: float32, or the precision of the inversion a command reads; bfloat16 is fast on a GPU and fine for NTI, unreliable for DPL: "
                   "see README, Benchmarks; float16 is for GPUs: on a CPU it runs tens of times slower)")
    p.add_argument("--variant", default=None,
                   help="the weight files to read, as diffusers names them (fp16: *.fp16.safetensors); default: the "
                   "plain ones, or the one variant a model has where it has no plain ones")
    p.add_argument("--compile", action="store_true",
                   help="compile the inner loops with torch.compile (UNet, hooked forwards, DPL's token step; CUDA "
                   "graphs on CUDA; minutes of compiling on a CPU, where it does not pay: see README, Benchmarks)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA only: replay the UNet's forwards (recorded inversions, the null-text step, DPL's token "
                   "step, Prompt-to-Prompt's sampling) as CUDA graphs of their eager kernels (no compiler; a few "
                   "eager calls to capture each); default: on where the device is CUDA and --compile is not given")
    p.add_argument("--seed", type=int, default=None, help="seed for torch's random generator")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log messages")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return checks.device("--device", name)


def load_options(args: argparse.Namespace, dtype: str | None = None) -> dict:
    """``load_model``'s device, dtype, compile and cuda_graphs as the options say (checked); ``dtype`` (an
    inversion's) where ``--dtype`` is not given, float32 where neither is, or where an inversion made in
    float16 (on a GPU) is read on a CPU, which has no fast float16 kernels."""
    device = pick_device(args.device)
    if args.dtype is None and dtype == "float16" and device.type == "cpu":
        print("The inversion was made in float16, which runs tens of times slower on a CPU: loading the model in "
              "float32 (--dtype float16 keeps float16)", file=sys.stderr)
        dtype = None
    if args.cuda_graphs and (args.compile or device.type != "cuda"):
        raise DplEditError("--cuda-graphs needs a CUDA device and no --compile (torch.compile makes its own CUDA "
                           f"graphs); here the device is {device}{' and --compile was given' if args.compile else ''}")
    graphs = args.cuda_graphs if args.cuda_graphs is not None else cuda_graphs_by_default(device, args.compile)
    return {"device": device, "dtype": args.dtype or dtype or "float32", "compile": args.compile, "cuda_graphs": graphs}


def load(args: argparse.Namespace, name: str, variant: str | None = None, dtype: str | None = None) -> StableDiffusion:
    """The model ``name`` as the options say; ``variant`` and ``dtype`` (an inversion's) where ``--variant``
    and ``--dtype`` are not given."""
    variant = args.variant if args.variant is not None else variant
    options = load_options(args, dtype)
    with loading(args, name, options, variant):
        return load_model(name, variant=variant, **options)


@contextmanager
def loading(args: argparse.Namespace, name: str, options: dict, variant: str | None):
    """Around a model's load: what loads, and how, said first (unless --quiet); the collector kept out of it."""
    if not args.quiet:
        print(f"Loading model {name} on {described(options, variant)}", file=sys.stderr)
    with collector.loading():
        yield


def described(options: dict, variant: str | None) -> str:
    """``cpu (float32)``, ``cuda (bfloat16, its fp16 weights, with CUDA graphs)``: what ``load_options`` chose."""
    how = ", compiling its UNet" if options["compile"] else ", with CUDA graphs" if options["cuda_graphs"] else ""
    weights = f", its {variant} weights" if variant else ""
    return f"{options['device']} ({options['dtype']}{weights}{how})"


def load_for(args: argparse.Namespace, inversion: Inversion) -> StableDiffusion:
    """The model an inversion was made with (its weight files' variant too), unless --model names another, in
    the inversion's precision unless --dtype names another."""
    dtype = inversion.settings.get("dtype")
    if args.model:
        return load(args, args.model, dtype=dtype)
    try:
        return load(args, inversion.model_id, inversion.settings.get("variant"), dtype)
    except ModelLoadError as err:  # moved, deleted, or on another machine: say whose model it is
        raise ModelLoadError(f"The inversion was made with model {inversion.model_id!r}, which does not load "
                             f"here: give its folder or hub id with --model. ({err})") from err


def pairs(items: list[str], option: str, convert=float) -> dict:
    """``["cat=2.0", ...]`` as a dict; a DplEditError for a malformed item or a word named twice."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            value = convert(value)
        except ValueError:
            raise DplEditError(f"{option} takes WORD=VALUE, got {item!r}") from None
        if key.strip() in result:
            raise DplEditError(f"{option} names {key.strip()!r} twice; give each word once.")
        result[key.strip()] = value
    return result


def counted(number: int, noun: str) -> str:
    """``number`` of ``noun``, plural unless one: "1 sample", "2 samples"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


@contextmanager
def named_as_options(names: dict[str, str]):
    """The library's errors in this command's words: the settings a :class:`DplEditError`'s message
    opens with (``cross_replace_steps must be ...``, ``subtract, blend_start: ...``), as a config field
    or check names them in ``names``, are replaced by their options (``--cross-steps``), so the message
    names what the user typed. Only the opening is read: a prompt or path quoted later stays as it is."""
    name = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
    opening = re.compile(rf"(?:{name})(?:, (?:{name}))*(?=[ :])")
    try:
        yield
    except DplEditError as err:
        found = opening.match(str(err))
        if found is None:
            raise
        renamed = re.sub(name, lambda match: names[match.group(0)], found.group(0))
        raise type(err)(renamed + str(err)[found.end():]) from err
