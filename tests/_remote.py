"""Remote mode in tests: the real FastAPI app behind an in-process httpx transport.

Every request goes through routing, authentication, role checks, JSON (de)serialisation and the
error mapping exactly as over a socket; only the socket is missing (``tests/test_serve.py`` starts
a real ``qmtl serve`` on a free port for that). The transport holds tokens for the calling OS
user (one approver token, one operator token) so CLI tests can run unchanged in both modes with the
same actors in the ledger.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx

from qmtl_core.config import Settings

SERVER = "http://qmtl.test"

#: ``audit verify --deep`` tests set this: the harness's tokens are then created the ledgered way
#: (``create_token``), since a token no ledger entry vouches for is exactly what --deep reports.
LEDGER_TOKENS = False


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
        self.tokens = {role: f"qmtl_test_{secrets.token_urlsafe(16)}" for role in ("operator", "approver")}
        if LEDGER_TOKENS:
            from qmtl_core.service._auth import create_token

            with service.store.write() as conn:
                for role in list(self.tokens):
                    _, self.tokens[role] = create_token(conn, actor=actor, role=role, created_by="test-harness",
                                                        now=service.clock())
        else:
            with service.store.write() as conn:
                for role, token in self.tokens.items():
                    conn.execute(sa.insert(schema.api_tokens).values(
                        token_hash=token_hash(token), token_id=secrets.token_hex(6), actor=actor, role=role,
                        created_at=iso(service.clock()), created_by="test-harness"))
        self._asgi = httpx.ASGITransport(app=self.app)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        role = "approver" if request.url.path.endswith(("/approve", "/reject")) else "operator"
        if "authorization" not in request.headers:
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
