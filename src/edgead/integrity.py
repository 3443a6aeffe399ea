"""One integrity rule for everything that decides: a sealed manifest per run folder and per exported file.

A run's config.json and an exported file's metadata hold what turns scores into decisions (threshold,
normalisation, preprocessing, the source run's identity) beside the hash of the weights or graph. Each
such record carries a *seal*: the sha256 of all its other fields, canonically serialised. Readers check
the fields' types first (so a malformed value is named), then the seal: an edited threshold, a deleted or
nulled hash, or a record pasted from another file is an error, never a pass.

The seal detects edits and damage, not a deliberate forger who recomputes it (nothing here is secret):
files that must prove where they came from need a signature on top.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgead.errors import EdgeadError


class IntegrityError(EdgeadError):
    """A decision-carrying record was changed after edgead wrote it, or lacks a hash it must have."""


def canonical_sha256(fields: Mapping[str, Any]) -> str:
    """sha256 of ``fields`` as canonical JSON (sorted keys, no spaces, no NaN): equal data, equal hash."""
    try:
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError:
        raise IntegrityError("a non-finite number cannot be sealed: the record is broken") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(fields: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``fields`` with ``key`` set to the seal of all the others."""
    unsealed = {name: value for name, value in fields.items() if name != key}
    return {**unsealed, key: canonical_sha256(unsealed)}


def check_seal(fields: Mapping[str, Any], key: str, source: Path | str, remedy: str) -> None:
    """Raise :class:`IntegrityError` unless ``fields[key]`` is the seal of the other fields."""
    recorded = fields.get(key)
    if not isinstance(recorded, str) or not recorded:
        raise IntegrityError(
            f"{source} has no {key} (missing or null): edgead cannot tell whether its threshold, settings "
            f"or hashes were changed, so it is refused; {remedy}"
        )
    expected = canonical_sha256({name: value for name, value in fields.items() if name != key})
    if recorded != expected:
        raise IntegrityError(
            f"{source} was edited or damaged after edgead wrote it: its fields do not match its {key} "
            f"(a changed threshold, setting or hash); {remedy}"
        )


def require_hash(fields: Mapping[str, Any], key: str, source: Path | str, remedy: str) -> str:
    """The hex sha256 stored under ``key``; a missing or null one is an error, never a skipped check."""
    value = fields.get(key)
    if not isinstance(value, str) or len(value) != 64:
        raise IntegrityError(f"{source} has no valid {key}: it cannot be checked, so it is refused; {remedy}")
    return value
