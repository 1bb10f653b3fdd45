"""Remote mode in tests: the real FastAPI app behind an in-process httpx transport.

Every request goes through routing, authentication, role checks, JSON (de)serialisation and the
error mapping exactly as over a socket; only the socket is missing (``tests/test_serve.py`` starts
a real ``qmtl serve`` on a free port for that). The transport holds tokens for the calling OS
user (one approver token, one operator token) so CLI tests can run unchanged in both modes with the
same actors in the ledger.

Tests that need several people (a requester and two approvers) act as them the way real people do
in remote mode: each person has their own tokens. ``as_person("alice")`` gives the environment of a
CLI run with alice's token; the transport sends her approver token to approve/reject and her
operator token elsewhere. Local mode cannot tell people apart (the actor is the OS account), so such
tests run in remote mode only.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx

from qmtl_core.config import Settings

SERVER = "http://qmtl.test"

#: People with tokens on every in-process server, besides the OS user.
PEOPLE = ("alice", "bob", "carol", "dave")
ROLES = ("operator", "approver")
_ALIAS = "qmtl_test_person_"

#: ``audit verify --deep`` tests set this: the harness's tokens are then created the ledgered way
#: (``create_token``), since a token no ledger entry vouches for is exactly what --deep reports.
LEDGER_TOKENS = False


def as_person(person: str) -> dict[str, str]:
    """The environment of a CLI run as ``person`` (remote mode): their token."""
    assert person in PEOPLE, person
    return {"QMTL_TOKEN": _ALIAS + person}


def _token(person: str, role: str) -> str:
    return f"qmtl_test_{person}_{role}_token"


class InProcessServer(httpx.BaseTransport):
    """An httpx transport that runs requests through ``create_app`` in a private event loop."""

    def __init__(self) -> None:
        import secrets

        import sqlalchemy as sa

        from qmtl_core.service._auth import token_hash
        from qmtl_core.service._http import create_app
        from qmtl_core.store import schema
        from qmtl_core.timeutil import iso

        settings = Settings.resolve()
        settings.server = None  # the server itself is local
        self.app = create_app(settings)
        service = self.app.state.service
        actor = settings.identity()
        # Inserted directly (no ledger entry), so both modes leave identical ledgers behind.
        self.tokens = {role: f"qmtl_test_{secrets.token_urlsafe(16)}" for role in ROLES}
        if LEDGER_TOKENS:
            from qmtl_core.service._auth import create_token

            with service.store.write() as conn:
                for role in list(self.tokens):
                    _, self.tokens[role] = create_token(conn, actor=actor, role=role, created_by="test-harness",
                                                        now=service.clock())
        else:
            people = {(p, r): _token(p, r) for p in PEOPLE for r in ROLES}
            with service.store.write() as conn:
                rows = [(actor, role, token) for role, token in self.tokens.items()]
                known = {r.token_hash for r in conn.execute(sa.select(schema.api_tokens.c.token_hash))}
                rows += [(p, r, t) for (p, r), t in people.items() if token_hash(t) not in known]
                for who, role, token in rows:
                    conn.execute(sa.insert(schema.api_tokens).values(
                        token_hash=token_hash(token), token_id=secrets.token_hex(6), actor=who, role=role,
                        created_at=iso(service.clock()), created_by="test-harness"))
        self._asgi = httpx.ASGITransport(app=self.app)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        role = "approver" if request.url.path.endswith(("/approve", "/reject")) else "operator"
        sent = request.headers.get("authorization", "")
        if sent.startswith(f"Bearer {_ALIAS}"):
            request.headers["Authorization"] = f"Bearer {_token(sent[len('Bearer ' + _ALIAS):], role)}"
        elif not sent:
            request.headers["Authorization"] = f"Bearer {self.tokens[role]}"
        request.read()

        async def send() -> httpx.Response:
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return asyncio.run_coroutine_threadsafe(send(), self._loop).result()

    def close(self) -> None:
        self.app.state.service.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def factory(server: str) -> Any:
    """``qmtl_cli._state.TRANSPORT_FACTORY`` for remote-mode tests."""
    return InProcessServer()
