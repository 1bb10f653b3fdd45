"""Evidence provenance (issue 19, DESIGN §11): only observed, owned, code-bound evidence counts.

Each finding of the issue is a test here, on SQLite and PostgreSQL; the remote paths go through
the real HTTP API (``tests/_remote.py``) with one token per person.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from qmtl_core.errors import NotOwner
from qmtl_core.risk import SnapshotError, parse_snapshot
from qmtl_core.service._auth import create_token
from tests._remote import InProcessServer
from tests._service import make_service
from tests.test_governance import T0, Setup, policy_text, svc  # noqa: F401 - fixture svc (on this module's worlds)


def _policy(world: str, **kw: Any) -> str:
    """The governance tests' policy, with ``feed`` as the world's local trusted producer."""
    return policy_text(world, **kw).replace("risk: {snapshot_max_age: 1h, decision_ttl: 10m}",
                                            "risk: {snapshot_max_age: 1h, decision_ttl: 10m, producers: [feed]}")


@pytest.fixture
def worlds(worlds_dir: Path) -> Path:
    (worlds_dir / "auto.yaml").write_text(_policy("auto", mode="auto_apply"))
    (worlds_dir / "gov.yaml").write_text(_policy("gov"))
    return worlds_dir


def _snapshot(world: str, version: str, now: datetime, *, returns: dict[str, list[tuple[datetime, float]]] | None,
              weights: dict[str, float], stage: str = "paper", as_of: datetime | None = None) -> Any:
    doc: dict[str, Any] = {"world_id": world, "version": version, "as_of": (as_of or now).isoformat(),
                           "ttl_sec": 3600, "weights": weights,
                           "provenance": {"actor": "whoever-the-caller-says", "stage": stage}}
    if returns is not None:
        doc["realized_returns"] = {sid: [{"ts": t.isoformat(), "r": r} for t, r in pts]
                                   for sid, pts in returns.items()}
    return parse_snapshot(doc)


def _daily(start: datetime, n: int, mean: float = 0.002) -> list[tuple[datetime, float]]:
    return [(start + timedelta(days=i), mean * (1 if i % 3 else -0.5)) for i in range(n)]


def _stage(svc: Any, world: str, sid: str) -> str:
    return next(v.stage for v in svc.campaign(world) if v.strategy_id == sid)


# --- finding 1: invented evidence never goes live ----------------------------------------------------------
def test_backdated_request_returns_and_a_weights_only_snapshot_never_go_live(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "auto")
    s.backtest("a")
    assert _stage(svc, "auto", "a") == "paper"  # entered paper at T0
    # Returns dated before the strategy entered paper: recorded, none counted.
    backdated = svc.record_evaluation("auto", strategy_id="a", stage="paper", returns=_daily(T0 - timedelta(days=13), 12))
    assert backdated.evidence_class == "unverified" and backdated.status == "insufficient_data"
    assert "12 request.returns observation(s) dated before the strategy entered paper" in backdated.reason
    # The same returns dated after entry are still only what a request says: unverified.
    svc.clock.advance(days=12)
    invented = svc.record_evaluation("auto", strategy_id="a", stage="paper", returns=_daily(T0, 12))
    assert invented.status == "pass" and invented.evidence_class == "unverified"
    assert set(invented.metric_classes.values()) == {"unverified"}
    assert svc.list_runs("auto", strategy_id="a", stage="paper")[0].to_dict()["evidence_class"] == "unverified"
    # A snapshot carrying only a weight, from the world's trusted producer: fresh, but no evidence.
    svc.as_actor("feed").put_risk_snapshot(_snapshot("auto", "w-only", svc.clock(), returns=None, weights={"a": 1.0}))
    out = s.loop()
    assert not [a for a in out.actions if a["action"] == "apply_live"], out.actions
    assert _stage(svc, "auto", "a") == "paper"
    view = svc.campaign("auto", strategy_id="a")[0]
    assert view.next_action is not None and view.next_action.reason == "awaiting_data"
    assert "unverified evidence" in view.next_action.detail
    # Its window shows what counts (nothing), not the 12 unverified observations.
    assert [(p.stage, p.n_observations) for p in view.progress][1:] == [("paper", 0)]
    promoted = svc.promote("auto", "a")
    assert promoted.status == "blocked" and promoted.exit_code == 12
    assert {"evidence_untrusted", "risk_snapshot_incomplete"} <= set(promoted.gate.codes)
    assert svc.activations("auto")["activations"][0]["stage"] == "paper"


def test_trusted_hub_returns_observed_after_entry_do_go_live(svc) -> None:  # type: ignore[no-untyped-def]
    """The honest path still works: a trusted producer's paper returns, observed in paper."""
    s = Setup(svc, "auto")
    s.backtest("a")
    svc.clock.advance(days=12)
    # Two days of returns from before entry are in the series too: dropped, and said so.
    series = _daily(T0 - timedelta(days=2), 14)
    svc.as_actor("feed").put_risk_snapshot(_snapshot("auto", "p1", svc.clock(), returns={"a": series},
                                                     weights={"a": 1.0}))
    out = s.loop()
    executed = [a["action"] for a in out.actions if a["outcome"] == "executed"]
    assert executed == ["evaluate", "apply_live"], out.actions
    run = svc.list_runs("auto", strategy_id="a", stage="paper")[0]
    assert run.evidence_class == "hub" and run.window["n_observations"] == 12
    assert run.window["start"].startswith(T0.strftime("%Y-%m-%dT%H:%M"))
    assert "2 risk snapshot p1 observation(s) dated before the strategy entered paper" in run.reason
    assert _stage(svc, "auto", "a") == "live"


