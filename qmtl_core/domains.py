"""Execution domains, effective modes, decision envelopes and the ComputeContext (DESIGN §8).

Everything here is a pure function of its inputs plus ``now``. There is exactly one table that
turns a spelling into a domain; an unknown value raises :class:`UnknownDomainError` instead of
being passed through, because a misspelt ``"live "`` silently becoming something else is how
money gets lost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final, Literal

from qmtl_core.errors import BadInputError

__all__ = [
    "ExecutionDomain",
    "EXECUTION_DOMAINS",
    "EFFECTIVE_MODES",
    "DOWNGRADE_REASONS",
    "UnknownDomainError",
    "normalize_domain",
    "normalize_mode",
    "domain_for_mode",
    "DecisionEnvelope",
    "ResolvedDomain",
    "resolve_domain",
    "ComputeContext",
    "queue_namespace",
]

ExecutionDomain = Literal["backtest", "dryrun", "live", "shadow"]

EXECUTION_DOMAINS: Final[tuple[str, ...]] = ("backtest", "dryrun", "live", "shadow")
EFFECTIVE_MODES: Final[tuple[str, ...]] = ("validate", "compute-only", "paper", "live", "shadow")

#: The one table. Domain names map to themselves; effective modes map to the domain they run in.
_TO_DOMAIN: Final[dict[str, str]] = {
    "backtest": "backtest",
    "dryrun": "dryrun",
    "live": "live",
    "shadow": "shadow",
    "validate": "backtest",
    "compute-only": "backtest",
    "paper": "dryrun",
}

#: Reason codes a resolution may carry when it lands on a lower domain than asked for.
DOWNGRADE_REASONS: Final[tuple[str, ...]] = (
    "decision_unavailable", "stale_decision", "missing_as_of", "decision_mismatch",
)

# Privilege order used when a caller asks for less than the world allows; shadow is outside it.
_RANK: Final[dict[str, int]] = {"backtest": 0, "dryrun": 1, "live": 2}


class UnknownDomainError(BadInputError):
    """An execution domain or effective mode that is not one of the known values."""

    code = "unknown_execution_domain"


def _clean(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise UnknownDomainError(f"{what} must be a string, got {type(value).__name__}",
                                 hint=f"use one of {', '.join(EXECUTION_DOMAINS)}")
    return value.strip().lower().replace("_", "-")


def normalize_domain(value: object) -> str:
    """Map a domain name or an effective mode to one of ``backtest|dryrun|live|shadow``.

    Case and surrounding whitespace are ignored (``"Live "`` → ``"live"``); ``compute_only`` is
    accepted for ``compute-only``. Anything else raises :class:`UnknownDomainError`.
    """
    key = _clean(value, "execution domain")
    try:
        return _TO_DOMAIN[key]
    except KeyError:
        raise UnknownDomainError(
            f"unknown execution domain {value!r}",
            hint=f"use one of {', '.join(EXECUTION_DOMAINS)} (or a mode: {', '.join(EFFECTIVE_MODES)})",
        ) from None


def normalize_mode(value: object) -> str:
    """Validate an effective mode (``validate|compute-only|paper|live|shadow``) and return it."""
    key = _clean(value, "effective mode")
    if key not in EFFECTIVE_MODES:
        raise UnknownDomainError(f"unknown effective mode {value!r}",
                                 hint=f"use one of {', '.join(EFFECTIVE_MODES)}")
    return key


def domain_for_mode(mode: object) -> str:
    """The execution domain an effective mode runs in (``paper`` → ``dryrun`` ...)."""
    return _TO_DOMAIN[normalize_mode(mode)]


def queue_namespace(world_id: str, domain: str) -> str:
    """The queue namespace of a world in a domain: ``"{world}.{domain}"``."""
    if not world_id or any(ch in world_id for ch in ". \t\n"):
        # a dot would let "a.live" in world "a" collide with domain "live" of world "a.live"
        raise BadInputError(f"world id {world_id!r} cannot be used in a queue namespace",
                            hint="world ids must be non-empty and contain no dots or whitespace")
    return f"{world_id}.{normalize_domain(domain)}"


@dataclass(frozen=True)
class DecisionEnvelope:
    """The world's answer to "in which domain may this strategy execute", as of a moment."""

    world_id: str
    strategy_id: str
    effective_mode: str
    reason: str
    as_of: datetime | None
    ttl_sec: int
    etag: str
    policy_version: int
    #: Whether the world allows live orders at all; absent means no (fail closed).
    allow_live: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "effective_mode", normalize_mode(self.effective_mode))
        if self.as_of is not None and self.as_of.tzinfo is None:
            raise BadInputError("decision as_of must be timezone-aware",
                                hint="use an aware UTC datetime")
        if isinstance(self.ttl_sec, bool) or not isinstance(self.ttl_sec, int) or self.ttl_sec < 0:
            raise BadInputError(f"decision ttl_sec must be a non-negative integer, got {self.ttl_sec!r}")

    @property
    def execution_domain(self) -> str:
        """The domain this envelope's effective mode runs in."""
        return _TO_DOMAIN[self.effective_mode]

    def expires_at(self) -> datetime | None:
        """When the decision stops being usable; ``None`` when it has no ``as_of``."""
        return None if self.as_of is None else self.as_of + timedelta(seconds=self.ttl_sec)


