"""Durations in policy files: ``<number><s|m|h|d>`` (``15m``, ``72h``, ``730d``, ``1.5h``).

They are held as ``timedelta`` and written back in the largest unit that divides them evenly, so
``model_dump`` round-trips and content hashes do not depend on how a value was spelled.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import lru_cache
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from qmtl_core.grammar import MAX_STORE_INT

DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$"
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RE = re.compile(DURATION_PATTERN)


class DurationError(ValueError):
    """A duration string that does not read as ``<number><s|m|h|d>``."""


def parse_duration(value: Any) -> timedelta:
    """Parse ``<number><s|m|h|d>`` into a ``timedelta``; anything else is a ``DurationError``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str):
        shown = repr(value)
        hint = f"; write {value}s, {value}m, {value}h or {value}d" if isinstance(value, (int, float)) \
            and not isinstance(value, bool) else ""
        raise DurationError(f"expected a duration like 15m, 72h or 30d, got {shown}{hint}")
    match = _RE.match(value)
    if match is None:
        raise DurationError(f"{value!r} is not a duration: use <number><s|m|h|d>, e.g. 15m, 72h, 30d")
    number, unit = match.groups()
    seconds = float(number) * _UNIT_SECONDS[unit]
    if seconds > MAX_STORE_INT:  # the store keeps durations (a decision's TTL) as INTEGER seconds
        raise DurationError(f"{value!r} is longer than {MAX_STORE_INT} seconds (about 68 years)")
    return timedelta(seconds=seconds)


@lru_cache(maxsize=256)  # a tick labels every strategy's window with the same few durations
def format_duration(value: timedelta) -> str:
    """The shortest exact spelling of ``value`` (``timedelta(hours=72)`` → ``3d``)."""
    total = value.total_seconds()
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if total and total % size == 0:
            return f"{int(total // size)}{unit}"
    return f"{int(total)}s" if total == int(total) else f"{total}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN,
                    "description": "<number><s|m|h|d>, e.g. 15m, 72h, 30d"}),
]
