"""Bar-by-bar backtest engine: signals on bar t's close, fills at bar t+1's open, no look-ahead.

No look-ahead holds by construction, not by convention: the engine copies bar t into a buffer
just before computing bar t, and compute functions only ever receive read-only windows of that
buffer (and of the values earlier nodes emitted). Nothing reachable from a window, including
``.base``, holds a later bar, because the later bars have not been written yet.

Liquidation: equity is marked at each bar's close; when it reaches zero or below (a short that
lost more than the account, a leveraged long), the account is liquidated at that close: that
bar's return is -1, trading stops, and the result ends there (``extra["liquidated_at"]``).

Speed: the per-bar work in Python is one column copy, one call per node and the window slicing;
fills, equity and returns are computed with numpy afterwards from the recorded position changes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from qmtl_core.domains import ComputeContext
from qmtl_core.errors import BadInputError
from qmtl_core.sdk._bars import Bars, BarsWindow, load_bars
from qmtl_core.sdk._broker import Fill, SimBroker, Trade
from qmtl_core.sdk._node import Node, StreamInput, TradeOrderPublisherNode
from qmtl_core.sdk._orders import Order, normalize_orders
from qmtl_core.sdk._strategy import Strategy

__all__ = ["BacktestResult", "run_backtest"]


@dataclass(frozen=True)
class BacktestResult:
    """What a backtest produced: per-bar returns, equity and positions, fills and trades."""

    timestamps: npt.NDArray[np.datetime64]
    returns: npt.NDArray[np.float64]
    equity: npt.NDArray[np.float64]
    positions: npt.NDArray[np.float64]
    trades: tuple[Trade, ...]
    open_trades: tuple[Trade, ...]
    fills: tuple[Fill, ...]
    unfilled_orders: int
    fee_bps: float
    slippage_bps: float
    initial_cash: float
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_trades(self) -> int:
        """Trades entered: closed round trips plus those still open at the end."""
        return len(self.trades) + len(self.open_trades)

    @property
    def total_return(self) -> float:
        """Final equity over initial cash, minus one."""
        return float(self.equity[-1] / self.initial_cash - 1.0) if len(self.equity) else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (returns with ISO timestamps, trades), e.g. for an evaluation run request."""
        stamps = np.datetime_as_string(self.timestamps, unit="us", timezone="UTC")
        return {"timestamps": [str(s) for s in stamps], "returns": self.returns.tolist(),
                "n_trades": self.n_trades, "trades": [t.to_dict() for t in self.trades],
                "open_trades": [t.to_dict() for t in self.open_trades],
                "fee_bps": self.fee_bps, "slippage_bps": self.slippage_bps,
                "unfilled_orders": self.unfilled_orders, "liquidated_at": self.extra.get("liquidated_at")}


class _Source:
    """The bar input: it 'emits' every bar; windows are views of the progressively filled buffer."""

    __slots__ = ("node", "buf", "ts", "n_emitted", "last_t")

    def __init__(self, node: Node, buf: npt.NDArray[np.float64], ts: npt.NDArray[np.datetime64]) -> None:
        self.node = node
        self.buf = buf
        self.ts = ts
        self.n_emitted = 0
        self.last_t = -1

    def window(self, t: int, period: int) -> BarsWindow:
        lo = t - period + 1
        return BarsWindow(self.buf, self.ts, lo if lo > 0 else 0, t + 1)


class _Step:
    """A compute node's run state: what it emitted so far and the view handed to its function."""

    __slots__ = ("node", "fn", "period", "inputs", "values", "n_emitted", "last_t", "view",
                 "first", "on_source_only")

    def __init__(self, node: Node, inputs: list[_Source | _Step], period: int) -> None:
        self.node = node
        # Call the user's function directly unless the node class overrides compute():
        # one Python call less per node per bar.
        fn = node.compute_fn
        self.fn: Callable[[Any], Any] = (
            fn if fn is not None and type(node).compute is Node.compute else node.compute)
        self.period = period
        self.inputs = inputs
        # Only the last `keep` outputs are ever read (set to the largest consumer period below).
        self.values: deque[Any] = deque(maxlen=1)
        self.n_emitted = 0
        self.last_t = -1
        # A node reading only the bar input is fresh every bar and ready from bar period-1 on,
        # which lets the loop skip the generic readiness check for the common case.
        self.on_source_only = all(isinstance(i, _Source) for i in inputs)
        self.first = period - 1
        self.view = _BacktestView(self)

    def ready(self, t: int) -> bool:
        fresh = False
        for inp in self.inputs:
            if inp.n_emitted < self.period:
                return False
            if inp.last_t == t:
                fresh = True
        return fresh

    def window(self, t: int, period: int) -> Any:
        vals = list(self.values)[-period:]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            arr = np.array(vals, dtype=np.float64)
            arr.flags.writeable = False
            return arr
        return tuple(vals)


