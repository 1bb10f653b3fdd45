"""Execution domains: the one normaliser, decision downgrades at a fixed now, the gateway context."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from qmtl_core.domains import (
    EFFECTIVE_MODES,
    EXECUTION_DOMAINS,
    ComputeContext,
    DecisionEnvelope,
    UnknownDomainError,
    domain_for_mode,
    normalize_domain,
    normalize_mode,
    queue_namespace,
    resolve_domain,
)
from qmtl_core.errors import BadInputError, UsageError
from qmtl_core.gateway import ComputeContextService, StrategySubmit

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=timezone.utc)


def envelope(mode: str = "live", *, as_of: datetime | None = NOW - timedelta(minutes=1),
             ttl: int = 600, world: str = "w1", strategy: str = "s1",
             allow_live: bool = True) -> DecisionEnvelope:
    return DecisionEnvelope(world_id=world, strategy_id=strategy, effective_mode=mode,
                            reason="gates passed", as_of=as_of, ttl_sec=ttl, etag="e" * 64,
                            policy_version=3, allow_live=allow_live)


# --- the normaliser -------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("backtest", "backtest"), ("dryrun", "dryrun"), ("live", "live"), ("shadow", "shadow"),
    ("validate", "backtest"), ("compute-only", "backtest"), ("compute_only", "backtest"),
    ("paper", "dryrun"), (" Live ", "live"), ("SHADOW", "shadow"),
])
def test_normalize_domain_maps_domains_and_modes(value: str, expected: str) -> None:
    assert normalize_domain(value) == expected


@pytest.mark.parametrize("value", ["", "prod", "livee", "sim", "dry-run", "paper trading", None, 1, True])
def test_unknown_domain_is_an_error_never_passed_through(value: object) -> None:
    with pytest.raises(UnknownDomainError) as info:
        normalize_domain(value)
    assert isinstance(info.value, BadInputError)
    assert info.value.exit_code == 2
    assert info.value.code == "unknown_execution_domain"


def test_mode_table() -> None:
    assert {m: domain_for_mode(m) for m in EFFECTIVE_MODES} == {
        "validate": "backtest", "compute-only": "backtest", "paper": "dryrun", "live": "live",
        "shadow": "shadow"}
    assert set(EXECUTION_DOMAINS) == {"backtest", "dryrun", "live", "shadow"}
    # "dryrun" is a domain, not an effective mode
    with pytest.raises(UnknownDomainError):
        normalize_mode("dryrun")
    with pytest.raises(UnknownDomainError):
        domain_for_mode("backtest")


def test_envelope_validates_its_fields() -> None:
    with pytest.raises(UnknownDomainError):
        envelope("turbo")
    with pytest.raises(BadInputError, match="timezone-aware"):
        envelope(as_of=datetime(2026, 1, 1))
    with pytest.raises(BadInputError, match="ttl_sec"):
        envelope(ttl=-1)
    assert envelope("paper").execution_domain == "dryrun"
    assert envelope(as_of=None).expires_at() is None


# --- downgrades -----------------------------------------------------------------------------------
def test_missing_decision_downgrades_to_backtest() -> None:
    r = resolve_domain(None, NOW)
    assert (r.domain, r.reason, r.envelope) == ("backtest", "decision_unavailable", None)


def test_expired_decision_downgrades_to_backtest() -> None:
    env = envelope(as_of=NOW - timedelta(seconds=601), ttl=600)
    r = resolve_domain(env, NOW)
    assert (r.domain, r.reason) == ("backtest", "stale_decision")
    assert r.envelope is env


def test_decision_expiring_exactly_now_is_still_valid() -> None:
    r = resolve_domain(envelope(as_of=NOW - timedelta(seconds=600), ttl=600), NOW)
    assert (r.domain, r.reason) == ("live", None)


def test_decision_without_as_of_downgrades() -> None:
    r = resolve_domain(envelope(as_of=None), NOW)
    assert (r.domain, r.reason) == ("backtest", "missing_as_of")


@pytest.mark.parametrize(("mode", "domain"), [("validate", "backtest"), ("compute-only", "backtest"),
                                              ("paper", "dryrun"), ("live", "live"),
                                              ("shadow", "shadow")])
def test_fresh_decision_sets_the_domain(mode: str, domain: str) -> None:
    assert resolve_domain(envelope(mode), NOW).domain == domain


@pytest.mark.parametrize("env", [None, envelope(as_of=None), envelope(as_of=NOW - timedelta(days=1))])
def test_explicit_shadow_is_kept_even_without_a_usable_decision(env: DecisionEnvelope | None) -> None:
    r = resolve_domain(env, NOW, requested="shadow")
    assert (r.domain, r.reason) == ("shadow", None)


def test_a_request_can_lower_but_never_raise_the_domain() -> None:
    assert resolve_domain(envelope("live"), NOW, requested="backtest").domain == "backtest"
    assert resolve_domain(envelope("live"), NOW, requested="paper").domain == "dryrun"
    assert resolve_domain(envelope("paper"), NOW, requested="live").domain == "dryrun"
    assert resolve_domain(envelope("validate"), NOW, requested="live").domain == "backtest"
    assert resolve_domain(envelope("shadow"), NOW, requested="live").domain == "shadow"
    with pytest.raises(UnknownDomainError):
        resolve_domain(envelope("live"), NOW, requested="hyperlive")


def test_resolve_refuses_naive_now() -> None:
    with pytest.raises(BadInputError):
        resolve_domain(None, datetime(2026, 1, 1))


# --- ComputeContext and namespaces ---------------------------------------------------------------
def test_compute_context_normalises_and_defaults_closed() -> None:
    ctx = ComputeContext(world_id="w1", execution_domain="paper")
    assert ctx.execution_domain == "dryrun"
    assert ctx.allow_live is False and ctx.downgrade_reason is None
    assert ctx.namespace == "w1.dryrun"
    with pytest.raises(UnknownDomainError):
        ComputeContext(world_id="w1", execution_domain="prod")
    live = ComputeContext(world_id="w1", execution_domain="live", allow_live=True)
    assert live.with_domain("shadow").allow_live is False
    assert live.with_domain("live").allow_live is True


def test_queue_namespace() -> None:
    assert queue_namespace("shadow-world", "shadow") == "shadow-world.shadow"
    assert queue_namespace("w", "paper") == "w.dryrun"
    for bad in ("", "a.b", "a b"):
        with pytest.raises(BadInputError):
            queue_namespace(bad, "live")


# --- gateway --------------------------------------------------------------------------------------
class SyncWorld:
    def __init__(self, env: DecisionEnvelope | None = None, error: Exception | None = None) -> None:
        self.env, self.error, self.calls = env, error, 0

    def get_decision(self, world_id: str, strategy_id: str) -> DecisionEnvelope | None:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.env


class AsyncWorld:
    def __init__(self, env: DecisionEnvelope | None) -> None:
        self.env = env

    async def get_decision(self, world_id: str, strategy_id: str) -> DecisionEnvelope | None:
        await asyncio.sleep(0)
        return self.env


def submit(domain: str | None = None, world: str = "w1", strategy: str = "s1") -> StrategySubmit:
    meta = {"execution_domain": domain} if domain else {}
    return StrategySubmit(dag_json="{}", meta=meta, world_id=world, node_ids_crc32=0,
                          strategy_id=strategy)


def test_no_world_client_keeps_shadow_and_downgrades_the_rest() -> None:
    svc = ComputeContextService(world_client=None)
    assert svc.build_sync(submit("shadow"), NOW).execution_domain == "shadow"
    for requested in (None, "live", "paper", "backtest"):
        ctx = svc.build_sync(submit(requested), NOW)
        assert (ctx.execution_domain, ctx.downgrade_reason) == ("backtest", "decision_unavailable")
        assert ctx.allow_live is False


def test_world_decision_drives_the_context() -> None:
    ctx = ComputeContextService(SyncWorld(envelope("live"))).build_sync(submit(), NOW)
    assert (ctx.execution_domain, ctx.downgrade_reason, ctx.allow_live) == ("live", None, True)
    assert ctx.policy_version == 3 and ctx.decision_etag == "e" * 64 and ctx.strategy_id == "s1"
    paper = ComputeContextService(SyncWorld(envelope("paper"))).build_sync(submit(), NOW)
    assert (paper.execution_domain, paper.allow_live) == ("dryrun", False)
    closed = ComputeContextService(SyncWorld(envelope("live", allow_live=False))).build_sync(submit(), NOW)
    assert (closed.execution_domain, closed.allow_live) == ("live", False)


def test_stale_or_failing_world_fails_closed() -> None:
    stale = envelope(as_of=NOW - timedelta(hours=1), ttl=60)
    ctx = ComputeContextService(SyncWorld(stale)).build_sync(submit(), NOW)
    assert (ctx.execution_domain, ctx.downgrade_reason) == ("backtest", "stale_decision")
    broken = ComputeContextService(SyncWorld(error=ConnectionError("down"))).build_sync(submit(), NOW)
    assert (broken.execution_domain, broken.downgrade_reason) == ("backtest", "decision_unavailable")
    other = ComputeContextService(SyncWorld(envelope(world="w2"))).build_sync(submit(), NOW)
    assert (other.execution_domain, other.downgrade_reason) == ("backtest", "decision_mismatch")


def test_async_build_awaits_async_world_clients() -> None:
    ctx = asyncio.run(ComputeContextService(AsyncWorld(envelope("paper"))).build(submit(), NOW))
    assert ctx.execution_domain == "dryrun"
    ctx = asyncio.run(ComputeContextService(SyncWorld(envelope("live"))).build(submit(), NOW))
    assert ctx.execution_domain == "live"
    with pytest.raises(UsageError, match="asynchronous"):
        ComputeContextService(AsyncWorld(envelope("paper"))).build_sync(submit(), NOW)


def test_unknown_requested_domain_is_rejected_by_the_gateway() -> None:
    with pytest.raises(UnknownDomainError):
        ComputeContextService().build_sync(submit("prod"), NOW)


def test_strategy_id_falls_back_to_meta_then_dag_hash() -> None:
    s = StrategySubmit(dag_json='{"a":1}', meta={"strategy_id": "abc"}, world_id="w", node_ids_crc32=0)
    assert s.resolved_strategy_id() == "abc"
    h = StrategySubmit(dag_json='{"a":1}', meta={}, world_id="w", node_ids_crc32=0).resolved_strategy_id()
    assert len(h) == 64
