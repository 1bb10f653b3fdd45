"""Gates: a policy's rules applied to one strategy's metrics at one stage. Pure functions.

Per rule the result is ``{id, metric, observed, min, max, status, severity, reason}``. The summary
(DESIGN §3): any blocking fail → fail; else any soft fail or any warn → warn; else pass. ``info``
rules are reported but never change the summary. A metric that could not be measured (absent,
``None`` or NaN) follows ``validation.on_missing_metric``: ``fail`` or ``warn``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from qmtl_core.policy._models import Rule, WorldPolicy

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class RuleResult:
    """One rule checked against one observed value."""

    id: str
    metric: str
    observed: float | None
    min: float | None
    max: float | None
    status: Status
    severity: str
    reason: str
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the contract of DESIGN §3, plus the metric's source when known)."""
        out: dict[str, Any] = {"id": self.id, "metric": self.metric, "observed": self.observed,
                               "min": self.min, "max": self.max, "status": self.status,
                               "severity": self.severity, "reason": self.reason}
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass(frozen=True)
class GateResult:
    """Every applicable rule's result for one strategy at one stage, and the summary."""

    strategy_id: str
    stage: str
    status: Status
    rules: tuple[RuleResult, ...]
    metrics: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def blocking_failures(self) -> list[RuleResult]:
        """Blocking rules that failed: the reasons the strategy is rejected."""
        return [r for r in self.rules if r.severity == "blocking" and r.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy_id": self.strategy_id, "stage": self.stage, "status": self.status,
                "rules": [r.to_dict() for r in self.rules]}


def observed_value(metrics: Mapping[str, Any], name: str) -> float | None:
    """The metric as a finite-or-infinite float, or ``None`` when absent or not measured (NaN)."""
    value = metrics.get(name)
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def clean_number(value: Any) -> float | None:
    """A metric value as a float, ``None`` when absent or NaN (not measured)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def check_rule(rule: Rule, observed: float | None, *, on_missing: str,
               source: str | None = None) -> RuleResult:
    """Check one rule; the reason says why in words a reviewer can read."""
    def result(status: Status, reason: str) -> RuleResult:
        return RuleResult(rule.id, rule.metric, observed, rule.min, rule.max, status, rule.severity,
                          reason, source)

    if observed is None:
        status: Status = "fail" if on_missing == "fail" else "warn"
        return result(status, f"{rule.metric} was not measured (on_missing_metric: {on_missing})")
    if rule.min is not None and observed < rule.min:
        return result("fail", f"{rule.metric} {_fmt(observed)} is below min {_fmt(rule.min)}")
    if rule.max is not None and observed > rule.max:
        return result("fail", f"{rule.metric} {_fmt(observed)} is above max {_fmt(rule.max)}")
    bounds = " and ".join(part for part in (
        f">= min {_fmt(rule.min)}" if rule.min is not None else "",
        f"<= max {_fmt(rule.max)}" if rule.max is not None else "") if part)
    return result("pass", f"{rule.metric} {_fmt(observed)} is {bounds}")


def summarize(results: list[RuleResult] | tuple[RuleResult, ...]) -> Status:
    """The strategy's status from its rule results (``info`` rules never count)."""
    counted = [r for r in results if r.severity != "info"]
    if any(r.status == "fail" and r.severity == "blocking" for r in counted):
        return "fail"
    if any(r.status != "pass" for r in counted):
        return "warn"
    return "pass"


def evaluate_gates(policy: WorldPolicy, metrics: Mapping[str, Any], *, stage: str,
                   strategy_id: str = "", sources: Mapping[str, str] | None = None) -> GateResult:
    """Apply every rule of ``policy`` that applies at ``stage`` to ``metrics``."""
    on_missing = policy.validation.on_missing_metric
    results = tuple(
        check_rule(rule, observed_value(metrics, rule.metric), on_missing=on_missing,
                   source=(sources or {}).get(rule.metric))
        for rule in policy.rules_for(stage))
    clean = {k: observed_value(metrics, k) for k in metrics}
    return GateResult(strategy_id, stage, summarize(results), results, clean)
