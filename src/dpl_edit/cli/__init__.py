"""The ``dpl`` command line: the only part of the package that prints."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .. import __version__
from ..errors import DplEditError, out_of_memory
from . import analysis, batch, demo, inversion, scenes, serve


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.seed is not None and args.run is not scenes.train_scenes:
        torch.manual_seed(args.seed)
    try:
        return args.run(args)
    except DplEditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written for the step in progress", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as err:
        print(f"error: {out_of_memory(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 (a bug: one line here, the traceback in a log file)
        log = Path(tempfile.gettempdir()) / f"dpl-edit-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text("".join(traceback.format_exception(err)))
        print(f"error: unexpected {type(err).__name__} ({err}); this is a bug in dpl-edit, please report it "
              f"with the traceback written to {log}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpl",
        description="Text-based editing of real images with diffusion models (Dynamic Prompt Learning).",
    )
    parser.add_argument("--version", action="version", version=f"dpl-edit {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for module in (demo, inversion, analysis, scenes, serve, batch):
        module.register(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
