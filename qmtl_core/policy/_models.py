"""The world policy schema (DESIGN §3) as pydantic v2 models: strict types, no unknown keys.

Cross-field checks raise ``PolicyProblem`` carrying the path of the offending key, so the YAML
loader can point at the exact line and column instead of at the enclosing block.
"""

from __future__ import annotations

import difflib
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from qmtl_core.approval_signing import parse_public_key
from qmtl_core.canonical import content_hash
from qmtl_core.grammar import MAX_STORE_INT
from qmtl_core.metric_names import KNOWN_METRICS, is_known_metric
from qmtl_core.policy._durations import Duration
from qmtl_core.timeutil import DEFAULT_FUTURE_TOLERANCE
from qmtl_core.world_files import WORLD_ID_PATTERN

#: Evaluation stages: where a run is measured. ``shadow`` is the run of a strategy fed live inputs
#: with orders off (``qmtl run --domain shadow``), beside its paper stage; it is never a stage a
#: strategy stands in.
Stage = Literal["backtest", "paper", "shadow", "live"]
STAGES: tuple[Stage, ...] = ("backtest", "paper", "shadow", "live")
Severity = Literal["blocking", "soft", "info"]
PromotionMode = Literal["disabled", "manual_approval", "auto_apply"]


class PolicyProblem(ValueError):
    """A cross-field problem in a policy, located by a path relative to the model that found it."""

    def __init__(self, path: tuple[str | int, ...], message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.hint = hint


def unknown_metric(name: str, declared: frozenset[str] | set[str] = frozenset()) -> str | None:
    """Why a rule may not name ``name`` (with a did-you-mean), or ``None`` when it may."""
    if is_known_metric(name, declared):
        return None
    names = sorted(KNOWN_METRICS | set(declared))
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(names)
    return (f"unknown metric {name!r} ({hint}; declare an extra metric under metrics: to gate on it)"
            if not close else f"unknown metric {name!r} ({hint})")


def _check_metric(name: str) -> str:
    # Only the shape here: whether the name is known depends on the policy's own ``metrics:``
    # declarations, which ``WorldPolicy._known_metrics`` sees and a nested model does not.
    if not name.strip():
        raise ValueError("a metric name is empty")
    return name


#: An integer the store keeps: bounded so it is refused here, at its line, not by the database.
StoreInt = Annotated[int, Field(le=MAX_STORE_INT)]


class MetricDeclaration(BaseModel):
    """An extra metric a policy's rules may name: measured elsewhere (a metrics file's ``extra``,
    a snapshot's ``extra_metrics``) and declared here so a typo in a rule is still caught."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    description: str | None = None
    better: Literal["higher", "lower"] | None = None


class _Model(BaseModel):
    # allow_inf_nan=False: a NaN threshold compares false both ways, so it would pass every
    # gate it guards; an infinite one cannot be stored as JSON.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Costs(_Model):
    """Trading costs used by backtest and paper simulation, in basis points per fill."""

    fee_bps: float = Field(0.0, ge=0, le=10_000)
    slippage_bps: float = Field(0.0, ge=0, le=10_000)


class Rule(_Model):
    """One gate: a metric held within ``[min, max]`` at the listed stages."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    metric: str
    min: float | None = None
    max: float | None = None
    stages: list[Stage] | None = Field(None, min_length=1, description="stages the rule applies to; "
                                                                        "absent = every stage")
    severity: Severity = "blocking"
    description: str | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        return _check_metric(v)

    @model_validator(mode="after")
    def _bounds(self) -> "Rule":
        if self.min is None and self.max is None:
            raise PolicyProblem((), f"rule {self.id!r} has neither min nor max",
                                "give min:, max: or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise PolicyProblem(("min",), f"rule {self.id!r}: min {self.min} is above max {self.max}",
                                "swap them or fix the bound")
        if self.stages is not None and len(set(self.stages)) != len(self.stages):
            raise PolicyProblem(("stages",), f"rule {self.id!r} lists a stage twice")
        return self

    def applies_to(self, stage: str) -> bool:
        """Whether the rule is checked at ``stage``."""
        return self.stages is None or stage in self.stages


#: Metrics where more is better: a consistency check's ``max_drop`` is a fall in one of these.
HIGHER_IS_BETTER = frozenset({"sharpe", "sortino", "calmar", "cagr", "total_return", "win_rate",
                              "profit_factor", "tail_ratio", "psr"})


class Consistency(_Model):
    """A drift check: a later stage's returns against an earlier stage's (the backtest by default).

    ``max_drop``: the later stage's ``metric`` may fall at most this much below the reference's
    (``reference - observed``, same units as the metric). ``ks_p_min``: the two-sample
    Kolmogorov-Smirnov test that both return series come from one distribution must give a p-value
    of at least this (a smaller p says the stage behaves unlike its backtest). Both sides need
    ``min_observations`` returns, else the check counts as a missing metric.
    """

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    stage: Literal["paper", "shadow", "live"]
    against: Literal["backtest", "paper", "shadow"] = "backtest"
    metric: str = "sharpe"
    max_drop: float | None = Field(None, ge=0, allow_inf_nan=False)
    ks_p_min: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    min_observations: int = Field(20, ge=2, le=1_000_000)
    severity: Severity = "blocking"

    @field_validator("metric")
    @classmethod
    def _rising_metric(cls, v: str) -> str:
        _check_metric(v)
        if v not in HIGHER_IS_BETTER:
            raise ValueError(f"consistency metric {v!r} is not one where more is better "
                             f"(use one of {', '.join(sorted(HIGHER_IS_BETTER))})")
        return v

    @model_validator(mode="after")
    def _shape(self) -> "Consistency":
        if self.max_drop is None and self.ks_p_min is None:
            raise PolicyProblem((), f"consistency check {self.id!r} has neither max_drop nor ks_p_min",
                                "give max_drop:, ks_p_min: or both")
        order = ("backtest", "paper", "shadow", "live")
        if order.index(self.against) >= order.index(self.stage):
            raise PolicyProblem(("against",), f"consistency check {self.id!r} compares {self.stage} "
                                f"against {self.against}, which does not come before it",
                                "compare a later stage against an earlier one, e.g. against: backtest")
        return self


class Validation(_Model):
    """How the gates treat a metric that could not be measured, and returns whose spacing does
    not match ``periods_per_year``."""

    on_missing_metric: Literal["fail", "warn"] = "fail"
    on_spacing_mismatch: Literal["warn", "fail"] = Field(
        "warn", description="returns observed at a rate more than 1.25x away from periods_per_year "
                            "(weekly returns under 252): warn in the notes, or fail (exit 2)")


class TopK(_Model):
    """Keep the ``k`` best strategies by ``metric`` (higher is better unless ``order: asc``)."""

    metric: str
    k: StoreInt = Field(ge=1)
    order: Literal["desc", "asc"] = "desc"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        return _check_metric(v)


class Correlation(_Model):
    """Drop a strategy whose returns correlate above ``max`` with one already kept."""

    max: float = Field(gt=-1, le=1)
    min_overlap: StoreInt = Field(20, ge=2, description="fewest overlapping periods to trust a correlation")


class Hysteresis(_Model):
    """Enter the active set above ``enter``; stay in it until below ``exit``."""

    metric: str
    enter: float
    exit: float

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        return _check_metric(v)

    @model_validator(mode="after")
    def _order(self) -> "Hysteresis":
        if self.enter < self.exit:
            raise PolicyProblem(("enter",), f"hysteresis enter {self.enter} is below exit {self.exit}",
                                "enter must be >= exit, or strategies would flap in and out")
        return self


class Selection(_Model):
    """Selection over strategies that passed the gates."""

    top_k: TopK | None = None
    correlation: Correlation | None = None
    hysteresis: Hysteresis | None = None


class StageWindow(_Model):
    """Observation a stage needs before its campaign can move on, measured on data."""

    window: Duration
    min_observations: StoreInt = Field(1, ge=1)

    @field_validator("window")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("window must be longer than zero")
        return v


class LiveWindow(_Model):
    """How long live results are monitored."""

    monitor_window: Duration = timedelta(days=30)


class Campaign(_Model):
    """Campaign windows per stage."""

    backtest: StageWindow | None = None
    paper: StageWindow | None = None
    #: Optional: when present, the live gate also needs this much shadow observation on data.
    shadow: StageWindow | None = None
    live: LiveWindow | None = None


class Approver(_Model):
    """An approver with an SSH public key (``approvers: [{name: alice, ssh_key: "ssh-ed25519 AAAA..."}]``);
    a plain name in the list is an approver without a key."""

    name: str
    ssh_key: str | None = Field(None, description="OpenSSH public key line; approvals are signed with it")

    @field_validator("ssh_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_public_key(v)
            except ValueError as exc:
                raise PolicyProblem((), str(exc), 'paste the whole line of id_ed25519.pub, e.g. "ssh-ed25519 AAAA..."')
        return v


class LivePromotion(_Model):
    """How a strategy goes from paper to live."""

    mode: PromotionMode = "disabled"
    approvers: list[Approver] = Field(default_factory=list)
    required_approvals: StoreInt = Field(1, ge=1)
    approval_ttl: Duration = timedelta(hours=72)
    cooldown: Duration = timedelta(0)
    max_live_slots: StoreInt = Field(1, ge=1)
    require_signatures: bool = Field(False, description="an approval counts only with a valid SSH signature "
                                                        "by the approver's ssh_key over the request's evidence")

    @field_validator("approvers", mode="before")
    @classmethod
    def _plain_names(cls, v: Any) -> Any:
        # A plain name is an approver without a key (the original, still valid, form).
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @field_validator("approvers")
    @classmethod
    def _approvers(cls, v: list[Approver]) -> list[Approver]:
        names = [a.name for a in v]
        for i, name in enumerate(names):
            if not name.strip():
                raise PolicyProblem((i,), "an approver name is empty")
            if name in names[:i]:
                raise PolicyProblem((i,), f"approver {name!r} is listed twice")
        return v

    @property
    def approver_names(self) -> tuple[str, ...]:
        """The approvers' names, in policy order."""
        return tuple(a.name for a in self.approvers)

    @property
    def ssh_keys(self) -> dict[str, str]:
        """Approver name -> SSH public key, for approvers that have one."""
        return {a.name: a.ssh_key for a in self.approvers if a.ssh_key}

    @model_validator(mode="after")
    def _consistent(self) -> "LivePromotion":
        if self.mode == "manual_approval" and not self.approvers:
            raise PolicyProblem(("approvers",) if "approvers" in self.model_fields_set else ("mode",),
                                "mode manual_approval needs at least one approver",
                                "list who may approve under approvers:")
        if self.approvers and self.required_approvals > len(self.approvers):
            raise PolicyProblem(("required_approvals",),
                                f"required_approvals is {self.required_approvals} but only "
                                f"{len(self.approvers)} approver(s) are listed",
                                "add approvers or lower required_approvals")
        if self.require_signatures:
            for i, a in enumerate(self.approvers):
                if not a.ssh_key:
                    raise PolicyProblem(("approvers", i), f"require_signatures is on but approver {a.name!r} "
                                        "has no ssh_key", f'write it as {{name: {a.name}, ssh_key: "ssh-ed25519 AAAA..."}}')
        return self


class Governance(_Model):
    """Governance of live promotion."""

    live_promotion: LivePromotion = LivePromotion()


class Risk(_Model):
    """Freshness limits for decisions that need the risk snapshot, who may produce it, and the book
    portfolio metrics measure a candidate against."""

    snapshot_max_age: Duration = timedelta(minutes=15)
    decision_ttl: Duration = timedelta(minutes=10)
    portfolio_book: Literal["live", "live_and_paper"] = Field(
        "live", description="strategies a candidate's portfolio metrics (incremental_var_99, "
                            "max_corr_live, ...) are measured against")
    #: Local identities whose snapshots are trusted ``hub`` evidence (remote: tokens with role
    #: ``producer``). Anyone else's snapshot is stored as ``unverified`` and never decided on.
    producers: list[str] = Field(default_factory=list)
    #: How far ahead of the clock an observation may be dated (producer clock skew): a snapshot's
    #: ``as_of`` and realized returns, returns posted for evaluation, bars fed to ``qmtl run``; more is
    #: refused (``timeutil.refuse_future``).
    future_tolerance: Duration = DEFAULT_FUTURE_TOLERANCE


class Notifications(_Model):
    """Where to announce approvals pending, blocks, applies and halts."""

    webhook: HttpUrl | None = None


class WorldPolicy(_Model):
    """A world's whole policy file."""

    world: str = Field(min_length=1, max_length=100, pattern=WORLD_ID_PATTERN)
    description: str | None = None
    policy_version: StoreInt = Field(ge=1)
    allow_live: bool = False
    periods_per_year: int = Field(252, ge=1, le=525_600)
    costs: Costs = Costs()
    rules: list[Rule] = Field(default_factory=list)
    #: Drift checks (``qmtl_core.consistency``): a later stage's returns against an earlier one's.
    consistency: list[Consistency] = Field(default_factory=list)
    validation: Validation = Validation()
    selection: Selection = Selection()
    campaign: Campaign = Campaign()
    governance: Governance | None = None
    risk: Risk = Risk()
    notifications: Notifications = Notifications()
    metrics: dict[str, MetricDeclaration] = Field(
        default_factory=dict, description="extra metrics rules may name (measured in metrics files' "
                                          "extra or a snapshot's extra_metrics)")
    benchmark: str | None = Field(None, min_length=1, description="the returns column (strategy id) "
                                                                   "beta and alpha are measured against")

    @field_validator("metrics")
    @classmethod
    def _declared(cls, v: dict[str, MetricDeclaration]) -> dict[str, MetricDeclaration]:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise PolicyProblem((name,), f"metric name {name!r} must be lower case letters, digits "
                                    "and _ (starting with a letter)")
            if is_known_metric(name):
                raise PolicyProblem((name,), f"metric {name!r} is built in",
                                    "declare only metrics qmtl does not measure itself")
        return v

    @model_validator(mode="after")
    def _known_metrics(self) -> "WorldPolicy":
        declared = frozenset(self.metrics)
        named: list[tuple[tuple[str | int, ...], str]] = [
            (("rules", i, "metric"), r.metric) for i, r in enumerate(self.rules)]
        for step in ("top_k", "hysteresis"):
            chosen = getattr(self.selection, step)
            if chosen is not None:
                named.append((("selection", step, "metric"), chosen.metric))
        for path, name in named:
            problem = unknown_metric(name, declared)
            if problem is not None:
                raise PolicyProblem(path, problem)
        return self

    @model_validator(mode="after")
    def _unique_rule_ids(self) -> "WorldPolicy":
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.id in seen:
                raise PolicyProblem(("rules", i, "id"), f"rule id {rule.id!r} is used twice",
                                    "give every rule its own id")
            seen.add(rule.id)
        for i, check in enumerate(self.consistency):
            if check.id in seen:
                raise PolicyProblem(("consistency", i, "id"), f"id {check.id!r} is used twice",
                                    "give every rule and consistency check its own id")
            seen.add(check.id)
        return self

    def consistency_for(self, stage: str) -> list[Consistency]:
        """The consistency checks measured on runs at ``stage``, in file order."""
        return [c for c in self.consistency if c.stage == stage]

    @property
    def live_promotion(self) -> LivePromotion:
        """The live promotion settings; absent ``governance`` means disabled (fail closed)."""
        if self.governance is None:
            return LivePromotion(mode="disabled")
        return self.governance.live_promotion

    def rules_for(self, stage: str) -> list[Rule]:
        """The rules checked at ``stage``, in file order."""
        return [r for r in self.rules if r.applies_to(stage)]


def policy_hash(policy: WorldPolicy) -> str:
    """Content hash of a policy's meaning: what the policy sets, as parsed.

    Comments, formatting and spellings do not count (``72h`` and ``3d`` hash the same), and neither
    does a value equal to its default, whether written out or left out. So a later qmtl that adds a
    field with a default leaves the hash of every policy that does not set it unchanged, and an
    upgraded store keeps recognising its recorded versions (schema v9 moved stored hashes to this
    form). The other side of it: a default must never change in place, since a policy relying on
    it would change meaning under the same hash (``tests/test_policy_hash.py`` pins the defaults).
    """
    return content_hash(policy.model_dump(mode="json", exclude_defaults=True))


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of a world policy file."""
    schema = WorldPolicy.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "qmtl world policy"
    return schema
