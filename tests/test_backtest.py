"""Backtest engine: next-bar-open fills, cost arithmetic, no look-ahead, bar loading errors, and the
SMA crossover on real GOOG daily bars trading exactly like the `backtesting` package."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from qmtl_core.errors import BadInputError, DataFileError
from qmtl_core.sdk import (
    Bars,
    Node,
    StreamInput,
    Strategy,
    TradeOrderPublisherNode,
    View,
    load_bars,
    run_backtest,
)

ROOT = Path(__file__).resolve().parent.parent
GOOG_CSV = ROOT / "worlds/data/GOOG.csv"


def load_example(name: str) -> types.ModuleType:
    path = ROOT / "examples/strategies" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SMA = load_example("sma_crossover")
MR = load_example("mean_reversion")

OPENS = [100.0, 102.0, 104.0, 103.0, 105.0]
CLOSES = [101.0, 103.0, 102.0, 104.0, 106.0]


def five_bars() -> Bars:
    return Bars.from_columns({
        "timestamp": np.array(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"],
                              dtype="datetime64[ns]"),
        "open": OPENS, "close": CLOSES,
        "high": [max(o, c) + 1 for o, c in zip(OPENS, CLOSES)],
        "low": [min(o, c) - 1 for o, c in zip(OPENS, CLOSES)],
        "volume": [1000.0] * 5})


class Scripted(Strategy):
    """Emits a scripted signal keyed by the bar's close."""

    defaults: ClassVar[dict[str, Any]] = {"script": {}}

    def setup(self) -> None:
        self.price = StreamInput(name="price", interval="1d")
        sig = Node(self.price, self.emit, name="scripted", period=1)
        self.add_nodes(self.price, sig, TradeOrderPublisherNode(sig))

    def emit(self, view: View) -> Any:
        return self.params["script"].get(float(view[self.price].close[-1]))


# --- fills and costs ------------------------------------------------------------------------------
def test_orders_fill_at_the_next_bars_open() -> None:
    res = run_backtest(Scripted(script={101.0: 1.0, 102.0: 0.0}), five_bars())
    assert [(f.bar, f.price) for f in res.fills] == [(1, 102.0), (3, 103.0)]
    (trade,) = res.trades
    assert (trade.entry_bar, trade.entry_price, trade.exit_bar, trade.exit_price) == (1, 102.0, 3, 103.0)
    assert trade.entry_time.isoformat() == "2024-01-02T00:00:00+00:00"
    assert res.positions[0] == 0 and res.positions[1] == pytest.approx(1 / 102.0)
    assert res.returns[0] == 0.0
    assert res.returns[1] == pytest.approx(103.0 / 102.0 - 1)  # bought at the open, marked at the close


def test_fee_and_slippage_arithmetic_by_hand() -> None:
    res = run_backtest(Scripted(script={101.0: 1.0, 102.0: 0.0}), five_bars(),
                       fee_bps=10.0, slippage_bps=20.0, initial_cash=1000.0)
    units = 1000.0 / 102.0                # target 100% of equity at bar 1's open
    p1 = 102.0 * 1.002                    # buying pays 20 bps above the open
    fee1 = units * p1 * 0.001             # 10 bps of the notional
    cash1 = 1000.0 - units * p1 - fee1
    p3 = 103.0 * 0.998                    # selling receives 20 bps below the open
    fee3 = units * p3 * 0.001
    cash3 = cash1 + units * p3 - fee3
    equity = [1000.0, cash1 + units * 103.0, cash1 + units * 102.0, cash3, cash3]
    assert res.equity.tolist() == pytest.approx(equity, rel=1e-12)
    prev = [1000.0, *equity[:-1]]
    assert res.returns.tolist() == pytest.approx([e / p - 1 for e, p in zip(equity, prev)], rel=1e-9)
    assert res.positions.tolist() == pytest.approx([0, units, units, 0, 0], rel=1e-12)
    (trade,) = res.trades
    assert trade.entry_price == pytest.approx(p1) and trade.exit_price == pytest.approx(p3)
    assert trade.fee == pytest.approx(fee1 + fee3)
    assert trade.pnl == pytest.approx(cash3 - 1000.0)
    assert [f.fee for f in res.fills] == pytest.approx([fee1, fee3])
    assert res.total_return == pytest.approx(cash3 / 1000.0 - 1)


