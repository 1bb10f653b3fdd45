"""What ``qmtl serve`` checks at its edge, before any route runs: size, token, and what leaves.

Order matters and is the point of this module:

1. A declared ``Content-Length`` above the limit is refused (413) before anything else is read.
2. Every path except the public ones (health, OpenAPI) needs a token accepted by the store, checked
   *before* the body is read: a caller without a token never makes the server buffer a byte of it.
3. A body streamed without a length is counted as it arrives and refused (413) past the limit, so
   memory never grows beyond the limit whatever the client declares.
4. Every JSON document that leaves is scrubbed: server file paths (worlds directory, ``QMTL_HOME``,
   the installation) become placeholders for everyone, and secrets (webhook URLs, database
   credentials) become ``[redacted]`` unless the token's role may see secrets (operators).

The principal found in step 2 is left in the ASGI scope, so routes do not look the token up twice.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qmtl_core.errors import QmtlError, RequestTooLarge
from qmtl_core.service._auth import Principal

#: Paths served without a token (they reveal nothing about worlds, runs or people).
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs"})
#: The scope key the principal travels under from the edge to the routes.
PRINCIPAL_KEY = "qmtl.principal"
#: Default cap on a request body: the largest legitimate one (a cohort's returns table for
#: hundreds of strategies over years of days) is a few MiB.
DEFAULT_MAX_BODY = 32 * 1024 * 1024
REDACTED = "[redacted]"
#: Keys whose string values are secrets wherever they appear in a document.
SECRET_KEYS = frozenset({"webhook", "token", "password", "secret", "database_url"})
# "webhook: <value>" written in YAML (block or flow style) inside a text such as a policy diff.
_WEBHOOK_IN_TEXT = re.compile(r"(webhook\s*:\s*)(?:\"[^\"\n]*\"|'[^'\n]*'|[^\s,}\n]+)")
# user:password@ in any URL (a database URL in an error message).
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^@\s/]+(@)")


class BodyTooLarge(HTTPException):
    """A body over a limit met inside the app (FastAPI's own limits, when set), answered as 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body larger than {limit} bytes")
        self.limit = limit


def too_large(limit: int) -> RequestTooLarge:
    """The error document of a refused body."""
    return RequestTooLarge(f"request body larger than the server's limit of {limit} bytes",
                           hint="send less per request (e.g. split an evaluate-cohort by strategies), "
                                "or ask the operator to raise qmtl serve --max-body")


@dataclass(frozen=True)
class Scrubber:
    """Rewrites the strings of a JSON document: paths always, secrets unless ``show_secrets``."""

    paths: tuple[tuple[str, str], ...]
    secrets: frozenset[str]

    @classmethod
    def for_server(cls, *, worlds_dir: Path, home: Path, secrets: Iterable[str] = ()) -> "Scrubber":
        """Placeholders for the server's directories, longest first so a nested one wins."""
        roots: dict[str, str] = {}
        for path, name in ((worlds_dir, "$QMTL_WORLDS_DIR"), (home, "$QMTL_HOME"),
                           (Path(__file__).resolve().parents[2], "<qmtl>"), (Path(sys.prefix), "<python>"),
                           (Path.home(), "~")):
            for form in {str(path), str(path.expanduser().resolve())}:
                if len(form) > 1:
                    roots.setdefault(form, name)
        ordered = tuple(sorted(roots.items(), key=lambda kv: -len(kv[0])))
        return cls(ordered, frozenset(s for s in secrets if s))

    def text(self, value: str, *, show_secrets: bool) -> str:
        """One string, scrubbed."""
        for root, name in self.paths:
            if root in value:  # a path, not the same letters inside base64 (a PNG) or a longer name
                value = re.sub(rf"(?<![\w+/.-]){re.escape(root)}(?=/|$|[^\w.-])", lambda _: name, value)
        if not show_secrets:
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            value = _URL_PASSWORD.sub(rf"\1{REDACTED}\2", value)
            value = _WEBHOOK_IN_TEXT.sub(rf"\1{REDACTED}", value)
        return value

    def document(self, doc: Any, *, show_secrets: bool) -> Any:
        """A JSON value, scrubbed recursively (keys named like secrets are redacted whole)."""
        if isinstance(doc, str):
            return self.text(doc, show_secrets=show_secrets)
        if isinstance(doc, list):
            return [self.document(v, show_secrets=show_secrets) for v in doc]
        if isinstance(doc, dict):
            out = {}
            for key, value in doc.items():
                if not show_secrets and key in SECRET_KEYS and isinstance(value, str) and value:
                    out[key] = REDACTED
                else:
                    out[key] = self.document(value, show_secrets=show_secrets)
            return out
        return doc


class Edge:
    """The ASGI middleware of the module docstring."""

    def __init__(self, app: ASGIApp, *, max_body: int, authenticate: Callable[[str | None], Principal],
                 scrubber: Callable[[], Scrubber], error_body: Callable[[QmtlError], tuple[int, dict[str, Any]]],
                 fresh_principal: Callable[[str | None], Principal | None] = lambda _: None,
                 fresh_scrubber: Callable[[], Scrubber | None] = lambda: None) -> None:
        self.app = app
        self.max_body = max_body
        self.authenticate = authenticate
        self.scrubber = scrubber
        self.error_body = error_body
        # Answers from memory (never blocking) when they can: no trip through the thread pool then.
        self.fresh_principal = fresh_principal
        self.fresh_scrubber = fresh_scrubber

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = _content_length(headers)
        if declared is not None and declared > self.max_body:
            await self._refuse(send, too_large(self.max_body))
            return
        principal: Principal | None = None
        if scope["path"] not in PUBLIC_PATHS:
            header = headers.get("authorization")
            try:
                principal = self.fresh_principal(header) or await run_in_threadpool(self.authenticate, header)
            except QmtlError as exc:
                await self._refuse(send, exc)
                return
            scope[PRINCIPAL_KEY] = principal
        show = principal is not None and principal.may("secrets")
        # Reading the store happens off the event loop.
        scrubber = self.fresh_scrubber() or await run_in_threadpool(self.scrubber)
        respond = self._scrubbing(send, scrubber, show_secrets=show)
        received, refused = 0, False

        async def counted() -> Message:
            # Past the limit the edge answers 413 itself and tells the app the client left: no
            # exception has to cross the middlewares in between, and nothing more is read.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    refused = True
                    await self._refuse(send, too_large(self.max_body))
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:  # after a refusal, whatever the app says about the cut body is dropped
                await respond(message)

        await self.app(scope, counted, guarded)

    def _scrubbing(self, send: Send, scrubber: Scrubber, *, show_secrets: bool) -> Send:
        start: Message | None = None
        chunks: list[bytes] = []

        async def scrubbed(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if Headers(raw=message.get("headers", [])).get("content-type", "").startswith("application/json"):
                    start = message  # held until the whole body is here
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                doc = json.loads(body)
            except ValueError:
                pass
            else:
                body = json.dumps(scrubber.document(doc, show_secrets=show_secrets),
                                  ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
            raw = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*raw, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        return scrubbed

    async def _refuse(self, send: Send, exc: QmtlError) -> None:
        # Refusals are fixed sentences (no path, no secret): nothing to scrub, nothing to look up.
        status, doc = self.error_body(exc)
        body = json.dumps(doc).encode("utf-8")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


__all__ = ["BodyTooLarge", "DEFAULT_MAX_BODY", "Edge", "PRINCIPAL_KEY", "PUBLIC_PATHS", "REDACTED", "Scrubber",
           "too_large"]
