"""Authority: one gate into live, a kill switch that needs only the world id, loop isolation, the
record's invariants in the facade, one world-id rule, and the OS account as the local identity.

Each finding of issue 20 is a regression test here, on SQLite and PostgreSQL, through the CLI in
local and remote mode (the real HTTP API) where a remote path exists.
"""

from __future__ import annotations

import json
import os
import pwd
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from qmtl_core.errors import BadInputError, BlockedError, UsageError
from qmtl_core.service import WorldService
from qmtl_core.store import open_store, schema
from tests._remote import SERVER, InProcessServer, as_person
from tests._service import Clock, make_service
from tests.cli_helpers import qmtl
from tests.test_governance import Setup, policy_text

OS_USER = pwd.getpwuid(os.geteuid()).pw_name


def live_anywhere(store_url: str, world: str) -> dict[str, Any]:
    """Every table's word on what is live: the current activation set, the stages, the newest
    decision envelope per strategy."""
    store = open_store(store_url)
    try:
        with store.read() as conn:
            sets, acts, st, d = schema.activation_sets, schema.activations, schema.strategies, schema.decisions
            version = conn.execute(sa.select(sa.func.max(sets.c.set_version)).where(sets.c.world_id == world)).scalar()
            activations = {r.strategy_id for r in conn.execute(sa.select(acts.c.strategy_id).where(
                acts.c.world_id == world, acts.c.set_version == version, acts.c.stage == "live"))}
            stages = {r.strategy_id for r in conn.execute(sa.select(st.c.strategy_id).where(
                st.c.world_id == world, st.c.stage == "live"))}
            newest: dict[str, str] = {}
            for r in conn.execute(sa.select(d.c.strategy_id, d.c.effective_mode).where(d.c.world_id == world)
                                  .order_by(d.c.id)):
                newest[r.strategy_id] = r.effective_mode
            decisions = {sid for sid, mode in newest.items() if mode == "live"}
    finally:
        store.dispose()
    return {"activations": activations, "stages": stages, "decisions": decisions}


NOTHING_LIVE = {"activations": set(), "stages": set(), "decisions": set()}


def _live_service(store_url: str, worlds_dir: Path, home: Path, text: str | None = None) -> WorldService:
    (worlds_dir / "gov.yaml").write_text(text or policy_text())
    svc = make_service(store_url, worlds_dir, home, Clock(datetime.now(timezone.utc))).as_actor("cron")
    Setup(svc).ready("a")
    rid = svc.as_actor("carol").promote("gov", "a", reason="paper is solid").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    assert svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok").status == "applied"
    return svc


@pytest.fixture
def live_world(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path) -> dict[str, str]:
    """World ``gov`` (two of alice, bob, carol) with strategy ``a`` live by two approvals."""
    _live_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h").close()
    assert live_anywhere(qmtl_env["QMTL_DATABASE_URL"], "gov")["activations"] == {"a"}
    return qmtl_env


# --- finding 1: rollback bypassed every live condition ------------------------------------------------
@pytest.mark.usefixtures("cli_mode")
def test_retire_halt_rollback_does_not_make_live(live_world: dict[str, str]) -> None:
    url = live_world["QMTL_DATABASE_URL"]
    assert qmtl("world", "demote", "gov", "a", "--to", "retired", "--reason", "retire it").exit_code == 0
    assert qmtl("world", "halt", "gov", "--reason", "incident").exit_code == 0
    rolled = qmtl("world", "rollback", "gov", "--reason", "undo the retirement", "--json")
    assert rolled.exit_code == 0, rolled.stderr
    doc = rolled.json()
    assert doc["changed"] == {"a": "paper"}
    [entry] = doc["reentries"]
    assert entry["strategy_id"] == "a" and entry["status"] == "blocked" and "world_halted" in entry["message"]
    assert live_anywhere(url, "gov") == NOTHING_LIVE
    # resuming asks the gate too: the cooldown since a's promotion still runs, so a stays in paper
    resumed = qmtl("world", "resume", "gov", "--reason", "incident over", "--allow-live", "--json")
    assert resumed.exit_code == 0 and live_anywhere(url, "gov") == NOTHING_LIVE
    dry = qmtl("promote", "a", "--world", "gov", "--dry-run", "--json").json()
    assert {"cooldown_active", "approval_required"} <= {r["code"] for r in dry["gate"]["reasons"]}
    assert qmtl("world", "history", "gov", "--json").json()["live"] == []
    assert [d["effective_mode"] for d in qmtl("world", "decision", "gov", "--json").json()["decisions"]] == ["paper"]
    assert qmtl("audit", "verify").exit_code == 0


