"""Orders: their normal form, the ONE order gate (fail closed), its counters, execution services.

An order reaches an execution service only through :func:`route_order`, and only when the
compute context's domain is ``live``, trade submission is enabled, the world's ``allow_live`` is
true and a service is set. Every other order is blocked and counted with a reason code.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from qmtl_core.domains import ComputeContext
from qmtl_core.errors import BadInputError, BlockedError, QmtlError

__all__ = [
    "BLOCK_REASONS",
    "Order",
    "normalize_orders",
    "gate_reason",
    "route_order",
    "OrderStats",
    "TradeExecutionService",
    "WebhookExecutionService",
    "OrderSubmissionError",
]

Order = dict[str, Any]

#: Why an order did not reach the execution service, in the order the gate checks them.
BLOCK_REASONS: Final[tuple[str, ...]] = (
    "no_compute_context", "domain_backtest", "domain_dryrun", "domain_shadow",
    "submission_disabled", "allow_live_false", "no_execution_service",
)

# Set only while route_order calls post_order, so services can refuse calls that bypass the gate.
_THROUGH_GATE: contextvars.ContextVar[bool] = contextvars.ContextVar("qmtl_through_gate", default=False)


class OrderSubmissionError(QmtlError):
    """The execution service did not accept an order that passed the gate."""

    exit_code = 1
    code = "order_submission_failed"


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"order {what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise BadInputError(f"order {what} must be finite, got {value!r}")
    return out


def normalize_orders(value: Any) -> list[Order]:
    """Turn what a signal node emitted into orders.

    - ``None`` → no order;
    - a number ``x`` → ``{"action": "TARGET", "target": x}`` (position as a fraction of equity);
    - ``{"action": "BUY"|"SELL", "size": s}`` with ``s > 0`` (units), other keys kept;
    - ``{"target": x}`` or ``{"action": "TARGET", "target": x}``;
    - a list/tuple of the above.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [o for item in value for o in normalize_orders(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [{"action": "TARGET", "target": _finite(value, "target")}]
    if isinstance(value, Mapping):
        order = dict(value)
        action = str(order.get("action", "TARGET" if "target" in order else "")).strip().upper()
        if action in ("BUY", "SELL"):
            size = _finite(order.get("size"), "size")
            if size <= 0:
                raise BadInputError(f"order size must be positive, got {size!r}",
                                    hint="use action SELL to reduce a position")
            order.update(action=action, size=size)
            return [order]
        if action == "TARGET":
            order.update(action=action, target=_finite(order.get("target"), "target"))
            return [order]
        raise BadInputError(f"order action {order.get('action')!r} is not BUY, SELL or TARGET")
    raise BadInputError(f"a signal emitted {type(value).__name__}, which is not an order",
                        hint="emit a number (target position), an order dict, or None")


@runtime_checkable
class TradeExecutionService(Protocol):
    """Where orders that passed the gate go (a broker adapter, a webhook ...)."""

    def post_order(self, order: Order) -> Any:
        """Submit one order."""
        ...


@dataclass
class OrderStats:
    """Counts of orders published, blocked (by reason) and failed at the service."""

    published: int = 0
    blocked: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_published(self) -> None:
        """Count one order the service accepted."""
        with self._lock:
            self.published += 1

    def record_blocked(self, reason: str) -> None:
        """Count one order the gate stopped."""
        with self._lock:
            self.blocked[reason] += 1

    def record_failed(self) -> None:
        """Count one order the service refused or failed on."""
        with self._lock:
            self.failed += 1

    @property
    def total_blocked(self) -> int:
        """All blocked orders, whatever the reason."""
        return sum(self.blocked.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        with self._lock:
            return {"published": self.published, "failed": self.failed,
                    "blocked": dict(sorted(self.blocked.items()))}


def gate_reason(ctx: ComputeContext | None, *, enabled: bool,
                service: TradeExecutionService | None) -> str | None:
    """Why an order in ``ctx`` may not be sent, or ``None`` when every condition holds."""
    if ctx is None:
        return "no_compute_context"
    if ctx.execution_domain != "live":
        return f"domain_{ctx.execution_domain}"
    if enabled is not True:
        return "submission_disabled"
    if ctx.allow_live is not True:
        return "allow_live_false"
    if service is None:
        return "no_execution_service"
    return None


def route_order(order: Order, ctx: ComputeContext | None, *, enabled: bool,
                service: TradeExecutionService | None, stats: OrderStats) -> bool:
    """The order gate: post ``order`` if allowed, else count it as blocked. True when posted."""
    reason = gate_reason(ctx, enabled=enabled, service=service)
    if reason is not None:
        stats.record_blocked(reason)
        return False
    assert service is not None  # gate_reason checked it
    token = _THROUGH_GATE.set(True)
    try:
        service.post_order(order)
    except Exception:
        stats.record_failed()
        raise
    finally:
        _THROUGH_GATE.reset(token)
    stats.record_published()
    return True


class WebhookExecutionService:
    """Posts each order as JSON to a URL (httpx); refuses to be called outside the order gate."""

    def __init__(self, url: str, *, timeout: float = 10.0,
                 headers: Mapping[str, str] | None = None, client: Any = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise BadInputError(f"webhook url {url!r} must start with http:// or https://")
        self.url = url
        self.timeout = timeout
        self.headers = dict(headers or {})
        #: an ``httpx.Client`` to reuse (connection pooling, tests); default: one request each
        self.client = client

    def post_order(self, order: Order) -> Any:
        """POST the order; a non-2xx answer or a transport error raises OrderSubmissionError."""
        if not _THROUGH_GATE.get():
            raise BlockedError("orders may only be posted through the order gate",
                               hint="send orders via a TradeOrderPublisherNode and the Runner",
                               code="order_gate_bypassed")
        import httpx  # lazy: only live trading needs it

        headers = {**self.headers}
        client_id = order.get("client_order_id")
        if isinstance(client_id, str):
            # lets the receiver drop a retried delivery of the same order
            headers.setdefault("Idempotency-Key", client_id)
        try:
            poster = self.client.post if self.client is not None else httpx.post
            response = poster(self.url, json=order, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise OrderSubmissionError(f"could not post order to {self.url}: {exc}") from None
        if response.status_code >= 300:
            raise OrderSubmissionError(
                f"order webhook {self.url} answered {response.status_code}: {response.text[:200]}")
        return response
