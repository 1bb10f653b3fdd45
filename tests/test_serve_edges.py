"""``qmtl serve``'s edges: body limits before the token, sockets closed on revoke, reads that write
nothing, secrets and server paths kept in, self-contained /docs, typed responses, ``--workers``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from qmtl_core.service._auth import create_token
from qmtl_core.service._edge import REDACTED
from qmtl_core.store import schema
from tests._remote import InProcessServer
from tests._service import Clock
from tests.test_governance import Setup, policy_text

ROOT = Path(__file__).resolve().parent.parent
SECRET_HOOK = "http://127.0.0.1:9/qmtl/s3cr3t-Tok3n"  # refused at once when notified
ROLES = (("reader", "rita"), ("submitter", "sam"), ("approver", "alice"), ("operator", "otto"))


def _h(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture
def api(qmtl_env: dict[str, str], worlds_dir: Path) -> Iterator[tuple[httpx.Client, dict[str, str], Any]]:
    """An in-process server (1 KiB body limit) over a world with a secret webhook, strategies in
    flight, a snapshot and a pending request; one token per role."""
    (worlds_dir / "gov.yaml").write_text(policy_text() + f"notifications:\n  webhook: {SECRET_HOOK}\n")
    server = InProcessServer(max_body=1024)
    service = server.app.state.service
    tokens = {}
    with service.store.write() as conn:
        for role, actor in ROLES:
            tokens[role] = create_token(conn, actor=actor, role=role, created_by="admin", now=service.clock())[1]
    setup = service.as_actor("cron")
    setup.clock = Clock(datetime.now(timezone.utc))
    Setup(setup).ready("a", "b")
    service.as_actor("carol").promote("gov", "a")
    service.list_worlds()  # every world file seen once (recording a first sight is issue 20's business)
    client = httpx.Client(base_url="http://qmtl.test", transport=server)
    yield client, tokens, server
    client.close()  # closes the server (the transport) too


# --- 1. body limits, checked before the token and before the body is read ---------------------------------
def _asgi(app: Any, *, method: str, path: str, headers: dict[str, str],
          chunks: list[bytes]) -> tuple[int, dict[str, Any], int]:
    """Call the ASGI app directly; returns (status, JSON body, how many body chunks it pulled)."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await asyncio.sleep(3600)  # the client has nothing more to say
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("qmtl.test", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_a_declared_oversized_body_is_refused_unread_even_without_a_token(api) -> None:  # type: ignore[no-untyped-def]
    _, tokens, server = api
    for headers in ({}, _h(tokens["operator"])):
        status, body, pulled = _asgi(server.app, method="POST", path="/risk-hub/snapshots",
                                     headers={**headers, "content-length": str(50 * 2**20)}, chunks=[b"x" * 4096])
        assert (status, body["error"], body["exit_code"], pulled) == (413, "request_too_large", 2, 0)
        assert "1024 bytes" in body["message"] and "--max-body" in body["hint"]


def test_a_body_without_an_accepted_token_is_never_read(api) -> None:  # type: ignore[no-untyped-def]
    _, tokens, server = api
    revoked = tokens["submitter"]
    with server.app.state.service.store.write() as conn:
        conn.execute(sa.update(schema.api_tokens).where(schema.api_tokens.c.actor == "sam")
                     .values(revoked_at="2020-01-01T00:00:00+00:00"))
    for headers in ({}, _h("qmtl_nope_nope"), _h(revoked), {"Authorization": "Basic eDp5"}):
        status, body, pulled = _asgi(server.app, method="POST", path="/worlds/gov/evaluate",
                                     headers={**headers, "transfer-encoding": "chunked"}, chunks=[b"{" * 512] * 8)
        assert (status, body["error"], pulled) == (401, "unauthorized", 0), headers


def test_a_streamed_body_is_cut_at_the_limit(api) -> None:  # type: ignore[no-untyped-def]
    _, tokens, server = api
    status, body, pulled = _asgi(server.app, method="POST", path="/risk-hub/snapshots",
                                 headers={**_h(tokens["operator"]), "transfer-encoding": "chunked",
                                          "content-type": "application/json"}, chunks=[b" " * 300] * 100)
    assert (status, body["error"]) == (413, "request_too_large")
    assert pulled == 4  # 4 x 300 bytes passes 1024: not one chunk more is pulled
    # Under the limit the same route works as before.
    ok = _asgi(server.app, method="POST", path="/worlds/gov/campaign/tick", headers=_h(tokens["operator"]),
               chunks=[b""])
    assert ok[0] == 200 and ok[1]["world"] == "gov"


def test_the_cli_reports_a_refused_body_as_bad_input(api) -> None:  # type: ignore[no-untyped-def]
    client, tokens, _ = api
    from qmtl_core.service._client import HttpClient

    remote = HttpClient("http://qmtl.test", tokens["operator"], transport=client._transport)
    with pytest.raises(Exception) as caught:
        remote.register_strategy("gov", strategy_id="big", meta={"pad": "x" * 4096})
    assert caught.value.code == "request_too_large" and caught.value.exit_code == 2  # type: ignore[attr-defined]


def test_a_revoked_token_is_refused_within_the_cache_time_and_unknown_tokens_are_never_cached(api) -> None:  # type: ignore[no-untyped-def]
    """The server remembers an accepted token for ``TOKEN_CACHE_SECONDS`` (1 s) only: after a revocation
    by any process, the next request past that time is 401; a refusal is never remembered."""
    from qmtl_core.service._auth import TOKEN_CACHE_SECONDS, TokenCache, authenticate

    _, tokens, server = api
    store = server.app.state.service.store
    asked: list[str | None] = []

    def check(header: str | None):  # type: ignore[no-untyped-def]
        asked.append(header)
        with store.read() as conn:
            return authenticate(conn, header)

    now = [100.0]
    cache = TokenCache(check, clock=lambda: now[0])
    header = f"Bearer {tokens['submitter']}"
    assert cache(header).actor == "sam" and cache(header).actor == "sam" and len(asked) == 1
    with store.write() as conn:
        conn.execute(sa.update(schema.api_tokens).where(schema.api_tokens.c.actor == "sam")
                     .values(revoked_at="2020-01-01T00:00:00+00:00"))
    now[0] += TOKEN_CACHE_SECONDS * 0.9
    assert cache.fresh(header) is not None  # still within the second it was accepted for
    now[0] += TOKEN_CACHE_SECONDS * 0.2
    assert cache.fresh(header) is None
    for _ in range(2):
        with pytest.raises(Exception) as refused:
            cache(header)
        assert refused.value.code == "unauthorized"  # type: ignore[attr-defined]
    assert len(asked) == 3  # each refusal asked the store again
    # Through the app: the same token is refused (the server's own cache expired long ago here).
    time.sleep(TOKEN_CACHE_SECONDS * 1.1)
    status, body, _ = _asgi(server.app, method="GET", path="/worlds", headers=_h(tokens["submitter"]), chunks=[])
    assert (status, body["error"]) == (401, "unauthorized")


# --- 3. reads never write --------------------------------------------------------------------------------
def _counts(service: Any) -> dict[str, int]:
    with service.store.read() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in schema.metadata.sorted_tables}


