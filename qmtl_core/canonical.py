"""Canonical JSON and content hashes: the one way qmtl turns a document into bytes to hash."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import orjson


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


#: Maps every ASCII digit to ``0`` and every other byte to a space: a run of 19 zeros in the
#: translation is a run of 19 digits, the shortest integer token that may not fit in 64 bits.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_WIDE_RUN = b"0" * 19


def exact_json_loads(text: str | bytes) -> Any:
    """Decode JSON to exactly the values it spells, fast.

    orjson is several times faster than the standard library but reads an integer beyond 64 bits
    as a float (``12345678901234567890123`` becomes ``1.2345678901234568e+22``), so a hashed
    document would read back as another one. A text with 19 digits in a row (rare outside such an
    integer; the check costs less than a regular expression's scan) goes to ``json.loads``, and
    so do the non-standard tokens (NaN) orjson refuses.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _WIDE_RUN not in data.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)