def test_a_snapshot_from_an_untrusted_identity_is_stored_unverified_and_never_decided_on(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "auto")
    s.backtest("a")
    svc.clock.advance(days=12)
    # "cron" is not in risk.producers, whatever the document's provenance.actor says.
    stored, _ = svc.put_risk_snapshot(_snapshot("auto", "p1", svc.clock(), returns={"a": _daily(T0, 12)},
                                                weights={"a": 1.0}))
    assert stored.evidence_class == "unverified"
    shown, _ = svc.risk_snapshot("auto")
    assert shown.to_dict()["evidence_class"] == "unverified"
    s.loop()
    view = svc.campaign("auto", strategy_id="a")[0]
    assert view.next_action is not None and view.next_action.reason == "risk_snapshot_missing"
    assert _stage(svc, "auto", "a") == "paper"
    entry = svc.audit_log(world="auto", kind="risk.snapshot_updated")[-1].to_dict()
    assert entry["payload"]["evidence_class"] == "unverified" and entry["actor"] == "cron"


# --- the shadow window counts only trusted shadow evidence observed in this paper stay ---------------------
def _shadowed(policy: str) -> str:
    return policy.replace("  paper: {window: 10d, min_observations: 8}\n",
                          "  paper: {window: 10d, min_observations: 8}\n  shadow: {window: 10d, min_observations: 8}\n")


def test_the_shadow_window_counts_only_trusted_shadow_evidence_observed_since_paper_entry(
        svc, worlds: Path) -> None:  # type: ignore[no-untyped-def]
    (worlds / "auto.yaml").write_text(_shadowed(_policy("auto", mode="auto_apply")))
    s = Setup(svc, "auto")
    s.ready("a")  # in paper since T0, a full trusted paper window and a fresh snapshot
    gate = svc.promote("auto", "a", dry_run=True).gate
    assert "shadow_window_incomplete" in gate.codes and "evidence_untrusted" not in gate.codes
    # qmtl's own replay of bars observed before the strategy entered paper: not counted either.
    before = svc.record_evaluation("auto", strategy_id="a", stage="shadow", run_id="early",
                                   returns=_daily(T0 - timedelta(days=13), 12), evidence_class="qmtl replay")
    assert before.status == "insufficient_data"
    assert "dated before the strategy entered paper" in before.reason
    assert "shadow_window_incomplete" in svc.promote("auto", "a", dry_run=True).gate.codes
    # What a request says about shadow is unverified: shown, never counted.
    typed = svc.record_evaluation("auto", strategy_id="a", stage="shadow", returns=_daily(T0, 12))
    assert typed.evidence_class == "unverified" and typed.status == "pass"
    gate = svc.promote("auto", "a", dry_run=True).gate
    assert {"evidence_untrusted", "shadow_window_incomplete"} <= set(gate.codes), gate.codes
    assert "shadow run" in next(r.detail for r in gate.reasons if r.code == "evidence_untrusted")
    assert _shadow_observations(svc) == 0  # the view shows what counts, not the typed run's 12
    assert not [a for a in s.loop().actions if a["action"] == "apply_live"]
    # The same replay observed in this paper stay is trusted shadow evidence, and the gate reads it.
    honest = svc.record_evaluation("auto", strategy_id="a", stage="shadow", run_id="replay",
                                   returns=_daily(T0, 12), evidence_class="qmtl replay")
    assert honest.evidence_class == "qmtl replay" and honest.status == "pass"
    gate = svc.promote("auto", "a", dry_run=True).gate
    assert not {"evidence_untrusted", "shadow_window_incomplete"} & set(gate.codes), gate.codes
    assert _shadow_observations(svc) == 12
    s.loop()
    assert _stage(svc, "auto", "a") == "live"


def _shadow_observations(svc) -> int:  # type: ignore[no-untyped-def]
    view = svc.campaign("auto", strategy_id="a")[0]
    return next(p.n_observations for p in view.progress if p.stage == "shadow")


def test_a_shadow_run_recorded_outside_paper_never_counts(svc, worlds: Path) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.campaign import RunSummary, StrategyState, counted_run, uncounted_detail

    run = RunSummary("r", 1, "pass", 1, "h", {}, (), T0, T0 + timedelta(days=12), 12, "qmtl replay")
    for stage in ("backtest", "live"):
        state = StrategyState("a", stage, {"shadow": run}, entered_at=T0 - timedelta(days=1))
        assert counted_run(state, "shadow") is None
        assert uncounted_detail(state, "shadow") == f"shadow run r#1 counts only while a is in paper"
    assert counted_run(StrategyState("a", "paper", {"shadow": run}, entered_at=T0), "shadow") is run
    assert counted_run(StrategyState("a", "paper", {"shadow": run}, entered_at=T0 + timedelta(seconds=1)),
                       "shadow") is None


