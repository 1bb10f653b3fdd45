"""Canonical JSON and content hashes: the one way qmtl turns a document into bytes to hash."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def _reject_non_finite(value: Any) -> Any:
    # JSON has no NaN/Infinity; a hash over a non-standard token would not be reproducible elsewhere.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"cannot hash non-finite number {value!r}")
    return value


def canonical_json(document: Any) -> str:
    """Serialise ``document`` deterministically: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_default)


def _default(value: Any) -> Any:
    # datetimes and other rich values are hashed by their ISO/string form.
    iso = getattr(value, "isoformat", None)
    if iso is not None:
        return iso()
    raise TypeError(f"cannot serialise {type(value).__name__} to canonical JSON")


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(document: Any) -> str:
    """Hex SHA-256 of the canonical JSON form of ``document``."""
    return sha256_hex(canonical_json(document))
