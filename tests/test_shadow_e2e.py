"""The seed's shadow-domain E2E (submit → gateway → control bus → Runner) and the order-gate matrix.

The snippets follow seeds/000 with qmtl's module paths (qmtl_core.gateway, qmtl_core.sdk).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from qmtl_core.controlbus import ControlBus, input_queue
from qmtl_core.gateway import ComputeContextService, StrategySubmit
from qmtl_core.sdk import (
    BLOCK_REASONS,
    ComputeContext,
    Node,
    Runner,
    TradeOrderPublisherNode,
)


@pytest.fixture(autouse=True)
def _fresh_runner() -> Iterator[None]:
    Runner.reset()
    yield
    Runner.reset()


class RecordingService:
    """An execution service that only remembers what it was given."""

    def __init__(self) -> None:
        self.orders: list[dict[str, Any]] = []

    def post_order(self, order: dict[str, Any]) -> None:
        self.orders.append(order)


# --- 1. gateway context --------------------------------------------------------------------------
def test_gateway_keeps_shadow_without_a_world_service() -> None:
    async def main() -> None:
        submit = StrategySubmit(dag_json="{}", meta={"execution_domain": "shadow"},
                                world_id="shadow-world", node_ids_crc32=0)
        svc = ComputeContextService(world_client=None)  # no world service: shadow survives
        ctx = await svc.build(submit)
        assert ctx.execution_domain == "shadow"
        assert ctx.world_id == "shadow-world"
        assert ctx.allow_live is False

    asyncio.run(main())


# --- 2. control bus → hub ------------------------------------------------------------------------
def test_queue_update_and_upsert_carry_world_and_domain() -> None:
    bus = ControlBus()
    hub: list[dict[str, Any]] = []  # what a WebSocket hub would forward
    bus.subscribe(lambda e: hub.append(e.to_json()), world_id="shadow-world", execution_domain="shadow")
    bus.publish_queue_update(tags=["shadow-tag"], interval=60,
                             queues=[{"queue": "q-shadow", "global": False}], match_mode="any",
                             world_id="shadow-world", execution_domain="shadow")
    by_type = {m["type"]: m["data"] for m in hub}
    assert by_type["queue_update"] == {
        "tags": ["shadow-tag"], "interval": 60, "queues": [{"queue": "q-shadow", "global": False}],
        "match_mode": "any", "world_id": "shadow-world", "execution_domain": "shadow", "version": 1}
    upsert = by_type["tagquery.upsert"]
    assert (upsert["tags"], upsert["interval"], upsert["execution_domain"], upsert["world_id"]) == (
        ["shadow-tag"], 60, "shadow", "shadow-world")
    # same (tags, interval, domain) again: no second upsert; the namespace stays separate from live
    bus.publish_queue_update(tags=["shadow-tag"], interval=60, queues=["q-shadow", "q2"],
                             world_id="shadow-world", execution_domain="shadow")
    assert [m["type"] for m in hub].count("tagquery.upsert") == 1
    assert input_queue("shadow-world", "shadow", "prices") == "shadow-world.shadow.mirror.prices"


# --- 3. runner order gating ----------------------------------------------------------------------
def test_runner_blocks_orders_in_shadow() -> None:
    ctx = ComputeContext(world_id="shadow-world", execution_domain="shadow")
    Runner.set_enable_trade_submission(True)
    service = type("S", (), {"orders": [], "post_order": lambda self, o: self.orders.append(o)})()
    Runner.set_trade_execution_service(service)

    src = Node(name="sig", interval=1, period=1)
    pub = TradeOrderPublisherNode(src)
    src.apply_compute_context(ctx)
    pub.apply_compute_context(ctx)
    Runner.feed_queue_data(pub, src.node_id, 1, 0, {"action": "BUY", "size": 1.0})
    assert service.orders == []  # shadow: order publication blocked
    assert Runner.order_stats.blocked["domain_shadow"] == 1
    assert Runner.order_stats.published == 0


def test_shadow_runs_the_same_graph_end_to_end_without_orders() -> None:
    """Submit in shadow, stream a live-like signal through the DAG, see computation but no orders."""
    ctx = asyncio.run(ComputeContextService().build(StrategySubmit(
        dag_json="{}", meta={"execution_domain": "shadow"}, world_id="shadow-world", node_ids_crc32=0)))
    Runner.set_enable_trade_submission(True)
    service = RecordingService()
    Runner.set_trade_execution_service(service)
    src = Node(name="px", interval=60, period=1)
    signal = Node(src, lambda v: {"action": "BUY", "size": 1.0} if v.input[-1] > 100 else None,
                  name="breakout", period=1)
    pub = TradeOrderPublisherNode(signal)
    for node in (src, signal, pub):
        node.apply_compute_context(ctx)
    outs = [Runner.feed_queue_data(src, "shadow-world.shadow.mirror.px", 60, ts, px)
            for ts, px in enumerate([99.0, 101.0, 102.0])]
    assert outs == [99.0, 101.0, 102.0]  # the strategy computed on the mirrored live input
    assert service.orders == []
    assert Runner.order_stats.blocked == {"domain_shadow": 2}


# --- the full gate matrix -------------------------------------------------------------------------
MATRIX = list(itertools.product(["backtest", "dryrun", "live", "shadow"], [True, False],
                                [True, False], [True, False]))


def expected_reason(domain: str, enabled: bool, allow_live: bool, has_service: bool) -> str | None:
    if domain != "live":
        return f"domain_{domain}"
    if not enabled:
        return "submission_disabled"
    if not allow_live:
        return "allow_live_false"
    if not has_service:
        return "no_execution_service"
    return None


@pytest.mark.parametrize(("domain", "enabled", "allow_live", "has_service"), MATRIX)
def test_order_gate_matrix(domain: str, enabled: bool, allow_live: bool, has_service: bool) -> None:
    ctx = ComputeContext(world_id="w", execution_domain=domain, allow_live=allow_live)
    Runner.set_enable_trade_submission(enabled)
    service = RecordingService()
    Runner.set_trade_execution_service(service if has_service else None)
    src = Node(name="sig", interval=1, period=1)
    pub = TradeOrderPublisherNode(src)
    pub.apply_compute_context(ctx)

    orders = Runner.feed_queue_data(pub, src.node_id, 1, 0, {"action": "BUY", "size": 1.0})

    reason = expected_reason(domain, enabled, allow_live, has_service)
    stats = Runner.order_stats
    if reason is None:
        assert [o["action"] for o in service.orders] == ["BUY"]
        assert service.orders[0]["world_id"] == "w" and service.orders[0]["execution_domain"] == "live"
        assert stats.published == 1 and stats.total_blocked == 0
    else:
        assert reason in BLOCK_REASONS
        assert service.orders == []
        assert stats.published == 0
        assert dict(stats.blocked) == {reason: 1}
    assert len(orders) == 1  # the order was built either way; only the gate decides if it is sent


def test_no_compute_context_blocks() -> None:
    Runner.set_enable_trade_submission(True)
    service = RecordingService()
    Runner.set_trade_execution_service(service)
    src = Node(name="sig", interval=1, period=1)
    pub = TradeOrderPublisherNode(src)
    Runner.feed_queue_data(pub, src.node_id, 1, 0, {"action": "SELL", "size": 2.0})
    assert service.orders == [] and Runner.order_stats.blocked == {"no_compute_context": 1}