# --- finding 2: a submitter acts only on its own strategies ------------------------------------------------
def test_another_identity_cannot_post_runs_or_submissions_for_a_strategy_it_did_not_submit(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "auto")
    s.ready("a")
    assert svc.promote("auto", "a").status == "applied"
    mallory = svc.as_actor("mallory")
    with pytest.raises(NotOwner) as caught:
        mallory.record_evaluation("auto", strategy_id="a", stage="live", metrics={"sharpe": -5.0})
    assert caught.value.exit_code == 10 and "mallory did not submit a" in caught.value.one_line()
    with pytest.raises(NotOwner):
        mallory.register_strategy("auto", strategy_id="a", code_hash="f" * 64)
    assert not svc.list_runs("auto", strategy_id="a", stage="live")
    s.loop()
    assert _stage(svc, "auto", "a") == "live"
    # The owner's own unverified failing live run is recorded but demotes nobody either.
    own = svc.record_evaluation("auto", strategy_id="a", stage="live", metrics={"sharpe": -5.0})
    assert own.evidence_class == "unverified" and own.status == "fail"
    s.loop()
    assert _stage(svc, "auto", "a") == "live"


# --- finding 3: the evidence hash binds the code -------------------------------------------------------
@pytest.mark.parametrize("change", ["code", "params"])
def test_code_or_parameters_changed_after_an_approval_void_the_request(svc, change: str) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.errors import EvidenceChanged
    from qmtl_core.service._client import LocalClient

    s = Setup(svc, "gov")
    svc.register_strategy("gov", strategy_id="a", code_hash="1" * 64,
                          meta={"submission": {"params": {"fast": 10}, "data": "prices.csv"}})
    s.ready("a")
    rid = svc.promote("gov", "a").request_id
    assert svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok").status == "pending"
    if change == "code":
        svc.register_strategy("gov", strategy_id="a", code_hash="2" * 64)
    else:
        svc.register_strategy("gov", strategy_id="a", meta={"submission": {"params": {"fast": 3}, "data": "prices.csv"}})
    with pytest.raises(EvidenceChanged) as caught:
        LocalClient(svc.as_actor("bob")).decide(rid, decision="approve", reason="ok")
    assert caught.value.exit_code == 4
    assert _stage(svc, "gov", "a") == "paper"
    assert svc.promotion_requests(world="gov", include_closed=True)[0]["status"] == "void"


@pytest.mark.parametrize("change", ["code", "params", "data"])
def test_changed_code_earns_its_own_paper_window_under_auto_apply(svc, change: str) -> None:  # type: ignore[no-untyped-def]
    """auto_apply compares no request's hash: the old code's paper run must not count for new code."""
    s = Setup(svc, "auto")
    submission = {"params": {"fast": 10}, "data": "prices.csv"}
    svc.register_strategy("auto", strategy_id="a", code_hash="1" * 64, meta={"submission": submission})
    s.ready("a")  # a full trusted paper window of the first code
    assert svc.promote("auto", "a", dry_run=True).gate.allowed
    changed = {"code": {"code_hash": "2" * 64},
               "params": {"meta": {"submission": {**submission, "params": {"fast": 3}}}},
               "data": {"meta": {"submission": {**submission, "data": "prices-2026.csv"}}}}[change]
    svc.register_strategy("auto", strategy_id="a", **changed)
    entry = svc.audit_log(world="auto", kind="strategy.submitted")[-1].to_dict()
    assert entry["payload"]["restarted"] == "paper" and "the paper window restarts" in entry["reason"]
    out = s.loop()
    assert not [a for a in out.actions if a["action"] == "apply_live"], out.actions
    assert _stage(svc, "auto", "a") == "paper"
    gate = svc.promote("auto", "a", dry_run=True).gate
    assert "evidence_untrusted" in gate.codes and "observed before a entered paper" in gate.reasons[0].detail
    # The new code observed for a full window of its own goes live the honest way.
    svc.clock.advance(days=12)
    s.snapshot(["a"], 12, version="new-code")
    executed = [a["action"] for a in s.loop().actions if a["outcome"] == "executed"]
    assert executed == ["evaluate", "apply_live"] and _stage(svc, "auto", "a") == "live"
    # Code nobody reviewed never stays live: changing it again takes it back to paper.
    svc.register_strategy("auto", strategy_id="a", code_hash="3" * 64)
    assert _stage(svc, "auto", "a") == "paper"
    demoted = svc.audit_log(world="auto", kind="strategy.demoted")[-1].to_dict()
    assert "code changed while live" in demoted["reason"]
    assert not [a for a in s.loop().actions if a["action"] == "apply_live"]


