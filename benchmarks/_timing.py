"""Shared by the benchmark scripts (each puts this folder on ``sys.path`` by being run from it)."""

from __future__ import annotations

import time
from typing import Any


def timed(phases: dict[str, float], name: str, fn: Any) -> Any:
    """``fn``, adding the seconds each call takes to ``phases[name]`` (to split a measured run)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - t0
    return wrapper