def test_unit_orders_close_fifo_and_flip() -> None:
    script = {101.0: {"action": "BUY", "size": 2.0}, 103.0: {"action": "BUY", "size": 1.0},
              102.0: {"action": "SELL", "size": 2.5}, 104.0: {"action": "SELL", "size": 1.0},
              106.0: 0.0}
    res = run_backtest(Scripted(script=script), five_bars(), initial_cash=1000.0)
    closed = [(t.entry_bar, t.size, t.exit_bar, t.entry_price, t.exit_price) for t in res.trades]
    assert closed == [(1, 2.0, 3, 102.0, 103.0), (2, 0.5, 3, 104.0, 103.0), (2, 0.5, 4, 104.0, 105.0)]
    assert [(t.entry_bar, t.size, t.exit_bar) for t in res.open_trades] == [(4, -0.5, None)]
    assert res.n_trades == 4
    assert res.unfilled_orders == 1  # the signal on the last bar has no next open to fill at
    assert res.positions.tolist() == [0.0, 2.0, 3.0, 0.5, -0.5]


def test_backtest_arguments_are_validated(tmp_path: Path) -> None:
    for kwargs in ({"fee_bps": -1.0}, {"slippage_bps": float("nan")}, {"initial_cash": 0.0}):
        with pytest.raises(BadInputError):
            run_backtest(Scripted(), five_bars(), **kwargs)

    class TwoInputs(Strategy):
        def setup(self) -> None:
            a, b = StreamInput(name="a"), StreamInput(name="b")
            self.add_nodes(a, b, Node([a, b], lambda v: None, name="x"))

    class PublishesBars(Strategy):
        def setup(self) -> None:
            a = StreamInput(name="a")
            self.add_nodes(a, TradeOrderPublisherNode(a))

    with pytest.raises(BadInputError, match="one bar input"):
        run_backtest(TwoInputs(), five_bars())
    with pytest.raises(BadInputError, match="signal node"):
        run_backtest(PublishesBars(), five_bars())


def test_multi_node_dag_windows_and_readiness() -> None:
    calls: list[tuple[str, int, Any]] = []

    class TwoStage(Strategy):
        def setup(self) -> None:
            price = StreamInput(name="price")

            def ret(v: View) -> float | None:
                c = v.input.close
                r = float(c[-1] / c[0] - 1)
                return None if c[-1] == 104.0 else r  # emits nothing on one bar

            def vol(v: View) -> float:
                calls.append(("vol", len(v.input), v.input.tolist()))
                return float(np.std(v.input))

            def sig(v: View) -> float:
                calls.append(("sig", len(v[r_node]), float(v["vol"][-1])))
                return 0.0

            r_node = Node(price, ret, name="ret", period=2)
            v_node = Node(r_node, vol, name="vol", period=2)
            s_node = Node([r_node, v_node], sig, name="sig", period=1)
            self.add_nodes(price, r_node, v_node, s_node, TradeOrderPublisherNode(s_node))

    res = run_backtest(TwoStage(), five_bars())
    rets = [c1 / c0 - 1 for c0, c1 in zip(CLOSES, CLOSES[1:])]  # bars 1..4; bar 3 (close 104) emits nothing
    vols = [c for c in calls if c[0] == "vol"]
    # vol needs two returns: first at bar 2, skips bar 3 (no new return), runs again at bar 4
    assert [c[2] for c in vols] == [pytest.approx(rets[0:2]), pytest.approx([rets[1], rets[3]])]
    sigs = [c for c in calls if c[0] == "sig"]
    assert len(sigs) == 2 and all(c[1] == 1 for c in sigs)
    # target 0 while flat is no fill; the bar-4 signal has no next open
    assert res.fills == () and res.unfilled_orders == 1 and res.positions.tolist() == [0.0] * 5


