"""How timestamped returns and bars are spaced: the rate against ``periods_per_year``, and gaps.

Pure functions, shared by every path that annualises returns (offline ``evaluate``, recorded runs
from ``submit``, ``qmtl run``, ``world evaluate`` and the tick's snapshot returns) and by the
``qmtl run`` bar reader:

- **Rate.** Returns observed at more than ``SPACING_TOLERANCE`` times away from the policy's
  ``periods_per_year`` (counted as intervals per year over their span, so the weekends and
  holidays of a trading calendar do not count) are annualised wrongly: 156 weekly returns under
  252 give a Sharpe sqrt(252/52) = 2.2x too large. ``check_spacing`` warns, or refuses when the
  policy says ``validation.on_spacing_mismatch: fail``.
- **Gaps.** Two consecutive observations further apart than ``GAP_INTERVALS`` steps *and* than
  ``GAP_FLOOR`` (a long weekend, or a market closed for a few days, is not a gap) leave a hole:
  the return across it is one return over the whole hole. The step is the stream interval for
  bars, the median spacing for returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from qmtl_core.errors import BadInputError
from qmtl_core.policy import WorldPolicy, format_duration
from qmtl_core.timeutil import iso

__all__ = ["GAP_FLOOR", "GAP_INTERVALS", "SPACING_MIN_OBSERVATIONS", "SPACING_TOLERANCE", "Gap",
           "check_spacing", "find_gaps", "gap_limit", "return_warnings", "spacing_note"]

#: Returns observed more than this factor away from ``periods_per_year`` are annualised wrongly.
SPACING_TOLERANCE = 1.25
#: Fewer timestamps than this say too little about their spacing to warn about it.
SPACING_MIN_OBSERVATIONS = 20
#: A gap is more than this many steps (stream intervals, or the returns' median spacing) ...
GAP_INTERVALS = 10
#: ... and more than this, so that a long weekend or a few closed market days are never a gap.
GAP_FLOOR = timedelta(days=4)
_YEAR_SECONDS = 365.25 * 86_400


@dataclass(frozen=True)
class Gap:
    """Two consecutive observations further apart than ``gap_limit`` allows."""

    before: datetime
    after: datetime

    @property
    def length(self) -> timedelta:
        """How far apart the two observations are."""
        return self.after - self.before

    def to_dict(self) -> dict[str, str | float]:
        """JSON form."""
        return {"before": iso(self.before), "after": iso(self.after), "seconds": self.length.total_seconds()}


def gap_limit(step: timedelta) -> timedelta:
    """The longest spacing that is not a gap, for observations ``step`` apart."""
    return max(step * GAP_INTERVALS, GAP_FLOOR)


def find_gaps(timestamps: Sequence[datetime], step: timedelta) -> list[Gap]:
    """Every pair of consecutive (sorted) ``timestamps`` further apart than ``gap_limit(step)``."""
    limit = gap_limit(step)
    return [Gap(a, b) for a, b in zip(timestamps, timestamps[1:]) if b - a > limit]


def spacing_note(timestamps: Sequence[datetime], periods_per_year: float) -> str | None:
    """A warning when the timestamps' rate disagrees with ``periods_per_year`` (else ``None``)."""
    if len(timestamps) < SPACING_MIN_OBSERVATIONS:
        return None
    span = (timestamps[-1] - timestamps[0]).total_seconds() / _YEAR_SECONDS
    if span <= 0:
        return None
    observed = (len(timestamps) - 1) / span
    ratio = observed / periods_per_year
    if 1 / SPACING_TOLERANCE <= ratio <= SPACING_TOLERANCE:
        return None
    return (f"returns are spaced about {observed:.3g} per year but periods_per_year is "
            f"{periods_per_year:g}: annualised metrics (sharpe, annual_volatility, cagr) are off by "
            f"a factor of about {math.sqrt(1 / ratio):.2g} or more")


def check_spacing(policy: WorldPolicy, timestamps: Sequence[datetime]) -> list[str]:
    """The spacing warning as notes, or ``BadInputError`` (``spacing_mismatch``, exit 2) when the
    policy makes it an error."""
    note = spacing_note(timestamps, policy.periods_per_year)
    if note is None:
        return []
    if policy.validation.on_spacing_mismatch == "fail":
        raise BadInputError(note, hint="resample the returns to the policy's periods, or fix "
                                       "periods_per_year", code="spacing_mismatch")
    return [f"warning: {note}"]


def return_warnings(policy: WorldPolicy, timestamps: Sequence[datetime]) -> list[str]:
    """What a run measured on returns at ``timestamps`` says about them: the spacing warning
    (``check_spacing``, which may refuse) and each gap, where one return spans the whole hole."""
    notes = check_spacing(policy, timestamps)
    if len(timestamps) > 2:
        steps = sorted(b - a for a, b in zip(timestamps, timestamps[1:]))
        for gap in find_gaps(timestamps, steps[len(steps) // 2]):
            notes.append(f"warning: one return spans a gap of {format_duration(gap.length)} "
                         f"({iso(gap.before)[:19]}Z to {iso(gap.after)[:19]}Z)")
    return notes