@pytest.mark.usefixtures("cli_mode")
def test_rollback_restores_paper_and_says_a_request_is_needed(live_world: dict[str, str]) -> None:
    """Remote mode: an operator token (which may not approve) cannot re-activate a live strategy."""
    url = live_world["QMTL_DATABASE_URL"]
    assert qmtl("world", "demote", "gov", "a", "--reason", "drawdown alarm").exit_code == 0
    rolled = qmtl("world", "rollback", "gov", "--reason", "undo the demotion")
    assert rolled.exit_code == 0, rolled.stderr
    assert "a restored to paper" in rolled.stdout or "a stays in paper" in rolled.stdout
    assert live_anywhere(url, "gov") == NOTHING_LIVE
    log = qmtl("audit", "log", "--world", "gov", "--json").json()["entries"]
    kinds = [e["kind"] for e in log]
    assert kinds[-2:] == ["world.rollback", "promotion.blocked"]  # cooldown: the block is on the record
    assert log[-2]["actor"] == OS_USER


def test_allow_live_false_means_nothing_live_in_any_table(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    svc = _live_service(store_url, worlds_dir, tmp_path / "h")
    svc.demote("gov", "a", reason="drawdown alarm")
    (worlds_dir / "gov.yaml").write_text(policy_text(allow_live=False, version=2))
    adopt_as_approvers(svc, "gov", 2)
    out = svc.rollback("gov", reason="undo the demotion")
    assert out["changed"] == {} and out["reentries"][0]["status"] == "blocked"
    assert "allow_live_false" in out["reentries"][0]["message"]
    assert live_anywhere(store_url, "gov") == NOTHING_LIVE
    svc.close()


def test_a_live_strategy_is_withdrawn_when_allow_live_false_comes_into_force(store_url: str, worlds_dir: Path,
                                                                             tmp_path: Path) -> None:
    svc = _live_service(store_url, worlds_dir, tmp_path / "h")
    (worlds_dir / "gov.yaml").write_text(policy_text(allow_live=False, version=2))
    adopt_as_approvers(svc, "gov", 2)
    assert live_anywhere(store_url, "gov") == NOTHING_LIVE
    entry = svc.audit_log(world="gov", kind="policy.enforced")[-1]
    assert entry.payload["withdrawn"] == ["a"] and entry.payload["changed"] == {"a": "paper"}
    assert svc.history("gov")["live"] == []
    svc.close()


def adopt_as_approvers(svc: WorldService, world: str, version: int) -> None:
    """Bring a changed policy file into force the governed way: recorded (a proposal, since the
    world runs strategies), then approved by two approvers of the version in force."""
    assert svc.load_world(world).proposal is not None
    assert svc.load_world(world).policy.policy_version == version - 1  # still the version in force
    assert svc.as_actor("alice").approve_policy(world, version=version, reason="reviewed")["adopted"] is False
    assert svc.as_actor("bob").approve_policy(world, version=version, reason="agreed")["adopted"] is True
    assert svc.load_world(world).policy.policy_version == version


# --- finding 2: weakening the policy needed nobody's approval ----------------------------------------------
def _weaker(text: str) -> str:
    return (text.replace("approvers: [alice, bob, carol]", "approvers: [dave]")
            .replace("required_approvals: 2", "required_approvals: 1").replace("policy_version: 1", "policy_version: 2"))


@pytest.mark.parametrize("cli_mode", ["remote"], indirect=True)
@pytest.mark.usefixtures("cli_mode")
def test_weakening_the_policy_is_a_proposal_until_the_approvers_in_force_agree(live_world: dict[str, str],
                                                                               worlds_dir: Path) -> None:
    path = worlds_dir / "gov.yaml"
    before = qmtl("audit", "log", "--json").json()["entries"]
    path.write_text(_weaker(path.read_text()))
    for read in (("world", "list"), ("world", "show", "gov"), ("world", "decision", "gov"),
                 ("world", "policy", "status", "gov"), ("world", "campaign", "gov"), ("promote", "--list")):
        assert qmtl(*read).exit_code == 0, read
    assert qmtl("audit", "log", "--json").json()["entries"] == before  # reads never write
    # dave edited the file; an acting command of his records it, as his proposal
    assert qmtl("world", "campaign-loop", "--world", "gov", "--once", "--execute", env=as_person("dave")).exit_code == 0
    status = qmtl("world", "policy", "status", "gov", "--json").json()
    assert status["in_force"]["policy_version"] == 1 and status["governors"] == ["alice", "bob", "carol"]
    [proposal] = status["proposals"]
    assert (proposal["policy_version"], proposal["recorded_by"], proposal["status"]) == (2, "dave", "proposed")
    assert "+    approvers: [dave]" in proposal["diff"] and "-    required_approvals: 2" in proposal["diff"]
    assert "approvers: [dave]" in qmtl("world", "policy", "status", "gov").stdout
    in_force = qmtl("world", "show", "gov", "--json").json()["policy"]["governance"]["live_promotion"]
    assert [a["name"] for a in in_force["approvers"]] == ["alice", "bob", "carol"]
    refused = qmtl("world", "policy", "approve", "gov", "--version", "2", "--reason", "mine", env=as_person("dave"))
    assert refused.exit_code == 10 and "not an approver" in refused.stderr
    assert qmtl("world", "policy", "approve", "gov", "--version", "2", env=as_person("alice")).exit_code == 2
    first = qmtl("world", "policy", "approve", "gov", "--version", "2", "--reason", "ok", env=as_person("alice"))
    assert first.exit_code == 11 and "1 of 2" in first.stdout
    again = qmtl("world", "policy", "approve", "gov", "--version", "2", "--reason", "ok", env=as_person("alice"))
    assert again.exit_code == 11  # counts once
    done = qmtl("world", "policy", "approve", "gov", "--version", "2", "--reason", "agreed", "--json",
                env=as_person("bob"))
    assert done.exit_code == 0 and done.json()["adopted"] is True and done.json()["approvals"] == ["alice", "bob"]
    assert qmtl("world", "show", "gov", "--json").json()["policy"]["policy_version"] == 2
    kinds = [e["kind"] for e in qmtl("audit", "log", "--world", "gov", "--kind", "policy.*", "--json").json()["entries"]]
    assert kinds[-4:] == ["policy.proposed", "policy.approved", "policy.approved", "policy.adopted"]
    assert qmtl("audit", "verify").exit_code == 0


def test_a_world_with_nothing_running_adopts_directly_and_a_running_one_keeps_its_version(
        store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    svc = _live_service(store_url, worlds_dir, tmp_path / "h")
    path = worlds_dir / "gov.yaml"
    # no "tightening" shortcut: even allow_live: false is a proposal while a strategy runs (halt is the
    # immediate stop), so nothing about the world changes until the approvers agree
    path.write_text(policy_text(allow_live=False, version=2))
    loaded = svc.as_actor("dave").load_world("gov")
    assert loaded.policy.policy_version == 1 and loaded.policy.allow_live is True
    assert loaded.proposal is not None and loaded.proposal.recorded_by == "dave"
    assert live_anywhere(store_url, "gov")["activations"] == {"a"}
    with pytest.raises(BlockedError, match="dave is not an approver"):
        svc.as_actor("dave").approve_policy("gov", version=2, reason="x")
    # ... and the proposer cannot approve their own proposal, even when listed
    path.write_text(policy_text(allow_live=False, version=3))
    svc.as_actor("carol").load_world("gov")
    with pytest.raises(BlockedError, match="carol proposed policy version 3"):
        svc.as_actor("carol").approve_policy("gov", version=3, reason="mine")
    status = svc.policy_status("gov")
    assert [(p["policy_version"], p["status"]) for p in status["proposals"]] == [(3, "proposed")]  # 2 superseded
    svc.demote("gov", "a", to="retired", reason="wind down")
    path.write_text(policy_text(allow_live=False, version=4))
    assert svc.load_world("gov").policy.policy_version == 4  # nothing in paper or live: adopted directly
    assert svc.audit_log(world="gov", kind="policy.*")[-1].kind == "policy.changed"
    svc.close()


# --- finding 4: the kill switch depended on the policy file ---------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "typo", "unversioned"])
@pytest.mark.usefixtures("cli_mode")
def test_halt_needs_only_the_world_id(live_world: dict[str, str], worlds_dir: Path, damage: str) -> None:
    path = worlds_dir / "gov.yaml"
    if damage == "missing":
        path.unlink()
    elif damage == "typo":
        path.write_text(path.read_text().replace("rules:", "rulez:"))
    else:
        path.write_text(path.read_text().replace("max_live_slots: 2", "max_live_slots: 3"))
    halted = qmtl("world", "halt", "gov", "--reason", "file trouble", "--json")
    assert halted.exit_code == 0, halted.stderr
    assert halted.json()["was_live"] == ["a"]
    assert live_anywhere(live_world["QMTL_DATABASE_URL"], "gov") == NOTHING_LIVE
    assert "already halted" in qmtl("world", "halt", "gov", "--reason", "again").stdout


def test_halt_of_an_unknown_world_is_not_found(qmtl_env: dict[str, str]) -> None:
    out = qmtl("world", "halt", "nowhere", "--reason", "typo")
    assert out.exit_code == 3 and "nowhere" in out.stderr


@pytest.mark.usefixtures("cli_mode")
def test_loop_reports_a_live_world_whose_policy_file_is_gone(live_world: dict[str, str], worlds_dir: Path) -> None:
    (worlds_dir / "gov.yaml").unlink()
    out = qmtl("world", "campaign-loop", "--all", "--once", "--execute", "--json")
    assert out.exit_code == 12, out.stderr
    [doc] = [json.loads(line) for line in out.stdout.splitlines()]
    worlds = {w["world"]: w for w in doc["worlds"]}
    assert worlds["gov"]["status"] == "error" and worlds["gov"]["error"] == "policy_unavailable"
    assert worlds["gov"]["exit_code"] == 12
    assert {"demo-momentum", "auto-carry", "research-sandbox"} <= set(worlds)  # the others still ran
    assert all(worlds[w]["status"] == "executed" for w in ("demo-momentum", "auto-carry"))
    listed = qmtl("world", "list", "--json").json()["worlds"]
    assert [w for w in listed if w["world"] == "gov"][0]["valid"] is False
    human = qmtl("world", "campaign-loop", "--all", "--once")
    assert human.exit_code == 12 and "policy_unavailable" in human.stdout


def test_loop_isolates_a_world_that_fails(store_url: str, worlds_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one world, a broken policy in another: both reported with their exit codes, the
    others run, and the next iteration runs too."""
    import qmtl_core.service._campaign as camp

    (worlds_dir / "broken.yaml").write_text("world: broken\npolicy_version: [\n")
    real = camp.load_state

    def flaky(conn: Any, loaded: Any) -> Any:
        if loaded.world_id == "auto-carry":
            raise ZeroDivisionError("a bug")
        return real(conn, loaded)

    monkeypatch.setattr(camp, "load_state", flaky)
    svc = make_service(store_url, worlds_dir, tmp_path / "h")
    for _ in range(2):
        outcomes = {o.world: o for o in svc.campaign_iteration(svc.world_names(), execute=True, holder="t",
                                                               lease_ttl=timedelta(minutes=5))}
        assert (outcomes["auto-carry"].status, outcomes["auto-carry"].exit_code) == ("error", 1)
        assert "ZeroDivisionError" in (outcomes["auto-carry"].message or "")
        assert (outcomes["broken"].exit_code, outcomes["broken"].error) == (2, "invalid_policy")
        assert outcomes["demo-momentum"].status == "executed"
        assert camp.iteration_exit(list(outcomes.values())) == 1
    with svc.store.read() as conn:  # the failed world's lease was released
        assert conn.execute(sa.select(schema.leases)).first() is None
    svc.close()


# --- finding 6: a reason was required only by the CLI ---------------------------------------------------
def test_reason_and_actor_are_enforced_by_the_facade(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    svc = _live_service(store_url, worlds_dir, tmp_path / "h")
    before = len(svc.audit_log())
    for call in (lambda r: svc.set_halted("gov", halted=True, reason=r),
                 lambda r: svc.set_halted("gov", halted=False, reason=r),
                 lambda r: svc.rollback("gov", reason=r),
                 lambda r: svc.demote("gov", "a", reason=r)):
        for empty in ("", "   ", "\n"):
            with pytest.raises(UsageError, match="needs a reason"):
                call(empty)
    assert len(svc.audit_log()) == before
    for actor in ("", " ", "bob ", "a\nb"):
        with pytest.raises(UsageError, match="invalid actor"):
            svc.as_actor(actor)
    svc.close()


def test_reason_is_required_through_http(live_world: dict[str, str]) -> None:
    from qmtl_core.service._client import HttpClient

    client = HttpClient(SERVER, None, transport=InProcessServer())
    try:
        for call in (lambda: client.set_halted("gov", halted=True, reason=""),
                     lambda: client.rollback("gov", reason=" "),
                     lambda: client.demote("gov", "a", reason="")):
            with pytest.raises(UsageError) as caught:
                call()
            assert caught.value.exit_code == 2
        assert client.audit_log(kind="world.*")["entries"] == []
    finally:
        client.close()


# --- finding 5: a world id that is a path ---------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../outside/evil", "/tmp/evil", "Gov", "gov.yaml", "-gov", "a b", "gov\n"])
def test_world_ids_follow_one_rule_in_the_library(store_url: str, worlds_dir: Path, tmp_path: Path,
                                                  bad: str) -> None:
    (tmp_path / "outside").mkdir(exist_ok=True)
    (tmp_path / "outside" / "evil.yaml").write_text(policy_text("evil"))
    svc = make_service(store_url, worlds_dir, tmp_path / "h")
    for call in (lambda: svc.load_world(bad), lambda: svc.set_halted(bad, halted=True, reason="x"),
                 lambda: svc.list_runs(bad), lambda: svc.history(bad)):
        with pytest.raises(BadInputError, match="invalid world id") as caught:
            call()
        assert caught.value.code == "invalid_world_id"
    assert svc.policy_history("evil") == [] and svc.audit_log() == []
    svc.close()


@pytest.mark.usefixtures("cli_mode")
def test_world_ids_follow_one_rule_in_the_cli_and_http(qmtl_env: dict[str, str], tmp_path: Path) -> None:
    out = qmtl("world", "halt", "../outside/evil", "--reason", "x")  # remote: refused before a URL is built
    assert out.exit_code == 2 and "invalid world id '../outside/evil'" in out.stderr
    out = qmtl("world", "halt", "Evil_World", "--reason", "x")
    assert out.exit_code == 2 and "invalid world id 'Evil_World'" in out.stderr
    snap = tmp_path / "snap.json"
    snap.write_text(json.dumps({"world_id": str(tmp_path / "outside" / "evil"), "version": "v1",
                                "as_of": "2026-03-02T12:00:00Z", "weights": {"a": 1.0},
                                "provenance": {"actor": "risk", "stage": "paper"}}))
    out = qmtl("risk", "put", str(snap))
    assert out.exit_code == 2 and "invalid world id" in out.stderr
    assert qmtl("audit", "log", "--json").json()["entries"] == []


# --- finding 3: the local identity was an environment variable -------------------------------------------
def test_local_identity_is_the_os_account_not_logname(live_world: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from qmtl_core.config import Settings

    monkeypatch.setenv("LOGNAME", "alice")
    monkeypatch.setenv("USER", "alice")
    assert Settings.resolve().identity() == OS_USER
    out = qmtl("world", "halt", "gov", "--reason", "who am i", env={"LOGNAME": "bob", "USER": "bob"})
    assert out.exit_code == 0
    entry = qmtl("audit", "log", "--kind", "world.halted", "--json").json()["entries"][-1]
    assert entry["actor"] == OS_USER
