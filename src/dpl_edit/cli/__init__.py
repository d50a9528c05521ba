"""The ``dpl`` command line: the only part of the package that prints."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

from .. import __version__
from ..errors import INTERRUPTED, DplEditError, out_of_memory, system_refusal
from . import collector


class Command(NamedTuple):
    module: str  # the module under dpl_edit.cli that defines the command's arguments and runs it
    help: str  # its line in `dpl --help`


COMMANDS = {
    "demo": Command("demo", "DPL vs null-text inversion editing of a bundled scene (offline, about a minute on a CPU)"),
    "invert": Command("inversion", "invert an image into the model once, for reconstruction and editing"),
    "reconstruct": Command("inversion", "sample the image back from an inversion"),
    "edit": Command("inversion", "edit an inverted image towards target prompts (Prompt-to-Prompt)"),
    "run": Command("inversion", "invert an image and edit it in one go"),
    "attention": Command("analysis", "draw the attention maps of an inversion as PNG grids"),
    "localisation": Command("analysis", "IoU of words' attention maps with ground-truth masks, against the threshold"),
    "train-scenes": Command("scenes", "train the scene model (VAE, then UNet + text encoder) from rendered scenes"),
    "check-scenes": Command("scenes", "quality table of a scene model: caption following, reconstruction, localisation"),
    "serve": Command("serve", "a web page to invert once and edit many times, with the attention views"),
    "batch": Command("batch", "invert and edit every item of a PIE-Bench folder with several methods (resumable; "
                     "several processes)"),
    "metrics": Command("batch", "PIE-Bench's metrics of a batch folder, methods side by side"),
    "scenes": Command("batch", "the scene world as a dataset: `dpl scenes export DIR`"),
}


def console() -> int:
    """The ``dpl`` executable (and ``python -m dpl_edit.cli``): :func:`main` with what its start-up
    imports and loads kept out of the garbage collector's passes (:mod:`.collector`), and a SIGTERM
    taken as a Ctrl-C (:func:`terminate_as_interrupt`)."""
    terminate_as_interrupt()
    collector.start()
    try:
        return main()
    finally:
        collector.settle()  # the interpreter's exit then skips walking every object (about 1 s)


def terminate_as_interrupt() -> None:
    """A SIGTERM (``kill``, a batch system's stop, ``dpl batch --processes`` stopping its workers) ends the
    process as a Ctrl-C does: the step in progress is dropped, what is written stays, a training run
    saves its checkpoint, a batch parent stops its workers, and one ``interrupted`` line. Left alone where
    the process was started with SIGTERM ignored, as Python leaves an ignored SIGINT."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the command's name first, from a parser that imports no command module (so `dpl --help`,
    # `--version` and a missing or unknown command answer without loading torch), then its arguments
    command = build_parser().parse_known_args(argv)[0].command
    try:
        parser = build_parser(command)  # imports the command's module, and with it torch
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser, with its usage (the top parser shows only `dpl COMMAND`)
            parser.commands.choices[command].error(f"unrecognized arguments: {' '.join(unknown)}")
        import torch  # every command needs it; after the arguments, so a bad one is answered at once
    except KeyboardInterrupt:  # while importing: nothing has started
        print(INTERRUPTED, file=sys.stderr)
        return 130
    collector.settle()  # the command's module and torch are imported
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.seed is not None and command != "train-scenes":
        torch.manual_seed(args.seed)
    try:
        return args.run(args)
    except DplEditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as err:
        print(f"error: {out_of_memory(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 (a bug: one line here, the traceback in a log file)
        if isinstance(err, OSError) and (refusal := system_refusal(err, "--out")):  # the machine, not a bug
            print(f"error: {refusal}", file=sys.stderr)
            return 1
        log = Path(tempfile.gettempdir()) / f"dpl-edit-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text("".join(traceback.format_exception(err)))
        print(f"error: unexpected {type(err).__name__} ({err}); this is a bug in dpl-edit, please report it "
              f"with the traceback written to {log}", file=sys.stderr)
        return 1


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``dpl`` parser with ``command``'s arguments (and those of its module's other commands);
    every other command is its name and help line alone."""
    parser = argparse.ArgumentParser(
        prog="dpl",
        description="Text-based editing of real images with diffusion models (Dynamic Prompt Learning).",
    )
    parser.add_argument("--version", action="version", version=f"dpl-edit {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    parser.commands = commands
    defined = COMMANDS[command].module if command else None
    first = next((name for name, each in COMMANDS.items() if each.module == defined), None)
    for name, (module, line) in COMMANDS.items():
        if module != defined:
            commands.add_parser(name, help=line, add_help=False)
        elif name == first:  # the module defines all its commands at its first one's place
            importlib.import_module(f".{module}", __name__).register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(console())