def _get_paths(app: Any, request_id: str) -> list[str]:
    """Every GET route of the app, with real and made-up ids."""
    out = []
    for route in app.routes:
        if "GET" not in getattr(route, "methods", ()) or route.path in ("/docs", "/openapi.json"):
            continue
        for world, strategy in (("gov", "a"), ("gov", "never-seen"), ("nope", "x")):
            out.append(route.path.replace("{world}", world).replace("{strategy_id}", strategy)
                       .replace("{request_id}", request_id))
    queries = ["?strategy=made-up-1", "?strategy=made-up-2&stage=paper", "?history=true"]
    return sorted(set(out)) + [f"/worlds/gov/{p}{q}" for p in ("decision", "campaign", "runs") for q in queries] + [
        "/promotions?all=true", "/worlds/gov/report?format=png&strategy=a"]


def test_reader_gets_never_write_a_row(api) -> None:  # type: ignore[no-untyped-def]
    client, tokens, server = api
    service = server.app.state.service
    request_id = client.get("/promotions", headers=_h(tokens["reader"])).json()["requests"][0]["request_id"]
    paths = _get_paths(server.app, request_id)
    assert len(paths) > 30
    for token in (tokens["reader"], tokens["operator"]):
        before = _counts(service)
        statuses = {p: client.get(p, headers=_h(token)).status_code for p in paths}
        assert _counts(service) == before
        assert statuses["/worlds/gov/decision?strategy=made-up-1"] == 200  # asked about, answered, not stored
        assert all(s < 500 for s in statuses.values()), statuses


