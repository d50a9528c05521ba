"""The garbage collector in the ``dpl`` executable.

What a command imports and loads once (torch, diffusers, transformers, the model: some 400,000
objects) lives as long as the process, yet the collector's full passes walk all of it: about 1 s
of passes while a command starts on this project's 2-core CPU, and about 1 s more while the
interpreter exits. So the executable pauses the collector while it imports and loads, then
freezes what exists (``gc.freeze``: the collector stops walking those objects and frees none of
them early) and collects again; later passes walk only what the command makes. Only
:func:`dpl_edit.cli.console` turns this on: a process that imports the library or calls
:func:`dpl_edit.cli.main` keeps Python's collector as it is.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_on = False


def start() -> None:
    """Turn this on for the process (the executable's first step); the collector pauses until :func:`settle`."""
    global _on
    _on = True
    gc.disable()


def settle() -> None:
    """Freeze every object that exists and collect again (where :func:`start` turned this on)."""
    if _on:
        gc.freeze()
        gc.enable()


@contextmanager
def loading() -> Iterator[None]:
    """Around a model's load: the collector paused inside, what it made frozen after (where on)."""
    if _on:
        gc.disable()
    try:
        yield
    finally:
        settle()
