"""Backtest throughput: qmtl's engine against the `backtesting` package on the same SMA crossover.

Runs (1) the real GOOG daily bars bundled in worlds/data (2004-08..2013-03, ~8.5 years), (2) ten
years of synthetic daily bars and (3) 1,000,000 synthetic minute bars. For each it prints bars/s
for both engines, the ratio, and whether the round-trip trades (entry/exit bar, price, side) are
identical. The reference engine takes ~8 s for a million bars here, so by default it runs on all
of them; ``--ref-cap N`` limits it to the first N bars (rates stay per bar, and the trades are then
compared on that same subset), which the output says when it happens.

    .venv/bin/python benchmarks/backtest.py [--bars 1000000] [--ref-cap N] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qmtl_core.sdk import Bars, load_bars, run_backtest  # noqa: E402

FAST, SLOW = 10, 20
Trades = list[tuple[int, int, float, float, bool]]


def load_sma() -> Any:
    path = ROOT / "examples/strategies/sma_crossover.py"
    spec = importlib.util.spec_from_file_location("bench_sma_crossover", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.SmaCrossover


def synthetic(n: int, step: str, seed: int = 7) -> Bars:
    """A geometric random walk with consistent OHLC, ``step`` apart."""
    rng = np.random.default_rng(seed)
    vol = 0.015 if step == "D" else 0.0006
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, vol, n)))
    open_ = np.concatenate(([100.0], close[:-1])) * np.exp(rng.normal(0.0, vol / 4, n))
    wiggle = np.abs(rng.normal(0.0, vol / 2, n))
    start = np.datetime64("2014-01-01T00:00", "ns")
    unit = np.timedelta64(1, "D") if step == "D" else np.timedelta64(1, "m")
    return Bars.from_columns({
        "timestamp": start + np.arange(n) * unit, "open": open_, "close": close,
        "high": np.maximum(open_, close) * (1 + wiggle), "low": np.minimum(open_, close) * (1 - wiggle),
        "volume": rng.integers(1_000, 100_000, n).astype(float)})


def to_frame(bars: Bars) -> pd.DataFrame:
    return pd.DataFrame({"Open": bars.open, "High": bars.high, "Low": bars.low, "Close": bars.close,
                         "Volume": bars.volume}, index=pd.DatetimeIndex(bars.timestamp))


def reference(frame: pd.DataFrame) -> tuple[float, Trades]:
    """Seconds and trades of the `backtesting` package's canonical SmaCross on ``frame``."""
    from backtesting import Backtest, Strategy
    from backtesting.lib import crossover

    def sma(values: Any, n: int) -> Any:
        return pd.Series(values).rolling(n).mean()

    class SmaCross(Strategy):
        def init(self) -> None:
            self.sma1 = self.I(sma, self.data.Close, FAST)
            self.sma2 = self.I(sma, self.data.Close, SLOW)

        def next(self) -> None:
            if crossover(self.sma1, self.sma2):
                self.position.close()
                self.buy()
            elif crossover(self.sma2, self.sma1):
                self.position.close()
                self.sell()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = Backtest(frame, SmaCross, cash=1e9, commission=0, trade_on_close=False,
                      exclusive_orders=False)
        t0 = time.perf_counter()
        stats = bt.run()
        elapsed = time.perf_counter() - t0
    t = stats._trades
    trades = [(int(a), int(b), float(c), float(d), bool(s > 0))
              for a, b, c, d, s in zip(t.EntryBar, t.ExitBar, t.EntryPrice, t.ExitPrice, t.Size)]
    return elapsed, trades


def ours(strategy_cls: Any, bars: Bars) -> tuple[float, Trades]:
    spacing = bars.timestamp[1] - bars.timestamp[0] if len(bars) > 1 else np.timedelta64(1, "D")
    interval = "1d" if spacing >= np.timedelta64(1, "D") else "1m"
    t0 = time.perf_counter()
    res = run_backtest(strategy_cls(fast=FAST, slow=SLOW, interval=interval), bars)
    elapsed = time.perf_counter() - t0
    return elapsed, [(t.entry_bar, t.exit_bar or -1, t.entry_price, t.exit_price or 0.0, t.is_long)
                     for t in res.trades]


def best_of(fn: Any, repeat: int) -> tuple[float, Trades]:
    runs = [fn() for _ in range(repeat)]
    return min(r[0] for r in runs), runs[0][1]


def case(name: str, strategy_cls: Any, bars: Bars, ref_bars: Bars, repeat: int) -> dict[str, Any]:
    q_sec, q_trades = best_of(lambda: ours(strategy_cls, bars), repeat)
    r_sec, r_trades = best_of(lambda: reference(to_frame(ref_bars)), repeat)
    if len(ref_bars) == len(bars):
        same_data_trades = q_trades
    else:
        same_data_trades = ours(strategy_cls, ref_bars)[1]
    q_rate, r_rate = len(bars) / q_sec, len(ref_bars) / r_sec
    return {"case": name, "bars": len(bars), "qmtl_seconds": round(q_sec, 4),
            "qmtl_bars_per_s": round(q_rate), "reference_bars": len(ref_bars),
            "reference_seconds": round(r_sec, 4), "reference_bars_per_s": round(r_rate),
            "ratio": round(q_rate / r_rate, 2), "trades": len(same_data_trades),
            "trades_identical": same_data_trades == r_trades}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bars", type=int, default=1_000_000, help="synthetic minute bars")
    ap.add_argument("--ref-cap", type=int, default=0,
                    help="run the reference engine on only the first N minute bars (0: all)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N for the daily cases")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()

    strategy_cls = load_sma()
    goog = load_bars(ROOT / "worlds/data/GOOG.csv")
    daily = synthetic(2520, "D")
    minute = synthetic(args.bars, "m")
    capped = minute.slice(0, args.ref_cap) if 0 < args.ref_cap < len(minute) else minute
    results = [
        case("GOOG daily (real, 8.5y)", strategy_cls, goog, goog, args.repeat),
        case("synthetic daily (10y)", strategy_cls, daily, daily, args.repeat),
        case(f"synthetic minute ({len(minute):,})", strategy_cls, minute, capped, 1),
    ]
    if args.json:
        print(json.dumps({"strategy": f"SmaCrossover(fast={FAST}, slow={SLOW})", "results": results},
                         indent=2))
        return 0
    print(f"SMA crossover {FAST}/{SLOW}, long/short, zero costs; rates are bars per second")
    for r in results:
        ref_note = "" if r["reference_bars"] == r["bars"] else f" (reference on first {r['reference_bars']:,} bars)"
        print(f"- {r['case']}: qmtl {r['qmtl_bars_per_s']:,}/s, backtesting {r['reference_bars_per_s']:,}/s"
              f"{ref_note}, ratio {r['ratio']}x; {r['trades']} trades, identical: {r['trades_identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
