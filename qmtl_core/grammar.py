"""The one grammar every text reader shares: numbers, timestamps, JSON, encodings, store integers.

A value must mean the same thing in a returns file, a metrics file, a bars file, a risk snapshot
and a command-line option, so each is defined once, here, and the readers only add the location
(file:line:column, the option name) to the message. The README's "Input grammar" table documents
what this module accepts; change both together.

- **Numbers:** ``[+-]digits[.digits][e[+-]digits]`` (also ``.5`` and ``5.``). No ``_`` separators
  (``1_0`` would read as 10), no ``,`` decimals, no ``%``, no hex, no ``inf``. Empty, ``nan``,
  ``na``, ``null`` and ``none`` (any case) mean "not measured" where a reader allows it.
- **Timestamps:** ``YYYY-MM-DD`` (midnight UTC) or ``YYYY-MM-DD[T ]HH:MM[:SS[.ffffff]]`` with ``Z``
  or ``±HH:MM`` (or the basic form ``YYYYMMDDTHHMM[SS[.ffffff]]`` with ``Z`` or ``±HHMM``); within
  years 0001-9999 once converted to UTC.
- **JSON:** RFC 8259 only: a key twice in one object, ``NaN`` and ``Infinity`` are refused.
- **Text:** UTF-8, with or without a leading byte-order mark.
- **Integers the store keeps:** 0 … 2³¹−1 (PostgreSQL ``INTEGER``).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "GrammarError",
    "MAX_STORE_INT",
    "NUMBER_PATTERN",
    "decode_text",
    "loads_json",
    "parse_number",
    "parse_timestamp",
]

#: The largest integer every store backend keeps in an ``INTEGER`` column.
MAX_STORE_INT = 2**31 - 1

NUMBER_PATTERN = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER = re.compile(NUMBER_PATTERN)
_MISSING = frozenset({"", "nan", "na", "null", "none"})
_TIMESTAMP = re.compile(
    # extended: 2026-01-31[T16:00[:00[.000000]]][Z|+05:30]
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?)?"
    # basic, only with a time (a bare 20260131 reads as a number): 20260131T160000[.000000][Z|+0530]
    r"|[0-9]{8}T[0-9]{4}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?(?:[Zz]|[+-][0-9]{4})?")
_BOM = "\ufeff"


class GrammarError(ValueError):
    """A value that does not fit the grammar; callers add where it was and raise their own error."""

    def __init__(self, message: str, hint: str | None = None, *, line: int | None = None,
                 column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.line = line
        self.column = column

    def at(self, where: str) -> str:
        """The message prefixed by ``where`` (and the line and column inside it, when known)."""
        if self.line is not None:
            return f"{where}:{self.line}:{self.column}: {self.message}"
        return f"{where}: {self.message}"


def parse_number(value: Any, *, missing_ok: bool = True) -> float:
    """A finite number from text or a JSON number; NaN for "not measured" when ``missing_ok``."""
    if isinstance(value, bool):
        raise GrammarError(f"{value!r} is not a number", "write a number such as 0.0125")
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise GrammarError("the number is too large", "numbers must be finite") from None
        if math.isnan(number) and missing_ok:
            return number
    else:
        raw = "" if value is None else str(value).strip()
        if raw.lower() in _MISSING:
            if missing_ok:
                return math.nan
            raise GrammarError("the value is missing" if not raw else f"{raw!r} is not a finite number",
                               "write a number such as 0.0125")
        if raw.lower().lstrip("+-") in ("inf", "infinity"):
            raise GrammarError("infinite value", "numbers must be finite")
        if _NUMBER.fullmatch(raw) is None:
            raise GrammarError(f"{raw!r} is not a number",
                               "write a plain decimal such as -0.0125 or 1.5e-3 (no _ , % or words)")
        number = float(raw)
    if not math.isfinite(number):
        raise GrammarError("infinite value" if math.isinf(number) else "NaN is not a number here",
                           "numbers must be finite")
    return number


def parse_timestamp(text: str, *, naive_utc: bool = False) -> datetime:
    """An aware UTC datetime from the timestamp grammar.

    A bare date names a day: midnight UTC. A date-time without a zone is refused unless
    ``naive_utc`` (return and metric files rarely carry one, bar and snapshot times must).
    """
    raw = text.strip() if isinstance(text, str) else ""
    if not isinstance(text, str) or _TIMESTAMP.fullmatch(raw) is None:
        raise GrammarError(f"{text!r} is not an ISO-8601 date or time",
                           "use e.g. 2026-01-31 or 2026-01-31T16:00:00Z")
    try:
        value = datetime.fromisoformat(raw[:-1] + "+00:00" if raw[-1] in "Zz" else raw)
    except ValueError:
        raise GrammarError(f"{text!r} is not a calendar date or time",
                           "check the month, day and hour") from None
    if value.tzinfo is None:
        if len(raw) != 10 and not naive_utc:
            raise GrammarError(f"{text!r} has no time zone", "add Z or an offset, e.g. 2026-01-31T00:00Z")
        value = value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first representable instant
        raise GrammarError(f"{text!r} is outside the calendar once converted to UTC",
                           "use a time between years 0001 and 9999 in UTC") from None


def decode_text(data: bytes) -> str:
    """UTF-8 text with an optional byte-order mark; ``UnicodeDecodeError`` for anything else."""
    text = data.decode("utf-8")
    return text[1:] if text.startswith(_BOM) else text


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise GrammarError(f"{name} is not valid JSON", "numbers must be finite; write null for "
                                                    "\"not measured\"")


def loads_json(text: str) -> Any:
    """A JSON document, refusing duplicate keys and ``NaN``/``Infinity`` (``GrammarError``)."""
    if text.startswith(_BOM):
        text = text[1:]
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise GrammarError(f"key {exc.args[0]!r} appears twice in one object",
                           "keep one of them: JSON readers disagree on which one counts") from None
    except json.JSONDecodeError as exc:
        raise GrammarError(f"not valid JSON ({exc.msg})", line=exc.lineno, column=exc.colno) from None
    except RecursionError:
        raise GrammarError("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer with more digits than Python converts
        if isinstance(exc, GrammarError):
            raise
        raise GrammarError(f"not valid JSON ({exc})") from None
