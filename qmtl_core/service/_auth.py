"""Bearer tokens for ``qmtl serve``: actors and roles, stored hashed in the shared store.

A token is ``qmtl_<id>_<secret>``; only ``sha256(token)`` is stored, so a leaked database does not
leak usable tokens, and every ``qmtl serve`` process on every host sharing the store accepts the
same tokens. Roles are sets of permissions (an approver cannot submit, a submitter cannot approve):

- ``reader``: every GET;
- ``submitter``: reader + evaluations, campaign ticks, promotion requests, for the strategies it
  submitted (ownership is checked by the facade);
- ``producer``: reader + risk snapshots and fed-bar replays: the identity whose realized returns
  count as trusted evidence (``hub``; ``qmtl replay`` for a replay it posts);
- ``approver``: reader + approve / reject;
- ``operator``: everything (campaign runs, halt, resume, rollback, demote, promotion requests), and
  the only role that sees secrets (webhook URLs, credentials) in the documents the server returns.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger
from qmtl_core.errors import Forbidden, NotFoundError, Unauthorized, UsageError
from qmtl_core.store import schema
from qmtl_core.timeutil import iso

ROLES = ("reader", "submitter", "producer", "approver", "operator")

#: What each role may do; a route names the permission it needs.
PERMISSIONS: dict[str, frozenset[str]] = {
    "reader": frozenset({"read"}),
    "submitter": frozenset({"read", "evaluate", "tick", "promote"}),
    "producer": frozenset({"read", "evaluate", "risk"}),
    "approver": frozenset({"read", "approve"}),
    "operator": frozenset({"read", "evaluate", "risk", "tick", "promote", "operate", "secrets"}),
}


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    actor: str
    role: str
    token_id: str

    def may(self, permission: str) -> bool:
        """Whether the role grants ``permission``."""
        return permission in PERMISSIONS.get(self.role, frozenset())

    def require(self, permission: str) -> None:
        """Refuse (403) unless the role grants ``permission``."""
        if not self.may(permission):
            allowed = [r for r, p in PERMISSIONS.items() if permission in p]
            raise Forbidden(f"{self.actor} ({self.role}) may not {permission}",
                            hint=f"needs a token with role {' or '.join(allowed)}")


def token_hash(token: str) -> str:
    """What the store keeps of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(conn: Connection, *, actor: str, role: str, created_by: str, now: datetime) -> tuple[str, str]:
    """A new token for ``actor`` with ``role``; returns ``(token_id, token)`` — the token only this once."""
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}", hint="use " + ", ".join(ROLES))
    if not actor.strip():
        raise UsageError("--actor must not be empty")
    token_id = secrets.token_hex(6)
    token = f"qmtl_{token_id}_{secrets.token_urlsafe(32)}"
    conn.execute(sa.insert(schema.api_tokens).values(token_hash=token_hash(token), token_id=token_id, actor=actor,
                                                     role=role, created_at=iso(now), created_by=created_by))
    ledger.append(conn, actor=created_by, kind="token.created", now=now, subject=f"token {token_id}",
                  reason=f"{actor} as {role}", payload={"token_id": token_id, "actor": actor, "role": role})
    return token_id, token


def revoke_token(conn: Connection, *, token_id: str, revoked_by: str, now: datetime) -> None:
    """Stop accepting a token."""
    t = schema.api_tokens
    row = conn.execute(sa.select(t).where(t.c.token_id == token_id)).first()
    if row is None:
        raise NotFoundError(f"no token {token_id!r}", hint="qmtl token list shows token ids")
    if row.revoked_at is None:
        conn.execute(sa.update(t).where(t.c.token_id == token_id).values(revoked_at=iso(now)))
        ledger.append(conn, actor=revoked_by, kind="token.revoked", now=now, subject=f"token {token_id}",
                      reason=f"{row.actor} as {row.role}", payload={"token_id": token_id})


def list_tokens(conn: Connection) -> list[dict[str, Any]]:
    """Every token (never the secret)."""
    t = schema.api_tokens
    return [{"token_id": r.token_id, "actor": r.actor, "role": r.role, "created_at": r.created_at,
             "created_by": r.created_by, "revoked_at": r.revoked_at}
            for r in conn.execute(sa.select(t).order_by(t.c.created_at))]


def authenticate(conn: Connection, header: str | None) -> Principal:
    """The principal of an ``Authorization: Bearer ...`` header; 401 when missing or not accepted."""
    parts = (header or "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].strip():
        raise Unauthorized("no bearer token", hint="set QMTL_TOKEN (qmtl token create prints one)")
    token = parts[1].strip()
    t = schema.api_tokens
    row = conn.execute(sa.select(t).where(t.c.token_hash == token_hash(token))).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("the token is not valid (unknown or revoked)", hint="ask for a new token")
    return Principal(row.actor, row.role, row.token_id)


#: How long a server trusts a token the store accepted before asking again: a revoked token is
#: refused by every server within this (an open ``/events`` socket is rechecked as often).
TOKEN_CACHE_SECONDS = 1.0


class TokenCache:
    """``authenticate`` for a server, remembering accepted tokens for ``ttl`` seconds.

    Only acceptances are kept (an unknown or revoked token is looked up every time, so a new token
    works at once and a caller cannot fill the cache), keyed by the token's hash, at most
    ``max_entries`` of them. ``fresh`` answers from memory alone, without blocking, or ``None``.
    """

    def __init__(self, check: Callable[[str | None], Principal], *, ttl: float = TOKEN_CACHE_SECONDS,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._check, self._ttl, self._max, self._clock = check, ttl, max_entries, clock
        self._accepted: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def fresh(self, header: str | None) -> Principal | None:
        """The principal of a token accepted less than ``ttl`` seconds ago, else ``None``."""
        found = self._accepted.get(token_hash(header or ""))
        return found[1] if found is not None and found[0] > self._clock() else None

    def __call__(self, header: str | None) -> Principal:
        """The principal, from memory while fresh, else from the store (401 as ``authenticate``)."""
        principal = self.fresh(header)
        if principal is not None:
            return principal
        principal = self._check(header)
        with self._lock:
            if len(self._accepted) >= self._max:
                now = self._clock()
                self._accepted = {k: v for k, v in self._accepted.items() if v[0] > now}
                if len(self._accepted) >= self._max:
                    self._accepted.clear()
            self._accepted[token_hash(header or "")] = (self._clock() + self._ttl, principal)
        return principal
