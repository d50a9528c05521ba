"""The errors dpl-edit raises for bad input; each message says what was wrong and what to do.

The command line prints them without a traceback.
"""

import errno

INTERRUPTED = "interrupted; nothing was written for the step in progress"  # what a Ctrl-C leaves: this line, exit code 130


class DplEditError(Exception):
    """Base class of the errors meant for the user."""


class ModelLoadError(DplEditError):
    """A model could not be loaded."""


class PromptError(DplEditError, ValueError):
    """A prompt cannot be used with this model (too long, words not found, ...)."""


class ImageLoadError(DplEditError, ValueError):
    """An image file could not be read or used."""


class InversionFileError(DplEditError):
    """An inversion folder is missing, damaged, or was made with another model."""


class SettingError(DplEditError, ValueError):
    """A setting is out of its range, not finite, or a path of the wrong kind."""


def out_of_memory(err: Exception) -> str:
    """What to tell a user whose device ran out of memory (``torch.OutOfMemoryError``): not a bug,
    a setting to change."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"The device ran out of memory ({first}). Invert fewer images at once (dpl batch "
            "--batch-size), edit towards fewer targets at once, use half precision on a GPU (--dtype "
            "float16 or bfloat16), turn CUDA graphs off (--no-cuda-graphs: each capture keeps its own "
            "memory), or free the memory other processes hold on the device.")


# what the system says when it refuses a file for reasons of the machine, not of dpl-edit
_FULL, _ELSEWHERE = "free some space or write somewhere else", "write somewhere else"
_REFUSALS = {
    errno.ENOSPC: ("the disk is full", _FULL),
    errno.EDQUOT: ("the disk quota is used up", _FULL),
    errno.EROFS: ("the file system is read-only", _ELSEWHERE),
    errno.EACCES: ("this user may not use that place", _ELSEWHERE),
    errno.EPERM: ("this user may not use that place", _ELSEWHERE),
}


def system_refusal(err: OSError, setting: str) -> str | None:
    """What to tell a user whose system refused to write or read a file (a full disk, a read-only
    or forbidden place): not a bug, a place to change (``setting`` names where). None for any
    other OS error."""
    if err.errno not in _REFUSALS:
        return None
    reason, advice = _REFUSALS[err.errno]
    where = f" {err.filename}" if err.filename is not None else ""
    return (f"The system refused the file{where}: {reason} ({err.strerror}). To go on, {advice} "
            f"({setting}); what was written before stays as it was.")
