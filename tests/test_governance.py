"""Governance on both backends: every block reason, four eyes, evidence binding, apply/rollback/halt."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from qmtl_core.datafiles import ReturnsTable
from qmtl_core.errors import BlockedError, ConflictError
from qmtl_core.risk import parse_snapshot
from qmtl_core.store import schema
from tests._service import Clock, make_service

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


def policy_text(world: str = "gov", *, allow_live: bool = True, mode: str = "manual_approval", version: int = 1,
                slots: int = 2, cooldown: str = "24h", approvers: bool | None = None) -> str:
    """A test world; ``approvers`` (default: under manual_approval) lists alice, bob and carol, two
    of whom must approve a promotion or a change of the policy in force."""
    listed = mode == "manual_approval" if approvers is None else approvers
    approvers_text = "    approvers: [alice, bob, carol]\n    required_approvals: 2\n" if listed else ""
    return f"""\
world: {world}
policy_version: {version}
allow_live: {str(allow_live).lower()}
rules:
  - {{id: sharpe, metric: sharpe, min: 0.3}}
campaign:
  backtest: {{window: 300d, min_observations: 250}}
  paper: {{window: 10d, min_observations: 8}}
governance:
  live_promotion:
    mode: {mode}
{approvers_text}    approval_ttl: 72h
    cooldown: {cooldown}
    max_live_slots: {slots}