# --- no look-ahead --------------------------------------------------------------------------------
def reachable_arrays(root: object) -> list[np.ndarray]:
    """Every numpy array reachable from ``root`` through attributes, slots, containers and .base
    (not module globals: what a module holds is the author's own business)."""
    out: list[np.ndarray] = []
    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (type, types.ModuleType, str, bytes,
                                                               int, float, complex, bool)):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            out.append(obj)
            stack.append(obj.base)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        if isinstance(obj, types.MethodType):
            stack.extend([obj.__self__, obj.__func__])
        if isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in obj.__closure__ or () if c.cell_contents is not None)
            stack.append(obj.__defaults__)
        for klass in type(obj).__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if isinstance(slot, str):
                    stack.append(getattr(obj, slot, None))
        if hasattr(obj, "__dict__") and not isinstance(obj, types.FunctionType):
            stack.append(vars(obj))
    return out


class Peeker(Strategy):
    """Tries every way a compute function could see the future; records what it found."""

    def setup(self) -> None:
        self.price = StreamInput(name="price", interval="1d")
        sig = Node(self.price, self.peek, name="peek", period=3)
        self.add_nodes(self.price, sig, TradeOrderPublisherNode(sig))
        self.found: list[tuple[int, float, float, int]] = []

    def peek(self, view: View) -> float:
        window = view[self.price]
        close = window.close
        t = int(np.flatnonzero(np.isfinite(close.base[3]))[-1])  # the latest bar it can see
        beyond = close.base[:, t + 1:] if t + 1 < close.base.shape[1] else np.empty((5, 0))
        future_arrays = 0
        for arr in reachable_arrays(view):
            if arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] > t + 1:
                future_arrays += int(np.isfinite(arr[:, t + 1:]).any())
            elif arr.dtype.kind == "f" and arr.ndim == 1 and arr.shape[0] > t + 1:
                future_arrays += int(np.isfinite(arr[t + 1:]).any())
            elif arr.dtype.kind == "M" and arr.shape[0] > t + 1:
                future_arrays += int((~np.isnat(arr[t + 1:])).any())
        next_open = float(close.base[0, t + 1]) if t + 1 < close.base.shape[1] else float("nan")
        self.found.append((t, float(close[-1]), next_open, future_arrays + int(np.isfinite(beyond).any())))
        try:
            close[-1] = 0.0  # writing into the window must not be possible either
        except ValueError:
            pass
        # the cheat: buy if the next open is higher than this close (only works with look-ahead)
        return 1.0 if next_open > close[-1] else None


def test_a_peeking_strategy_cannot_see_future_bars() -> None:
    bars = load_bars(GOOG_CSV).slice(0, 300)
    strat = Peeker()
    res = run_backtest(strat, bars)
    assert len(strat.found) == 300 - 2  # ready from bar period-1
    for i, (t, close, next_open, leaks) in enumerate(strat.found):
        assert t == i + 2 and close == bars.close[t]
        assert np.isnan(next_open)
        assert leaks == 0
    assert res.n_trades == 0  # the cheat never fired: NaN > x is always False
    assert bars.close.flags.writeable is False


def test_signals_before_bar_k_do_not_depend_on_bars_from_k_on() -> None:
    bars = load_bars(GOOG_CSV)
    full = run_backtest(SMA.SmaCrossover(), bars, fee_bps=1.0, slippage_bps=2.0)
    for k in (60, 500, 1234, 2000):
        part = run_backtest(SMA.SmaCrossover(), bars.slice(0, k), fee_bps=1.0, slippage_bps=2.0)
        assert [f for f in full.fills if f.bar < k] == list(part.fills)
        np.testing.assert_array_equal(full.equity[:k], part.equity)
        np.testing.assert_array_equal(full.returns[:k], part.returns)


