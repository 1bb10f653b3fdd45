"""DAG nodes: Node, StreamInput, TradeOrderPublisherNode, and the stable content-hash node ids."""

from __future__ import annotations

import functools
import hashlib
import inspect
import marshal
import re
import textwrap
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from qmtl_core.canonical import content_hash
from qmtl_core.domains import ComputeContext
from qmtl_core.errors import BadInputError

__all__ = ["View", "ComputeFn", "Node", "StreamInput", "TradeOrderPublisherNode", "parse_interval",
           "code_fingerprint"]


class View(Protocol):
    """What a compute function receives: windows of its inputs up to the current moment only."""

    @property
    def timestamp(self) -> Any:
        """The current moment (bar timestamp in a backtest, queue timestamp when streaming)."""
        ...

    @property
    def context(self) -> ComputeContext | None:
        """The compute context of the node being computed."""
        ...

    def __getitem__(self, upstream: Node | str) -> Any:
        """The window of ``upstream``'s latest values (at most the node's ``period``), oldest first."""
        ...

    @property
    def input(self) -> Any:
        """The window of the node's first input."""
        ...


ComputeFn = Callable[[View], Any]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")


def parse_interval(value: int | str) -> int:
    """An interval in seconds from ``60`` or ``"60s" | "1m" | "1h" | "1d"``; must be positive."""
    if isinstance(value, bool):
        raise BadInputError(f"interval {value!r} is not a duration")
    if isinstance(value, int):
        seconds = value
    else:
        m = _INTERVAL.match(str(value))
        if not m:
            raise BadInputError(f"interval {value!r} is not a duration", hint="use e.g. 60, 60s, 1m, 1h, 1d")
        seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise BadInputError(f"interval {value!r} must be positive")
    return seconds


def code_fingerprint(fn: Callable[..., Any] | None) -> str | None:
    """A stable text identifying a compute function's code: its source, else its bytecode hash."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        inner = code_fingerprint(fn.func)
        return f"partial({inner},{fn.args!r},{sorted(fn.keywords.items())!r})"
    target = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        return textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        if code is not None:
            # no source (REPL, exec): bytecode is stable for one Python version, which is enough
            return "bytecode:" + hashlib.sha256(marshal.dumps(code)).hexdigest()
        return f"{type(target).__module__}.{type(target).__qualname__}"


class Node:
    """A computation in a strategy's DAG; ``compute_fn(view)`` runs when its inputs have data."""

    kind: ClassVar[str] = "node"
    interval: int
    period: int

    def __init__(self, input: Node | Sequence[Node] | None = None,  # noqa: A002 - the SDK's name
                 compute_fn: ComputeFn | None = None, name: str | None = None,
                 interval: int | str | None = None, period: int = 1,
                 params: Mapping[str, Any] | None = None) -> None:
        if input is None:
            inputs: tuple[Node, ...] = ()
        elif isinstance(input, Node):
            inputs = (input,)
        else:
            inputs = tuple(input)
        for up in inputs:
            if not isinstance(up, Node):
                raise BadInputError(f"node input {up!r} is not a Node")
        if compute_fn is not None and not callable(compute_fn):
            raise BadInputError(f"compute_fn {compute_fn!r} is not callable")
        if interval is None:
            if not inputs:
                raise BadInputError(f"node {name or self.kind!r} needs an interval (it has no input)")
            interval = inputs[0].interval
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise BadInputError(f"node period must be a positive integer, got {period!r}")
        self.inputs = inputs
        self.compute_fn = compute_fn
        self.name = name or getattr(compute_fn, "__name__", None) or self.kind
        self.interval = parse_interval(interval)
        self.period = period
        self.params: dict[str, Any] = dict(params or {})
        self.children: list[Node] = []
        self._ctx: ComputeContext | None = None
        self._node_id: str | None = None
        # streaming cache: (queue_id, interval) -> the latest `period` (timestamp, payload)
        self.cache: dict[tuple[str, int], deque[tuple[Any, Any]]] = {}
        for up in inputs:
            up.children.append(self)

    def _identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "interval": self.interval,
                "period": self.period, "code": code_fingerprint(self.compute_fn),
                "inputs": [up.node_id for up in self.inputs], "params": self.params}

    @property
    def node_id(self) -> str:
        """Content hash of kind, name, interval, period, compute code, params and input ids."""
        if self._node_id is None:
            self._node_id = content_hash(self._identity())
        return self._node_id

    def apply_compute_context(self, ctx: ComputeContext) -> None:
        """Set the world/domain this node computes in (the order gate reads it)."""
        if not isinstance(ctx, ComputeContext):
            raise BadInputError(f"expected a ComputeContext, got {type(ctx).__name__}")
        self._ctx = ctx

    @property
    def compute_context(self) -> ComputeContext | None:
        """The context applied last, or ``None``."""
        return self._ctx

    def compute(self, view: View) -> Any:
        """Run ``compute_fn``; without one, pass the latest input value through."""
        if self.compute_fn is not None:
            return self.compute_fn(view)
        window = view.input
        if not len(window):
            return None
        if hasattr(window, "close"):  # bars: pass the latest bar on as a plain dict
            return {f: float(getattr(window, f)[-1]) for f in ("open", "high", "low", "close", "volume")}
        return window[-1]

    def describe(self) -> dict[str, Any]:
        """JSON description used in the strategy's DAG document."""
        return {"node_id": self.node_id, "kind": self.kind, "name": self.name,
                "interval": self.interval, "period": self.period,
                "inputs": [up.node_id for up in self.inputs], "params": self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, id={self.node_id[:12]})"


class StreamInput(Node):
    """A source of OHLCV bars (or other payloads) fed from a queue or, in a backtest, from a file."""

    kind: ClassVar[str] = "stream_input"

    def __init__(self, name: str = "price", interval: int | str = "1d", period: int = 1,
                 tags: Sequence[str] = (), symbol: str | None = None) -> None:
        self.tags = tuple(sorted(set(tags)))
        self.symbol = symbol
        super().__init__(None, None, name=name, interval=interval, period=period)

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "tags": list(self.tags), "symbol": self.symbol}

    def describe(self) -> dict[str, Any]:
        """JSON description, with tags and symbol."""
        return {**super().describe(), "tags": list(self.tags), "symbol": self.symbol}


class TradeOrderPublisherNode(Node):
    """Turns its input's signals into orders; in a run they go through the Runner's order gate."""

    kind: ClassVar[str] = "trade_order_publisher"

    def __init__(self, src: Node, name: str | None = None, symbol: str | None = None) -> None:
        if not isinstance(src, Node):
            raise BadInputError(f"TradeOrderPublisherNode needs a source Node, got {src!r}")
        self.symbol = symbol
        super().__init__(src, None, name=name or f"{src.name}.orders", interval=src.interval, period=1)

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "symbol": self.symbol}

    @property
    def source(self) -> Node:
        """The node whose output is turned into orders."""
        return self.inputs[0]
