"""The one-gate invariant under random operation sequences (hypothesis stateful testing).

Operations: promote, approve (by approvers, the requester and an outsider), demote, rollback, halt,
resume, policy changes (proposed, sometimes approved), risk snapshots (fresh or lagging), time
passing and the campaign loop. After every step, every table must agree that:

- a halted world, or one whose policy in force sets ``allow_live: false``, has nothing live
  (activation set, stages, newest decision envelopes);
- a live strategy became live by ``promotion.applied`` (the gate) and nothing since moved it, on the
  evidence hash its request was opened on, with enough distinct approvals that are neither the
  requester's nor the submitter's under manual approval;
- live strategies never exceed the policy's live slots.

SQLite only: the property is about the flows, which the other tests run on both backends; each
example starts from a copy of one prepared store, so 2,400 steps (20 runs of 120) fit in a minute or two.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from qmtl_core.errors import QmtlError
from qmtl_core.service._policies import policy_in_force
from qmtl_core.store import schema
from tests._service import Clock, make_service
from tests.test_governance import Setup, policy_text

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
WORLD = "prop"
STRATEGIES = ("a", "b", "c")


def _policy(version: int, *, allow_live: bool = True, mode: str = "manual_approval", cooldown: str = "1h",
            slots: int = 1) -> str:
    return policy_text(WORLD, allow_live=allow_live, mode=mode, version=version, slots=slots, cooldown=cooldown,
                       approvers=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with three strategies in paper, each with a full paper window, at T0."""
    root = tmp_path_factory.mktemp("template")
    (root / "worlds").mkdir()
    (root / "worlds" / f"{WORLD}.yaml").write_text(_policy(1))
    svc = make_service(f"sqlite:///{root / 'store.db'}", root / "worlds", root / "home", Clock(T0)).as_actor("cron")
    Setup(svc, WORLD).ready(*STRATEGIES)
    svc.close()
    return root


