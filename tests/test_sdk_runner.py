"""SDK: node and strategy ids, DAG validation, order normalisation, streaming Runner, webhook service."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from datetime import datetime, timezone
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from qmtl_core.errors import BadInputError, BlockedError
from qmtl_core.sdk import (
    Bars,
    ComputeContext,
    Node,
    OrderSubmissionError,
    Runner,
    StreamInput,
    Strategy,
    TradeOrderPublisherNode,
    View,
    WebhookExecutionService,
    normalize_orders,
    parse_interval,
    strategy_id,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_runner() -> Iterator[None]:
    Runner.reset()
    yield
    Runner.reset()


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource finds the module's source through sys.modules
    spec.loader.exec_module(module)
    return module


def last_close(view: View) -> float:
    return float(view.input.close[-1])


# --- ids ------------------------------------------------------------------------------------------
def test_node_id_is_a_stable_content_hash() -> None:
    def make(period: int = 3, name: str = "sig", fn: Any = last_close) -> Node:
        return Node(StreamInput(name="price", interval="1m"), fn, name=name, interval=60, period=period)

    a, b = make(), make()
    assert a.node_id == b.node_id and len(a.node_id) == 64
    assert make(period=4).node_id != a.node_id
    assert make(name="other").node_id != a.node_id
    assert make(fn=lambda v: None).node_id != a.node_id
    other_input = Node(StreamInput(name="volume", interval="1m"), last_close, name="sig", period=3)
    assert other_input.node_id != a.node_id
    assert Node(name="sig", interval=1, period=1).node_id == Node(name="sig", interval="1s").node_id


def test_parse_interval() -> None:
    assert [parse_interval(v) for v in (60, "60", "60s", "1m", "2h", "1d")] == [60, 60, 60, 60, 7200, 86400]
    for bad in (0, -1, "1w", "abc", True, "0m"):
        with pytest.raises(BadInputError):
            parse_interval(bad)  # type: ignore[arg-type]


def test_node_argument_validation() -> None:
    with pytest.raises(BadInputError, match="needs an interval"):
        Node(name="orphan")
    with pytest.raises(BadInputError, match="period"):
        Node(name="x", interval=1, period=0)
    with pytest.raises(BadInputError, match="not callable"):
        Node(name="x", interval=1, compute_fn=42)  # type: ignore[arg-type]
    with pytest.raises(BadInputError):
        Node(input=[object()], name="x", interval=1)  # type: ignore[list-item]
    with pytest.raises(BadInputError):
        Node(name="x", interval=1).apply_compute_context("live")  # type: ignore[arg-type]


STRATEGY_SRC = """
from qmtl_core.sdk import Node, StreamInput, Strategy, TradeOrderPublisherNode

class Tiny(Strategy):
    defaults = {"threshold": 100.0}

    def setup(self):
        price = StreamInput(name="price", interval="1d")
        sig = Node(price, lambda v: 1.0 if v.input.close[-1] > self.params["threshold"] else 0.0,
                   name="sig", period=1, params=self.params)
        self.add_nodes(price, sig, TradeOrderPublisherNode(sig))
