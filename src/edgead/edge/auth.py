"""The API key shared by the scoring server and its edge clients: read from a file, never from the command line
(where other users could see it in the process list)."""

from __future__ import annotations

from pathlib import Path

from edgead.errors import UsageError

API_KEY_HEADER = "X-API-Key"
MIN_KEY_LENGTH = 16


def read_api_key(path: str | Path | None) -> str | None:
    """The key from its file (surrounding whitespace dropped); None without a file."""
    if path is None:
        return None
    path = Path(path)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--api-key-file {path} cannot be read ({exc}): give a text file holding the key") from None
    if len(key) < MIN_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise UsageError(
            f"--api-key-file {path} must hold one key of at least {MIN_KEY_LENGTH} printable ASCII characters"
        )
    return key