# --- finding 4: the hub cannot be wedged or poisoned ----------------------------------------------------
def test_future_as_of_is_refused_and_within_tolerance_accepted(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc, "auto").backtest("a")
    feed = svc.as_actor("feed")
    for ahead in (timedelta(days=1), timedelta(days=365 * 70)):
        with pytest.raises(SnapshotError) as caught:
            feed.put_risk_snapshot(_snapshot("auto", f"f{ahead.days}", svc.clock(), returns=None,
                                             weights={"a": 1.0}, as_of=svc.clock() + ahead))
        line = caught.value.one_line()
        assert caught.value.exit_code == 2 and "as_of:" in line and "in the future" in line and "\n" not in line
    feed.put_risk_snapshot(_snapshot("auto", "skew", svc.clock(), returns=None, weights={"a": 1.0},
                                     as_of=svc.clock() + timedelta(minutes=4)))
    assert [e.to_dict()["subject"] for e in svc.audit_log(world="auto", kind="risk.snapshot_updated")] == [
        "risk snapshot skew"]


def test_observations_dated_in_the_future_are_refused_wherever_they_enter(svc) -> None:  # type: ignore[no-untyped-def]
    """One rule (``timeutil.refuse_future``) for snapshot returns, evaluated returns and cohorts."""
    from qmtl_core.errors import BadInputError

    s = Setup(svc, "auto")
    s.backtest("a")
    svc.clock.advance(days=12)
    now = svc.clock()
    ahead = _daily(T0, 12) + [(now + timedelta(hours=1), 0.001)]
    with pytest.raises(SnapshotError) as caught:
        svc.as_actor("feed").put_risk_snapshot(_snapshot("auto", "f", now, returns={"a": ahead}, weights={"a": 1.0}))
    line = caught.value.one_line()
    assert caught.value.exit_code == 2 and caught.value.code == "observation_in_future"
    assert "snapshot f: realized_returns.a.12.ts: " in line and "is 1h in the future" in line
    for stage in ("paper", "backtest"):
        with pytest.raises(BadInputError) as refused:
            svc.record_evaluation("auto", strategy_id="a", stage=stage, returns=ahead,
                                  evidence_class="qmtl replay")
        assert refused.value.exit_code == 2 and f"a {stage} returns, point 13: " in refused.value.one_line()
    assert not svc.list_runs("auto", strategy_id="a", stage="paper")  # nothing half-written
    with pytest.raises(BadInputError, match="backtest cohort returns, row 2: "):
        import numpy as np

        from qmtl_core.datafiles import ReturnsTable

        svc.evaluate_cohort("auto", stage="backtest", returns=ReturnsTable(
            ("a",), (T0, now + timedelta(days=1)), np.array([[0.01, 0.02]])))
    # Within the tolerance (clock skew, default 5 minutes) an observation is accepted.
    skewed = _daily(T0, 12) + [(now + timedelta(minutes=4), 0.001)]
    svc.as_actor("feed").put_risk_snapshot(_snapshot("auto", "skew", now, returns={"a": skewed}, weights={"a": 1.0}))
    assert svc.record_evaluation("auto", strategy_id="a", stage="paper", returns=skewed).status == "pass"


def test_the_latest_snapshot_is_chosen_per_stage(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "auto")
    s.backtest("a", "b")
    svc.clock.advance(days=12)
    feed = svc.as_actor("feed")
    feed.put_risk_snapshot(_snapshot("auto", "paper-1", svc.clock(), returns={"a": _daily(T0, 12)},
                                     weights={"a": 0.5, "b": 0.5}))
    svc.clock.advance(minutes=1)
    # A newer snapshot of another stage must not hide the paper one.
    feed.put_risk_snapshot(_snapshot("auto", "live-1", svc.clock(), returns={"b": _daily(T0, 12)},
                                     weights={"a": 0.5, "b": 0.5}, stage="live"))
    actions = {a.strategy_id: a for a in svc.campaign_tick("auto")}
    assert actions["a"].action == "evaluate" and "risk snapshot paper-1" in actions["a"].detail


def test_refs_are_resolved_from_the_hub_directory_pinned_by_sha256_or_refused(svc) -> None:  # type: ignore[no-untyped-def]
    Setup(svc, "auto").backtest("a")
    svc.clock.advance(days=12)
    refs = svc.settings.risk_refs_dir
    refs.mkdir(parents=True)
    data = json.dumps({"a": [{"ts": t.isoformat(), "r": r} for t, r in _daily(T0, 12)]}).encode()
    (refs / "returns.json").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    feed = svc.as_actor("feed")

    def doc(ref: str, version: str) -> Any:
        return parse_snapshot({"world_id": "auto", "version": version, "as_of": svc.clock().isoformat(),
                               "weights": {"a": 1.0}, "realized_returns_ref": ref,
                               "provenance": {"actor": "risk", "stage": "paper"}})

    for ref, fragment in ((f"returns.json#sha256={'0' * 64}", "has sha256"),
                          (f"../returns.json#sha256={digest}", "outside the hub's refs directory"),
                          ("returns.json", "is not '<file>#sha256=<hex>'"),
                          (f"nope.json#sha256={digest}", "cannot read 'nope.json'")):
        with pytest.raises(SnapshotError) as caught:
            feed.put_risk_snapshot(doc(ref, "bad"))
        assert "realized_returns_ref" in caught.value.one_line() and fragment in caught.value.one_line()
    stored, created = feed.put_risk_snapshot(doc(f"returns.json#sha256={digest}", "good"))
    assert created and stored.snapshot.realized_returns_ref is None
    assert stored.series("a") == (_daily(T0, 12)[-1][0], 12)
    entry = svc.audit_log(world="auto", kind="risk.snapshot_updated")[-1].to_dict()
    assert entry["payload"]["refs"] == {"realized_returns_ref": f"returns.json#sha256={digest}"}
    # A poisoned point inside the file is refused and located like an inline one.
    bad = json.dumps({"a": [{"ts": T0.isoformat(), "r": -2.0}]}).encode()
    (refs / "bad.json").write_bytes(bad)
    with pytest.raises(SnapshotError, match=r"realized_returns\.a\.0\.r: r is -2\.0"):
        feed.put_risk_snapshot(doc(f"bad.json#sha256={hashlib.sha256(bad).hexdigest()}", "poisoned"))


