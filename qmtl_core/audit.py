"""``qmtl audit verify --deep``: rebuild from the ledger alone what the decision tables hold, and
name every difference.

The tables that decide (approvals, activation sets, strategy stages, halts, API tokens, recorded
policy versions and their approvals) are overwritten in place, so a write behind qmtl's back leaves
no trace in them; every legitimate change also appends a ledger entry carrying its result.
Replaying those entries gives what the tables must hold. ``LedgerState`` is that replay (a pure
fold over entries, fed by ``ledger.verify`` in its one pass over the chain), ``read_tables`` reads
the tables, and ``compare`` lists the differences.

Signatures on approvals are re-verified against the approver's key in the policy version that was
in force when the approval was made (the ledger says which; the store keeps its document, checked
against the hash the ledger recorded), so rotating a key through a governed policy change leaves
every earlier approval valid, and a policy row forged to swap a key is itself a difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core.approval_signing import approval_message, signature_problem
from qmtl_core.checkpoint import Checkpoint
from qmtl_core.errors import CheckpointMismatch, LedgerBroken, LedgerStateMismatch
from qmtl_core.ledger import LedgerEntry, VerifyResult, verify
from qmtl_core.policy import WorldPolicy, policy_hash
from qmtl_core.store import schema

#: Ledger kinds whose payload carries a whole activation set (``governance._activations.write_set``).
SET_KINDS = frozenset({"promotion.applied", "strategy.promoted", "strategy.demoted", "world.rollback"})
DECISION_KINDS = {"promotion.approved": "approve", "promotion.rejected": "reject"}
#: Ledger kinds that record a policy version, its adoption, an approval of it, or a new hash of it.
POLICY_KINDS = frozenset({"policy.recorded", "policy.changed", "policy.proposed", "policy.adopted",
                          "policy.approved", "policy.rehashed"})

ActivationRow = tuple[str, float, "str | None", str]  # stage, weight, run_id, etag


@dataclass(frozen=True)
class Difference:
    """One thing a table holds that the ledger does not vouch for, or the other way round."""

    kind: str  # approval | activation_set | stage | halt | token | policy | policy_approval | signature
    key: str
    problem: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"kind": self.kind, "key": self.key, "problem": self.problem}

    def line(self) -> str:
        """One line for people."""
        return f"{self.kind} {self.key}: {self.problem}"


@dataclass
class SignedDecision:
    """An approval whose ledger entry carries a signature, kept for re-verification."""

    seq: int
    world: str | None
    approver: str
    request_id: str
    strategy_id: str | None
    evidence_hash: str
    signature: str | None
    #: The world's policy version in force when the approval was made, according to the ledger.
    policy_version: int | None = None


@dataclass
class LedgerState:
    """What the decision tables must hold, according to the ledger."""

    approvals: dict[tuple[str, str, str], tuple[str, int]] = field(default_factory=dict)
    sets: dict[tuple[str, int], tuple[str | None, dict[str, ActivationRow]]] = field(default_factory=dict)
    stages: dict[tuple[str, str], str] = field(default_factory=dict)
    halted: dict[str, bool] = field(default_factory=dict)
    tokens: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    approvals_by_world: dict[str, list[SignedDecision]] = field(default_factory=dict)
    #: (world, version) -> (content hash, status) of every recorded policy version.
    policies: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    #: (world, version, approver) -> the content hash they approved.
    policy_approvals: dict[tuple[str, int, str], str] = field(default_factory=dict)
    in_force: dict[str, int] = field(default_factory=dict)
    proposed: dict[str, set[int]] = field(default_factory=dict)

    #: The kinds the fold reads; the walk decodes no other payload.
    KINDS = frozenset(DECISION_KINDS) | SET_KINDS | POLICY_KINDS | {
        "world.halted", "world.resumed", "token.created", "token.revoked"}

    def __call__(self, entry: LedgerEntry) -> None:
        """Fold one verified entry in (``ledger.verify``'s ``visit``)."""
        kind, payload = entry.kind, entry.payload or {}
        if kind in DECISION_KINDS:
            key = (str(payload.get("request_id")), entry.actor, str(payload.get("evidence_hash")))
            self.approvals[key] = (DECISION_KINDS[kind], entry.seq)
            if kind == "promotion.approved" and entry.world is not None:
                self.approvals_by_world.setdefault(entry.world, []).append(SignedDecision(
                    entry.seq, entry.world, entry.actor, key[0], entry.subject, key[2], payload.get("signature"),
                    self.in_force.get(entry.world)))
        elif kind in POLICY_KINDS and entry.world is not None and "policy_version" in payload:
            self._policy(entry.world, kind, int(payload["policy_version"]), str(payload.get("content_hash")),
                         entry.actor, payload)
        elif kind in SET_KINDS and "set_version" in payload and entry.world is not None:
            rows = {str(a["strategy_id"]): (str(a["stage"]), float(a["weight"]), a.get("run_id"), str(a["etag"]))
                    for a in payload.get("activations") or ()}
            self.sets[(entry.world, int(payload["set_version"]))] = (payload.get("set_etag"), rows)
            for sid, stage in (payload.get("changed") or {}).items():
                self.stages[(entry.world, str(sid))] = stage or "backtest"
        elif kind in ("world.halted", "world.resumed") and entry.world is not None:
            self.halted[entry.world] = kind == "world.halted"
        elif kind == "token.created":
            self.tokens[str(payload.get("token_id"))] = (str(payload.get("actor")), str(payload.get("role")), False)
        elif kind == "token.revoked":
            token_id = str(payload.get("token_id"))
            if token_id in self.tokens:
                actor, role, _ = self.tokens[token_id]
                self.tokens[token_id] = (actor, role, True)

    def _policy(self, world: str, kind: str, version: int, digest: str, actor: str, payload: Mapping[str, Any]) -> None:
        # Mirrors service._policies: recording a version supersedes every open proposal, adopting
        # one supersedes the older ones, and the newest adopted version is in force.
        open_proposals = self.proposed.setdefault(world, set())
        if kind == "policy.approved":
            self.policy_approvals[(world, version, actor)] = digest
        elif kind == "policy.rehashed":
            previous = str(payload.get("previous_hash"))
            if (world, version) in self.policies:
                self.policies[(world, version)] = (digest, self.policies[(world, version)][1])
            for key, approved in self.policy_approvals.items():
                if key[:2] == (world, version) and approved == previous:
                    self.policy_approvals[key] = digest
        else:
            superseded = set(open_proposals) if kind != "policy.adopted" else {v for v in open_proposals if v < version}
            for v in superseded:
                self.policies[(world, v)] = (self.policies[(world, v)][0], "superseded")
            open_proposals -= superseded | {version}
            status = "proposed" if kind == "policy.proposed" else "adopted"
            self.policies[(world, version)] = (digest, status)
            if status == "proposed":
                open_proposals.add(version)
            else:
                self.in_force[world] = version


@dataclass
class TableState:
    """What the decision tables hold."""

    approvals: dict[tuple[str, str, str], tuple[str, int | None]]
    sets: dict[tuple[str, int], tuple[str, dict[str, ActivationRow]]]
    stages: dict[tuple[str, str], str]
    halted: dict[str, bool]
    tokens: dict[str, tuple[str, str, bool]]
    #: (world, version) -> (content hash, status, stored document).
    policies: dict[tuple[str, int], tuple[str, str, Any]] = field(default_factory=dict)
    policy_approvals: dict[tuple[str, int, str], str] = field(default_factory=dict)


def read_tables(conn: Connection) -> TableState:
    """Read the decision tables (in the same transaction as the ledger walk)."""
    a, sets, acts = schema.approvals, schema.activation_sets, schema.activations
    approvals = {(request_id, approver, evidence): (decision, None if seq is None else int(seq))
                 for request_id, approver, evidence, decision, seq in conn.execute(
                     sa.select(a.c.request_id, a.c.approver, a.c.evidence_hash, a.c.decision, a.c.ledger_seq))}
    set_rows: dict[tuple[str, int], tuple[str, dict[str, ActivationRow]]] = {
        (world, int(version)): (etag, {}) for world, version, etag in conn.execute(
            sa.select(sets.c.world_id, sets.c.set_version, sets.c.etag))}
    # Rows come in primary-key order, so each set's rows are consecutive: one lookup per set.
    key: tuple[str, int] | None = None
    rows: dict[str, ActivationRow] = {}
    for world, version, sid, stage, weight, run_id, etag in conn.execute(
            sa.select(acts.c.world_id, acts.c.set_version, acts.c.strategy_id, acts.c.stage, acts.c.weight,
                      acts.c.run_id, acts.c.etag).order_by(acts.c.world_id, acts.c.set_version)).all():
        if key is None or key[0] != world or key[1] != version:
            key = (world, int(version))
            rows = set_rows.setdefault(key, ("", {}))[1]
        rows[sid] = (stage, float(weight), run_id, etag)
    st, w, t = schema.strategies, schema.worlds, schema.api_tokens
    stages = {(world, sid): stage
              for world, sid, stage in conn.execute(sa.select(st.c.world_id, st.c.strategy_id, st.c.stage))}
    halted = {world: bool(flag) for world, flag in conn.execute(sa.select(w.c.world_id, w.c.halted))}
    tokens = {token_id: (actor, role, revoked_at is not None)
              for token_id, actor, role, revoked_at in conn.execute(
                  sa.select(t.c.token_id, t.c.actor, t.c.role, t.c.revoked_at))}
    pv, pa = schema.policy_versions, schema.policy_approvals
    policies = {(world, int(version)): (digest, status, document)
                for world, version, digest, status, document in conn.execute(
                    sa.select(pv.c.world_id, pv.c.policy_version, pv.c.content_hash, pv.c.status, pv.c.document))}
    policy_approvals = {(world, int(version), approver): digest
                        for world, version, approver, digest in conn.execute(
                            sa.select(pa.c.world_id, pa.c.policy_version, pa.c.approver, pa.c.content_hash))}
    return TableState(approvals, set_rows, stages, halted, tokens, policies, policy_approvals)


def _describe(rows: Mapping[str, ActivationRow]) -> str:
    return ", ".join(f"{sid} {r[0]} w={r[1]:g}" for sid, r in sorted(rows.items())) or "empty"


def compare(ledger_state: LedgerState, tables: TableState) -> list[Difference]:
    """Every difference between the replayed ledger and the tables, in a stable order."""
    out: list[Difference] = []
    for key in sorted(set(tables.approvals) | set(ledger_state.approvals)):
        request_id, approver, evidence = key
        label = f"{request_id}/{approver}"
        table, led = tables.approvals.get(key), ledger_state.approvals.get(key)
        if led is None:
            out.append(Difference("approval", label, f"the approvals table has {approver}'s {table[0] if table else '?'} "
                                  f"on evidence {evidence[:12]} but no ledger entry records it (forged?)"))
        elif table is None:
            out.append(Difference("approval", label, f"ledger entry {led[1]} records {approver}'s {led[0]} "
                                  "but the approvals table has no row for it (deleted?)"))
        elif table[0] != led[0] or table[1] != led[1]:
            out.append(Difference("approval", label, f"the table says {table[0]} (ledger entry {table[1]}), "
                                  f"the ledger says {led[0]} (entry {led[1]})"))
    for key in sorted(set(tables.sets) | set(ledger_state.sets)):
        label = f"{key[0]}/{key[1]}"
        table_set, led_set = tables.sets.get(key), ledger_state.sets.get(key)
        if led_set is None:
            out.append(Difference("activation_set", label, f"set {key[1]} of {key[0]} ({_describe(table_set[1]) if table_set else ''}) "
                                  "is not in the ledger (written behind qmtl's back)"))
        elif table_set is None:
            out.append(Difference("activation_set", label, "the ledger records this set but the tables do not "
                                  "hold it (deleted?)"))
        elif table_set[1] != led_set[1] or (led_set[0] is not None and table_set[0] != led_set[0]):
            out.append(Difference("activation_set", label, f"the tables hold {_describe(table_set[1])}, "
                                  f"the ledger says {_describe(led_set[1])}"))
    for key in sorted(set(tables.stages) | set(ledger_state.stages)):
        table_stage, led_stage = tables.stages.get(key), ledger_state.stages.get(key, "backtest")
        if table_stage is None:
            out.append(Difference("stage", f"{key[0]}/{key[1]}", f"the ledger has it at {led_stage} but the "
                                  "strategies table has no row (deleted?)"))
        elif table_stage != led_stage:
            out.append(Difference("stage", f"{key[0]}/{key[1]}", f"the strategies table says {table_stage}, "
                                  f"the ledger says {led_stage}"))
    for world in sorted(set(tables.halted) | set(ledger_state.halted)):
        table_halt, led_halt = tables.halted.get(world, False), ledger_state.halted.get(world, False)
        if table_halt != led_halt:
            out.append(Difference("halt", world, f"the worlds table says {'halted' if table_halt else 'running'}, "
                                  f"the ledger says {'halted' if led_halt else 'running'}"))
    for token_id in sorted(set(tables.tokens) | set(ledger_state.tokens)):
        table_tok, led_tok = tables.tokens.get(token_id), ledger_state.tokens.get(token_id)
        if led_tok is None:
            assert table_tok is not None
            out.append(Difference("token", token_id, f"token for {table_tok[0]} as {table_tok[1]} exists but no "
                                  "ledger entry created it (forged?)"))
        elif table_tok is None:
            if not led_tok[2]:
                out.append(Difference("token", token_id, "the ledger created this token but the table lost it"))
        elif table_tok[:2] != led_tok[:2]:
            out.append(Difference("token", token_id, f"the table says {table_tok[0]} as {table_tok[1]}, the ledger "
                                  f"says {led_tok[0]} as {led_tok[1]}"))
        elif led_tok[2] and not table_tok[2]:
            out.append(Difference("token", token_id, "the ledger revoked this token but the table accepts it"))
    out += _compare_policies(ledger_state, tables)
    return out


def _document_problem(document: Any, digest: str) -> str | None:
    try:
        found = policy_hash(WorldPolicy.model_validate(document))
    except ValueError as exc:  # pydantic's ValidationError and PolicyProblem
        return f"its stored document is not a policy this qmtl reads ({str(exc).splitlines()[0]})"
    return None if found == digest else f"its stored document hashes to {found[:12]}, not {digest[:12]} (edited)"


def _compare_policies(ledger_state: LedgerState, tables: TableState) -> list[Difference]:
    out: list[Difference] = []
    for key in sorted(set(tables.policies) | set(ledger_state.policies)):
        label = f"{key[0]}/v{key[1]}"
        table, led = tables.policies.get(key), ledger_state.policies.get(key)
        if led is None:
            assert table is not None
            out.append(Difference("policy", label, f"policy version {key[1]} ({table[1]}) is in the store but no "
                                  "ledger entry records it (written behind qmtl's back)"))
        elif table is None:
            out.append(Difference("policy", label, f"the ledger records policy version {key[1]} ({led[1]}) but "
                                  "the store has no row for it (deleted?)"))
        elif table[0] != led[0]:
            out.append(Difference("policy", label, f"the store says content {table[0][:12]}, the ledger says "
                                  f"{led[0][:12]}"))
        elif table[1] != led[1]:
            out.append(Difference("policy", label, f"the store says {table[1]}, the ledger says {led[1]}"))
        else:
            problem = _document_problem(table[2], table[0])
            if problem is not None:
                out.append(Difference("policy", label, problem))
    for key in sorted(set(tables.policy_approvals) | set(ledger_state.policy_approvals)):
        label = f"{key[0]}/v{key[1]}/{key[2]}"
        table_hash, led_hash = tables.policy_approvals.get(key), ledger_state.policy_approvals.get(key)
        if led_hash is None:
            out.append(Difference("policy_approval", label, f"the store has {key[2]}'s approval of policy version "
                                  f"{key[1]} but no ledger entry records it (forged?)"))
        elif table_hash is None:
            out.append(Difference("policy_approval", label, "the ledger records this approval but the store has no "
                                  "row for it (deleted?)"))
        elif table_hash != led_hash:
            out.append(Difference("policy_approval", label, f"the store says content {table_hash[:12]}, the ledger "
                                  f"says {led_hash[:12]}"))
    return out


def vouched_policies(ledger_state: LedgerState, tables: TableState) -> dict[tuple[str, int], WorldPolicy]:
    """The recorded policy versions whose stored document is the one the ledger recorded."""
    out: dict[tuple[str, int], WorldPolicy] = {}
    for key, (digest, _, document) in tables.policies.items():
        led = ledger_state.policies.get(key)
        if led is None or led[0] != digest:
            continue
        try:
            policy = WorldPolicy.model_validate(document)
        except ValueError:
            continue
        if policy_hash(policy) == digest:
            out[key] = policy
    return out


def signature_problem_of(d: SignedDecision, policies: Mapping[tuple[str, int], WorldPolicy]) -> str | None:
    """Why approval ``d`` does not hold under the policy version in force when it was made (``None``
    when it does): a signature must verify against that version's key for the approver; none is
    needed only where that version did not require one."""
    policy = None if d.world is None or d.policy_version is None else policies.get((d.world, d.policy_version))
    if policy is None:
        if d.signature is None:
            return None  # nothing to check; a missing or forged policy version is its own difference
        if d.policy_version is None:
            return "signed, but the ledger records no policy version in force when it was made"
        return (f"signed under policy version {d.policy_version}, which the store does not hold as the ledger "
                "recorded it, so the key cannot be known")
    lp = policy.live_promotion
    if d.signature is None:
        return (f"unsigned, but policy version {d.policy_version} required signatures" if lp.require_signatures
                else None)
    key = lp.ssh_keys.get(d.approver)
    if key is None:
        return f"signed, but {d.approver} had no ssh_key in policy version {d.policy_version}"
    message = approval_message(world=str(d.world), strategy_id=str(d.strategy_id), request_id=d.request_id,
                               evidence_hash=d.evidence_hash)
    return signature_problem(key, d.signature, message)


def check_signatures(ledger_state: LedgerState, policies: Mapping[tuple[str, int], WorldPolicy]) -> list[Difference]:
    """Re-verify every approval recorded in the ledger against the policy version it was made under."""
    out: list[Difference] = []
    for _, decisions in sorted(ledger_state.approvals_by_world.items()):
        for d in decisions:
            problem = signature_problem_of(d, policies)
            if problem is not None:
                out.append(Difference("signature", f"{d.request_id}/{d.approver}", f"ledger entry {d.seq}: {problem}"))
    return out


def store_origin(conn: Connection) -> str:
    """The checkpoint origin of this store: ``qmtl/<store_id>``."""
    value = conn.execute(sa.select(schema.store_meta.c.value).where(schema.store_meta.c.key == "store_id")).scalar()
    if value is None:  # only a store whose store_meta row was deleted by hand
        raise LedgerStateMismatch("the store has no identity (store_meta.store_id is missing)",
                                  hint="restore the store from a backup")
    return f"qmtl/{value}"


@dataclass
class AuditResult:
    """``qmtl audit verify``: the chain walk, each checkpoint's fate and, with ``--deep``, every
    difference between the ledger and the tables."""

    chain: VerifyResult
    origin: str
    deep: bool = False
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether everything checked holds."""
        return self.chain.ok and self.chain.anchors_ok and not self.differences

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``qmtl audit verify --json``."""
        return {**self.chain.to_dict(), "ok": self.ok, "origin": self.origin, "deep": self.deep,
                **({"differences": [d.to_dict() for d in self.differences]} if self.deep else {})}

    def raise_for_problems(self) -> None:
        """Raise the error of the first kind of problem found (all exit 4); the rest go in ``details``."""
        chain = self.chain
        if not chain.ok:
            raise LedgerBroken(f"ledger broken at entry {chain.first_broken_seq}: {chain.problem}",
                               hint="restore the store from a backup; the entries from there on cannot be trusted",
                               details=self.to_dict())
        failed = [a for a in chain.anchors if not a["ok"]]
        if failed:
            first = failed[0]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise CheckpointMismatch(f"checkpoint {first['checkpoint']}: {first['problem']}{more}",
                                     hint="the ledger was rewritten or truncated after that checkpoint; restore "
                                          "the store from a backup that contains it", details=self.to_dict())
        if self.differences:
            first_diff = self.differences[0]
            more = f" (and {len(self.differences) - 1} more)" if len(self.differences) > 1 else ""
            raise LedgerStateMismatch(f"{first_diff.line()}{more}",
                                      hint="the tables were changed behind qmtl's back; --json lists every "
                                           "difference", details=self.to_dict())


def verify_store(conn: Connection, *, checkpoints: Sequence[tuple[str, Checkpoint]] = (),
                 deep: bool = False) -> AuditResult:
    """Walk the chain once, checking each checkpoint and (``deep``) replaying the decision tables."""
    origin = store_origin(conn)
    anchors: dict[str, tuple[int, str]] = {}
    foreign: list[dict[str, Any]] = []
    for label, cp in checkpoints:
        if cp.origin != origin:
            foreign.append({"checkpoint": label, "seq": cp.size, "hash": cp.head_hash, "ok": False,
                            "problem": f"it is for another store (origin {cp.origin}; this store is {origin})"})
        else:
            anchors[label] = (cp.size, cp.head_hash)
    state = LedgerState() if deep else None
    chain = verify(conn, anchors=anchors, visit=state, visit_kinds=LedgerState.KINDS)
    chain.anchors[:0] = foreign
    differences: list[Difference] = []
    if state is not None and chain.ok:
        tables = read_tables(conn)
        differences = compare(state, tables) + check_signatures(state, vouched_policies(state, tables))
    return AuditResult(chain, origin, deep, differences)
