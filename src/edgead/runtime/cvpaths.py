"""Paths that OpenCV can be given safely.

Linux file names are bytes and need not be UTF-8; Python keeps such bytes as surrogate escapes, and
OpenCV's path arguments crash on them (a segfault inside its image and video writers). edgead writes
images through ``cv2.imencode`` and a Python file write, and hands OpenCV's video reader and writer a
symlink or a temporary file with a plain name whenever the real name is not valid UTF-8.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np


def is_plain(path: str | os.PathLike) -> bool:
    """True when OpenCV can take ``path`` as it is (valid UTF-8)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """A file name fit for a terminal or a UTF-8 CSV: undecodable bytes shown as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if not is_plain(name) else name


def write_image(path: str | os.PathLike, bgr: np.ndarray) -> None:
    """Encode with OpenCV in memory, write with Python: any file name works."""
    suffix = Path(path).suffix or ".png"
    ok, data = cv2.imencode(suffix, bgr)
    if not ok:
        raise OSError(f"OpenCV cannot encode an image as {suffix}")
    Path(path).write_bytes(data.tobytes())


@contextmanager
def readable_by_opencv(path: Path) -> Iterator[str]:
    """``path`` itself, or a plain-named symlink to it while OpenCV opens it."""
    if is_plain(path):
        yield str(path)
        return
    folder = tempfile.mkdtemp(prefix="edgead-cv-")
    link = Path(folder) / f"input{path.suffix.encode('ascii', 'ignore').decode() or ''}"
    os.symlink(os.path.abspath(path), link)
    try:
        yield str(link)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class WritablePath:
    """Where OpenCV's video writer writes: ``path`` itself, or a temporary plain name moved there on finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._folder = None if is_plain(path) else tempfile.mkdtemp(prefix="edgead-cv-")
        self.opencv_path = str(path) if self._folder is None else str(Path(self._folder) / f"video{path.suffix}")

    def finish(self) -> None:
        if self._folder is not None:
            shutil.move(self.opencv_path, self.path)
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