# --- remote: the same findings through the HTTP API ----------------------------------------------------
@pytest.fixture
def api(qmtl_env: dict[str, str], worlds_dir: Path):  # type: ignore[no-untyped-def]
    (worlds_dir / "auto.yaml").write_text(policy_text("auto", mode="auto_apply"))
    server = InProcessServer()
    service = server.app.state.service
    tokens = {}
    with service.store.write() as conn:
        for role, actor in (("submitter", "sam"), ("submitter", "mallory"), ("producer", "feed"),
                            ("operator", "otto")):
            tokens[actor] = create_token(conn, actor=actor, role=role, created_by="admin", now=service.clock())[1]
    client = httpx.Client(base_url="http://qmtl.test", transport=server)
    yield client, tokens
    client.close()  # closes the transport, the in-process server with it


def _as(tokens: dict[str, str], actor: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[actor]}"}


def _series_doc(start: datetime, n: int, mean: float = 0.003) -> list[list[Any]]:
    return [[(start + timedelta(days=i)).isoformat(), mean * (1 if i % 3 else -0.5)] for i in range(n)]


def test_remote_invented_evidence_and_sabotage_are_refused(api) -> None:  # type: ignore[no-untyped-def]
    client, tokens = api
    now = datetime.now(timezone.utc)
    r = client.post("/worlds/auto/evaluate", headers=_as(tokens, "sam"), json={
        "strategy_id": "s1", "stage": "backtest", "returns": _series_doc(datetime(2024, 1, 1, tzinfo=timezone.utc), 400)})
    assert r.status_code == 200, r.text
    run = {"execute": True, "holder": "t"}
    assert client.post("/worlds/auto/campaign/run", headers=_as(tokens, "otto"), json=run).status_code == 200
    assert client.get("/worlds/auto/strategies/s1", headers=_as(tokens, "sam")).json()["stage"] == "paper"
    # Finding 1: backdated paper returns, a claimed replay, a weights-only snapshot.
    for claim in ({}, {"evidence_class": "qmtl replay"}):
        r = client.post("/worlds/auto/evaluate", headers=_as(tokens, "sam"), json={
            "strategy_id": "s1", "stage": "paper", "returns": _series_doc(now - timedelta(days=20), 12), **claim})
        assert r.status_code == 200 and r.json()["evidence_class"] == "unverified", r.text
    snapshot = {"world_id": "auto", "version": "w1", "as_of": now.isoformat(), "weights": {"s1": 1.0},
                "provenance": {"actor": "feed", "stage": "paper"}}
    r = client.post("/risk-hub/snapshots", headers=_as(tokens, "sam"), json=snapshot)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert client.post("/risk-hub/snapshots", headers=_as(tokens, "feed"), json=snapshot).status_code == 200
    out = client.post("/worlds/auto/campaign/run", headers=_as(tokens, "otto"), json=run).json()
    assert not [a for a in out["actions"] if a["action"] == "apply_live"], out
    stages = {a["strategy_id"]: a["stage"] for a in
              client.get("/worlds/auto/activations", headers=_as(tokens, "sam")).json()["activations"]}
    assert stages == {"s1": "paper"}
    promoted = client.post("/worlds/auto/promotions", headers=_as(tokens, "sam"), json={"strategy_id": "s1"}).json()
    assert promoted["status"] == "blocked" and promoted["exit_code"] == 12
    assert "risk_snapshot_incomplete" in [x["code"] for x in promoted["gate"]["reasons"]]
    # Finding 2: another submitter cannot post a run or a submission for s1.
    r = client.post("/worlds/auto/evaluate", headers=_as(tokens, "mallory"), json={
        "strategy_id": "s1", "stage": "live", "metrics": {"sharpe": -5.0}})
    assert r.status_code == 403 and r.json()["error"] == "not_owner" and r.json()["exit_code"] == 10
    r = client.post("/worlds/auto/strategies", headers=_as(tokens, "mallory"),
                    json={"strategy_id": "s1", "code_hash": "f" * 64})
    assert r.status_code == 403 and r.json()["error"] == "not_owner"
    # A producer's replay of fed bars is qmtl replay; its claim is honoured.
    r = client.post("/worlds/auto/evaluate", headers=_as(tokens, "feed"), json={
        "strategy_id": "s1", "stage": "paper", "returns": _series_doc(now - timedelta(days=20), 12),
        "evidence_class": "qmtl replay"})
    assert r.status_code == 200
    # ... but only observations after entry count: all of these predate it.
    assert r.json()["status"] == "insufficient_data" and "dated before the strategy entered paper" in r.json()["reason"]