risk: {{snapshot_max_age: 1h, decision_ttl: 10m}}
"""


class Setup:
    """A world with strategies taken through backtest and a full paper window."""

    def __init__(self, svc: Any, world: str = "gov") -> None:
        self.svc, self.world = svc, world

    def backtest(self, *ids: str, mean: float = 0.003) -> None:
        rng = np.random.default_rng(3)
        stamps = tuple(datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=i) for i in range(400))
        table = ReturnsTable(tuple(ids), stamps, rng.normal(mean, 0.01, (len(ids), 400)))
        self.svc.evaluate_cohort(self.world, stage="backtest", returns=table)
        self.loop()

    def snapshot(self, ids: list[str], days: int, *, version: str, mean: float = 0.002, lag: timedelta = timedelta(0),
                 weights: dict[str, float] | None = None, end: datetime | None = None, stage: str = "paper",
                 step: timedelta = timedelta(days=1)) -> None:
        now = self.svc.clock()
        last = end or now
        rets = {sid: [{"ts": (last - step * (days - i)).isoformat(),
                       "r": mean * (1 if i % 3 else -0.5)} for i in range(days)] for sid in ids}
        cover = weights or {sid: 1.0 / len(ids) for sid in ids}
        # Posted by a trusted producer: the only snapshots a decision reads (DESIGN §11).
        self.svc.as_actor("risk", role="producer").put_risk_snapshot(parse_snapshot({
            "world_id": self.world, "version": version, "as_of": (now - lag).isoformat(), "ttl_sec": 3600,
            "weights": cover, "realized_returns": rets, "provenance": {"actor": "risk", "stage": stage}}))

    def loop(self) -> Any:
        return self.svc.campaign_iteration([self.world], execute=True, holder="t", lease_ttl=timedelta(minutes=5))[0]

    def ready(self, *ids: str) -> None:
        """Backtest, promote to paper (loop), and evaluate a full paper window from a fresh snapshot
        (directly, so no governance action runs before the test's own)."""
        self.backtest(*ids)
        # Paper returns count only when observed after the strategy entered paper: let 12 days pass.
        self.svc.clock.advance(days=12)
        self.snapshot(list(ids), 12, version="p12")
        for sid in ids:
            self.svc.record_evaluation(self.world, strategy_id=sid, stage="paper")


@pytest.fixture
def worlds(worlds_dir: Path) -> Path:
    (worlds_dir / "gov.yaml").write_text(policy_text())
    (worlds_dir / "auto.yaml").write_text(policy_text("auto", mode="auto_apply"))
    (worlds_dir / "nolive.yaml").write_text(policy_text("nolive", allow_live=False, mode="auto_apply"))
    (worlds_dir / "closed.yaml").write_text(policy_text("closed", mode="disabled"))
    return worlds_dir


@pytest.fixture
def svc(store_url: str, worlds: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    service = make_service(store_url, worlds, tmp_path / "home", Clock(T0)).as_actor("cron")
    yield service
    service.close()


def _blocked_entry(svc: Any, world: str) -> dict[str, Any]:
    entries = svc.audit_log(world=world, kind="promotion.blocked")
    assert entries, "a blocked decision must be in the ledger"
    return entries[-1].to_dict()


def _assert_blocked(svc: Any, world: str, strategy: str, code: str, exit_code: int) -> None:
    out = svc.promote(world, strategy)
    assert out.status == "blocked" and code in out.gate.codes and out.exit_code == exit_code, out.to_dict()
    entry = _blocked_entry(svc, world)
    assert code in [r["code"] for r in entry["payload"]["reasons"]]
    with svc.store.read() as conn:
        t = schema.promotion_requests
        row = conn.execute(sa.select(t).where(t.c.request_id == out.request_id)).one()
    assert row.status == "blocked"
    assert next(v for v in svc.campaign(world) if v.strategy_id == strategy).stage != "live"


# --- one scenario per block reason ---------------------------------------------------------------------
def test_allow_live_false_blocks_even_auto_apply(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "nolive")
    s.ready("a")
    _assert_blocked(svc, "nolive", "a", "allow_live_false", 10)
    out = s.loop()
    assert all(a["action"] != "apply_live" for a in out.actions)


def test_promotion_disabled(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc, "closed").ready("a")
    _assert_blocked(svc, "closed", "a", "promotion_disabled", 10)


def test_not_in_paper_never_skips_paper(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "auto")
    s.ready("a")  # in paper with full evidence; take it back to backtest to test the gate itself
    svc.demote("auto", "a", to="backtest", reason="test")
    _assert_blocked(svc, "auto", "a", "not_in_paper", 10)


def test_paper_window_incomplete(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.backtest("a")
    svc.clock.advance(days=4)
    s.snapshot(["a"], 4, version="p4")
    s.loop()
    _assert_blocked(svc, "gov", "a", "paper_window_incomplete", 10)


def test_validation_failed(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.backtest("a")
    svc.clock.advance(days=12)
    s.snapshot(["a"], 12, version="bad", mean=-0.004)
    s.loop()
    _assert_blocked(svc, "gov", "a", "validation_failed", 10)


def test_risk_snapshot_missing_is_fail_closed(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.backtest("a")
    svc.record_evaluation("gov", strategy_id="a", stage="paper",
                          returns=[(T0 - timedelta(days=12 - i), 0.002) for i in range(12)])
    _assert_blocked(svc, "gov", "a", "risk_snapshot_missing", 12)


def test_risk_snapshot_expired_is_fail_closed(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc).ready("a")
    svc.clock.advance(hours=2)
    _assert_blocked(svc, "gov", "a", "risk_snapshot_expired", 12)


def test_risk_snapshot_lagging_is_fail_closed(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.backtest("a")
    svc.record_evaluation("gov", strategy_id="a", stage="paper",
                          returns=[(T0 - timedelta(days=12 - i), 0.002) for i in range(12)])
    s.snapshot(["a"], 12, version="old", lag=timedelta(hours=3))  # the only snapshot: as_of 3h ago
    _assert_blocked(svc, "gov", "a", "risk_snapshot_lagging", 12)


def test_risk_snapshot_incomplete_is_fail_closed(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.ready("a", "b")
    s.snapshot(["b"], 12, version="only-b", weights={"b": 1.0})
    _assert_blocked(svc, "gov", "a", "risk_snapshot_incomplete", 12)


def test_cooldown_and_slots(svc, worlds: Path) -> None:  # type: ignore[no-untyped-def]
    (worlds / "gov.yaml").write_text(policy_text(mode="auto_apply", slots=1))
    s = Setup(svc)
    s.ready("a", "b")
    s.loop()  # auto_apply: a goes live; b is held by the cooldown and the single slot
    assert {v.strategy_id: v.stage for v in svc.campaign("gov")} == {"a": "live", "b": "paper"}
    out = svc.promote("gov", "b")
    assert {"cooldown_active", "max_live_slots_exceeded"} <= set(out.gate.codes) and out.exit_code == 10
    assert _blocked_entry(svc, "gov")["payload"]["reasons"]


def test_world_halted_blocks_and_decisions_become_compute_only(svc) -> None:  # type: ignore[no-untyped-def]
    (svc.settings.worlds_dir / "auto.yaml").write_text(policy_text("auto", mode="auto_apply"))
    s = Setup(svc, "auto")
    s.ready("a", "b")
    assert svc.promote("auto", "a").status == "applied"
    assert svc.decision("auto", "a").effective_mode == "live"
    halted = svc.set_halted("auto", halted=True, reason="broker outage")
    assert halted["was_live"] == ["a"] and halted["stages_changed"] == {"a": "paper"}
    d = svc.decision("auto", "a")
    assert (d.effective_mode, d.execution_domain, d.reason) == ("compute-only", "backtest", "world_halted")
    assert {x["strategy_id"]: x["stage"] for x in svc.activations("auto")["activations"]} == {"a": "paper",
                                                                                              "b": "paper"}
    _assert_blocked(svc, "auto", "b", "world_halted", 10)
    resumed = svc.set_halted("auto", halted=False, reason="fixed")
    # the way back goes through the gate, which blocks (recorded): a went live less than a cooldown ago
    [entry] = resumed["reentries"]
    assert (entry["strategy_id"], entry["status"]) == ("a", "blocked") and "cooldown_active" in entry["message"]
    assert svc.decision("auto", "a").effective_mode == "paper"  # resume never makes it live on its own
    # The halt took a back to paper: only paper returns observed since then count (a new window).
    svc.clock.advance(days=11)
    s.snapshot(["a", "b"], 12, version="p12-later")
    s.loop()  # the gate decides again; under auto_apply the loop applies once every gate passes
    assert svc.decision("auto", "a").effective_mode == "live"
    kinds = [e.kind for e in svc.audit_log(world="auto")]
    assert "world.halted" in kinds and "world.resumed" in kinds


# --- manual approval: four eyes, evidence binding ---------------------------------------------------
def test_manual_approval_flow_and_four_eyes(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc).ready("a")
    opened = svc.as_actor("carol").promote("gov", "a", reason="paper looks good")
    assert opened.status == "pending" and opened.exit_code == 11 and opened.request_id
    again = svc.promote("gov", "a")
    assert again.request_id == opened.request_id  # the same evidence: the same open request
    rid = opened.request_id
    with pytest.raises(BlockedError, match="not an approver"):
        svc.as_actor("mallory").decide_request(rid, decision="approve", reason="x")
    with pytest.raises(BlockedError, match="cannot approve"):
        svc.as_actor("carol").decide_request(rid, decision="approve", reason="mine")  # the requester
    first = svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    assert first.status == "pending" and first.gate.valid_approvals == ("alice",)
    twice = svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok again")
    assert twice.status == "pending" and twice.gate.valid_approvals == ("alice",)  # counts once
    done = svc.as_actor("bob").decide_request(rid, decision="approve", reason="ship it")
    assert done.status == "applied" and done.exit_code == 0
    assert {v.strategy_id: v.stage for v in svc.campaign("gov")} == {"a": "live"}
    assert svc.decision("gov", "a").effective_mode == "live"
    with pytest.raises(ConflictError, match="not pending"):
        svc.as_actor("alice").decide_request(rid, decision="approve", reason="late")
    applied = svc.audit_log(world="gov", kind="promotion.applied")[-1]
    assert applied.payload["approvals"] == ["alice", "bob"] and applied.payload["request_id"] == rid


def test_submitter_cannot_approve(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc.as_actor("alice"))
    s.ready("a")  # alice submitted (recorded the runs of) strategy a
    rid = svc.promote("gov", "a").request_id
    with pytest.raises(BlockedError, match="submitted"):
        svc.as_actor("alice").decide_request(rid, decision="approve", reason="my own")


def test_new_evidence_voids_the_request_and_old_approvals(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.ready("a")
    rid = svc.promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    s.snapshot(["a"], 13, version="p13")  # new paper data arrives ...
    s.loop()  # ... and is evaluated: the evidence changed
    voided = svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok")
    assert voided.status == "voided" and voided.exit_code == 4
    with svc.store.read() as conn:
        t = schema.promotion_requests
        assert conn.execute(sa.select(t.c.status).where(t.c.request_id == rid)).scalar() == "void"
    fresh = svc.promote("gov", "a")
    assert fresh.request_id != rid and fresh.gate.valid_approvals == ()  # alice's old approval does not count


def test_approvals_expire(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.ready("a")
    rid = svc.promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    svc.clock.advance(hours=73)
    s.snapshot(["a"], 12, version="same-data-later", end=T0 + timedelta(days=12))  # fresh again, same substance
    out = svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok")
    assert out.status == "pending" and "approvals_expired" in out.gate.codes


def test_reject_closes_the_request(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc).ready("a")
    rid = svc.promote("gov", "a").request_id
    out = svc.as_actor("carol").decide_request(rid, decision="reject", reason="too risky")
    assert out.status == "rejected"
    assert svc.promotion_requests(world="gov") == []
    assert svc.promotion_requests(world="gov", include_closed=True)[0]["status"] == "rejected"


def test_dry_run_writes_nothing(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc).ready("a")
    before = len(svc.audit_log())
    out = svc.promote("gov", "a", dry_run=True)
    assert out.status == "planned" and out.gate.codes == ["approval_required"]
    assert len(svc.audit_log()) == before and svc.promotion_requests(include_closed=True) == []


# --- the loop hands live actions to governance ---------------------------------------------------------
def test_loop_requests_approval_then_applies_once_approved(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.ready("a")
    out = s.loop()
    assert [a["action"] for a in out.actions if a["outcome"] == "executed"] == ["request_live_approval"]
    assert out.exit_code == 11  # approval pending
    rid = svc.promotion_requests(world="gov")[0]["request_id"]
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok")  # applies
    assert {v.strategy_id: v.stage for v in svc.campaign("gov")} == {"a": "live"}
    again = s.loop()
    assert not [a for a in again.actions if a["outcome"] == "executed"]


def test_loop_auto_applies_only_after_paper(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "auto")
    s.backtest("a")
    assert {v.stage for v in svc.campaign("auto")} == {"paper"}  # promoted to paper, not live
    svc.clock.advance(days=12)  # paper returns observed after entry
    s.snapshot(["a"], 12, version="p12")
    out = s.loop()
    assert [a["action"] for a in out.actions if a["outcome"] == "executed"] == ["evaluate", "apply_live"]
    assert {v.stage for v in svc.campaign("auto")} == {"live"}


# --- activation sets -----------------------------------------------------------------------------------
def test_apply_touches_no_other_activation_and_rollback_restores(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc).ready("a", "b")
    before = svc.activations("gov")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    assert svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok").status == "applied"
    after = svc.activations("gov")
    b_before = next(x for x in before["activations"] if x["strategy_id"] == "b")
    b_after = next(x for x in after["activations"] if x["strategy_id"] == "b")
    assert b_before == b_after and after["set_version"] == before["set_version"] + 1
    a_after = next(x for x in after["activations"] if x["strategy_id"] == "a")
    assert a_after["stage"] == "live" and a_after["weight"] == pytest.approx(0.5)
    result = svc.rollback("gov", reason="undo")
    assert result["changed"] == {"a": "paper"}
    assert {v.strategy_id: v.stage for v in svc.campaign("gov")} == {"a": "paper", "b": "paper"}
    assert svc.decision("gov", "a").effective_mode == "paper"
    assert svc.audit_verify().ok


def test_history_at_answers_what_was_live_then_and_why(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc).ready("a")
    rid = svc.promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="solid")
    svc.clock.advance(minutes=1)
    svc.as_actor("bob").decide_request(rid, decision="approve", reason="agree")
    live_at = svc.clock()
    svc.clock.advance(days=1)
    svc.demote("gov", "a", reason="drawdown alarm")
    now = svc.history("gov")
    assert now["live"] == [] and now["activations"][0]["stage"] == "paper"
    then = svc.history("gov", at=live_at + timedelta(hours=1))
    assert then["live"] == ["a"]
    why = then["activations"][0]["why"]
    assert why["kind"] == "promotion.applied" and why["actor"] == "bob"
    assert [x["actor"] for x in why["approvals"]] == ["alice", "bob"]
    before = svc.history("gov", at=T0 - timedelta(days=1))
    assert before["activations"] == []


def test_unknown_strategy_and_request(svc) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.errors import RequestNotFound, StrategyNotFound

    with pytest.raises(StrategyNotFound):
        svc.promote("gov", "nope")
    with pytest.raises(RequestNotFound):
        svc.decide_request("pr-nope", decision="approve", reason="x")
    with pytest.raises(ConflictError, match="no previous activation set"):
        svc.rollback("gov", reason="x")


# --- regressions from review -------------------------------------------------------------------------
def test_paper_run_gated_under_an_older_policy_cannot_go_live(svc) -> None:  # type: ignore[no-untyped-def]
    (svc.settings.worlds_dir / "auto.yaml").write_text(policy_text("auto", mode="auto_apply", approvers=True))
    s = Setup(svc, "auto")
    s.ready("a")
    tighter = policy_text("auto", mode="auto_apply", version=2, approvers=True).replace(
        "  - {id: sharpe, metric: sharpe, min: 0.3}",
        "  - {id: sharpe, metric: sharpe, min: 0.3}\n  - {id: strict, metric: sharpe, min: 50, stages: [paper]}")
    (svc.settings.worlds_dir / "auto.yaml").write_text(tighter)
    svc.load_world("auto")  # recorded as a proposal (a is in paper), in force once two approvers agree
    svc.as_actor("alice").approve_policy("auto", version=2, reason="stricter paper gate")
    svc.as_actor("bob").approve_policy("auto", version=2, reason="agreed")
    out = svc.promote("auto", "a")
    assert out.status == "blocked" and "validation_stale" in out.gate.codes
    s.loop()  # the loop re-evaluates under version 2: the run now fails, and nothing goes live
    assert {v.strategy_id: v.stage for v in svc.campaign("auto")} == {"a": "paper"}


def test_rolling_back_a_demotion_restores_paper_and_asks_the_gate(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "auto")
    s.ready("a")
    assert svc.promote("auto", "a").status == "applied"
    svc.clock.advance(hours=1)
    s.snapshot(["a"], 6, version="live-1", mean=-0.01, stage="live", step=timedelta(minutes=10))
    first = s.loop()
    assert [a["action"] for a in first.actions if a["outcome"] == "executed"] == ["evaluate", "demote"]
    rolled = svc.rollback("auto", reason="undo")  # the restored set has a live: it comes back as paper
    assert rolled["changed"] == {} and [r["strategy_id"] for r in rolled["reentries"]] == ["a"]
    assert rolled["reentries"][0]["status"] == "blocked"  # the cooldown since its promotion still runs
    assert {v.strategy_id: v.stage for v in svc.campaign("auto")} == {"a": "paper"}
    assert svc.decision("auto", "a").effective_mode == "paper"
    entry = svc.audit_log(world="auto", kind="world.rollback")[-1]
    assert entry.payload["requests_for"] == ["a"] and all(x["stage"] == "paper" for x in entry.payload["activations"])


def test_a_blocked_apply_does_not_use_up_its_key(svc, worlds: Path) -> None:  # type: ignore[no-untyped-def]
    (worlds / "auto.yaml").write_text(policy_text("auto", mode="auto_apply", slots=1, cooldown="0s"))
    s = Setup(svc, "auto")
    s.ready("a", "b")
    first = s.loop()
    outcomes = {(a["strategy_id"], a["action"]): a["outcome"] for a in first.actions}
    assert outcomes[("a", "apply_live")] == "executed" and outcomes[("b", "apply_live")] == "blocked"
    svc.demote("auto", "a", to="retired", reason="free the slot")
    svc.clock.advance(minutes=1)
    s.loop()
    assert {v.strategy_id: v.stage for v in svc.campaign("auto")}["b"] == "live"


def test_an_expired_approval_can_be_renewed(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc)
    s.ready("a")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    svc.clock.advance(hours=73)
    s.snapshot(["a"], 12, version="same-later", end=T0 + timedelta(days=12))
    renewed = svc.as_actor("alice").decide_request(rid, decision="approve", reason="still ok")
    assert renewed.gate.valid_approvals == ("alice",) and "approvals_expired" not in renewed.gate.codes
    assert svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok").status == "applied"


def test_a_decision_on_a_request_read_before_a_reject_sees_the_reject(svc) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.governance._requests import decide, load_request

    Setup(svc).ready("a")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    with svc.store.read() as conn:
        stale = load_request(conn, rid)  # bob's process read the row ...
    svc.as_actor("alice").decide_request(rid, decision="reject", reason="changed my mind")  # ... then a reject lands
    loaded = svc.load_world("gov")
    with pytest.raises(ConflictError, match="rejected, not pending"):
        with svc.store.write() as conn:
            decide(conn, loaded.policy, stale, actor="bob", decision="approve", reason="ok", now=svc.clock())
    assert {v.strategy_id: v.stage for v in svc.campaign("gov")} == {"a": "paper"}