# --- the reference library ------------------------------------------------------------------------
def reference_trades(fast: int, slow: int) -> list[tuple[int, int, float, float, bool]]:
    import pandas as pd
    from backtesting import Backtest
    from backtesting import Strategy as RefStrategy
    from backtesting.lib import crossover
    from backtesting.test import GOOG

    def sma(values: Any, n: int) -> Any:
        return pd.Series(values).rolling(n).mean()

    class SmaCross(RefStrategy):
        n1 = fast
        n2 = slow

        def init(self) -> None:
            self.sma1 = self.I(sma, self.data.Close, self.n1)
            self.sma2 = self.I(sma, self.data.Close, self.n2)

        def next(self) -> None:
            if crossover(self.sma1, self.sma2):
                self.position.close()
                self.buy()
            elif crossover(self.sma2, self.sma1):
                self.position.close()
                self.sell()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trades remain open", progress-bar and pandas notices
        stats = Backtest(GOOG, SmaCross, cash=1_000_000, commission=0, trade_on_close=False,
                         exclusive_orders=False).run()
    t = stats._trades
    return [(int(a), int(b), float(c), float(d), bool(s > 0))
            for a, b, c, d, s in zip(t.EntryBar, t.ExitBar, t.EntryPrice, t.ExitPrice, t.Size)]


@pytest.mark.parametrize(("fast", "slow"), [(10, 20), (5, 30), (20, 50), (3, 7)])
def test_sma_crossover_trades_identically_to_backtesting(fast: int, slow: int) -> None:
    ref = reference_trades(fast, slow)
    res = run_backtest(SMA.SmaCrossover(fast=fast, slow=slow), GOOG_CSV)
    mine = [(t.entry_bar, t.exit_bar, t.entry_price, t.exit_price, t.is_long) for t in res.trades]
    assert len(ref) > 30
    assert mine == ref
    # backtesting leaves the last position open (finalize_trades=False): so do we
    assert len(res.open_trades) == 1


def test_long_only_and_mean_reversion_on_goog() -> None:
    bars = load_bars(GOOG_CSV)
    long_only = run_backtest(SMA.SmaCrossover(allow_short=False), bars, fee_bps=1.0, slippage_bps=2.0)
    assert long_only.positions.min() >= 0 and long_only.n_trades > 10
    mr = run_backtest(MR.MeanReversion(), bars, fee_bps=1.0, slippage_bps=2.0)
    assert mr.n_trades > 10 and np.isfinite(mr.returns).all()
    assert {np.sign(t.size) for t in mr.trades} == {-1.0, 1.0}
    assert run_backtest(MR.MeanReversion(allow_short=False), bars).positions.min() >= 0
    doc = mr.to_dict()
    assert len(doc["returns"]) == len(bars) and doc["timestamps"][0] == "2004-08-19T00:00:00.000000Z"


# --- loading bars ---------------------------------------------------------------------------------
def test_goog_csv_loads() -> None:
    bars = load_bars(GOOG_CSV)
    assert len(bars) == 2148
    assert str(bars.timestamp[0]) == "2004-08-19T00:00:00.000000000"
    assert (bars.open[0], bars.close[-1]) == (100.0, 806.19)


HEADER = "timestamp,open,high,low,close,volume\n"
GOOD = "2024-01-02,10,11,9,10.5,100\n"


@pytest.fixture
def write(tmp_path: Path) -> Iterator[Any]:
    def _write(text: str, name: str = "bars.csv") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    yield _write


