"""Building a ``WorldService`` for tests: a given store, the example worlds, a movable clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from qmtl_core.config import Settings
from qmtl_core.service import WorldService


class Clock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: Any) -> None:
        self.now += timedelta(**kw)


def make_service(store_url: str, worlds_dir: Path, home: Path, clock: Clock | None = None, *,
                 live: bool = True) -> WorldService:
    """A facade on the given store. ``live``: it acts with the caller's live intent (as with
    ``--allow-live``), which governance tests assume; tests of that intent pass ``live=False``."""
    settings = Settings(home=home, worlds_dir=worlds_dir, database_url=store_url)
    return WorldService(settings, clock=clock or Clock(), live_confirmed=live)


def daily(n: int, *, start: datetime | None = None, mean: float = 0.001, seed: int = 0) -> list[tuple[datetime, float]]:
    """``n`` daily returns from ``start`` (deterministic noise around ``mean``)."""
    import numpy as np

    t0 = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
    values = np.random.default_rng(seed).normal(mean, 0.01, n)
    return [(t0 + timedelta(days=i), float(v)) for i, v in enumerate(values)]
