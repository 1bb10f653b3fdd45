"""Governance from the terminal, crash safety of apply, webhook notifications, and the pure gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from qmtl_core.campaign import RunSummary
from qmtl_core.governance import Approval, GateInput, RequestView, promotion_gate
from qmtl_core.policy import load_policy_text
from qmtl_core.risk import StoredSnapshot, parse_snapshot
from tests._remote import as_person
from tests._service import Clock, make_service
from tests.cli_helpers import qmtl
from tests.test_governance import Setup, policy_text

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


# --- the pure gate: allow_live false wins over a complete set of approvals -------------------------
def _inputs(text: str, approvals: tuple[Approval, ...] = ()) -> GateInput:
    policy = load_policy_text(text)
    run = RunSummary("paper-r", 1, "pass", policy.policy_version, "h", {"sharpe": 1.0}, (),
                     NOW - timedelta(days=12), NOW - timedelta(days=1), 12, "hub")
    snap = parse_snapshot({"world_id": "gov", "version": "v", "as_of": NOW.isoformat(), "weights": {"a": 1.0},
                           "realized_returns": {"a": [{"ts": (NOW - timedelta(days=1)).isoformat(), "r": 0.001}]},
                           "provenance": {"actor": "r", "stage": "paper"}})
    g = GateInput(policy, "a", "paper", run, StoredSnapshot(snap, snap.content_hash, NOW, "r"))
    evidence = promotion_gate(g, NOW).evidence_hash
    return GateInput(policy, "a", "paper", run, g.snapshot,
                     request=RequestView("pr-1", "carol", evidence, NOW, tuple(
                         Approval(a.approver, a.decision, evidence, a.created_at) for a in approvals)))


def test_gate_allows_with_every_approval() -> None:
    ok = (Approval("alice", "approve", "", NOW), Approval("bob", "approve", "", NOW))
    result = promotion_gate(_inputs(policy_text(), ok), NOW)
    assert result.allowed and result.valid_approvals == ("alice", "bob") and result.exit_code == 0


def test_allow_live_false_blocks_a_fully_approved_request() -> None:
    ok = (Approval("alice", "approve", "", NOW), Approval("bob", "approve", "", NOW))
    result = promotion_gate(_inputs(policy_text(allow_live=False), ok), NOW)
    assert not result.allowed and result.codes == ["allow_live_false"] and result.exit_code == 10


def test_requester_and_unlisted_approvals_never_count() -> None:
    votes = (Approval("carol", "approve", "", NOW), Approval("mallory", "approve", "", NOW),
             Approval("alice", "approve", "", NOW))
    result = promotion_gate(_inputs(policy_text(), votes), NOW)
    assert result.valid_approvals == ("alice",) and "approval_required" in result.codes


# --- the terminal -------------------------------------------------------------------------------------
@pytest.fixture
def ready_world(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path) -> dict[str, str]:
    (worlds_dir / "gov.yaml").write_text(policy_text())
    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h",
                       Clock(datetime.now(timezone.utc))).as_actor("cron")
    Setup(svc).ready("a")
    svc.close()
    return qmtl_env


# Several people act here, so these run in remote mode: each person with their own token, as in
# production. (Local mode acts as the OS account; it cannot tell people apart.)
_as = as_person


@pytest.mark.parametrize("cli_mode", ["remote"], indirect=True)
@pytest.mark.usefixtures("cli_mode")
def test_cli_promote_approve_list_decision_history(ready_world: dict[str, str]) -> None:
    dry = qmtl("promote", "a", "--world", "gov", "--dry-run", "--json")
    assert dry.exit_code == 11 and dry.json()["gate"]["reasons"][0]["code"] == "approval_required"
    opened = qmtl("promote", "a", "--world", "gov", "--reason", "paper is solid", env=_as("carol"))
    assert opened.exit_code == 11 and "opened request" in opened.stdout
    listed = qmtl("promote", "--list", "--json").json()["requests"]
    assert len(listed) == 1 and listed[0]["requester"] == "carol" and listed[0]["required_approvals"] == 2
    rid = listed[0]["request_id"]
    human = qmtl("promote", "--list")
    assert rid in human.stdout and "0/2" in human.stdout
    assert qmtl("approve", rid, env=_as("alice")).exit_code == 2  # a reason is required
    self_approval = qmtl("approve", rid, "--reason", "mine", env=_as("carol"))
    assert self_approval.exit_code == 10 and "four eyes" in self_approval.stderr
    first = qmtl("approve", rid, "--reason", "sharpe holds", env=_as("alice"))
    assert first.exit_code == 11 and "1 of 2" in first.stdout
    # The last approval would apply: without --allow-live nothing is recorded and it says so (exit 10).
    unconfirmed = qmtl("approve", rid, "--reason", "agreed", env=_as("bob"))
    assert unconfirmed.exit_code == 10 and "would put a live in gov" in unconfirmed.stderr
    assert "--allow-live" in unconfirmed.stderr
    assert qmtl("world", "history", "gov", "--json").json()["live"] == []
    assert "1/2" in qmtl("promote", "--list").stdout  # bob's approval was not kept either
    done = qmtl("approve", rid, "--reason", "agreed", "--json", "--allow-live", env=_as("bob"))
    assert done.exit_code == 0 and done.json()["status"] == "applied"
    decision = qmtl("world", "decision", "gov", "--json").json()["decisions"][0]
    assert decision["effective_mode"] == "live" and decision["ttl_sec"] == 600 and decision["etag"]
    hist = qmtl("world", "history", "gov", "--json").json()
    assert hist["live"] == ["a"] and [x["actor"] for x in hist["activations"][0]["why"]["approvals"]] == ["alice", "bob"]
    assert "approved by alice (sharpe holds), bob (agreed)" in qmtl("world", "history", "gov").stdout
    past = qmtl("world", "history", "gov", "--at", "2020-01-01T00:00Z", "--json").json()
    assert past["live"] == [] and qmtl("world", "history", "gov", "--at", "2020-01-01").exit_code == 0
    assert qmtl("world", "history", "gov", "--at", "2020-01-01T00:00").exit_code == 2  # naive time
    assert qmtl("approve", "pr-nope", "--reason", "x").exit_code == 3
    assert qmtl("audit", "verify").exit_code == 0


@pytest.mark.parametrize("cli_mode", ["remote"], indirect=True)
@pytest.mark.usefixtures("cli_mode")
def test_cli_halt_resume_demote_rollback_reject(ready_world: dict[str, str]) -> None:
    assert qmtl("world", "halt", "gov").exit_code == 2  # --reason required
    assert qmtl("world", "halt", "gov", "--reason", "broker outage").exit_code == 0
    assert "already halted" in qmtl("world", "halt", "gov", "--reason", "again").stdout
    blocked = qmtl("promote", "a", "--world", "gov", "--json")
    assert blocked.exit_code == 10 and "world_halted" in [r["code"] for r in blocked.json()["gate"]["reasons"]]
    unconfirmed = qmtl("world", "resume", "gov", "--reason", "fixed")
    assert unconfirmed.exit_code == 10 and "lift its kill switch" in unconfirmed.stderr
    assert qmtl("promote", "a", "--world", "gov", "--dry-run", "--json").json()["gate"]["reasons"][0]["code"] \
        == "world_halted"  # still halted: the refused resume changed nothing
    assert qmtl("world", "resume", "gov", "--reason", "fixed", "--allow-live").exit_code == 0
    rid = qmtl("promote", "a", "--world", "gov", "--json", env=_as("carol")).json()["request_id"]
    rejected = qmtl("reject", rid, "--reason", "not this week", env=_as("bob"))
    assert rejected.exit_code == 0 and "rejected" in rejected.stdout
    assert qmtl("approve", rid, "--reason", "x", env=_as("alice")).exit_code == 4  # closed
    assert qmtl("world", "demote", "gov", "a", "--to", "backtest", "--reason", "rework").exit_code == 0
    rolled = qmtl("world", "rollback", "gov", "--reason", "undo the demotion", "--json")
    assert rolled.exit_code == 0 and rolled.json()["changed"] == {"a": "paper"}
    assert qmtl("world", "demote", "gov", "a", "--to", "live", "--reason", "x").exit_code == 2


# --- crash safety: SIGKILL anywhere inside apply leaves the old state or the new, never a mix --------
_CRASH = """
import os, signal, sys
from pathlib import Path
from tests._service import make_service
import qmtl_core.governance._activations as acts
import qmtl_core.governance._requests as reqs
from qmtl_core import ledger

