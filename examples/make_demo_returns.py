"""Write ``worlds/data/demo-returns.csv``: daily returns of a few simple rules on real GOOG prices.

The prices are the public GOOG daily bars the ``backtesting`` package ships (``worlds/data/GOOG.csv``).
Each rule decides its position on the close of day t-1 and earns day t's close-to-close return, so
nothing looks ahead; a position change costs ``COST_BPS``. One strategy starts late (its earlier
cells are empty: no history yet), one is short, so the demo shows passes, warnings and failures.
Run: .venv/bin/python examples/make_demo_returns.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COST_BPS = 3.0


def _sma(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full_like(x, np.nan)
    c = np.cumsum(np.insert(x, 0, 0.0))
    out[n - 1:] = (c[n:] - c[:-n]) / n
    return out


def _run(position: np.ndarray, ret: np.ndarray) -> np.ndarray:
    pos = np.nan_to_num(position, nan=0.0)
    held = np.concatenate([[0.0], pos[:-1]])  # decided at t-1's close, earns t's return
    changes = np.abs(np.diff(np.concatenate([[0.0], held])))
    return held * ret - changes * COST_BPS / 1e4


def main() -> None:
    rows = list(csv.DictReader((ROOT / "worlds/data/GOOG.csv").open()))
    dates = [r["timestamp"] for r in rows]
    close = np.array([float(r["close"]) for r in rows])
    ret = np.concatenate([[0.0], close[1:] / close[:-1] - 1.0])
    strategies = {
        "buy_hold": np.ones_like(close),
        "sma_10_30": (_sma(close, 10) > _sma(close, 30)).astype(float),
        "sma_20_100": (_sma(close, 20) > _sma(close, 100)).astype(float),
        "sma_20_100_fast": (_sma(close, 18) > _sma(close, 90)).astype(float),
        "momentum_60": (close / np.concatenate([np.full(60, np.nan), close[:-60]]) > 1.0).astype(float),
        "reversal_5": (close / np.concatenate([np.full(5, np.nan), close[:-5]]) < 1.0).astype(float),
        "short_hold": -np.ones_like(close),
    }
    series = {name: _run(pos, ret)[1:] for name, pos in strategies.items()}
    late = _run(strategies["sma_10_30"], ret)[1:].copy()
    late[: len(late) - 300] = np.nan  # joined the cohort 300 days before the end
    series["sma_10_30_late"] = late
    out = ROOT / "worlds/data/demo-returns.csv"
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["timestamp", *series])
        for i, day in enumerate(dates[1:]):
            writer.writerow([day, *("" if np.isnan(s[i]) else f"{s[i]:.10f}" for s in series.values())])
    print(f"wrote {out} ({len(dates) - 1} days, {len(series)} strategies)")


if __name__ == "__main__":
    main()