@dataclass(frozen=True)
class ResolvedDomain:
    """The domain a run executes in, why it was downgraded (if it was) and the decision used."""

    domain: str
    reason: str | None
    envelope: DecisionEnvelope | None


def resolve_domain(envelope: DecisionEnvelope | None, now: datetime,
                   requested: str | None = None) -> ResolvedDomain:
    """Decide the execution domain from a world decision at ``now`` (pure).

    - an explicit request for ``shadow`` is kept: shadow sends no orders, so it is safe even
      without a world decision;
    - no decision → ``backtest`` / ``decision_unavailable``; a decision without ``as_of`` →
      ``backtest`` / ``missing_as_of``; ``as_of + ttl < now`` → ``backtest`` / ``stale_decision``;
    - otherwise the world's effective mode decides; a request may only lower the privilege
      (asking for ``backtest`` when the world says ``live`` gives ``backtest``), never raise it.
    """
    if now.tzinfo is None:
        raise BadInputError("now must be timezone-aware")
    wanted = normalize_domain(requested) if requested is not None else None
    if wanted == "shadow":
        return ResolvedDomain("shadow", None, envelope)
    if envelope is None:
        return ResolvedDomain("backtest", "decision_unavailable", None)
    if envelope.as_of is None:
        return ResolvedDomain("backtest", "missing_as_of", envelope)
    expires = envelope.expires_at()
    assert expires is not None  # as_of is set, checked above
    if expires < now:
        return ResolvedDomain("backtest", "stale_decision", envelope)
    decided = envelope.execution_domain
    if wanted is not None and decided != "shadow" and _RANK[wanted] < _RANK[decided]:
        return ResolvedDomain(wanted, None, envelope)
    return ResolvedDomain(decided, None, envelope)


@dataclass(frozen=True)
class ComputeContext:
    """Where a strategy's nodes compute: the world, the execution domain and what allowed it."""

    world_id: str
    execution_domain: str
    downgrade_reason: str | None = None
    #: Live orders need this to be True as well as the domain being live (order gate, fail closed).
    allow_live: bool = False
    strategy_id: str | None = None
    as_of: datetime | None = None
    decision_etag: str | None = None
    policy_version: int | None = None
    requested_domain: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "execution_domain", normalize_domain(self.execution_domain))
        if self.requested_domain is not None:
            object.__setattr__(self, "requested_domain", normalize_domain(self.requested_domain))

    @property
    def namespace(self) -> str:
        """The queue namespace this context computes in (``{world}.{domain}``)."""
        return queue_namespace(self.world_id, self.execution_domain)

    def with_domain(self, domain: str, reason: str | None = None) -> ComputeContext:
        """A copy in another domain; ``allow_live`` is dropped unless the new domain is live."""
        dom = normalize_domain(domain)
        return replace(self, execution_domain=dom, downgrade_reason=reason,
                       allow_live=self.allow_live and dom == "live")
