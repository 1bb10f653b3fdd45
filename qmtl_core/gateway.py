"""Gateway side of a strategy submission: turn a submit + the world's decision into a ComputeContext.

The context service never trusts the submitter for privilege: the requested domain may keep
``shadow`` (orders off) or ask for less than the world decided, nothing more. When the world
service cannot answer, the run falls back to ``backtest`` with a reason code (fail closed).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from qmtl_core.canonical import sha256_hex
from qmtl_core.domains import (ComputeContext, DecisionEnvelope, ResolvedDomain, normalize_domain,
                               resolve_domain)
from qmtl_core.errors import UsageError
from qmtl_core.timeutil import utcnow

__all__ = ["StrategySubmit", "WorldClient", "ComputeContextService", "ComputeContext"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrategySubmit:
    """A strategy submission as the gateway receives it."""

    dag_json: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    world_id: str = ""
    node_ids_crc32: int = 0
    strategy_id: str | None = None

    def resolved_strategy_id(self) -> str:
        """The strategy id: explicit, else ``meta["strategy_id"]``, else a hash of the DAG."""
        if self.strategy_id:
            return self.strategy_id
        meta_id = self.meta.get("strategy_id") if self.meta else None
        if isinstance(meta_id, str) and meta_id:
            return meta_id
        return sha256_hex(self.dag_json)

    def requested_domain(self) -> str | None:
        """The domain the submitter asked for (``meta["execution_domain"]``), not yet validated."""
        value = self.meta.get("execution_domain") if self.meta else None
        return None if value is None else str(value)


@runtime_checkable
class WorldClient(Protocol):
    """What the gateway needs from the world service: the current decision for a strategy."""

    def get_decision(self, world_id: str, strategy_id: str) -> (
            DecisionEnvelope | None | Awaitable[DecisionEnvelope | None]):
        """The world's decision envelope, ``None`` when it has none (sync or async)."""
        ...


class ComputeContextService:
    """Builds the ComputeContext of a submission from the world's decision envelope."""

    def __init__(self, world_client: WorldClient | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.world_client = world_client
        self._clock = clock

    async def build(self, submit: StrategySubmit, now: datetime | None = None) -> ComputeContext:
        """Async form (the seed awaits it); awaits an async world client."""
        requested = self._requested(submit)
        envelope: DecisionEnvelope | None = None
        failed = False
        if self.world_client is not None and requested != "shadow":
            try:
                answer = self.world_client.get_decision(submit.world_id, submit.resolved_strategy_id())
                envelope = await answer if inspect.isawaitable(answer) else answer
            except Exception:  # noqa: BLE001 - any failure of the world service must fail closed
                log.warning("world decision unavailable for %s", submit.world_id, exc_info=True)
                failed = True
        return self._context(submit, requested, envelope, failed, now)

    def build_sync(self, submit: StrategySubmit, now: datetime | None = None) -> ComputeContext:
        """Synchronous form used by qmtl's own code (local mode)."""
        requested = self._requested(submit)
        envelope: DecisionEnvelope | None = None
        failed = False
        if self.world_client is not None and requested != "shadow":
            try:
                answer = self.world_client.get_decision(submit.world_id, submit.resolved_strategy_id())
            except Exception:  # noqa: BLE001 - see build()
                log.warning("world decision unavailable for %s", submit.world_id, exc_info=True)
                answer, failed = None, True
            if inspect.isawaitable(answer):
                close = getattr(answer, "close", None)
                if callable(close):
                    close()  # a never-awaited coroutine would warn (and fail under -W error)
                raise UsageError("the world client is asynchronous",
                                 hint="use `await ComputeContextService.build(...)`")
            envelope = answer
        return self._context(submit, requested, envelope, failed, now)

    @staticmethod
    def _requested(submit: StrategySubmit) -> str | None:
        raw = submit.requested_domain()
        return None if raw is None else normalize_domain(raw)

    def _context(self, submit: StrategySubmit, requested: str | None,
                 envelope: DecisionEnvelope | None, failed: bool,
                 now: datetime | None) -> ComputeContext:
        at = now if now is not None else self._clock()
        strategy_id = submit.resolved_strategy_id()
        if envelope is not None and (envelope.world_id != submit.world_id
                                     or envelope.strategy_id != strategy_id):
            # A decision for another world/strategy is no decision for this one.
            resolved = ResolvedDomain("backtest", "decision_mismatch", None)
        elif failed:
            resolved = resolve_domain(None, at, requested)
        else:
            resolved = resolve_domain(envelope, at, requested)
        env = resolved.envelope
        return ComputeContext(
            world_id=submit.world_id,
            execution_domain=resolved.domain,
            downgrade_reason=resolved.reason,
            allow_live=bool(env is not None and env.allow_live and resolved.domain == "live"),
            strategy_id=strategy_id,
            as_of=env.as_of if env is not None else None,
            decision_etag=env.etag if env is not None else None,
            policy_version=env.policy_version if env is not None else None,
            requested_domain=requested,
        )
