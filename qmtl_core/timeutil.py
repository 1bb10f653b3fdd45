"""Time helpers: aware UTC datetimes only, ISO-8601 parsing that refuses naive times."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone

from qmtl_core.errors import BadInputError
from qmtl_core.grammar import GrammarError, parse_timestamp


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def parse_instant(text: str, *, what: str = "time") -> datetime:
    """Parse a timestamp of the shared grammar (``qmtl_core.grammar``) that carries a time zone.

    A bare date (``2026-01-31``) is taken as midnight UTC, since it names a day, not a local time;
    a date-time without a zone, or one outside the calendar in UTC, is a ``BadInputError`` naming
    ``what`` (the option or field the value came from).
    """
    try:
        return parse_timestamp(text)
    except GrammarError as exc:
        raise BadInputError(f"{what}: {exc.message}", hint=exc.hint) from None


def parse_optional_instant(text: str | None) -> datetime | None:
    """``parse_instant`` for a stored time that may be absent (``None`` or empty)."""
    return parse_instant(text) if text else None


def iso(value: datetime) -> str:
    """Format an aware datetime as fixed-width ISO-8601 UTC (microseconds, ``Z``), sortable as text."""
    # Not strftime: its %Y does not pad years before 1000 on every platform.
    u = value.astimezone(timezone.utc)
    return (f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}."
            f"{u.microsecond:06d}Z")


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def human_duration(value: "timedelta | float") -> str:
    """A duration as people read it: the two largest units, rounded down (``17m 1s``, ``272d 8h``,
    ``45s``); never Python's ``0:17:01.328945``. Negative durations get a ``-`` sign."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    sign, rest = ("-", -seconds) if seconds < 0 else ("", seconds)
    rest = int(rest)
    parts = []
    for unit, size in _UNITS:
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
        if len(parts) == 2:
            break
    # "1d 0h" says no more than "1d"
    return sign + " ".join(p for i, p in enumerate(parts) if i == 0 or not p.startswith("0"))


#: How far ahead of the clock an observation (or a snapshot's ``as_of``) may be dated: clock skew
#: between the producer and qmtl. A world sets its own with ``risk.future_tolerance``.
DEFAULT_FUTURE_TOLERANCE = timedelta(minutes=5)


def refuse_future(stamps: Iterable[datetime], *, now: datetime, tolerance: timedelta,
                  where: Callable[[int], str], error: type[BadInputError] = BadInputError) -> None:
    """Refuse the first of ``stamps`` dated more than ``tolerance`` after ``now`` (exit 2), located by
    ``where(index)``. An observation from the future was not observed: counted, it would be invented
    evidence, and stored it would wedge what comes after it (a snapshot ranked by ``as_of``, bars
    that only append). Every reader of observations calls this one rule."""
    limit = now + tolerance
    for i, ts in enumerate(stamps):
        if ts > limit:
            raise error(f"{where(i)}: {iso(ts)[:19]}Z is {human_duration(ts - now)} in the future (observations "
                        f"may be dated at most {human_duration(tolerance)} ahead of the clock, for skew)",
                        hint="date each observation when it was made, in UTC, and check the producer's clock "
                             "(risk.future_tolerance sets the allowance)", code="observation_in_future")
