"""The pure campaign tick: each stage's actions and reasons, determinism, keys that follow evidence."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from qmtl_core.campaign import (
    RunSummary,
    StrategyState,
    WorldState,
    campaign_view,
    progress,
    tick,
    worst_exit,
)
from qmtl_core.policy import load_policy_text
from qmtl_core.risk import StoredSnapshot, parse_snapshot

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)

POLICY = load_policy_text("""\
world: w
policy_version: 2
allow_live: true
rules:
  - {id: sharpe, metric: sharpe, min: 0.5}
campaign:
  backtest: {window: 365d, min_observations: 200}
  paper: {window: 30d, min_observations: 20}
governance:
  live_promotion: {mode: manual_approval, approvers: [alice, bob], required_approvals: 1}
""")


def _run(stage: str, status: str = "pass", *, days: int = 400, n: int | None = None, end: datetime | None = None,
         policy_version: int = 2, rev: int = 1, run_id: str | None = None,
         evidence_class: str | None = "hub") -> RunSummary:
    end = end or NOW - timedelta(days=1)
    n = n if n is not None else days + 1
    return RunSummary(run_id or f"{stage}-r", rev, status, policy_version, f"hash-{stage}-{status}-{days}-{n}-{rev}",
                      {"sharpe": 1.0}, ({"id": "sharpe", "status": "fail" if status == "fail" else "pass",
                                        "severity": "blocking", "reason": "sharpe 0.1 is below min 0.5"},),
                      end - timedelta(days=days), end, n, evidence_class)


def _snap(returns: dict[str, int], *, stage: str = "paper", age: timedelta = timedelta(0),
          received: datetime = NOW) -> StoredSnapshot:
    doc = {"world_id": "w", "version": "v", "as_of": (NOW - age).isoformat(), "ttl_sec": 900,
           "weights": {k: 1.0 / len(returns) for k in returns} if returns else {"x": 1.0},
           "realized_returns": {k: [{"ts": (NOW - timedelta(days=n - i)).isoformat(), "r": 0.001}
                                    for i in range(n)] for k, n in returns.items()},
           "provenance": {"actor": "risk", "stage": stage}}
    snap = parse_snapshot(doc)
    return StoredSnapshot(snap, snap.content_hash, received, "t")


def _one(state: WorldState):  # type: ignore[no-untyped-def]
    actions = tick(state, NOW)
    assert len(actions) == len(state.strategies)
    return actions[0]


def _world(*strategies: StrategyState, snapshot: StoredSnapshot | None = None, policy=POLICY) -> WorldState:  # type: ignore[no-untyped-def]
    return WorldState("w", policy, tuple(strategies), snapshot)


def test_backtest_without_evidence_is_fail_closed() -> None:
    a = _one(_world(StrategyState("s", "backtest")))
    assert (a.action, a.reason, a.exit_class) == ("blocked", "insufficient_data", 12)


def test_backtest_failing_gates_is_blocked() -> None:
    a = _one(_world(StrategyState("s", "backtest", {"backtest": _run("backtest", "fail")})))
    assert (a.action, a.reason, a.exit_class) == ("blocked", "validation_failed", 10)
    assert "below min 0.5" in a.detail


def test_backtest_window_measured_on_data() -> None:
    short = _one(_world(StrategyState("s", "backtest", {"backtest": _run("backtest", days=100)})))
    assert (short.action, short.reason) == ("blocked", "backtest_window_incomplete")
    assert "backtest 100/365d, 101/200 obs" in short.detail
    ok = _one(_world(StrategyState("s", "backtest", {"backtest": _run("backtest", "warn")})))
    assert ok.action == "promote_to_paper" and ok.exit_class == 0 and ok.executable
    assert ok.suggested_body == {"strategy_id": "s", "from_stage": "backtest", "to_stage": "paper",
                                 "evidence": {"run_id": "backtest-r", "revision": 1,
                                              "content_hash": "hash-backtest-warn-400-401-1"}}
    assert "metrics" not in ok.suggested_body


def test_paper_without_snapshot_is_fail_closed_and_with_empty_snapshot_waits() -> None:
    s = StrategyState("s", "paper", {"backtest": _run("backtest")})
    a = _one(_world(s))
    assert (a.action, a.reason, a.exit_class) == ("blocked", "risk_snapshot_missing", 12)
    b = _one(_world(s, snapshot=_snap({"other": 5})))
    assert (b.action, b.reason, b.exit_class) == ("observe", "awaiting_data", 11)


def test_paper_new_data_is_evaluated_with_a_data_based_run_id() -> None:
    s = StrategyState("s", "paper", {"backtest": _run("backtest")})
    a = _one(_world(s, snapshot=_snap({"s": 10})))
    assert (a.action, a.reason) == ("evaluate", "new_data")
    assert a.suggested_run_id == "paper-20260301T120000Z"  # the last return, not the clock
    assert a.suggested_body == {"strategy_id": "s", "stage": "paper", "run_id": a.suggested_run_id}
    assert a.requires == ("risk_snapshot:v",)


def test_paper_snapshot_of_another_stage_or_stale_is_not_new_data() -> None:
    s = StrategyState("s", "paper", {"backtest": _run("backtest")})
    # A backtest snapshot is not a paper one: for a paper decision the world has none.
    other = _one(_world(s, snapshot=_snap({"s": 10}, stage="backtest")))
    assert (other.action, other.reason) == ("blocked", "risk_snapshot_missing")
    lagging = _one(_world(s, snapshot=_snap({"s": 10}, age=timedelta(hours=1))))
    assert (lagging.action, lagging.reason) == ("blocked", "risk_snapshot_lagging")
    expired = _one(_world(s, snapshot=_snap({"s": 10}, received=NOW - timedelta(hours=1))))
    assert (expired.action, expired.reason) == ("blocked", "risk_snapshot_expired")


def test_paper_window_incomplete_waits_and_complete_goes_to_governance() -> None:
    end = NOW - timedelta(days=1)
    partial = _run("paper", days=20, n=15, end=end)
    s = StrategyState("s", "paper", {"backtest": _run("backtest"), "paper": partial})
    a = _one(_world(s))
    assert (a.action, a.reason, a.exit_class) == ("observe", "window_incomplete", 11)
    assert a.detail == "paper 20/30d, 15/20 obs"
    done = StrategyState("s", "paper", {"paper": _run("paper", days=31, n=25, end=end)})
    b = _one(_world(done))
    assert (b.action, b.reason, b.exit_class) == ("blocked", "risk_snapshot_missing", 12)
    snap = _snap({"s": 25})  # the same returns the paper run saw: no new data, fresh evidence
    c = _one(_world(done, snapshot=snap))
    assert (c.action, c.reason, c.exit_class) == ("request_live_approval", "approval_required", 11)
    from qmtl_core.governance import Approval, RequestView

    evidence = c.suggested_body["evidence_hash"]
    waiting = RequestView("pr-1", "cron", evidence, NOW - timedelta(hours=1))
    state = WorldState("w", POLICY, (done,), snap, requests={"s": waiting})
    assert (_one(state).action, _one(state).reason) == ("observe", "approval_pending")
    approved = RequestView("pr-1", "cron", evidence, NOW - timedelta(hours=1),
                           (Approval("bob", "approve", evidence, NOW - timedelta(minutes=5)),))
    d = _one(WorldState("w", POLICY, (done,), snap, requests={"s": approved}))
    assert (d.action, d.exit_class) == ("apply_live", 0) and d.executable
    failed = StrategyState("s", "paper", {"paper": _run("paper", "fail", days=31, n=25, end=end)})
    assert _one(_world(failed)).reason == "validation_failed"


def test_allow_live_false_and_disabled_block_before_governance() -> None:
    done = StrategyState("s", "paper", {"paper": _run("paper", days=31, n=25)})
    no_live = load_policy_text(POLICY.model_dump_json().replace('"allow_live":true', '"allow_live":false'))
    assert _one(_world(done, policy=no_live)).reason == "allow_live_false"
    text = "world: w\npolicy_version: 2\nallow_live: true\ncampaign: {paper: {window: 30d, min_observations: 20}}\n"
    assert _one(_world(done, policy=load_policy_text(text))).reason == "promotion_disabled"


def test_policy_change_re_evaluates_under_the_new_version() -> None:
    s = StrategyState("s", "backtest", {"backtest": _run("backtest", policy_version=1)})
    a = _one(_world(s))
    assert (a.action, a.reason) == ("evaluate", "policy_changed")
    assert a.suggested_run_id == "backtest-r-policy2"


def test_live_failing_is_demoted_and_passing_is_monitored() -> None:
    bad = _one(_world(StrategyState("s", "live", {"live": _run("live", "fail", days=10)})))
    assert bad.action == "demote" and bad.executable
    good = _one(_world(StrategyState("s", "live", {"live": _run("live", days=10)})))
    assert (good.action, good.reason, good.exit_class) == ("observe", "live_monitoring", 0)


def test_keys_follow_evidence() -> None:
    s1 = StrategyState("s", "backtest", {"backtest": _run("backtest", "warn")})
    s2 = StrategyState("s", "backtest", {"backtest": _run("backtest", "warn", rev=2)})
    k1, k2 = _one(_world(s1)).idempotency_key, _one(_world(s2)).idempotency_key
    assert k1 != k2 and len(k1) == 64
    assert _one(_world(s1)).idempotency_key == k1


def test_retired_strategies_get_no_action() -> None:
    assert tick(_world(StrategyState("s", "retired")), NOW) == []


def test_worst_exit_order() -> None:
    assert worst_exit([0, 11, 10]) == 10 and worst_exit([11, 12, 10]) == 12
    assert worst_exit([0, 11]) == 11 and worst_exit([]) == 0


def test_progress_without_run_and_view() -> None:
    p = progress(POLICY, "paper", None)
    assert not p.satisfied and p.label() == "paper 0/30d, 0/20 obs"
    views = campaign_view(_world(StrategyState("s", "paper", {"backtest": _run("backtest")})), NOW)
    assert [p.stage for p in views[0].progress] == ["backtest", "paper"]
    assert views[0].phase == "paper_campaign" and views[0].next_action is not None


_stage = st.sampled_from(["backtest", "paper", "live"])
_status = st.sampled_from(["pass", "warn", "fail", "insufficient_data"])


@st.composite
def _states(draw):  # type: ignore[no-untyped-def]
    strategies = []
    for i in range(draw(st.integers(1, 6))):
        stage = draw(_stage)
        runs = {}
        for s in ("backtest", "paper", "live"):
            if draw(st.booleans()):
                runs[s] = _run(s, draw(_status), days=draw(st.integers(0, 500)), n=draw(st.integers(0, 600)),
                               policy_version=draw(st.sampled_from([1, 2])), rev=draw(st.integers(1, 3)))
        strategies.append(StrategyState(f"s{i}", stage, runs))
    snap = None
    if draw(st.booleans()):
        snap = _snap({f"s{i}": draw(st.integers(1, 40)) for i in range(draw(st.integers(0, 3)))},
                     stage=draw(_stage), age=timedelta(minutes=draw(st.integers(0, 30))))
    return WorldState("w", POLICY, tuple(strategies), snap)


@settings(max_examples=200, deadline=None)
@given(_states(), st.integers(0, 3600))
def test_tick_is_deterministic_and_keys_unique(state: WorldState, seconds: int) -> None:
    now = NOW + timedelta(seconds=seconds)
    first, second = tick(state, now), tick(state, now)
    assert [a.to_dict() for a in first] == [a.to_dict() for a in second]
    keys = [a.idempotency_key for a in first]
    assert len(keys) == len(set(keys))
    reversed_state = WorldState(state.world, state.policy, tuple(reversed(state.strategies)), state.snapshot)
    assert [a.to_dict() for a in tick(reversed_state, now)] == [a.to_dict() for a in first]
