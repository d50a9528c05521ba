"""`dpl serve`: the web page (Gradio), on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

from .. import checks
from ..errors import DplEditError
from . import COMMANDS
from .common import add_model_options, load_options, loading


def register(commands) -> None:
    p = commands.add_parser(
        "serve",
        help=COMMANDS["serve"].help,
        description="Start a Gradio page: pick a scene or upload an image, invert it (DPL, NTI, NPI or direct), "
        "edit it with Prompt-to-Prompt as often as you like, and look at each word's attention. Inversions are "
        "cached on disk (by image, prompt, model and settings), so editing never inverts again.",
    )
    add_model_options(p, "scenes")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--steps", type=int, default=50, help="the page's default number of steps (default: 50)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dpl-edit-serve",
                   help="folder for cached inversions and downloads (default: dpl-edit-serve in the temp folder)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (off by default)")
    p.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    checks.count("--port", args.port)
    checks.count("--steps", args.steps)
    checks.output_folder("--cache", args.cache)
    if args.port > 65535:
        raise DplEditError(f"--port must be at most 65535, got {args.port}")
    options = load_options(args)
    _check_address(args.host, args.port)
    try:
        from ..web.app import serve
        from ..web.workbench import Workbench
    except ImportError as err:
        raise DplEditError(f"dpl serve needs Gradio ({err}); install it with: pip install 'dpl-edit[web]'") from err
    workbench = Workbench(args.cache, model_name=args.model, variant=args.variant, **options)
    with loading(args, args.model, options, args.variant):
        workbench.model()  # a model that cannot be loaded (offline, say) fails here, before the page starts
    print(f"dpl serve: model {args.model}, cache {args.cache}; open http://{args.host}:{args.port}", file=sys.stderr)
    serve(workbench, host=args.host, port=args.port, share=args.share, default_steps=args.steps)
    return 0


def _check_address(host: str, port: int) -> None:
    """The page can listen on ``host:port``: said before the model loads, not as Gradio's error after."""
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as err:
        raise DplEditError(f"--host {host!r} is no name or address to listen on ({err.strerror}); the default, "
                           "127.0.0.1, is this machine only, 0.0.0.0 every network it is on.") from err
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise DplEditError(f"Cannot listen on {host}:{port} ({reason}): another program may be using the port; "
                           "give another with --port.") from err
