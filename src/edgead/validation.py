"""Declared types and ranges for everything a user or a file can set, and one-line messages for them.

Head hyperparameters are checked by pydantic at construction (``@hyperparameters`` on ``__init__``),
run configs and exported files' metadata by :class:`edgead.runs.RunConfig`, command-line options by
:class:`edgead.training.FitSettings` and the CLI's ranges: each value is declared once, with its type
and range, and checked before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, ValidationError, validate_call

from edgead.errors import SizeError

F = TypeVar("F", bound=Callable[..., Any])

Ratio = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # (0, 1]
OpenRatio = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]  # (0, 1)
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

# Upper bounds of the size-like options: far above any useful value, so a typo or a hostile file
# (``hidden=1000000000000``) is a range error before anything is allocated. Bounds that depend on the
# image size and the backbone are checked by ``Head.check_sizes`` with :func:`check_memory`.
BatchSize = Annotated[int, Field(ge=1, le=1024)]  # images (or vectors) per optimisation/feature batch
Epochs = Annotated[int, Field(ge=1, le=10_000)]  # passes over the training set
Steps = Annotated[int, Field(ge=1, le=1_000_000)]  # optimiser steps
Views = Annotated[int, Field(ge=1, le=256)]  # cached augmented versions of each training image
Width = Annotated[int, Field(ge=1, le=1024)]  # base width of a small CNN (its layers use up to 4x)
Channels = Annotated[int, Field(ge=1, le=16_384)]  # feature, code or hidden channels of a head
BankSize = Annotated[int, Field(ge=1, le=1_000_000)]  # memory-bank entries / patches per chunk

# Settings whose float32 tensors (weights, optimiser state, one batch's activations) would need more
# than this are refused up front; larger machines are not what edgead is for, and an allocator error
# deep in training says nothing about which option to change.
MEMORY_LIMIT_GIB = 64


def check_memory(setting: str, nbytes: float, fix: str) -> None:
    """Raise SizeError naming ``setting`` when an estimate of the memory it needs exceeds the limit."""
    if nbytes > MEMORY_LIMIT_GIB * 2**30:
        raise SizeError(
            f"{setting} would need about {math.ceil(nbytes / 2**30):,} GiB of memory, more than the "
            f"{MEMORY_LIMIT_GIB} GiB limit; {fix}"
        )


def hyperparameters(init: F) -> F:
    """Validate a head's ``__init__`` arguments against their annotations (strict types, declared ranges)."""
    return validate_call(config=ConfigDict(strict=True, arbitrary_types_allowed=True))(init)


def describe(exc: ValidationError, limit: int = 3) -> str:
    """A pydantic error as one line: ``field: problem (got value)``, the first ``limit`` of them."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "value"
        got = error.get("input")
        shown = f" (got {got!r})" if error["type"] != "missing" and not isinstance(got, dict) else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "value_error":
            shown = ""  # our own validators name the value already
        parts.append(f"{where}: {message[0].lower()}{message[1:]}{shown}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
