"""Decision envelopes: the world's answer to "in which domain may this strategy execute". Pure.

The envelope is derived from the strategy's stage, the world's live activation, the kill switch and
``allow_live``; ``as_of`` is the moment it was derived and ``ttl`` the policy's
``risk.decision_ttl``, so a consumer holding an old envelope downgrades to backtest
(``stale_decision``) instead of trading on it. The etag hashes what the decision *says* (not when),
so a changed decision is never mistaken for an old one and an unchanged one is recorded once.
"""

from __future__ import annotations

from datetime import datetime

from qmtl_core.canonical import content_hash
from qmtl_core.domains import DecisionEnvelope
from qmtl_core.policy import WorldPolicy


def derive_decision(policy: WorldPolicy, strategy_id: str, *, stage: str | None, live_active: bool,
                    halted: bool, now: datetime, activation_etag: str | None = None) -> DecisionEnvelope:
    """The decision envelope for one strategy now."""
    if stage is None:
        mode, reason = "validate", "unknown_strategy"
    elif halted:
        mode, reason = "compute-only", "world_halted"
    elif stage == "live":
        if not policy.allow_live:
            mode, reason = "compute-only", "allow_live_false"
        elif not live_active:
            mode, reason = "compute-only", "no_live_activation"
        else:
            mode, reason = "live", "live_activation"
    elif stage == "paper":
        mode, reason = "paper", "paper_campaign"
    elif stage == "retired":
        mode, reason = "compute-only", "retired"
    else:
        mode, reason = "compute-only", "backtest_campaign"
    etag = content_hash({"world": policy.world, "strategy_id": strategy_id, "effective_mode": mode,
                         "reason": reason, "policy_version": policy.policy_version,
                         "allow_live": policy.allow_live, "activation": activation_etag})
    return DecisionEnvelope(policy.world, strategy_id, mode, reason, now,
                            int(policy.risk.decision_ttl.total_seconds()), etag, policy.policy_version,
                            allow_live=policy.allow_live)


def envelope_to_dict(envelope: DecisionEnvelope) -> dict[str, object]:
    """JSON form of an envelope (``as_of`` in ISO-8601 UTC)."""
    return {"world_id": envelope.world_id, "strategy_id": envelope.strategy_id,
            "effective_mode": envelope.effective_mode, "execution_domain": envelope.execution_domain,
            "reason": envelope.reason,
            "as_of": envelope.as_of.isoformat().replace("+00:00", "Z") if envelope.as_of else None,
            "ttl_sec": envelope.ttl_sec, "etag": envelope.etag, "policy_version": envelope.policy_version,
            "allow_live": envelope.allow_live}