def test_remote_code_change_restarts_the_paper_window_under_auto_apply(api, store_url: str) -> None:  # type: ignore[no-untyped-def]
    """Item 2 of the trust holes through the HTTP API: the loop (an operator's campaign/run with
    X-Allow-Live) never applies new code on the old code's paper evidence."""
    from tests.cli_helpers import enter_stage_at

    client, tokens = api
    now = datetime.now(timezone.utc)
    r = client.post("/worlds/auto/strategies", headers=_as(tokens, "sam"), json={"strategy_id": "s1", "code_hash": "1" * 64})
    assert r.status_code == 200, r.text
    r = client.post("/worlds/auto/evaluate", headers=_as(tokens, "sam"), json={
        "strategy_id": "s1", "stage": "backtest", "returns": _series_doc(now - timedelta(days=420), 400)})
    assert r.status_code == 200, r.text
    run = {"execute": True, "holder": "t"}
    live = {**_as(tokens, "otto"), "X-Allow-Live": "true"}
    assert client.post("/worlds/auto/campaign/run", headers=live, json=run).status_code == 200
    enter_stage_at("auto", "s1", (now - timedelta(days=14)).isoformat(), store_url=store_url)  # 14 days in paper
    snapshot = {"world_id": "auto", "version": "p1", "as_of": now.isoformat(), "weights": {"s1": 1.0},
                "realized_returns": {"s1": [{"ts": t, "r": v} for t, v in _series_doc(now - timedelta(days=12), 12)]},
                "provenance": {"actor": "feed", "stage": "paper"}}
    assert client.post("/risk-hub/snapshots", headers=_as(tokens, "feed"), json=snapshot).status_code == 200
    measured = client.post("/worlds/auto/evaluate", headers=_as(tokens, "feed"), json={"strategy_id": "s1",
                                                                                       "stage": "paper"}).json()
    assert (measured["evidence_class"], measured["status"]) == ("hub", "pass"), measured  # a full trusted window
    # The owner swaps the code before the loop comes round: the old code's window no longer counts.
    r = client.post("/worlds/auto/strategies", headers=_as(tokens, "sam"), json={"strategy_id": "s1", "code_hash": "2" * 64})
    assert r.status_code == 200, r.text
    out = client.post("/worlds/auto/campaign/run", headers=live, json=run).json()
    assert not [a for a in out["actions"] if a["action"] == "apply_live"], out
    assert client.get("/worlds/auto/strategies/s1", headers=_as(tokens, "sam")).json()["stage"] == "paper"
    promoted = client.post("/worlds/auto/promotions", headers=_as(tokens, "sam"), json={"strategy_id": "s1",
                                                                                         "dry_run": True}).json()
    assert "evidence_untrusted" in [x["code"] for x in promoted["gate"]["reasons"]], promoted


def test_remote_observations_dated_in_the_future_are_refused(api) -> None:  # type: ignore[no-untyped-def]
    client, tokens = api
    now = datetime.now(timezone.utc)
    r = client.post("/worlds/auto/evaluate", headers=_as(tokens, "sam"), json={
        "strategy_id": "s1", "stage": "backtest", "returns": _series_doc(now - timedelta(days=400), 400)})
    assert r.status_code == 200, r.text
    future = _series_doc(now - timedelta(days=3), 5)  # the last point is tomorrow
    r = client.post("/worlds/auto/evaluate", headers=_as(tokens, "feed"), json={
        "strategy_id": "s1", "stage": "paper", "returns": future, "evidence_class": "qmtl replay"})
    assert r.status_code == 400 and r.json()["error"] == "observation_in_future", r.text
    assert r.json()["exit_code"] == 2 and "s1 paper returns, point 5: " in r.json()["message"]
    snapshot = {"world_id": "auto", "version": "f1", "as_of": now.isoformat(), "weights": {"s1": 1.0},
                "realized_returns": {"s1": [{"ts": t, "r": v} for t, v in future]},
                "provenance": {"actor": "feed", "stage": "paper"}}
    r = client.post("/risk-hub/snapshots", headers=_as(tokens, "feed"), json=snapshot)
    assert r.status_code == 400 and "realized_returns.s1.4.ts" in r.json()["message"], r.text


