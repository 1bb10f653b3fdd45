"""Response models of ``qmtl serve``: the OpenAPI schema of every document the API returns.

The documents are the ``LocalClient`` documents the CLI renders (one shape for both modes); these
models describe them so the schema is a contract a client can rely on (and schemathesis checks every
response against it). Each model allows extra keys, so a document may grow a field without breaking
older clients; the fields listed are the ones a client may count on. Routes serialise with
``exclude_unset``, so a field absent from a document is never added as ``null``. Numbers that are
whole in one document and fractional in another are ``int | float`` so a value leaves exactly as
the facade produced it (remote output stays byte-identical to local output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, create_model

from qmtl_core.governance._gate import GateResult
from qmtl_core.ledger import LedgerEntry
from qmtl_core.service._policies import PolicyApproval, PolicyRecord

Number = int | float


class Doc(BaseModel):
    """A response document: the listed fields, plus any others the document carries."""

    model_config = ConfigDict(extra="allow")


def from_core(name: str, cls: type, *, drop: Collection[str] = (),
              add: Mapping[str, tuple[Any, Any]] | None = None) -> type[Doc]:
    """The response model of a core dataclass whose JSON form is its own fields: their names,
    types and defaults read from ``cls`` (less ``drop``, plus ``add``: name -> (type, default)), so
    the schema cannot drift from the core. Only for dataclasses whose ``to_dict`` leaves each
    field's value as it is (a ``datetime`` field rendered as a string would not round-trip)."""
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        fields[f.name] = (hints[f.name], default)
    fields.update(add or {})
    model: type[Doc] = create_model(name, __base__=Doc, __doc__=cls.__doc__, **fields)
    return model


class ErrorDoc(Doc):
    """Every error: the same document the CLI prints with ``--json``; the CLI exits with ``exit_code``."""

    error: str
    message: str
    exit_code: int
    hint: str | None = None
    details: dict[str, Any] | None = None


class Health(Doc):
    ok: bool
    version: str
    store: str


class WorldRow(Doc):
    world: str
    path: str
    valid: bool
    error: str | None = None
    policy_version: int | None = None
    allow_live: bool | None = None
    live_promotion: str | None = None
    rules: int | None = None
    content_hash: str | None = None
    description: str | None = None


class WorldList(Doc):
    worlds: list[WorldRow]
    worlds_dir: str


PolicyVersion = from_core("PolicyVersion", PolicyRecord)
PolicyApprovalRow = from_core("PolicyApprovalRow", PolicyApproval)


class WorldDoc(Doc):
    world: str
    path: str
    content_hash: str
    policy: dict[str, Any]
    policy_versions: list[PolicyVersion]


class RuleResult(Doc):
    id: str
    metric: str
    status: str
    severity: str
    observed: Number | None = None
    min: Number | None = None
    max: Number | None = None
    reason: str | None = None


class RunDoc(Doc):
    """One evaluation run revision."""

    world: str
    strategy_id: str
    stage: str
    run_id: str
    revision: int
    status: str
    policy_version: int
    metrics: dict[str, Number | None]
    metric_sources: dict[str, str | None]
    window: dict[str, Any] | None = None
    rules: list[RuleResult]
    content_hash: str
    recorded_at: str
    recorded_by: str
    created: bool | None = None
    warnings: list[str] | None = None  # what the returns' timestamps say (rate vs periods_per_year, gaps)


class RunList(Doc):
    runs: list[RunDoc]


class StrategyVerdict(Doc):
    strategy_id: str
    status: str
    selected: bool
    metrics: dict[str, Number | None]
    rules: list[RuleResult]
    #: Portfolio metrics a rule of the stage needs that could not be measured, with why.
    unmeasured: dict[str, str] | None = None


class CohortDoc(Doc):
    """``record: true``: ``runs``; ``record: false``: the offline evaluation (``strategies`` ...)."""

    runs: list[RunDoc] | None = None
    world: str | None = None
    stage: str | None = None
    status: str | None = None
    #: Offline: 0, 10 (a blocking rule fails) or 12 (a portfolio metric a blocking rule needs was not measured).
    exit_code: int | None = None
    strategies: list[StrategyVerdict] | None = None
    selected: list[str] | None = None
    notes: list[Any] | None = None


class StrategyRow(Doc):
    world_id: str
    strategy_id: str
    stage: str | None = None
    name: str | None = None
    code_hash: str | None = None
    submitter: str | None = None
    meta: dict[str, Any] | None = None


class StrategyListRow(Doc):
    strategy_id: str
    name: str | None = None
    stage: str | None = None
    submitter: str | None = None


class StrategyList(Doc):
    world: str
    strategies: list[StrategyListRow]


class StrategyChange(Doc):
    strategy: StrategyRow
    changed: bool


class QueuesDoc(Doc):
    world: str
    events: list[dict[str, Any]]


class SubmissionDoc(Doc):
    """A submission's run, the strategy's row (with a registration) and the queue events written."""

    run: RunDoc
    strategy: StrategyRow | None = None
    changed: bool
    events: list[dict[str, Any]]


class ReturnsRun(Doc):
    strategy_id: str
    stage: str
    run_id: str
    revision: int
    returns: list[list[Any]] | None = None


class ReturnsList(Doc):
    runs: list[ReturnsRun]


class ActionDoc(Doc):
    """A campaign action (``campaign tick``)."""

    action: str
    world: str
    strategy_id: str
    stage: str | None = None
    reason: str
    requires: list[str]
    idempotency_key: str
    suggested_run_id: str | None = None
    suggested_body: dict[str, Any] | None = None
    exit_class: int


class CampaignStrategy(Doc):
    strategy_id: str
    stage: str | None = None
    phase: str
    progress: list[dict[str, Any]]
    metrics: dict[str, Number | None]
    next_action: ActionDoc | None = None