class LiveInvariant(RuleBasedStateMachine):
    """Random governance traffic against one world; the invariant is checked after each step."""

    template: Path

    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qmtl-prop-"))
        shutil.copytree(self.template, self.dir / "w")
        self.url = f"sqlite:///{self.dir / 'w' / 'store.db'}"
        self.clock = Clock(T0)
        self.svc = make_service(self.url, self.dir / "w" / "worlds", self.dir / "w" / "home", self.clock)
        self.ops = self.svc.as_actor("cron")
        self.setup = Setup(self.ops, WORLD)
        self.version = 1
        self.snapshots = 0

    def teardown(self) -> None:
        if hasattr(self, "svc"):
            assert self.svc.audit_verify().ok
            self.svc.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _try(self, call: Any) -> Any:
        try:
            return call()
        except QmtlError:  # refused (blocked, conflict, bad state): refusing is always allowed
            return None

    # -- operations -------------------------------------------------------------------------------
    @rule(sid=st.sampled_from(STRATEGIES))
    def promote(self, sid: str) -> None:
        self._try(lambda: self.svc.as_actor("carol").promote(WORLD, sid, reason="paper looks good"))

    @rule(sid=st.sampled_from(STRATEGIES), who=st.sampled_from(["alice", "bob", "carol", "dave", "cron"]))
    def approve(self, sid: str, who: str) -> None:
        pending = [r for r in self.svc.promotion_requests(world=WORLD) if r["strategy_id"] == sid]
        if pending:
            self._try(lambda: self.svc.as_actor(who).decide_request(pending[0]["request_id"], decision="approve",
                                                                    reason="ok"))

    @rule(sid=st.sampled_from(STRATEGIES), to=st.sampled_from(["paper", "backtest", "retired"]))
    def demote(self, sid: str, to: str) -> None:
        self._try(lambda: self.ops.demote(WORLD, sid, to=to, reason="operator"))

    @rule()
    def rollback(self) -> None:
        self._try(lambda: self.ops.rollback(WORLD, reason="undo"))

    @rule(halted=st.booleans())
    def kill_switch(self, halted: bool) -> None:
        self._try(lambda: self.ops.set_halted(WORLD, halted=halted, reason="drill"))

    @rule(allow_live=st.booleans(), mode=st.sampled_from(["manual_approval", "auto_apply"]),
          cooldown=st.sampled_from(["0s", "1h"]), slots=st.sampled_from([1, 2]), approve=st.booleans())
    def change_policy(self, allow_live: bool, mode: str, cooldown: str, slots: int, approve: bool) -> None:
        self.version += 1
        path = self.svc.settings.worlds_dir / f"{WORLD}.yaml"
        path.write_text(_policy(self.version, allow_live=allow_live, mode=mode, cooldown=cooldown, slots=slots))
        self._try(lambda: self.svc.as_actor("dave").load_world(WORLD))
        if approve:
            for who in ("alice", "bob"):
                self._try(lambda: self.svc.as_actor(who).approve_policy(WORLD, version=self.version, reason="ok"))

    @rule(lag_minutes=st.sampled_from([0, 0, 90]))
    def snapshot(self, lag_minutes: int) -> None:
        from datetime import timedelta

        self.snapshots += 1
        self._try(lambda: self.setup.snapshot(list(STRATEGIES), 12, version=f"s{self.snapshots}",
                                              lag=timedelta(minutes=lag_minutes)))

    @rule(minutes=st.sampled_from([1, 30, 120, 1500]))
    def time_passes(self, minutes: int) -> None:
        self.clock.advance(minutes=minutes)

    @rule()
    def campaign_loop(self) -> None:
        self._try(self.setup.loop)

    # -- the invariant ----------------------------------------------------------------------------
    @invariant()
    def live_only_through_the_gate(self) -> None:
        if not hasattr(self, "svc"):
            return
        with self.svc.store.read() as conn:
            policy = policy_in_force(conn, WORLD)
            assert policy is not None
            halted = bool(conn.execute(sa.select(schema.worlds.c.halted)
                                       .where(schema.worlds.c.world_id == WORLD)).scalar())
            acts, sets = schema.activations, schema.activation_sets
            version = conn.execute(sa.select(sa.func.max(sets.c.set_version)).where(sets.c.world_id == WORLD)).scalar()
            live = {r.strategy_id for r in conn.execute(sa.select(acts.c.strategy_id).where(
                acts.c.world_id == WORLD, acts.c.set_version == version, acts.c.stage == "live"))}
            stages = {r.strategy_id for r in conn.execute(sa.select(schema.strategies.c.strategy_id).where(
                schema.strategies.c.world_id == WORLD, schema.strategies.c.stage == "live"))}
            newest: dict[str, str] = {}
            d = schema.decisions
            for r in conn.execute(sa.select(d.c.strategy_id, d.c.effective_mode).where(d.c.world_id == WORLD)
                                  .order_by(d.c.id)):
                newest[r.strategy_id] = r.effective_mode
            entries = list(conn.execute(sa.select(schema.ledger.c.kind, schema.ledger.c.payload)
                                        .where(schema.ledger.c.world_id == WORLD).order_by(schema.ledger.c.seq)))
            requests = {r.request_id: r for r in conn.execute(sa.select(schema.promotion_requests)
                                                               .where(schema.promotion_requests.c.world_id == WORLD))}
            submitters = {r.strategy_id: r.submitter for r in conn.execute(
                sa.select(schema.strategies.c.strategy_id, schema.strategies.c.submitter)
                .where(schema.strategies.c.world_id == WORLD))}
        assert live == stages, (live, stages)
        assert {s for s, m in newest.items() if m == "live"} == live
        if halted or not policy.allow_live:
            assert live == set(), (halted, policy.allow_live, live)
        assert len(live) <= policy.live_promotion.max_live_slots
        for sid in live:
            last = [(kind, p) for kind, p in entries if sid in ((p or {}).get("changed") or {})][-1]
            kind, payload = last
            assert kind == "promotion.applied" and payload["changed"][sid] == "live", (sid, kind)
            request = requests[payload["request_id"]]
            assert request.status == "applied" and request.evidence_hash == payload["evidence_hash"]
            approvals = payload.get("approvals") or []
            assert len(set(approvals)) == len(approvals)
            assert request.requester not in approvals and submitters.get(sid) not in approvals


def test_nothing_is_live_unless_the_gate_allowed_it(template: Path) -> None:
    LiveInvariant.template = template
    run_state_machine_as_test(LiveInvariant, settings=settings(
        max_examples=20, stateful_step_count=120, deadline=None, database=None,
        suppress_health_check=list(HealthCheck)))
