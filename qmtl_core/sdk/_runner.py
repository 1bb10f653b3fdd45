"""The Runner: feeds queue data through a strategy's nodes and owns the process-wide order gate state.

Trade submission settings are class-level on purpose (the seed sets them on the class): one
process has one execution service and one on/off switch. ``Runner.reset()`` restores the
fail-closed defaults (tests call it between cases).
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qmtl_core.canonical import content_hash
from qmtl_core.domains import ComputeContext
from qmtl_core.errors import BadInputError, QmtlError
from qmtl_core.gateway import ComputeContextService, StrategySubmit, WorldClient
from qmtl_core.sdk._backtest import BacktestResult, run_backtest
from qmtl_core.sdk._bars import BAR_FIELDS, Bars
from qmtl_core.sdk._node import Node, StreamInput, TradeOrderPublisherNode
from qmtl_core.sdk._orders import Order, OrderStats, TradeExecutionService, normalize_orders, route_order
from qmtl_core.sdk._strategy import Strategy, strategy_id
from qmtl_core.timeutil import parse_instant

__all__ = ["Runner", "SubmitResult", "SubmitHandler"]


@dataclass(frozen=True)
class SubmitResult:
    """What a submission gave back: the strategy id, its DAG and the context it runs in."""

    strategy_id: str
    world_id: str
    context: ComputeContext
    dag: dict[str, Any]
    #: With a world service connected (:meth:`Runner.use_world_service`): the recorded
    #: ``qmtl_core.submit.Submission`` (backtest run, status, next step).
    submission: Any = None


SubmitHandler = Callable[[Strategy, str, "str | None"], SubmitResult]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stamp_ns(stamp: Any) -> int:
    """Epoch nanoseconds of a queue timestamp: epoch seconds, an aware datetime or ISO text."""
    if _is_number(stamp):
        return int(stamp * 1_000_000_000)
    if isinstance(stamp, str):
        stamp = parse_instant(stamp)
    if isinstance(stamp, datetime):
        if stamp.tzinfo is None:
            raise ValueError("naive timestamp")
        return round(stamp.timestamp() * 1_000_000) * 1_000
    raise TypeError(f"unsupported timestamp {stamp!r}")


def _stream_window(upstream: Node | None, items: deque[tuple[Any, Any]] | None) -> Any:
    """A streaming window in the same shapes a backtest gives: Bars, a float array, or a tuple."""
    if not items:
        return ()
    stamps = [ts for ts, _ in items]
    payloads = [p for _, p in items]
    if isinstance(upstream, StreamInput) and all(isinstance(p, Mapping) for p in payloads):
        try:
            ts = np.array([_stamp_ns(s) for s in stamps], dtype=np.int64).astype("datetime64[ns]")
            cols = {f: np.array([float(p[f]) for p in payloads]) for f in BAR_FIELDS}
        except (KeyError, TypeError, ValueError, QmtlError):
            return tuple(payloads)  # not bars after all: hand the payloads over as they are
        return Bars(timestamp=ts, **cols)
    if all(_is_number(p) for p in payloads):
        arr = np.array(payloads, dtype=np.float64)
        arr.flags.writeable = False
        return arr
    return tuple(payloads)


def _as_strategy(strategy: Any) -> Strategy:
    """An instance as given; a Strategy subclass instantiated with its defaults."""
    if isinstance(strategy, type) and issubclass(strategy, Strategy):
        try:
            return strategy()
        except TypeError as exc:  # an __init__ with required arguments
            raise BadInputError(f"cannot build {strategy.__qualname__} without arguments: {exc}",
                                hint="pass an instance: Runner.submit(MyStrategy(...), world=...)") from None
    if isinstance(strategy, Strategy):
        return strategy
    raise BadInputError(f"Runner.submit needs a Strategy subclass or instance, got {strategy!r}",
                        hint="pass the class (Runner.submit(MyStrategy, world=...)) or an instance")


class _StreamView:
    """The view a compute function gets when fed from queues: the node's cached windows."""

    __slots__ = ("_node", "_last_key", "timestamp", "context")

    def __init__(self, node: Node, last_key: tuple[str, int], timestamp: Any) -> None:
        self._node = node
        self._last_key = last_key
        self.timestamp = timestamp
        self.context = node.compute_context

    def __getitem__(self, upstream: Node | str) -> Any:
        for up in self._node.inputs:
            if upstream is up or upstream == up.node_id or upstream == up.name:
                return _stream_window(up, self._node.cache.get((up.node_id, up.interval)))
        if isinstance(upstream, str):
            for (queue, interval), items in self._node.cache.items():
                if queue == upstream:
                    return _stream_window(None, items)
        raise BadInputError(f"node {self._node.name!r} has no input {upstream!r}")

    @property
    def input(self) -> Any:
        """The window of the first input (for a source node: the queue fed last)."""
        if self._node.inputs:
            return self[self._node.inputs[0]]
        return _stream_window(self._node if isinstance(self._node, StreamInput) else None,
                              self._node.cache.get(self._last_key))