point = sys.argv[4]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "after_activations":  # the set and the stages are written; the decisions are next
    acts._store_decisions = die
elif point == "before_ledger":
    real = ledger.append_many
    def append_many(conn, drafts, **kw):
        if any(d.kind == "promotion.applied" for d in drafts):
            die()
        return real(conn, drafts, **kw)
    acts.ledger.append_many = append_many
elif point == "before_close":
    reqs._close = die
svc = make_service(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])).as_actor("bob")
svc.decide_request(sys.argv[5], decision="approve", reason="ship it")
print("survived")
"""


@pytest.mark.parametrize("point", ["after_activations", "before_ledger", "before_close"])
def test_sigkill_inside_apply_leaves_old_or_new_never_a_mix(ready_world: dict[str, str], worlds_dir: Path,
                                                            tmp_path: Path, point: str) -> None:
    url = ready_world["QMTL_DATABASE_URL"]
    svc = make_service(url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc)))
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    before = svc.activations("gov")
    proc = subprocess.run([sys.executable, "-c", _CRASH, url, str(worlds_dir), str(tmp_path / "h"), point, rid],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr[-800:]
    assert svc.activations("gov") == before  # the old activation set, untouched
    assert {v.strategy_id: v.stage for v in svc.campaign("gov")} == {"a": "paper"}
    assert svc.promotion_requests(world="gov")[0]["status"] == "pending"
    assert svc.audit_verify().ok
    done = svc.as_actor("bob").decide_request(rid, decision="approve", reason="ship it")
    assert done.status == "applied" and svc.activations("gov")["set_version"] == before["set_version"] + 1
    assert svc.audit_verify().ok
    svc.close()


# --- notifications ----------------------------------------------------------------------------------------
class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook():  # type: ignore[no-untyped-def]
    handler = type("Hook", (_Hook,), {"received": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_webhook_receives_events_and_failures_never_block(store_url: str, worlds_dir: Path, tmp_path: Path,
                                                          hook) -> None:  # type: ignore[no-untyped-def]
    server, handler = hook
    url = f"http://127.0.0.1:{server.server_address[1]}/qmtl"
    (worlds_dir / "gov.yaml").write_text(policy_text() + f"notifications: {{webhook: '{url}'}}\n")
    svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(NOW)).as_actor("cron")
    svc._notify_options = {"backoff": (0.01, 0.01), "timeout": 2.0}
    Setup(svc).ready("a")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
    svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok")
    svc.set_halted("gov", halted=True, reason="drill")
    events = [e["event"] for e in handler.received]
    assert events == ["promotion.requested", "promotion.approved", "promotion.approved", "promotion.applied",
                      "world.halted"]
    assert handler.received[0]["request_id"] == rid and handler.received[-1]["reason"] == "drill"
    handler.status = 503  # the receiver breaks: decisions go on, failures are recorded
    out = svc.set_halted("gov", halted=False, reason="drill over")
    assert out["changed"] and out["notifications"][0]["ok"] is False and out["notifications"][0]["attempts"] == 3
    failed = svc.audit_log(kind="notification.failed")
    # resuming re-requests what was live at the halt; that request's block is notified (and fails) too
    assert [f.subject for f in failed] == ["world.resumed", "promotion.blocked"]
    assert all("HTTP 503" in (f.reason or "") for f in failed)
    assert svc.audit_verify().ok
    svc.close()


# --- the outbox: a notification survives a SIGKILL between commit and delivery, and is sent once ---------
_KILL_BEFORE_DELIVERY = """
import os, signal, sys
from pathlib import Path
from tests._service import make_service
import qmtl_core.outbox as outbox

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
outbox.flush = die   # the decision has committed; delivery never starts
svc = make_service(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])).as_actor("alice")
svc.decide_request(sys.argv[4], decision="approve", reason="ok")
print("survived")
"""


class _KeyedHook(_Hook):
    keys: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        type(self).keys.append(self.headers.get("Idempotency-Key", ""))
        super().do_POST()


def test_outbox_delivers_after_a_crash_exactly_once(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    handler = type("Hook", (_KeyedHook,), {"received": [], "status": 200, "keys": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/qmtl"
        (worlds_dir / "gov.yaml").write_text(policy_text() + f"notifications: {{webhook: '{url}'}}\n")
        svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("cron")
        Setup(svc).ready("a")
        rid = svc.as_actor("carol").promote("gov", "a").request_id
        assert [e["event"] for e in handler.received] == ["promotion.requested"]
        proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_DELIVERY, store_url, str(worlds_dir),
                               str(tmp_path / "h"), rid], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr[-800:]
        assert [e.actor for e in svc.audit_log(kind="promotion.approved")] == ["alice"]  # committed
        assert len(handler.received) == 1  # ... but not announced
        svc.campaign_iteration(["gov"], execute=True, holder="next", lease_ttl=timedelta(minutes=5))
        approved = [e for e in handler.received if e["event"] == "promotion.approved"]
        assert len(approved) == 1 and approved[0]["request_id"] == rid and approved[0]["actor"] == "alice"
        assert handler.keys[-1] == approved[0]["event_id"] and len(set(handler.keys)) == len(handler.keys)
        count = len(handler.received)
        assert svc.flush_outbox() == []  # nothing is due twice
        svc.set_halted("gov", halted=True, reason="drill")
        assert len(handler.received) == count + 1 and handler.received[-1]["event"] == "world.halted"
        assert svc.audit_verify().ok
        svc.close()
    finally:
        server.shutdown()
        server.server_close()
