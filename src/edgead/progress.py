"""Progress bars for anything over a second, shown only on a terminal (logs stay clean)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    # disable=None lets tqdm hide the bar when stderr is not a terminal.
    return tqdm(iterable, desc=desc, total=total, disable=None if enabled else True, leave=False)