class CampaignDoc(Doc):
    world: str
    strategies: list[CampaignStrategy]


class TickDoc(Doc):
    world: str
    actions: list[ActionDoc]


class IterationDoc(Doc):
    """One campaign-loop iteration over one world."""

    world: str
    status: str
    exit_code: int
    actions: list[dict[str, Any]]


class DecisionDoc(Doc):
    world_id: str
    strategy_id: str
    effective_mode: str
    execution_domain: str
    reason: str
    as_of: str | None = None
    ttl_sec: int
    etag: str
    policy_version: int


class DecisionList(Doc):
    world: str
    decisions: list[DecisionDoc]


class ActivationDoc(Doc):
    strategy_id: str
    stage: str
    weight: Number
    run_id: str | None = None
    etag: str
    activated_at: str


class ActivationSet(Doc):
    world: str
    set_version: int
    activations: list[ActivationDoc]


LedgerEntryDoc = from_core("LedgerEntryDoc", LedgerEntry)


class HistoryDoc(Doc):
    world: str
    halted: bool
    activations: list[dict[str, Any]]
    timeline: list[LedgerEntryDoc]


class ReportDoc(Doc):
    format: str
    world: str
    generated_at: str
    strategies: list[dict[str, Any]]


GateDoc = from_core("GateDoc", GateResult, drop={"needs_approval"}, add={"exit_code": (int, ...)})


class OutcomeDoc(Doc):
    """A governance outcome (promote, approve, reject); the CLI exits with ``exit_code``."""

    status: str
    world: str
    strategy_id: str
    request_id: str | None = None
    message: str
    exit_code: int
    gate: GateDoc | None = None


class RequestDoc(Doc):
    request_id: str
    world: str
    strategy_id: str
    status: str
    requester: str
    created_at: str
    evidence_hash: str | None = None
    approvals: list[dict[str, Any]]


class ApprovalRequest(Doc):
    """The request an approver is asked to sign."""

    request_id: str
    world: str
    strategy_id: str
    status: str
    requester: str
    reason: str | None = None
    created_at: str
    age_seconds: Number | None = None
    approvals: list[dict[str, Any]]
    required_approvals: int | None = None


class ChecklistRow(Doc):
    """One gate condition: ok, or the reason codes failing it."""

    condition: str
    ok: bool
    codes: list[str]
    detail: str


class SideBySideRow(Doc):
    """One metric at each stage the strategy has a run in."""

    metric: str
    label: str
    percent: bool
    values: dict[str, Number | None]


class SmallSample(Doc):
    """Whether the paper track record is long enough for its Sharpe (Bailey & López de Prado)."""

    stage: str
    n_observations: int
    sharpe_per_period: Number
    min_track_record_length: int | None = None
    enough: bool
    source: str


class ApprovalRisk(Doc):
    """The risk evidence: the newest snapshot's weight, correlations with live, stress; the costs."""

    snapshot: dict[str, Any] | None = None
    weight: Number | None = None
    correlation_with_live: dict[str, dict[str, Number | None]] | None = None
    stress: dict[str, Any] | None = None
    constraints: dict[str, Any] | None = None
    costs: dict[str, Any]


class ApprovalPolicy(Doc):
    version_at_request: int | None = None
    version_now: int | None = None
    changed: bool


class ApprovalEvidence(Doc):
    request: str | None = None
    now: str | None = None
    unchanged: bool


class ApprovalView(Doc):
    """What an approver reads before signing (``qmtl promote --show``)."""

    request: ApprovalRequest
    checklist: list[ChecklistRow]
    allowed_now: bool
    stages: list[str]
    side_by_side: list[SideBySideRow]
    caveats: list[str]
    small_sample: SmallSample | None = None
    risk: ApprovalRisk
    policy: ApprovalPolicy
    evidence: ApprovalEvidence


class RequestList(Doc):
    requests: list[RequestDoc]


PolicyProposal = from_core("PolicyProposal", PolicyRecord, add={
    "approvals": (list[PolicyApprovalRow], ...),  # type: ignore[valid-type]
    "diff": (str, ...)})


class PolicyStatusDoc(Doc):
    """The policy version in force and open proposals (``qmtl world policy status``)."""

    world: str
    in_force: PolicyVersion | None = None  # type: ignore[valid-type]
    governors: list[str]
    required_approvals: int | None = None
    proposals: list[PolicyProposal]  # type: ignore[valid-type]
    governed: bool


class PolicyApprovalDoc(Doc):
    """An approval of a proposed policy version (``qmtl world policy approve``)."""

    world: str
    policy_version: int
    approvals: list[str]
    required_approvals: int
    already: bool
    adopted: bool


class RollbackDoc(Doc):
    set_version: int
    changed: dict[str, str | None]


class HaltDoc(Doc):
    world: str
    halted: bool
    changed: bool


class DemoteDoc(Doc):
    world: str
    strategy_id: str
    to: str
    set_version: int


class SnapshotStored(Doc):
    world: str
    version: str
    created: bool
    content_hash: str
    as_of: str


class SnapshotDoc(Doc):
    world_id: str
    version: str
    as_of: str
    ttl_sec: Number
    weights: dict[str, Number]
    content_hash: str
    freshness: dict[str, Any]


class AuditLog(Doc):
    entries: list[LedgerEntryDoc]


class VerifyDoc(Doc):
    ok: bool
    entries: int
    head_seq: int | None = None
    head_hash: str | None = None
    first_broken_seq: int | None = None
    problem: str | None = None
    origin: str | None = None
    deep: bool | None = None


class LedgerHead(Doc):
    """What a checkpoint signs: the store's identity and the chain's head."""

    origin: str
    seq: int
    hash: str
