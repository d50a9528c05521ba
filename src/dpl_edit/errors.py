"""The errors dpl-edit raises for bad input; each message says what was wrong and what to do.

The command line prints them without a traceback.
"""


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
