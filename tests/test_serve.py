"""``qmtl serve``: the 401/403 matrix, identity from the token, and a real server process on a port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from qmtl_core.config import Settings
from qmtl_core.service._auth import create_token
from qmtl_core.service._http import create_app
from tests._remote import InProcessServer
from tests._service import Clock, make_service
from tests.test_governance import Setup, policy_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def api(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An in-process server with one token per role (actors named after their roles)."""
    (worlds_dir / "gov.yaml").write_text(policy_text())
    server = InProcessServer()
    service = server.app.state.service
    tokens = {}
    with service.store.write() as conn:
        for role, actor in (("reader", "rita"), ("submitter", "sam"), ("approver", "alice"),
                            ("operator", "otto"), ("approver", "carol"), ("producer", "pia")):
            tokens[actor] = create_token(conn, actor=actor, role=role, created_by="admin", now=service.clock())[1]
    client = httpx.Client(base_url="http://qmtl.test", transport=server)
    yield client, tokens, server
    client.close()


def _h(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {"Authorization": "Bearer "}


# (method, path, body, permission) — one per kind of route
ROUTES: list[tuple[str, str, Any, str]] = [
    ("GET", "/worlds", None, "read"),
    ("GET", "/worlds/gov/runs", None, "read"),
    ("GET", "/audit", None, "read"),
    ("POST", "/worlds/gov/evaluate", {"strategy_id": "s1", "metrics": {"sharpe": 1.0}}, "evaluate"),
    ("POST", "/risk-hub/snapshots", {"world_id": "gov"}, "risk"),
    ("POST", "/worlds/gov/campaign/tick", None, "tick"),
    ("POST", "/worlds/gov/promotions", {"strategy_id": "s1", "dry_run": True}, "promote"),
    ("POST", "/promotions/pr-x/approve", {"reason": "x"}, "approve"),
    ("POST", "/worlds/gov/halt", {"reason": "drill"}, "operate"),
    ("GET", "/worlds/gov/policy", None, "read"),
    ("POST", "/worlds/gov/policy/approve", {"version": 2, "reason": "x"}, "approve"),
]
ALLOWED = {"rita": {"read"}, "sam": {"read", "evaluate", "tick", "promote"},
           "pia": {"read", "evaluate", "risk"},  # a producer: its realized returns are trusted evidence
           "alice": {"read", "approve"}, "otto": {"read", "evaluate", "risk", "tick", "promote", "operate"}}


@pytest.mark.parametrize(("method", "path", "body", "permission"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_401_403_matrix(api, method: str, path: str, body: Any, permission: str) -> None:  # type: ignore[no-untyped-def]
    client, tokens, _ = api
    for token in (None, "qmtl_nope_nope"):
        r = client.request(method, path, json=body, headers=_h(token))
        assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.json()["exit_code"] == 2
    for actor, allowed in ALLOWED.items():
        r = client.request(method, path, json=body, headers=_h(tokens[actor]))
        if permission in allowed:
            assert r.status_code not in (401, 403), (actor, path, r.json())
        else:
            assert r.status_code == 403 and r.json()["error"] == "forbidden", (actor, path, r.json())


def test_health_needs_no_token_and_docs_are_served(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    assert client.get("/healthz").json()["ok"] is True
    assert "/worlds/{world}/evaluate" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_changes_are_attributed_to_the_token_actor(api) -> None:  # type: ignore[no-untyped-def]
    client, tokens, server = api
    r = client.post("/worlds/gov/evaluate", json={"strategy_id": "s1", "metrics": {"sharpe": 1.0}},
                    headers=_h(tokens["sam"]))
    assert r.status_code == 200 and r.json()["recorded_by"] == "sam"
    entries = client.get("/audit", params={"kind": "run.*"}, headers=_h(tokens["rita"])).json()["entries"]
    assert [e["actor"] for e in entries] == ["sam"]


def test_approver_identity_comes_from_the_token(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, tokens, server = api
    svc = server.app.state.service
    setup_svc = svc.as_actor("cron")
    setup_svc.clock = Clock(datetime.now(timezone.utc))
    Setup(setup_svc).ready("a")
    opened = client.post("/worlds/gov/promotions", json={"strategy_id": "a", "reason": "go"},
                         headers=_h(tokens["otto"]))
    assert opened.status_code == 200 and opened.json()["status"] == "pending"
    rid = opened.json()["request_id"]
    # carol's approver token cannot approve on behalf of anyone else, and "otto" (the requester,
    # an operator) has no approve permission at all.
    assert client.post(f"/promotions/{rid}/approve", json={"reason": "x"}, headers=_h(tokens["otto"])).status_code == 403
    first = client.post(f"/promotions/{rid}/approve", json={"reason": "ok"}, headers=_h(tokens["alice"])).json()
    assert first["gate"]["valid_approvals"] == ["alice"]
    again = client.post(f"/promotions/{rid}/approve", json={"reason": "ok"}, headers=_h(tokens["alice"])).json()
    assert again["gate"]["valid_approvals"] == ["alice"]  # the same token counts once
    unconfirmed = client.post(f"/promotions/{rid}/approve", json={"reason": "ok"}, headers=_h(tokens["carol"]))
    assert unconfirmed.status_code == 428 and unconfirmed.json()["error"] == "allow_live_required"
    done = client.post(f"/promotions/{rid}/approve", json={"reason": "ok"},
                       headers={**_h(tokens["carol"]), "X-Allow-Live": "true"}).json()
    assert done["status"] == "applied" and done["gate"]["valid_approvals"] == ["alice", "carol"]


def test_requester_token_cannot_approve(api) -> None:  # type: ignore[no-untyped-def]
    client, tokens, server = api
    svc = server.app.state.service
    with svc.store.write() as conn:
        both = create_token(conn, actor="alice", role="submitter", created_by="admin", now=svc.clock())[1]
    setup_svc = svc.as_actor("cron")
    setup_svc.clock = Clock(datetime.now(timezone.utc))
    Setup(setup_svc).ready("a")
    rid = client.post("/worlds/gov/promotions", json={"strategy_id": "a"}, headers=_h(both)).json()["request_id"]
    refused = client.post(f"/promotions/{rid}/approve", json={"reason": "mine"}, headers=_h(tokens["alice"]))
    assert refused.status_code == 422 and refused.json()["error"] == "requester_cannot_approve"


def test_bad_request_bodies_are_one_clear_error(api) -> None:  # type: ignore[no-untyped-def]
    client, tokens, _ = api
    r = client.post("/worlds/gov/evaluate", json={"strategy_id": ""}, headers=_h(tokens["sam"]))
    assert r.status_code == 400 and r.json()["exit_code"] == 2 and "strategy_id" in r.json()["message"]
    r = client.post("/worlds/gov/evaluate", json={"strategy_id": "s", "returns": [["nope", 1]]},
                    headers=_h(tokens["sam"]))
    assert r.status_code == 400 and "is not an ISO-8601" in r.json()["message"]
    assert client.get("/worlds/nope", headers=_h(tokens["rita"])).status_code == 404


# --- a real server on a free port ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def real_server(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    (worlds_dir / "gov.yaml").write_text(policy_text())
    # /metrics read on every scrape: tests scrape right after the change they look for
    env = {**qmtl_env, "PYTHONPATH": str(ROOT), "QMTL_HOME": str(tmp_path / "server-home"), "QMTL_METRICS_MAX_AGE": "0"}
    made = subprocess.run([sys.executable, "-m", "qmtl_cli", "token", "create", "--actor", "otto", "--role",
                           "operator", "--json"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qmtl_cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # a loaded machine starts Python slowly
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.communicate()[1][-800:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    yield url, token, env
    proc.terminate()
    proc.communicate(timeout=10)


def test_cli_against_a_real_server(real_server) -> None:  # type: ignore[no-untyped-def]
    url, token, env = real_server
    client_env = {k: v for k, v in env.items() if k not in ("QMTL_DATABASE_URL", "QMTL_WORLDS_DIR")}
    client_env.update({"QMTL_SERVER": url, "QMTL_TOKEN": token, "QMTL_HOME": str(Path(env["QMTL_HOME"]).parent / "c")})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qmtl_cli", *args], env=client_env, capture_output=True,
                              text=True, cwd=ROOT)

    listed = run("world", "list", "--json")
    assert listed.returncode == 0 and "gov" in [w["world"] for w in json.loads(listed.stdout)["worlds"]]
    rec = run("world", "evaluate", "gov", "--strategy", "s1", "--stage", "paper", "--json")
    assert rec.returncode == 12 and json.loads(rec.stdout)["status"] == "insufficient_data"
    missing = run("world", "show", "nope")
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1 and "known worlds" in missing.stderr
    tail = run("events", "tail", "--world", "gov", "--since", "0", "--limit", "2", "--json")
    assert tail.returncode == 0, tail.stderr
    kinds = [json.loads(line)["kind"] for line in tail.stdout.splitlines()]
    assert kinds == ["policy.recorded", "run.recorded"]
    bad = subprocess.run([sys.executable, "-m", "qmtl_cli", "world", "list"], capture_output=True, text=True,
                         cwd=ROOT, env={**client_env, "QMTL_TOKEN": "qmtl_wrong"})
    assert bad.returncode == 2 and "token is not valid" in bad.stderr
    ledger = run("audit", "log", "--json")
    assert {e["actor"] for e in json.loads(ledger.stdout)["entries"] if e["kind"] == "run.recorded"} == {"otto"}


def test_local_and_remote_print_the_same(qmtl_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI renders the same documents in both modes: byte-identical output on the same store."""
    import qmtl_cli._state

    from tests import _remote
    from tests.cli_helpers import qmtl
    from tests.test_cli_evaluate import DEMO_RETURNS

    assert qmtl("world", "evaluate", "demo-momentum", "--record", "--returns", str(DEMO_RETURNS)).exit_code == 10
    assert qmtl("world", "campaign-loop", "--world", "demo-momentum", "--once", "--execute").exit_code in (10, 12)
    monkeypatch.setattr(qmtl_cli._state, "TRANSPORT_FACTORY", _remote.factory)
    commands = [("world", "runs", "demo-momentum"), ("world", "campaign", "demo-momentum"),
                ("world", "decision", "demo-momentum", "--json"), ("world", "history", "demo-momentum"),
                ("promote", "--list"), ("audit", "log"), ("world", "list"),
                ("world", "evaluate", "demo-momentum", "--returns", str(DEMO_RETURNS), "--explain")]
    for args in commands:
        local = qmtl(*args)
        remote = qmtl("--server", _remote.SERVER, *args)
        if "decision" in args:  # as_of is the moment of asking
            strip = lambda doc: [{k: v for k, v in d.items() if k != "as_of"} for d in doc["decisions"]]  # noqa: E731
            assert strip(local.json()) == strip(remote.json())
        else:
            assert (local.exit_code, local.stdout) == (remote.exit_code, remote.stdout), args