# --- finding 5: blocks met by the loop are recorded, once per evidence ----------------------------------
def test_a_block_met_by_the_loop_is_recorded_once_and_shown_on_the_pending_request(svc) -> None:  # type: ignore[no-untyped-def]
    s = Setup(svc, "gov")
    s.ready("a")
    s.loop()  # opens the request: every gate but approvals passes
    [request] = svc.promotion_requests(world="gov")
    assert request["blocked_reason"] is None
    svc.clock.advance(hours=2)  # the snapshot (ttl 1h) expires: the loop meets a fail-closed block
    for _ in range(3):
        out = s.loop()
        svc.clock.advance(minutes=1)
    assert out.exit_code == 12
    entries = [e.to_dict() for e in svc.audit_log(world="gov", kind="campaign.blocked")
               if e.to_dict()["reason"].startswith("risk_snapshot_expired: ")]
    assert len(entries) == 1, entries  # once per evidence, not once per tick
    [request] = svc.promotion_requests(world="gov")
    assert request["status"] == "pending" and request["blocked_reason"].startswith("risk_snapshot_expired")
    # A fresh snapshot of the same substance clears the block from the request.
    s.snapshot(["a"], 12, version="p12-again", end=T0 + timedelta(days=12))
    s.loop()
    [request] = svc.promotion_requests(world="gov")
    assert request["status"] == "pending" and request["blocked_reason"] is None


# --- finding 6: point in time ---------------------------------------------------------------------------
def test_requests_and_the_report_at_t_show_only_what_was_known_at_t(svc) -> None:  # type: ignore[no-untyped-def]
    from qmtl_core.report._collect import collect

    s = Setup(svc, "gov")
    s.ready("a")
    rid = svc.promote("gov", "a").request_id
    opened = svc.clock()
    svc.clock.advance(seconds=3)
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    svc.clock.advance(seconds=3)
    assert svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok").status == "applied"
    at = opened + timedelta(seconds=1)
    [then] = svc.promotion_requests(world="gov", at=at)
    assert then["request_id"] == rid and then["status"] == "pending" and then["approvals"] == []
    [mid] = svc.promotion_requests(world="gov", at=opened + timedelta(seconds=4))
    assert [a["approver"] for a in mid["approvals"]] == ["alice"] and mid["status"] == "pending"
    assert svc.promotion_requests(world="gov", at=opened - timedelta(seconds=1)) == []
    assert svc.promotion_requests(world="gov") == []  # applied now: nothing pending
    report = collect(svc, "gov", at=at).to_dict()
    [pending] = report["pending_requests"]
    assert pending["request_id"] == rid and pending["approvals"] == [] and pending["status"] == "pending"
    assert [a["stage"] for a in report["activations"]] == ["paper"]
    history = svc.history("gov", at=at)
    assert history["live"] == []


def test_an_approval_renewed_after_t_shows_at_t_as_it_was_given(svc) -> None:  # type: ignore[no-untyped-def]
    """Approvals are dated at renewal in the approvals table; ``--at`` reads what the ledger knew."""
    from qmtl_core.report._collect import collect

    s = Setup(svc, "gov")
    s.ready("a")
    rid = svc.promote("gov", "a").request_id
    alice = svc.as_actor("alice")
    alice.decide_request(rid, decision="approve", reason="first look")
    given = svc.clock()
    svc.clock.advance(hours=80)  # past approval_ttl (72h): alice renews on the same evidence
    s.snapshot(["a"], 12, version="p12-later", end=T0 + timedelta(days=12))
    alice.decide_request(rid, decision="approve", reason="still fine")
    renewed = svc.clock()
    at = given + timedelta(hours=1)
    [then] = svc.promotion_requests(world="gov", at=at)
    assert [(a["approver"], a["at"], a["reason"]) for a in then["approvals"]] == [
        ("alice", given.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "first look")]
    [now] = svc.promotion_requests(world="gov", at=renewed)
    assert [(a["approver"], a["reason"]) for a in now["approvals"]] == [("alice", "still fine")]
    assert svc.promotion_requests(world="gov", at=given - timedelta(seconds=1)) == []
    [pending] = collect(svc, "gov", at=at).to_dict()["pending_requests"]
    assert [a["approver"] for a in pending["approvals"]] == ["alice"]
    [current] = svc.promotion_requests(world="gov")  # the current view: the renewal
    assert [(a["approver"], a["reason"]) for a in current["approvals"]] == [("alice", "still fine")]


# --- schema v5 ----------------------------------------------------------------------------------------
def test_a_v6_store_migrates_and_evidence_stored_before_provenance_is_untrusted(svc, store_url: str) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    from qmtl_core.store import migrate, schema
    from qmtl_core.store._store import Store
    from qmtl_core.store.migrations import head_version

    s = Setup(svc, "auto")
    s.ready("a")
    with svc.store.read() as conn:
        entered = conn.execute(sa.select(schema.strategies.c.stage_entered_at)).scalar_one()
    # Turn the store back into a v6 store: no provenance columns.
    dropped = {"strategies": ("stage_entered_at", "code_binding"),
               "run_revisions": ("evidence_class", "metric_classes"), "run_heads": ("evidence_class",),
               "risk_snapshots": ("stage", "evidence_class"), "promotion_requests": ("blocked_reason", "blocked_at")}
    with svc.store.write() as conn:
        conn.execute(sa.text("DROP INDEX ix_risk_snapshots_world_stage_asof"))
        for table, columns in dropped.items():
            for column in columns:
                conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(sa.delete(schema.schema_version).where(schema.schema_version.c.version > 6))
    svc.close()
    store = Store(store_url)
    with store.write() as conn:
        assert migrate(conn) == list(range(7, head_version() + 1))  # v7 (provenance) and every later one
    with store.read() as conn:
        st, rs = schema.strategies, schema.risk_snapshots
        row = conn.execute(sa.select(st.c.stage_entered_at, st.c.updated_at, st.c.stage)).one()
        assert row.stage == "paper" and row.stage_entered_at == row.updated_at >= entered
        assert set(conn.execute(sa.select(rs.c.stage, rs.c.evidence_class)).all()) == {("paper", None)}
    store.dispose()
    again = make_service(store_url, svc.settings.worlds_dir, svc.settings.home, svc.clock).as_actor("cron")
    try:
        # Nothing recorded without provenance counts: the paper run and the snapshot are untrusted.
        view = again.campaign("auto", strategy_id="a")[0]
        assert view.next_action is not None and view.next_action.reason == "risk_snapshot_missing"
        out = again.promote("auto", "a")
        assert out.status == "blocked" and "evidence_untrusted" in out.gate.codes
    finally:
        again.close()