"""


def test_strategy_id_is_stable_and_tracks_code_and_params(tmp_path: Path) -> None:
    path = tmp_path / "tiny.py"
    path.write_text(STRATEGY_SRC)
    mod = load_module(path, "tiny_a")
    sid = strategy_id(mod.Tiny)
    assert sid == strategy_id(mod.Tiny()) == strategy_id(load_module(path, "tiny_b").Tiny)
    assert strategy_id(mod.Tiny(threshold=50.0)) != sid
    path2 = tmp_path / "tiny2.py"
    path2.write_text(STRATEGY_SRC + "\n# a comment is a code change too\n")
    assert strategy_id(load_module(path2, "tiny_c").Tiny) != sid
    with pytest.raises(BadInputError):
        strategy_id(object)  # type: ignore[arg-type]


def test_example_strategies_load_by_path_and_have_ids() -> None:
    sma = load_module(ROOT / "examples/strategies/sma_crossover.py", "ex_sma")
    mr = load_module(ROOT / "examples/strategies/mean_reversion.py", "ex_mr")
    ids = {strategy_id(sma.SmaCrossover), strategy_id(mr.MeanReversion),
           strategy_id(sma.SmaCrossover(fast=5, slow=30))}
    assert len(ids) == 3
    dag = json.loads(sma.SmaCrossover().dag_json())
    assert [n["kind"] for n in dag["nodes"]] == ["stream_input", "node", "trade_order_publisher"]
    with pytest.raises(BadInputError):
        sma.SmaCrossover(fast=30, slow=10).build()
    with pytest.raises(BadInputError, match="no parameter"):
        sma.SmaCrossover(speed=3)


def test_dag_validation() -> None:
    class Missing(Strategy):
        def setup(self) -> None:
            price = StreamInput()
            self.add_nodes(Node(price, last_close, name="sig"))

    class Empty(Strategy):
        def setup(self) -> None:
            pass

    class Twins(Strategy):
        def setup(self) -> None:
            price = StreamInput()
            self.add_nodes(price, Node(price, last_close, name="a"), Node(price, last_close, name="a"))

    class Unordered(Strategy):
        def setup(self) -> None:
            price = StreamInput()
            sig = Node(price, last_close, name="sig")
            self.add_nodes([TradeOrderPublisherNode(sig), sig], price)

    with pytest.raises(BadInputError, match="was not added"):
        Missing().build()
    with pytest.raises(BadInputError, match="no nodes"):
        Empty().build()
    with pytest.raises(BadInputError, match="identical"):
        Twins().build()
    assert [n.kind for n in Unordered().nodes] == ["stream_input", "node", "trade_order_publisher"]
    with pytest.raises(NotImplementedError):
        Strategy().build()


# --- orders ---------------------------------------------------------------------------------------
def test_normalize_orders() -> None:
    assert normalize_orders(None) == []
    assert normalize_orders(0.5) == [{"action": "TARGET", "target": 0.5}]
    assert normalize_orders({"action": "buy", "size": 2, "symbol": "X"}) == [
        {"action": "BUY", "size": 2.0, "symbol": "X"}]
    assert normalize_orders({"target": -1}) == [{"action": "TARGET", "target": -1.0}]
    assert len(normalize_orders([1.0, {"action": "SELL", "size": 1}])) == 2
    for bad in (True, "buy", {"action": "BUY", "size": 0}, {"action": "BUY", "size": float("nan")},
                {"action": "HOLD"}, {"action": "SELL"}, float("inf")):
        with pytest.raises(BadInputError):
            normalize_orders(bad)


# --- streaming ------------------------------------------------------------------------------------
class RecordingService:
    def __init__(self) -> None:
        self.orders: list[dict[str, Any]] = []

    def post_order(self, order: dict[str, Any]) -> None:
        self.orders.append(order)


def momentum_dag() -> tuple[StreamInput, Node, TradeOrderPublisherNode]:
    price = StreamInput(name="price", interval=60, symbol="BTC")
    sig = Node(price, lambda v: 1.0 if v[price].close[-1] > v[price].close[0] else -1.0,
               name="mom", period=3)
    return price, sig, TradeOrderPublisherNode(sig, symbol="BTC")


def bar(px: float) -> dict[str, float]:
    return {"open": px, "high": px, "low": px, "close": px, "volume": 1.0}


def test_streaming_warms_up_then_publishes_in_live() -> None:
    price, sig, pub = momentum_dag()
    ctx = ComputeContext(world_id="w", execution_domain="live", allow_live=True, strategy_id="s1")
    for n in (price, sig, pub):
        n.apply_compute_context(ctx)
    service = RecordingService()
    Runner.set_trade_execution_service(service)
    Runner.set_enable_trade_submission(True)
    outs = [Runner.feed_queue_data(price, "w.live.btc", 60, 1_700_000_000 + 60 * i, bar(px))
            for i, px in enumerate([100.0, 101.0, 103.0, 99.0])]
    assert [o is not None for o in outs] == [True, True, True, True]  # a source passes data through
    assert [o["target"] for o in service.orders] == [1.0, -1.0]  # after the 3-bar warm-up only
    first = service.orders[0]
    assert (first["world_id"], first["execution_domain"], first["strategy_id"], first["symbol"]) == (
        "w", "live", "s1", "BTC")
    assert first["node_id"] == pub.node_id and len(first["client_order_id"]) == 32
    assert service.orders[0]["client_order_id"] != service.orders[1]["client_order_id"]
    assert Runner.order_stats.as_dict() == {"published": 2, "failed": 0, "blocked": {}}


def test_streaming_windows_match_backtest_shapes() -> None:
    seen: list[Any] = []
    price = StreamInput(name="price", interval=60)
    sig = Node(price, lambda v: seen.append(v[price]) or None, name="spy", period=2)
    nums = Node(name="n", interval=60)
    after = Node(nums, lambda v: seen.append(v[nums]) or None, name="after", period=2)
    stamps = [datetime(2026, 1, 2, 9, 30, tzinfo=timezone.utc), "2026-01-02T09:31:00Z"]
    for i in range(2):
        Runner.feed_queue_data(price, "q", 60, stamps[i], bar(10.0 + i))
        Runner.feed_queue_data(nums, "nq", 60, i, float(i))
    assert isinstance(seen[0], Bars) and seen[0].close.tolist() == [10.0, 11.0]
    assert [str(t) for t in seen[0].timestamp] == ["2026-01-02T09:30:00.000000000",
                                                   "2026-01-02T09:31:00.000000000"]
    assert isinstance(seen[1], np.ndarray) and seen[1].tolist() == [0.0, 1.0]
    assert not seen[1].flags.writeable
    assert after.inputs == (nums,)
    with pytest.raises(BadInputError, match="interval"):
        Runner.feed_queue_data(sig, price.node_id, 30, 0, bar(1.0))


def test_runner_settings_validate_and_reset() -> None:
    with pytest.raises(BadInputError):
        Runner.set_enable_trade_submission("yes")  # type: ignore[arg-type]
    with pytest.raises(BadInputError):
        Runner.set_trade_execution_service(object())  # type: ignore[arg-type]
    Runner.set_enable_trade_submission(True)
    Runner.set_trade_execution_service(RecordingService())
    Runner.order_stats.record_blocked("domain_shadow")
    Runner.reset()
    assert Runner.trade_submission_enabled() is False
    assert Runner._trade_execution_service is None
    assert Runner.order_stats.as_dict() == {"published": 0, "failed": 0, "blocked": {}}


def test_local_submit_resolves_and_applies_the_context() -> None:
    sma = load_module(ROOT / "examples/strategies/sma_crossover.py", "ex_sma2")
    strat = sma.SmaCrossover()
    res = Runner.submit(strat, world="demo")
    assert (res.context.execution_domain, res.context.downgrade_reason) == ("backtest", "decision_unavailable")
    assert res.strategy_id == strategy_id(strat) == res.context.strategy_id
    assert all(n.compute_context == res.context for n in strat.nodes)
    shadow = Runner.submit(strat, world="demo", execution_domain="shadow")
    assert shadow.context.execution_domain == "shadow"
    Runner.set_submit_handler(lambda s, w, d: res)
    assert Runner.submit(strat, world="x") is res


# --- webhook service ------------------------------------------------------------------------------
def test_webhook_only_through_the_gate() -> None:
    received: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(json.loads(request.content))
        assert request.headers["Idempotency-Key"] == received[-1]["client_order_id"]
        return httpx.Response(200, json={"ok": True})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        hook = WebhookExecutionService("https://broker.example.invalid/orders", client=client)
        with pytest.raises(BlockedError, match="order gate"):
            hook.post_order({"action": "BUY", "size": 1.0})
        assert received == []
        src = Node(name="sig", interval=1)
        pub = TradeOrderPublisherNode(src)
        pub.apply_compute_context(ComputeContext(world_id="w", execution_domain="live", allow_live=True))
        Runner.set_trade_execution_service(hook)
        Runner.set_enable_trade_submission(True)
        Runner.feed_queue_data(pub, src.node_id, 1, 0, {"action": "BUY", "size": 1.0})
    assert [o["action"] for o in received] == ["BUY"]
    assert Runner.order_stats.published == 1
    with pytest.raises(BadInputError):
        WebhookExecutionService("ftp://x")


def test_webhook_failure_is_counted_and_raised() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(503, text="down"))
    with httpx.Client(transport=transport) as client:
        Runner.set_trade_execution_service(WebhookExecutionService("https://b.invalid/o", client=client))
        Runner.set_enable_trade_submission(True)
        src = Node(name="sig", interval=1)
        pub = TradeOrderPublisherNode(src)
        pub.apply_compute_context(ComputeContext(world_id="w", execution_domain="live", allow_live=True))
        with pytest.raises(OrderSubmissionError, match="503"):
            Runner.feed_queue_data(pub, src.node_id, 1, 0, 1.0)
    assert Runner.order_stats.failed == 1 and Runner.order_stats.published == 0


def test_unserialisable_order_is_a_clear_error() -> None:
    src = Node(name="sig", interval=1)
    pub = TradeOrderPublisherNode(src)
    with pytest.raises(BadInputError, match="JSON"):
        Runner.feed_queue_data(pub, src.node_id, 1, object(), 1.0)


def test_source_module_is_hashed(tmp_path: Path) -> None:
    code = textwrap.dedent(STRATEGY_SRC)
    ns: dict[str, Any] = {"__name__": "no_file_module"}
    exec(compile(code, "<no file>", "exec"), ns)  # noqa: S102 - a class without a source file
    assert len(strategy_id(ns["Tiny"])) == 64