@pytest.mark.parametrize(("body", "row", "column", "fragment"), [
    (GOOD + "2024-01-03,10,11,9,abc,100\n", 2, "close", "'abc' is not a number"),
    (GOOD + "2024-01-03T10:00:00,10,11,9,10,100\n", 2, "timestamp", "has no time zone"),
    (GOOD + "03/01/2024,10,11,9,10,100\n", 2, "timestamp", "not an ISO-8601"),
    (GOOD + "2024-01-03,10,11,9,10\n", 2, "volume", "expected 6 fields, found 5"),
    (GOOD + "2024-01-02,10,11,9,10,100\n", 2, "timestamp", "not after the previous bar"),
    (GOOD + GOOD.replace("01-02", "01-03").replace(",11,9,", ",8,9,"), 2, "high", "below"),
    (GOOD + "2024-01-03,10,11,9,nan,100\n", 2, "close", "not a finite number"),
    ("2024-01-01,10,11,9,10,100\n" + GOOD.replace("10,11,9", "-1,11,9"), 2, "open", "not a positive price"),
    (GOOD + "2024-01-03,10,11,9,10,-5\n", 2, "volume", "negative"),
])
def test_malformed_csv_names_row_and_column(write: Any, body: str, row: int, column: str,
                                            fragment: str) -> None:
    path = write(HEADER + body)
    with pytest.raises(DataFileError) as info:
        load_bars(path)
    message = info.value.one_line()
    assert f"row {row}" in message and f"column '{column}'" in message and fragment in message
    assert str(path) in message
    assert info.value.details["row"] == row and info.value.details["column"] == column
    assert info.value.details["line"] == row + 1
    assert info.value.exit_code == 2


def test_whole_file_problems(write: Any, tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="missing column"):
        load_bars(write("timestamp,open,close\n2024-01-01,1,1\n"))
    with pytest.raises(DataFileError, match="empty"):
        load_bars(write(""))
    with pytest.raises(DataFileError, match="no bars"):
        load_bars(write(HEADER))
    with pytest.raises(DataFileError, match="unsupported"):
        load_bars(write(HEADER + GOOD, name="bars.xlsx"))
    with pytest.raises(DataFileError, match="no such"):
        load_bars(tmp_path / "missing.csv")
    ok = load_bars(write("Timestamp,Open,High,Low,Close,Volume,extra\n"
                         "2024-01-02T15:30:00Z,10,11,9,10.5,100,x\n\n"))
    assert len(ok) == 1 and str(ok.timestamp[0]) == "2024-01-02T15:30:00.000000000"


def test_parquet_needs_pyarrow_or_loads(write: Any) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataFileError, match="pyarrow") as info:
            load_bars(write("not really parquet", name="bars.parquet"))
        assert "pip install 'qmtl[parquet]'" in info.value.one_line()
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write("", name="bars.parquet")
    table = pa.table({"timestamp": pa.array(np.array(["2024-01-02", "2024-01-03"], dtype="datetime64[ns]")),
                      "open": [10.0, 11.0], "high": [11.0, 12.0], "low": [9.0, 10.0],
                      "close": [10.5, 11.5], "volume": [1.0, 2.0]})
    pq.write_table(table, path)
    assert load_bars(path).close.tolist() == [10.5, 11.5]


def test_backtest_never_reaches_the_execution_service_nor_restamps_nodes() -> None:
    from qmtl_core.sdk import ComputeContext, Runner

    class Recorder:
        def __init__(self) -> None:
            self.orders: list[Any] = []

        def post_order(self, order: Any) -> None:
            self.orders.append(order)

    service = Recorder()
    Runner.reset()
    try:
        Runner.set_enable_trade_submission(True)
        Runner.set_trade_execution_service(service)
        strat = SMA.SmaCrossover()
        live = ComputeContext(world_id="w", execution_domain="live", allow_live=True)
        strat.apply_compute_context(live)
        res = Runner.backtest(strat, GOOG_CSV)
        assert res.n_trades > 0 and service.orders == []
        assert all(n.compute_context is live for n in strat.nodes)
        assert Runner.order_stats.as_dict() == {"published": 0, "failed": 0, "blocked": {}}
    finally:
        Runner.reset()
