"""``qmtl audit verify --deep``: rebuild from the ledger alone what the decision tables hold, and
name every difference.

The tables that decide (approvals, activation sets, strategy stages, halts, API tokens) are
overwritten in place, so a write behind qmtl's back leaves no trace in them; every legitimate change
also appends a ledger entry carrying its result. Replaying those entries gives what the tables must
hold. ``LedgerState`` is that replay (a pure fold over entries, fed by ``ledger.verify`` in its one
pass over the chain), ``read_tables`` reads the tables, and ``compare`` lists the differences.
Signatures on approvals are re-verified against the approvers' keys in the world's policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core.checkpoint import Checkpoint
from qmtl_core.errors import CheckpointMismatch, LedgerBroken, LedgerStateMismatch
from qmtl_core.ledger import LedgerEntry, VerifyResult, verify
from qmtl_core.store import schema

#: Ledger kinds whose payload carries a whole activation set (``governance._activations.write_set``).
SET_KINDS = frozenset({"promotion.applied", "strategy.promoted", "strategy.demoted", "world.rollback"})
DECISION_KINDS = {"promotion.approved": "approve", "promotion.rejected": "reject"}

ActivationRow = tuple[str, float, "str | None", str]  # stage, weight, run_id, etag


@dataclass(frozen=True)
class Difference:
    """One thing a table holds that the ledger does not vouch for, or the other way round."""

    kind: str  # approval | activation_set | stage | halt | token | signature
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


@dataclass
class LedgerState:
    """What the decision tables must hold, according to the ledger."""

    approvals: dict[tuple[str, str, str], tuple[str, int]] = field(default_factory=dict)
    sets: dict[tuple[str, int], tuple[str | None, dict[str, ActivationRow]]] = field(default_factory=dict)
    stages: dict[tuple[str, str], str] = field(default_factory=dict)
    halted: dict[str, bool] = field(default_factory=dict)
    tokens: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    approvals_by_world: dict[str, list[SignedDecision]] = field(default_factory=dict)

    #: The kinds the fold reads; the walk decodes no other payload.
    KINDS = frozenset(DECISION_KINDS) | SET_KINDS | {"world.halted", "world.resumed", "token.created",
                                                      "token.revoked"}

    def __call__(self, entry: LedgerEntry) -> None:
        """Fold one verified entry in (``ledger.verify``'s ``visit``)."""
        kind, payload = entry.kind, entry.payload or {}
        if kind in DECISION_KINDS:
            key = (str(payload.get("request_id")), entry.actor, str(payload.get("evidence_hash")))
            self.approvals[key] = (DECISION_KINDS[kind], entry.seq)
            if kind == "promotion.approved" and entry.world is not None:
                self.approvals_by_world.setdefault(entry.world, []).append(SignedDecision(
                    entry.seq, entry.world, entry.actor, key[0], entry.subject, key[2], payload.get("signature")))
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


@dataclass
class TableState:
    """What the decision tables hold."""

    approvals: dict[tuple[str, str, str], tuple[str, int | None]]
    sets: dict[tuple[str, int], tuple[str, dict[str, ActivationRow]]]
    stages: dict[tuple[str, str], str]
    halted: dict[str, bool]
    tokens: dict[str, tuple[str, str, bool]]


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
    return TableState(approvals, set_rows, stages, halted, tokens)


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
    return out


#: ``(decision) -> why its signature does not hold, or None`` (``WorldService`` builds it from the policies).
SignatureCheck = Callable[[SignedDecision], "str | None"]


def check_signatures(ledger_state: LedgerState, check: SignatureCheck) -> list[Difference]:
    """Re-verify every approval recorded in the ledger."""
    out: list[Difference] = []
    for _, decisions in sorted(ledger_state.approvals_by_world.items()):
        for d in decisions:
            problem = check(d)
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


def verify_store(conn: Connection, *, checkpoints: Sequence[tuple[str, Checkpoint]] = (), deep: bool = False,
                 check: SignatureCheck | None = None) -> AuditResult:
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
        differences = compare(state, read_tables(conn))
        if check is not None:
            differences += check_signatures(state, check)
    return AuditResult(chain, origin, deep, differences)
