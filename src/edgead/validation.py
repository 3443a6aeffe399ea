"""Declared types and ranges for everything a user or a file can set, and one-line messages for them.

Head hyperparameters are checked by pydantic at construction (``@hyperparameters`` on ``__init__``),
run configs and exported files' metadata by :class:`edgead.runs.RunConfig`, command-line options by
:class:`edgead.training.FitSettings` and the CLI's ranges: each value is declared once, with its type
and range, and checked before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, ValidationError, validate_call

F = TypeVar("F", bound=Callable[..., Any])

Ratio = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # (0, 1]
OpenRatio = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]  # (0, 1)
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


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
