"""Output paths checked before any work, and writes that never leave half a result.

Every command that writes checks its outputs first (:func:`check_output_dir`, :func:`check_output_file`),
so a bad ``--out`` fails in a second rather than after an hour of fitting; then it writes through
:func:`atomic_dir` or :func:`atomic_write_bytes`: into a temporary sibling, renamed into place only once
complete, so a crash, a full disk or Ctrl-C leaves the previous result (or nothing), never a mix.

A folder is replaced only when it is empty or holds edgead's own output of the same kind (its marker
file: ``config.json`` for a run, ``metrics.json`` for a test report...); a run folder only with
``force``. A folder holding anything else is never replaced, whatever the flags say.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from edgead.errors import OutputError, UsageError


def as_output_path(value: str | os.PathLike | None, option: str = "--out") -> Path:
    """A path from an option's raw text; an empty string is a usage error, not the current folder."""
    if value is None or not str(value).strip():
        raise UsageError(f"{option} is empty: give a path to write to")
    return Path(value)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_writable_parent(path: Path, option: str = "--out") -> None:
    """The folder that ``path`` would be created in exists as a folder (or can be made) and takes files."""
    anchor = _nearest_existing(path.parent if path.name else path)
    if not anchor.is_dir():
        raise OutputError(f"{option} {path}: {anchor} is a file, so no folder can be made under it")
    try:
        handle, probe = tempfile.mkstemp(prefix=".edgead-write-check-", dir=anchor)
    except OSError as exc:
        raise OutputError(
            f"{option} {path}: cannot write in {anchor} ({exc.strerror or exc}); choose a writable place"
        ) from None
    os.close(handle)
    os.unlink(probe)


def check_output_dir(
    path: str | os.PathLike, marker: str, force: bool = False, option: str = "--out", kind: str = "output"
) -> Path:
    """Check, before any work, that ``path`` can become the output folder.

    ``marker`` names the file that identifies edgead's own output of this kind. Without ``force``, an
    existing folder holding that marker is refused only when ``kind`` is ``"run"`` (a fitted model is
    never replaced silently); reports and predictions of the same kind are replaced. A non-empty folder
    without the marker is always refused.
    """
    path = as_output_path(path, option)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} exists and is a file, not a folder: choose a folder path")
    if path.is_dir():
        try:
            entries = [p for p in path.iterdir() if not p.name.startswith(".edgead-")]
        except OSError as exc:
            raise OutputError(f"{option} {path} cannot be read ({exc.strerror or exc})") from None
        if entries and not (path / marker).is_file():
            raise OutputError(
                f"{option} {path} already holds other files (it is not an edgead {kind} folder): "
                "choose a new or empty folder"
            )
        if entries and kind == "run" and not force:
            raise OutputError(
                f"{option} {path} already holds a fitted run: pass --force to replace it (its export/ and "
                "test/ folders go too), or choose another folder"
            )
    check_writable_parent(path, option)
    return path


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] = (), option: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written as a file."""
    path = as_output_path(path, option)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder: give a file name, e.g. {path / ('report' + (suffixes or ('.md',))[0])}")
    if suffixes and path.suffix not in suffixes:
        raise UsageError(f"{option} {path} should end in {' or '.join(suffixes)}")
    check_writable_parent(path, option)
    return path


def check_outside(path: str | os.PathLike, folder: str | os.PathLike, option: str, what: str) -> None:
    """Refuse an output inside an input folder: its images would be read as input by the next run."""
    out, inside = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if out == inside or inside in out.parents:
        raise OutputError(
            f"{option} {path} lies inside {what} {folder}: the images written there would be read as input next "
            "time; choose a folder outside it"
        )


def check_work_dir(path: str | os.PathLike, option: str) -> Path:
    """A folder that edgead fills with its own files (e.g. --runs-dir): not a file, and writable."""
    path = as_output_path(path, option)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} exists and is a file, not a folder: choose a folder path")
    check_writable_parent(path / "probe", option)
    return path


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final``, on failure it is removed.

    Callers check ``final`` with :func:`check_output_dir` first: whatever is there is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".edgead-{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    mode = 0o777 & ~_umask()
    os.chmod(temporary, mode)
    if final.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".edgead-{final.name}.", suffix=".old", dir=final.parent))
        os.rename(final, old / "previous")
        os.rename(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temporary, final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, then rename it over ``path`` (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".edgead-{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path for a writer that wants a file name (a plot, an ONNX file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".edgead-{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent
    )
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def default_file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (some writers, e.g. safetensors, use 0600)."""
    return 0o666 & ~_umask()


def write_records_csv(
    path: str | Path,
    record_type: type,
    records: Sequence[Any],
    text_fields: Sequence[str] = ("name",),
    ms_fields: Sequence[str] = (),
) -> Path:
    """Dataclass records as a CSV file, one column per field of ``record_type``, written atomically: the
    ``text_fields`` (file names, paths) made printable whatever bytes they hold, ``ms_fields`` rounded."""
    from edgead.runtime.cvpaths import printable

    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(record_type)])
    writer.writeheader()
    for record in records:
        row = asdict(record)
        for key in text_fields:
            if row[key] is not None:
                row[key] = printable(str(row[key]))
        for key in ms_fields:
            if row[key] is not None:
                row[key] = round(row[key], 3)
        writer.writerow(row)
    return atomic_write_text(path, handle.getvalue())