# --- 4. secrets by role; no server paths ------------------------------------------------------------------
def _bodies(client: httpx.Client, token: str, paths: list[str]) -> dict[str, str]:
    return {p: client.get(p, headers=_h(token)).text for p in paths}


def test_only_operators_see_secrets_and_nobody_sees_server_paths(api, tmp_path: Path, worlds_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client, tokens, server = api
    # A policy change puts the secret in the ledger's diff too; a broken file puts a path in an error.
    gov = worlds_dir / "gov.yaml"
    gov.write_text(gov.read_text().replace("policy_version: 1", "policy_version: 2")
                   .replace(f"webhook: {SECRET_HOOK}", f"webhook: '{SECRET_HOOK}/v2'"))
    assert client.post("/worlds/gov/campaign/tick", headers=_h(tokens["operator"])).status_code == 200
    client.post("/worlds/gov/evaluate", json={"strategy_id": "a", "stage": "paper"}, headers=_h(tokens["operator"]))
    (worlds_dir / "broken.yaml").write_text("world: broken\npolicy_version: 1\nrules: [\n")
    request_id = client.get("/promotions", headers=_h(tokens["reader"])).json()["requests"][0]["request_id"]
    paths = _get_paths(server.app, request_id) + ["/worlds/broken", "/worlds/gov/audit-nope", "/audit?kind=policy.*"]
    leaks = [str(tmp_path), str(tmp_path.resolve()), str(ROOT), str(Path.home()), sys.prefix]
    for role in ("reader", "submitter", "approver", "operator"):
        bodies = _bodies(client, tokens[role], paths)
        for path, text in bodies.items():
            assert not [p for p in leaks if p in text], (role, path, text[:400])
            if role != "operator":
                assert "s3cr3t" not in text, (role, path)
    reader = client.get("/worlds/gov", headers=_h(tokens["reader"])).json()
    assert reader["policy"]["notifications"]["webhook"] == REDACTED
    assert reader["path"] == "$QMTL_WORLDS_DIR/gov.yaml"
    entries = client.get("/audit", headers=_h(tokens["reader"])).json()["entries"]
    diffs = [e["payload"]["diff"] for e in entries if "webhook" in str((e.get("payload") or {}).get("diff"))]
    assert all("webhook: [redacted]" in d for d in diffs)  # a proposal's or a change's diff alike
    operator = client.get("/worlds/gov", headers=_h(tokens["operator"])).json()
    assert operator["policy"]["notifications"]["webhook"].startswith(SECRET_HOOK)  # in force (v1 until v2 is approved)
    broken = client.get("/worlds/broken", headers=_h(tokens["reader"])).json()
    assert broken["message"].startswith("$QMTL_WORLDS_DIR/broken.yaml:"), broken
    missing = client.get("/worlds/nope", headers=_h(tokens["reader"])).json()
    assert missing["message"] == "world 'nope' not found in $QMTL_WORLDS_DIR"


def test_an_internal_error_names_an_incident_not_the_server(api, monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    _, tokens, server = api
    from qmtl_core.service import _client

    def broken(self: Any, *a: Any, **k: Any) -> Any:
        raise OSError(f"[Errno 13] Permission denied: '{server.app.state.service.settings.home}/qmtl.db'")
    monkeypatch.setattr(_client.LocalClient, "activations", broken)

    async def call() -> httpx.Response:  # as over a socket: the app's own exception does not reach us
        transport = httpx.ASGITransport(app=server.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://qmtl.test") as http:
            return await http.get("/worlds/gov/activations", headers=_h(tokens["operator"]))
    r = asyncio.run(call())
    body = r.json()
    assert r.status_code == 500 and body["error"] == "internal_error" and body["exit_code"] == 1
    assert "incident" in body["message"] and "Permission denied" not in r.text and "/" not in body["message"]
    incident = body["message"].split("incident ")[1].rstrip(")")
    assert incident in capfd.readouterr().err  # the operator finds the whole story in the server's log


# --- 5/6. docs without the internet; every route typed ----------------------------------------------------
def test_docs_load_nothing_from_elsewhere_and_every_route_is_typed(api) -> None:  # type: ignore[no-untyped-def]
    client, _, server = api
    page = client.get("/docs")
    assert page.status_code == 200 and "<script" not in page.text.lower()
    assert "src=" not in page.text and "https://" not in page.text and "/worlds/{world}/evaluate" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert client.get("/redoc").status_code == 404  # not served: it would load its script from a CDN
    spec = client.get("/openapi.json").json()
    untyped = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status in ("200", "400", "401", "403", "404", "413", "500"):
                content = op["responses"].get(status, {}).get("content", {})
                if status == "200" and path == "/metrics":  # Prometheus text, declared as such
                    assert content["text/plain"]["schema"] == {"type": "string"}
                    continue
                if not content.get("application/json", {}).get("schema", {}).get("$ref"):
                    untyped.append((method, path, status))
    assert not untyped
    assert len(spec["paths"]) >= 24
    # and no answer is a loose object: every success model lists its fields (schemathesis checks them)
    schemas = spec["components"]["schemas"]
    loose = sorted({(path, op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"])
                    for path, ops in spec["paths"].items() for op in ops.values()
                    if path != "/metrics" and "application/json" in op["responses"].get("200", {}).get("content", {})
                    and not schemas[op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
                                    .rsplit("/", 1)[1]].get("properties")})
    assert not loose
    view = schemas["ApprovalView"]["properties"]
    assert view["checklist"]["items"]["$ref"].endswith("/ChecklistRow")
    # models of core dataclasses are derived from them: the gate's reasons are the gate's Reason
    assert schemas["GateDoc"]["properties"]["reasons"]["items"]["$ref"].endswith("/Reason")
    assert set(schemas["Reason"]["properties"]) == {"code", "detail"}


# --- 2. sockets closed on revoke; --workers; memory -------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qmtl_cli", "serve", "--port", str(port), *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a loaded machine starts Python processes slowly
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.communicate()[1][-800:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=30)


@pytest.fixture
def served(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path) -> dict[str, Any]:
    (worlds_dir / "gov.yaml").write_text(policy_text())
    env = {**qmtl_env, "PYTHONPATH": str(ROOT), "QMTL_HOME": str(tmp_path / "server-home")}

    def token(role: str) -> tuple[str, str]:
        made = subprocess.run([sys.executable, "-m", "qmtl_cli", "token", "create", "--actor", f"a-{role}", "--role",
                               role, "--json"], env=env, capture_output=True, text=True, cwd=ROOT)
        assert made.returncode == 0, made.stderr
        doc = json.loads(made.stdout)
        return doc["token_id"], doc["token"]
    return {"env": env, "token": token}


def test_a_websocket_is_closed_within_seconds_of_its_token_being_revoked(served: dict[str, Any]) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    token_id, token = served["token"]("reader")
    _, other = served["token"]("reader")
    proc, url = _start(served["env"])
    try:
        ws_url = url.replace("http://", "ws://") + "/events"
        with connect(ws_url, additional_headers=_h(token), open_timeout=30) as ws, \
                connect(ws_url, additional_headers=_h(other), open_timeout=30) as bystander:
            first = json.loads(ws.recv(timeout=30))
            assert first["kind"] == "token.created"
            revoked = subprocess.run([sys.executable, "-m", "qmtl_cli", "token", "revoke", token_id],
                                     env=served["env"], capture_output=True, text=True, cwd=ROOT)
            assert revoked.returncode == 0, revoked.stderr
            t0 = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=10)  # events (the revocation itself may be one) until the close
            assert time.monotonic() - t0 < 10  # rechecked every second; slack for a loaded machine
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
            # The other reader's socket stays open and sees the revocation.
            kinds = [json.loads(bystander.recv(timeout=10))["kind"] for _ in range(3)]
            assert "token.revoked" in kinds
    finally:
        _stop(proc)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _post_raw(url: str, headers: list[str], body_bytes: int, *, chunked: bool) -> int:
    """Send a POST with ``body_bytes`` of body (stopping when the server hangs up); its status."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(("POST /worlds/gov/evaluate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
        chunk = b" " * (1 << 20)
        try:
            for _ in range(body_bytes // len(chunk)):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        except OSError:
            pass  # the server answered and closed: what we want
        s.settimeout(30)
        reply = b""
        try:
            while b"\r\n" not in reply:
                part = s.recv(4096)
                if not part:
                    break
                reply += part
        except OSError:
            pass
    return int(reply.split(b" ", 2)[1]) if reply else 0


def test_large_posts_do_not_grow_the_server(served: dict[str, Any]) -> None:
    _, token = served["token"]("operator")
    proc, url = _start(served["env"], "--max-body", str(1 << 20))
    try:
        httpx.get(f"{url}/worlds", headers=_h(token), timeout=30)  # warm up every import
        before = _rss_kib(proc.pid)
        fifty = 50 << 20
        assert _post_raw(url, [f"Content-Length: {fifty}"], fifty, chunked=False) == 413
        assert _post_raw(url, ["Transfer-Encoding: chunked"], fifty, chunked=True) == 401
        assert _post_raw(url, ["Transfer-Encoding: chunked", f"Authorization: Bearer {token}"], fifty,
                         chunked=True) == 413
        grown = _rss_kib(proc.pid) - before
        assert grown < 12 * 1024, f"the server grew by {grown} KiB for 150 MB of refused bodies"
        assert httpx.get(f"{url}/healthz", timeout=30).json()["ok"] is True
    finally:
        _stop(proc)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_workers_serve_the_same_store(served: dict[str, Any]) -> None:
    _, token = served["token"]("operator")
    proc, url = _start(served["env"], "--workers", "2")
    try:
        deadline = time.monotonic() + 180
        while len([c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]) < 2:
            assert time.monotonic() < deadline, _children(proc.pid)
            time.sleep(0.2)
        with httpx.Client(base_url=url, headers=_h(token), timeout=30) as http:
            for i in range(6):  # new connections, so both workers answer some
                r = http.post("/worlds/gov/evaluate", json={"strategy_id": f"s{i}", "metrics": {"sharpe": 1.0}},
                              headers={"Connection": "close"})
                assert r.status_code == 200 and r.json()["recorded_by"] == "a-operator"
            runs = http.get("/worlds/gov/runs").json()["runs"]
        assert sorted(r["strategy_id"] for r in runs) == [f"s{i}" for i in range(6)]
    finally:
        _stop(proc)
    assert not os.path.exists(f"/proc/{proc.pid}")


def test_a_reader_cannot_record_a_policy_version(api, worlds_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A changed or new policy file is recorded by an acting command, never by a reader's GET."""
    client, tokens, server = api
    gov = worlds_dir / "gov.yaml"
    gov.write_text(gov.read_text().replace("policy_version: 1", "policy_version: 2").replace("min: 0.3}", "min: 0.35}"))
    (worlds_dir / "fresh.yaml").write_text(policy_text("fresh"))
    before = _counts(server.app.state.service)
    for path in ("/worlds", "/worlds/gov", "/worlds/fresh", "/worlds/gov/decision", "/worlds/gov/campaign",
                 "/worlds/fresh/decision?strategy=x", "/promotions?world=gov", "/worlds/gov/report"):
        assert client.get(path, headers=_h(tokens["reader"])).status_code < 500, path
    assert _counts(server.app.state.service) == before


def _ws_first(app: Any, *, query: str, headers: dict[str, str]) -> dict[str, Any]:
    """Open ``/events`` on the ASGI app directly; what it first answers (accept or close), then hang up."""
    sent: list[dict[str, Any]] = []
    answered = asyncio.Event()
    connected = False

    async def receive() -> dict[str, Any]:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        await answered.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        answered.set()

    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
             "path": "/events", "raw_path": b"/events", "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("qmtl.test", 80), "subprotocols": []}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    return sent[0]


def test_a_token_in_the_websocket_url_is_refused(api: tuple[httpx.Client, dict[str, str], Any]) -> None:
    """Tokens in URLs end up in access logs and proxies: ``/events`` takes the Authorization header
    only, and a ``?token=`` (even a valid one, even beside a valid header) is refused with 4401."""
    _, tokens, server = api
    reader = tokens["reader"]
    assert _ws_first(server.app, query="since=0", headers=_h(reader))["type"] == "websocket.accept"
    for query, headers in ((f"token={reader}", {}), (f"since=0&token={reader}", _h(reader))):
        closed = _ws_first(server.app, query=query, headers=headers)
        assert (closed["type"], closed["code"]) == ("websocket.close", 4401), query
        assert "token in the URL is refused" in closed["reason"]
    assert _ws_first(server.app, query="since=0", headers={})["code"] == 4401  # no token at all