class _BacktestView:
    """The view a compute function gets in a backtest: windows of its inputs up to bar t."""

    __slots__ = ("_step", "_by_key", "_t", "context")

    def __init__(self, step: _Step) -> None:
        self._step = step
        self._by_key: dict[Any, _Source | _Step] = {}
        self._t = -1
        self.context: ComputeContext | None = None

    def bind(self) -> None:
        for inp in self._step.inputs:
            self._by_key[inp.node] = inp
            self._by_key[inp.node.node_id] = inp
            self._by_key.setdefault(inp.node.name, inp)

    def __getitem__(self, upstream: Node | str) -> Any:
        try:
            inp = self._by_key[upstream]
        except (KeyError, TypeError):
            raise BadInputError(f"node {self._step.node.name!r} has no input {upstream!r}",
                                hint="read only the nodes passed as its input") from None
        return inp.window(self._t, self._step.period)

    @property
    def input(self) -> Any:
        """The window of the node's first input."""
        return self._step.inputs[0].window(self._t, self._step.period)

    @property
    def timestamp(self) -> np.datetime64:
        """The current bar's timestamp."""
        src = self._step.inputs[0]
        while not isinstance(src, _Source):
            src = src.inputs[0]
        return cast(np.datetime64, src.ts[self._t])


def _check_costs(fee_bps: float, slippage_bps: float, initial_cash: float) -> None:
    for name, value in (("fee_bps", fee_bps), ("slippage_bps", slippage_bps)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise BadInputError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (isinstance(initial_cash, (int, float)) and math.isfinite(initial_cash) and initial_cash > 0):
        raise BadInputError(f"initial_cash must be a positive number, got {initial_cash!r}")


def run_backtest(strategy: Strategy, bars: Bars | str | Path, *, fee_bps: float = 0.0,
                 slippage_bps: float = 0.0, initial_cash: float = 1.0,
                 world_id: str = "backtest", context: ComputeContext | None = None) -> BacktestResult:
    """Run ``strategy`` over ``bars`` (a :class:`Bars` or a CSV/Parquet path).

    Each bar t: orders emitted on bar t-1 fill at bar t's open (slippage against the order, fee
    on the notional, both in bps); then every node computes with data up to bar t's close.
    Orders emitted on the last bar are not filled (counted in ``unfilled_orders``); what each
    publisher emitted on it is in ``extra["last_signals"]`` as ``(publisher, signal)`` pairs.

    ``context`` is what compute functions see as ``view.context`` (default: the ``backtest``
    domain of ``world_id``); paper simulation passes its ``dryrun`` context. Fills are simulated
    either way: nothing here reaches an execution service.
    """
    _check_costs(fee_bps, slippage_bps, initial_cash)
    data = bars if isinstance(bars, Bars) else load_bars(bars)
    nodes = strategy.build()
    # The context goes to the views only: re-stamping the nodes would silently move a strategy
    # object that is also running live in this process into the backtest domain.
    ctx = context if context is not None else ComputeContext(world_id=world_id, execution_domain="backtest")

    n = len(data)
    src_matrix = data.matrix()
    src_ts = data.timestamp
    # The buffers compute functions see: NaN/NaT until the engine reaches a bar.
    wbuf = np.full((5, n), np.nan)
    wts = np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]")
    rbuf, rts = wbuf.view(), wts.view()
    rbuf.flags.writeable = False
    rts.flags.writeable = False

    sources = [nd for nd in nodes if not nd.inputs]
    if len(sources) != 1:
        raise BadInputError(f"a backtest feeds one bar input; the strategy has {len(sources)} "
                            f"({', '.join(s.name for s in sources) or 'none'})")
    source = _Source(sources[0], rbuf, rts)
    states: dict[int, _Source | _Step] = {id(sources[0]): source}
    steps: list[_Step] = []
    publishers: list[_Step] = []
    for nd in nodes:
        if nd is sources[0]:
            continue
        inputs = [states[id(up)] for up in nd.inputs]
        if any(isinstance(i, _Step) and isinstance(i.node, TradeOrderPublisherNode) for i in inputs):
            raise BadInputError(f"node {nd.name!r} reads orders from a publisher; publishers are sinks")
        if isinstance(nd, TradeOrderPublisherNode):
            if isinstance(inputs[0], _Source):
                raise BadInputError(f"publisher {nd.name!r} reads bars directly; give it a signal node")
            publishers.append(_Step(nd, inputs, 1))
            continue
        if isinstance(nd, StreamInput):
            raise BadInputError(f"StreamInput {nd.name!r} cannot have inputs")
        step = _Step(nd, inputs, nd.period)
        step.view.context = ctx
        step.view.bind()
        states[id(nd)] = step
        steps.append(step)

    for step in [*steps, *publishers]:
        for inp in step.inputs:
            if isinstance(inp, _Step) and (inp.values.maxlen or 0) < step.period:
                inp.values = deque(maxlen=step.period)

    broker = SimBroker(cash=initial_cash, fee_bps=fee_bps, slippage_bps=slippage_bps, timestamps=src_ts)
    opens = src_matrix[0].tolist()
    pending: list[Order] = []
    pub_sources = [p.inputs[0] for p in publishers]
    closes = src_matrix[3].tolist()
    liquidated = _loop(n, src_matrix, src_ts, wbuf, wts, source, steps, pub_sources, broker, opens,
                       closes, pending)
    unfilled = len(pending)
    end = n if liquidated is None else liquidated + 1
    last_signals = tuple((p.node, p.inputs[0].values[-1]) for p in publishers  # type: ignore[union-attr]
                         if end and p.inputs[0].last_t == end - 1)

    positions, cash = _forward_fill(end, broker.changes, initial_cash)
    equity = cash + positions * src_matrix[3, :end]
    if liquidated is not None:
        equity[-1] = 0.0  # an account is liquidated at zero: it cannot lose more than it holds
    prev = np.concatenate(([initial_cash], equity[:-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        returns = np.where(prev > 0, equity / prev - 1.0, np.nan)
    extra: dict[str, Any] = {"skipped_orders": broker.skipped, "last_signals": last_signals}
    if liquidated is not None:
        extra["liquidated_at"] = str(np.datetime_as_string(src_ts[liquidated], unit="us", timezone="UTC"))
    return BacktestResult(
        timestamps=src_ts[:end], returns=returns, equity=equity, positions=positions,
        trades=tuple(broker.trades), open_trades=tuple(broker.open_trades()),
        fills=tuple(broker.fills), unfilled_orders=unfilled, fee_bps=float(fee_bps),
        slippage_bps=float(slippage_bps), initial_cash=float(initial_cash), extra=extra)


def _loop(n: int, src_matrix: npt.NDArray[np.float64], src_ts: npt.NDArray[np.datetime64],
          wbuf: npt.NDArray[np.float64], wts: npt.NDArray[np.datetime64], source: _Source,
          steps: list[_Step], pub_sources: list[_Source | _Step], broker: SimBroker,
          opens: list[float], closes: list[float], pending: list[Order]) -> int | None:
    """The per-bar walk; kept flat with locals because it runs once per bar.

    Returns the bar at whose close the equity reached zero or below (a liquidation: the walk
    stops there and pending orders are dropped), or ``None`` when the account survived.
    """
    for t in range(n):
        if pending:
            broker.execute(t, opens[t], pending)
            pending.clear()
        # Reveal bar t (all of it: the node computes at its close) and nothing after it.
        wbuf[:, t] = src_matrix[:, t]
        wts[t] = src_ts[t]
        source.n_emitted = t + 1
        source.last_t = t
        for step in steps:
            if step.on_source_only:
                if t < step.first:
                    continue
            elif not step.ready(t):
                continue
            view = step.view
            view._t = t
            out = step.fn(view)
            if out is not None:
                step.values.append(out)
                step.n_emitted += 1
                step.last_t = t
        if broker.position and broker.cash + broker.position * closes[t] <= 0.0:
            pending.clear()
            return t
        for src in pub_sources:
            if src.last_t == t:
                pending.extend(normalize_orders(src.values[-1]))  # type: ignore[union-attr]
    return None


def _forward_fill(n: int, changes: list[tuple[int, float, float]],
                  initial_cash: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Position and cash held through each bar, from the (bar, position, cash) change records."""
    if not changes:
        return np.zeros(n), np.full(n, float(initial_cash))
    bars_at = np.array([c[0] for c in changes], dtype=np.int64)
    pos_at = np.array([c[1] for c in changes], dtype=np.float64)
    cash_at = np.array([c[2] for c in changes], dtype=np.float64)
    idx = np.searchsorted(bars_at, np.arange(n), side="right") - 1
    has = idx >= 0
    safe = np.where(has, idx, 0)
    return np.where(has, pos_at[safe], 0.0), np.where(has, cash_at[safe], float(initial_cash))
