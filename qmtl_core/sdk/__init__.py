"""qmtl strategy SDK: nodes, strategies, the Runner with its order gate, and the backtest engine.

A strategy subclasses :class:`Strategy` and builds a DAG in ``setup()``::

    class Momentum(Strategy):
        def setup(self) -> None:
            price = StreamInput(name="price", interval="1d", period=21)
            signal = Node(input=price, compute_fn=lambda v: ..., name="signal", period=21)
            self.add_nodes(price, signal, TradeOrderPublisherNode(signal))

``run_backtest(Momentum(), "worlds/data/GOOG.csv", fee_bps=1, slippage_bps=2)`` evaluates it;
``Runner.feed_queue_data`` drives it from queues, with every order passing the one order gate.
"""

from qmtl_core.domains import ComputeContext
from qmtl_core.sdk._backtest import BacktestResult, run_backtest
from qmtl_core.sdk._bars import BAR_FIELDS, Bars, BarsWindow, load_bars
from qmtl_core.sdk._broker import Fill, Trade
from qmtl_core.sdk._node import ComputeFn, Node, StreamInput, TradeOrderPublisherNode, View, parse_interval
from qmtl_core.sdk._orders import (
    BLOCK_REASONS,
    Order,
    OrderStats,
    OrderSubmissionError,
    TradeExecutionService,
    WebhookExecutionService,
    gate_reason,
    normalize_orders,
    route_order,
)
from qmtl_core.sdk._runner import Runner, SubmitHandler, SubmitResult
from qmtl_core.sdk._strategy import Strategy, strategy_id, strategy_source

__all__ = [
    "BAR_FIELDS",
    "BLOCK_REASONS",
    "BacktestResult",
    "Bars",
    "BarsWindow",
    "ComputeContext",
    "ComputeFn",
    "Fill",
    "Node",
    "Order",
    "OrderStats",
    "OrderSubmissionError",
    "Runner",
    "StreamInput",
    "Strategy",
    "SubmitHandler",
    "SubmitResult",
    "Trade",
    "TradeExecutionService",
    "TradeOrderPublisherNode",
    "View",
    "WebhookExecutionService",
    "gate_reason",
    "load_bars",
    "normalize_orders",
    "parse_interval",
    "route_order",
    "run_backtest",
    "strategy_id",
    "strategy_source",
]
