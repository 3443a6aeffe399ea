"""User-facing errors.

Anything a user can cause (a missing folder, a corrupt image, a run folder from another model)
raises an :class:`EdgeadError` subclass whose message says what was wrong and how to fix it.
The CLI prints that message as one line, without a traceback, and exits with 2 for a wrong option
value (:class:`UsageError`, as the parser does for its own usage errors) and 1 for everything else.
"""


class EdgeadError(Exception):
    """Base class for errors caused by input, configuration or environment, not by a bug."""


class DatasetError(EdgeadError):
    """A dataset folder is missing, empty or not in a supported layout."""


class ImageReadError(EdgeadError):
    """An image or mask file cannot be decoded."""


class WeightsError(EdgeadError):
    """Pretrained weights are unavailable, do not match their checksum, or do not fit the architecture."""


class RunFolderError(EdgeadError):
    """A saved run folder is missing, incomplete, or belongs to another model."""


class UsageError(EdgeadError):
    """An option or argument has a wrong value (exit code 2, like the CLI parser's own usage errors)."""


class SizeError(UsageError, ValueError):
    """A size-like option is too large for the image size or for memory (also a ValueError, as before)."""


class OutputError(EdgeadError):
    """An output path cannot be written, or writing it would replace something that is not ours."""


class NonFiniteError(EdgeadError):
    """A model produced NaN or infinite values: its results cannot be trusted (fail closed)."""