class Runner:
    """Runs strategies: queue data through nodes, backtests, and orders through the one gate."""

    _lock: ClassVar[threading.RLock] = threading.RLock()
    _enable_trade_submission: ClassVar[bool] = False
    _trade_execution_service: ClassVar[TradeExecutionService | None] = None
    _world_client: ClassVar[WorldClient | None] = None
    _submit_handler: ClassVar[SubmitHandler | None] = None
    order_stats: ClassVar[OrderStats] = OrderStats()

    # --- process-wide settings ---------------------------------------------------------------------
    @classmethod
    def set_enable_trade_submission(cls, enabled: bool) -> None:
        """Turn order submission on or off for the whole process (off by default)."""
        if not isinstance(enabled, bool):
            raise BadInputError(f"set_enable_trade_submission needs True or False, got {enabled!r}")
        with cls._lock:
            cls._enable_trade_submission = enabled

    @classmethod
    def trade_submission_enabled(cls) -> bool:
        """Whether order submission is switched on."""
        return cls._enable_trade_submission

    @classmethod
    def set_trade_execution_service(cls, service: TradeExecutionService | None) -> None:
        """Set (or clear, with ``None``) the service orders go to when the gate lets them through."""
        if service is not None and not callable(getattr(service, "post_order", None)):
            raise BadInputError("the trade execution service needs a post_order(order) method")
        with cls._lock:
            cls._trade_execution_service = service

    @classmethod
    @contextlib.contextmanager
    def trading(cls, service: TradeExecutionService) -> Iterator[None]:
        """Within the block: submission enabled and orders the gate lets through go to ``service``;
        the previous settings come back afterwards. The gate still decides every order."""
        with cls._lock:
            previous = (cls._enable_trade_submission, cls._trade_execution_service)
        cls.set_trade_execution_service(service)
        cls.set_enable_trade_submission(True)
        try:
            yield
        finally:
            with cls._lock:
                cls._enable_trade_submission, cls._trade_execution_service = previous

    @classmethod
    def has_trade_execution_service(cls) -> bool:
        """Whether an execution service is set (the gate still decides whether orders reach it)."""
        return cls._trade_execution_service is not None

    @classmethod
    def set_world_client(cls, client: WorldClient | None) -> None:
        """The world service ``submit`` asks for decisions (``None``: no world, fail closed)."""
        cls._world_client = client

    @classmethod
    def set_submit_handler(cls, handler: SubmitHandler | None) -> None:
        """Replace how ``submit`` registers a strategy (the service layer plugs in here)."""
        cls._submit_handler = handler

    @classmethod
    def use_world_service(cls, service: Any, *, data: str | Path | None = None) -> None:
        """Make :meth:`submit` record submissions in ``service`` (a ``WorldService``) exactly as
        ``qmtl submit`` does: backtest on ``data`` (default: the bundled GOOG bars), record the
        backtest run, resolve the context from the world's decision. ``None`` disconnects."""
        if service is None:
            cls.set_submit_handler(None)
            return
        from qmtl_core.submit import connect_runner

        connect_runner(service, data=data)

    @classmethod
    def reset(cls) -> None:
        """Back to the fail-closed defaults: submission off, no service, no world, zero counters."""
        with cls._lock:
            cls._enable_trade_submission = False
            cls._trade_execution_service = None
            cls._world_client = None
            cls._submit_handler = None
            cls.order_stats = OrderStats()

    # --- submission and backtests -----------------------------------------------------------------
    @classmethod
    def submit(cls, strategy: Strategy | type[Strategy], world: str,
               execution_domain: str | None = None) -> SubmitResult:
        """Submit ``strategy`` (an instance, or a Strategy class built with its defaults, as
        upstream's ``Runner.submit(MyStrategy, world=...)``) to ``world``: compute its id,
        resolve its context, apply it.

        Without a submit handler this is the local path: the context comes from the world client
        set with :meth:`set_world_client` (none: ``backtest``/``decision_unavailable``, or
        ``shadow`` when asked for).
        """
        strategy = _as_strategy(strategy)
        if not isinstance(world, str) or not world:
            raise BadInputError(f"Runner.submit needs a world id, got {world!r}")
        handler = cls._submit_handler
        if handler is not None:
            return handler(strategy, world, execution_domain)
        sid = strategy_id(strategy)
        ids = sorted(n.node_id for n in strategy.build())
        submit = StrategySubmit(
            dag_json=strategy.dag_json(),
            meta={"execution_domain": execution_domain} if execution_domain else {},
            world_id=world, node_ids_crc32=zlib.crc32(",".join(ids).encode()), strategy_id=sid)
        ctx = ComputeContextService(world_client=cls._world_client).build_sync(submit)
        strategy.apply_compute_context(ctx)
        return SubmitResult(strategy_id=sid, world_id=world, context=ctx, dag=strategy.dag())

    @staticmethod
    def backtest(strategy: Strategy, bars: Bars | str | Path, *, fee_bps: float = 0.0,
                 slippage_bps: float = 0.0, initial_cash: float = 1.0) -> BacktestResult:
        """Run a backtest (never touches the execution service)."""
        return run_backtest(strategy, bars, fee_bps=fee_bps, slippage_bps=slippage_bps,
                            initial_cash=initial_cash)

    # --- streaming ------------------------------------------------------------------------------
    @classmethod
    def feed_queue_data(cls, node: Node, queue_id: str, interval: int, timestamp: Any,
                        payload: Any) -> Any:
        """Deliver one item from queue ``queue_id`` to ``node``; compute and propagate downstream.

        Returns what the node produced: its output, or for a TradeOrderPublisherNode the orders
        it built (each went through the order gate; see ``order_stats``). ``None`` while the
        node's inputs do not have ``period`` items yet.
        """
        iv = int(interval)
        for up in node.inputs:
            if up.node_id == queue_id and up.interval != iv:
                raise BadInputError(f"queue {queue_id[:12]} feeds {node.name!r} at interval {up.interval}, "
                                    f"not {iv}")
        key = (queue_id, iv)
        cache = node.cache.get(key)
        if cache is None:
            cache = node.cache[key] = deque(maxlen=node.period)
        cache.append((timestamp, payload))
        if not cls._ready(node, key):
            return None
        view = _StreamView(node, key, timestamp)
        if isinstance(node, TradeOrderPublisherNode):
            window = view.input
            return cls._publish(node, window[-1] if len(window) else None, timestamp)
        if not node.inputs and node.compute_fn is None:
            out = payload  # a plain source forwards what it was fed, unchanged
        else:
            out = node.compute(view)
        if out is not None:
            for child in list(node.children):
                cls.feed_queue_data(child, node.node_id, node.interval, timestamp, out)
        return out

    @staticmethod
    def _ready(node: Node, key: tuple[str, int]) -> bool:
        if not node.inputs:
            return len(node.cache[key]) >= node.period
        return all(len(node.cache.get((up.node_id, up.interval), ())) >= node.period
                   for up in node.inputs)

    @classmethod
    def publish(cls, node: TradeOrderPublisherNode, signal: Any, timestamp: Any) -> list[Order]:
        """Turn what ``node``'s signal emitted into orders and send each through the order gate
        (in ``node``'s compute context); returns the stamped orders, sent or blocked."""
        if not isinstance(node, TradeOrderPublisherNode):
            raise BadInputError(f"{node!r} is not a TradeOrderPublisherNode")
        return cls._publish(node, signal, timestamp)

    @classmethod
    def _publish(cls, node: TradeOrderPublisherNode, signal: Any, timestamp: Any) -> list[Order]:
        ctx = node.compute_context
        with cls._lock:  # one consistent view of the switch and the service per batch
            enabled, service = cls._enable_trade_submission, cls._trade_execution_service
        orders = []
        for order in normalize_orders(signal):
            order = cls._stamp(order, node, ctx, timestamp)
            route_order(order, ctx, enabled=enabled, service=service, stats=cls.order_stats)
            orders.append(order)
        return orders

    @staticmethod
    def _stamp(order: Order, node: TradeOrderPublisherNode, ctx: ComputeContext | None,
               timestamp: Any) -> Order:
        stamped = dict(order)
        if node.symbol is not None:
            stamped.setdefault("symbol", node.symbol)
        stamped.update(
            world_id=ctx.world_id if ctx else None,
            execution_domain=ctx.execution_domain if ctx else None,
            strategy_id=ctx.strategy_id if ctx else None,
            node_id=node.node_id,
            timestamp=timestamp.isoformat() if isinstance(timestamp, datetime) else timestamp,
        )
        try:
            # Same order, same moment, same node -> same id: receivers can drop a redelivery.
            stamped["client_order_id"] = content_hash(stamped)[:32]
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"order from {node.name!r} is not JSON-serialisable: {exc}") from None
        return stamped
