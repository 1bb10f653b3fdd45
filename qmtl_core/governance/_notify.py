"""Webhook notifications: POST a JSON event when a request is opened, approved, applied, blocked,
or a world is halted. Delivery never blocks or undoes a decision: it happens after the decision is
committed (from the outbox, ``qmtl_core.outbox``), with a timeout and bounded retries, and a failure
is reported back for the ledger."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Seconds to wait before each retry (three attempts in all).
BACKOFF = (0.5, 2.0)
TIMEOUT = 5.0


@dataclass(frozen=True)
class Delivery:
    """The fate of one notification."""

    event: str
    ok: bool
    attempts: int
    error: str | None = None


def deliver(url: str, events: Sequence[dict[str, Any]], *, backoff: Sequence[float] = BACKOFF,
            timeout: float = TIMEOUT) -> list[Delivery]:
    """POST each event to ``url``; retry on connection errors and 5xx, give up on 4xx."""
    import httpx

    out = []
    with httpx.Client(timeout=timeout) as client:
        for event in events:
            attempts, error = 0, None
            for delay in (0.0, *backoff):
                if delay:
                    time.sleep(delay)
                attempts += 1
                try:
                    # The receiver deduplicates on the key: a retry after a crash re-sends the same event.
                    key = event.get("event_id")
                    response = client.post(url, json=event, headers={"Idempotency-Key": str(key)} if key else None)
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    continue
                if response.status_code < 300:
                    error = None
                    break
                error = f"HTTP {response.status_code}"
                if response.status_code < 500:
                    break
            out.append(Delivery(str(event.get("event")), error is None, attempts, error))
    return out
