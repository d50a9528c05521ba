"""Checks of settings where they enter the library (config dataclasses and entry functions), so
the command line, the Python API and any other front end give the same message for a bad value.

Each raises :class:`SettingError` saying which setting, what it got and what it takes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from .errors import SettingError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # a model's precisions


def finite(name: str, value: float, low: float = -math.inf, high: float = math.inf, *, above: bool = False) -> None:
    """A finite number in [low, high] (in (low, high] with ``above``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {value}")
    if value < low or (above and value == low) or value > high:
        low_bracket = "(" if above else "["
        raise SettingError(f"{name} must be in {low_bracket}{low:g}, {high:g}], got {value:g}")


def fraction(name: str, value: float) -> None:
    """A number in [0, 1]."""
    finite(name, value, 0.0, 1.0)


def count(name: str, value: int, low: int = 1) -> None:
    """An integer of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise SettingError(f"{name} must be at least {low}, got {value}")


def settings(name: str, kind: type, value, base=None):
    """A settings argument as a ``kind`` (a config dataclass): the instance itself; a dict of its
    fields, applied over ``base`` (its defaults where None); None for ``base``. Anything else, or a
    dict naming a field ``kind`` lacks, is a SettingError naming ``name``."""
    base = kind() if base is None else base
    if value is None:
        return base
    if isinstance(value, kind):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(map(str, set(value) - known))
        if unknown:
            raise SettingError(f"{name} has no setting {', '.join(unknown)}; {kind.__name__} takes {', '.join(sorted(known))}")
        return dataclasses.replace(base, **value)
    raise SettingError(f"{name} must be {kind.__name__}(...) or a dict of its settings, got {type(value).__name__}")


def dtype(name: str, value: torch.dtype | str) -> torch.dtype:
    """A model precision: ``torch.float32``, ``float16`` or ``bfloat16``, or its name."""
    chosen = DTYPES.get(value) if isinstance(value, str) else value
    if not isinstance(chosen, torch.dtype) or chosen not in DTYPES.values():
        raise SettingError(f"{name} must be float32, float16 or bfloat16 (a torch.dtype or its name), got {value!r}")
    return chosen


def dtype_name(value: torch.dtype) -> str:
    """A precision's name as ``--dtype`` and :func:`dtype` take it: ``"bfloat16"``."""
    return str(value).removeprefix("torch.")


def device(name: str, value: torch.device | str) -> torch.device:
    """A device this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    try:
        chosen = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise SettingError(f"Unknown {name} {value!r}; use cpu, cuda, cuda:N or mps") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"{name} {value!r} was asked for but this torch build sees no CUDA GPU; use cpu")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise SettingError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"{name} {value!r} was asked for but this machine has no MPS device; use cpu")
    return chosen


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what an image may be written as
PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # what a plot may be written as


def output_folder(name: str, path: str | os.PathLike) -> Path:
    """A folder to write into: it may exist as a folder or not yet, never be a file, and can be made
    (the nearest part of its path that exists is a folder this process may write in)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SettingError(f"{name} {path} is a file; give a folder (it is created if missing).")
    _writable(name, path, path)
    return path


def output_file(name: str, path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    """A file to write: not an existing folder, named with one of ``suffixes`` (its format), and in
    a folder that exists and may be written in."""
    path = Path(path)
    if path.is_dir():
        raise SettingError(f"{name} {path} is a folder; give a file name such as {path / ('image' + suffixes[0])}.")
    if path.suffix.lower() not in suffixes:
        raise SettingError(f"{name} {path}: the file name must end in {', '.join(suffixes)} (its format).")
    if not path.parent.exists():
        raise SettingError(f"{name}: the folder {path.parent} does not exist; create it first.")
    _writable(name, path, path.parent)
    return path


def _writable(name: str, path: Path, folder: Path) -> None:
    """The nearest part of ``folder`` (where ``path`` is written) that exists is a folder this
    process may write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError(f"{name} {path} cannot be written: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingError(f"{name} {path}: this user may not write in {existing}; give another place.")