def test_one_bad_stored_snapshot_fails_its_world_closed_and_the_loop_runs_the_others(svc) -> None:  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    from qmtl_core.store import schema

    s = Setup(svc, "auto")
    s.backtest("a")
    svc.clock.advance(days=12)
    svc.as_actor("feed").put_risk_snapshot(_snapshot("auto", "p1", svc.clock(), returns={"a": _daily(T0, 12)},
                                                     weights={"a": 1.0}))
    # A snapshot stored before the hub refused r < -1 (an older qmtl, or a hand-edited row).
    t = schema.risk_snapshots
    with svc.store.write() as conn:
        document = conn.execute(sa.select(t.c.document)).scalar_one()
        document["realized_returns"]["a"][3]["r"] = -2.0
        conn.execute(sa.update(t).values(document=document, content_hash="f" * 64))
    svc.evaluate_cohort("gov", stage="backtest", returns=_cohort("g"))
    outcomes = {o.world: o for o in svc.campaign_iteration(["auto", "gov"], execute=True, holder="h",
                                                          lease_ttl=timedelta(minutes=5))}
    bad = outcomes["auto"]
    assert bad.exit_code == 12
    [failed] = [a for a in bad.actions if a["outcome"] == "error"]
    assert failed["action"] == "evaluate" and failed["result"]["why"] == "risk_snapshot_invalid"
    assert "auto a: stored risk snapshot auto version p1 is not valid: realized_returns.a.3.r" in \
        failed["result"]["message"]
    assert [a["action"] for a in outcomes["gov"].actions if a["outcome"] == "executed"] == ["promote_to_paper"]


def _cohort(sid: str) -> Any:
    import numpy as np

    from qmtl_core.datafiles import ReturnsTable

    stamps = tuple(datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(days=i) for i in range(400))
    return ReturnsTable((sid,), stamps, np.random.default_rng(3).normal(0.003, 0.01, (1, 400)))


@pytest.mark.usefixtures("cli_mode")
def test_cli_backdated_paper_returns_are_unverified_and_never_promote(qmtl_env: dict[str, str], worlds: Path,
                                                                     tmp_path: Path) -> None:
    """Finding 1 as a user types it: ``qmtl world evaluate W --strategy S --stage paper --returns F``."""
    from tests.cli_helpers import qmtl

    bt = tmp_path / "bt.csv"
    bt.write_text("timestamp,s1\n" + "".join(
        f"{(datetime(2024, 1, 1) + timedelta(days=i)).date()},{0.003 * (1 if i % 3 else -0.5)}\n" for i in range(400)))
    assert qmtl("world", "evaluate", "auto", "--strategy", "s1", "--returns", str(bt)).exit_code == 0
    assert qmtl("world", "campaign-loop", "--world", "auto", "--once", "--execute").exit_code == 12  # paper, no data
    today = datetime.now(timezone.utc).date()
    backdated = tmp_path / "paper.csv"
    backdated.write_text("timestamp,s1\n" + "".join(
        f"{today - timedelta(days=20 - i)},{0.003 * (1 if i % 3 else -0.5)}\n" for i in range(12)))
    ran = qmtl("world", "evaluate", "auto", "--strategy", "s1", "--stage", "paper", "--returns", str(backdated),
               "--json")
    doc = ran.json()
    assert ran.exit_code == 12 and doc["status"] == "insufficient_data" and doc["evidence_class"] == "unverified"
    assert "12 request.returns observation(s) dated before the strategy entered paper" in doc["reason"]
    human = qmtl("world", "evaluate", "auto", "--strategy", "s1", "--stage", "paper", "--returns", str(backdated))
    assert "evidence: unverified (supplied in a request)" in human.stdout
    loop = qmtl("world", "campaign-loop", "--world", "auto", "--once", "--execute", "--json")
    assert '"apply_live"' not in loop.stdout
    promoted = qmtl("promote", "s1", "--world", "auto", "--json")
    assert promoted.exit_code == 12 and promoted.json()["status"] == "blocked"
