"""Schema versions and the migration path, so a store made by an older qmtl opens with a newer one.

A new store gets the current schema in one ``create_all`` and is stamped with the head version.
An existing store runs each migration above its version, in order, in one transaction. To change
the schema: edit ``schema.py`` *and* append a step here that brings a store of the previous
version to the new shape; ``tests/test_store_migrations.py`` opens a frozen v1 store to prove it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core._version import __version__
from qmtl_core.errors import StoreVersionError
from qmtl_core.store import schema
from qmtl_core.timeutil import iso, utcnow

#: Any number fits, as long as every process uses the same one: it serialises migrations on PostgreSQL.
_PG_MIGRATION_LOCK = 0x716D746C  # "qmtl"


@dataclass(frozen=True)
class Migration:
    """One step from ``version - 1`` to ``version``."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial(conn: Connection) -> None:
    schema.metadata.create_all(conn)


def _api_tokens(conn: Connection) -> None:
    schema.api_tokens.create(conn, checkfirst=True)


def _run_heads(conn: Connection) -> None:
    """Create ``run_heads`` and fill it from the runs already stored (the same "latest" order)."""
    schema.run_heads.create(conn, checkfirst=True)
    er, rr, heads = schema.evaluation_runs, schema.run_revisions, schema.run_heads
    ranked = (sa.select(er.c.id.label("run_pk"), rr.c.id.label("rev_pk"),
                        sa.func.row_number().over(partition_by=(er.c.world_id, er.c.strategy_id, er.c.stage),
                                                  order_by=(er.c.updated_at.desc(), er.c.id.desc()))
                        .label("rank"))
              .join(rr, sa.and_(rr.c.run_pk == er.c.id, rr.c.revision == er.c.latest_revision))
              .subquery())
    latest = (sa.select(er.c.world_id, er.c.strategy_id, er.c.stage, er.c.id, er.c.run_id, rr.c.revision,
                        rr.c.status, rr.c.policy_version, rr.c.content_hash,
                        rr.c.window["start"].as_string(), rr.c.window["end"].as_string(),
                        sa.func.coalesce(rr.c.window["n_observations"].as_integer(), 0),
                        rr.c.metrics, rr.c.rule_results, er.c.updated_at)
              .select_from(ranked)
              .join(er, er.c.id == ranked.c.run_pk).join(rr, rr.c.id == ranked.c.rev_pk)
              .where(ranked.c.rank == 1))
    conn.execute(heads.insert().from_select(
        ["world_id", "strategy_id", "stage", "run_pk", "run_id", "revision", "status", "policy_version",
         "content_hash", "window_start", "window_end", "n_observations", "metrics", "rule_results",
         "updated_at"], latest))


def _snapshot_summaries(conn: Connection) -> None:
    """Add ``risk_snapshots.summary`` and fill it for each world's latest snapshot (the one the
    campaign reads); older ones keep none and are summarised from their document when read."""
    from qmtl_core.risk import SUMMARY_FORMAT, RiskSnapshot, summarize

    t = schema.risk_snapshots
    kind = t.c.summary.type.compile(dialect=conn.dialect)
    if "summary" not in {c["name"] for c in sa.inspect(conn).get_columns("risk_snapshots")}:
        conn.execute(sa.text(f"ALTER TABLE risk_snapshots ADD COLUMN summary {kind}"))
    ranked = sa.select(t.c.id, sa.func.row_number().over(
        partition_by=t.c.world_id, order_by=(t.c.as_of.desc(), t.c.id.desc())).label("rank")).subquery()
    latest = [r.id for r in conn.execute(sa.select(ranked.c.id).where(ranked.c.rank == 1))]
    for snapshot_id in latest:
        document = conn.execute(sa.select(t.c.document).where(t.c.id == snapshot_id)).scalar_one()
        summary = summarize(RiskSnapshot.model_validate(document))
        assert summary["format"] == SUMMARY_FORMAT
        conn.execute(sa.update(t).where(t.c.id == snapshot_id).values(summary=summary))


def _audit_anchors(conn: Connection) -> None:
    """The store's identity, approvals tied to their ledger entries, the notification outbox and,
    on PostgreSQL, the trigger that keeps the ledger append-only."""
    schema.store_meta.create(conn, checkfirst=True)  # stamps a new store_id
    schema.notification_outbox.create(conn, checkfirst=True)
    if "ledger_seq" not in {c["name"] for c in sa.inspect(conn).get_columns("approvals")}:
        kind = schema.approvals.c.ledger_seq.type.compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE approvals ADD COLUMN ledger_seq {kind}"))
    # Tie each existing decision to the newest ledger entry that records it; a row no entry records
    # stays untied and stops counting, which is the point.
    led, a = schema.ledger, schema.approvals
    vouched: dict[tuple[str, str, str, str], int] = {}
    for row in conn.execute(sa.select(led.c.seq, led.c.actor, led.c.kind, led.c.payload)
                            .where(led.c.kind.in_(("promotion.approved", "promotion.rejected")))
                            .order_by(led.c.seq)):
        payload = row.payload or {}
        decision = "approve" if row.kind == "promotion.approved" else "reject"
        vouched[(str(payload.get("request_id")), row.actor, str(payload.get("evidence_hash")), decision)] = row.seq
    for row in conn.execute(sa.select(a.c.id, a.c.request_id, a.c.approver, a.c.evidence_hash, a.c.decision)).all():
        seq = vouched.get((row.request_id, row.approver, row.evidence_hash, row.decision))
        if seq is not None:
            conn.execute(sa.update(a).where(a.c.id == row.id).values(ledger_seq=seq))
    if conn.dialect.name == "postgresql":
        for statement in schema.LEDGER_GUARD_DDL:
            conn.exec_driver_sql(statement)


def _policy_proposals(conn: Connection) -> None:
    """Governed policy changes: a status per recorded version (every existing one was in force when
    recorded: ``adopted``) and the approvals of proposals."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("policy_versions")}
    if "status" not in columns:
        conn.execute(sa.text("ALTER TABLE policy_versions ADD COLUMN status VARCHAR(16) NOT NULL DEFAULT 'adopted'"))
    for name in ("adopted_at", "adopted_by"):
        if name not in columns:
            kind = schema.policy_versions.c[name].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE policy_versions ADD COLUMN {name} {kind}"))
    t = schema.policy_versions
    conn.execute(sa.update(t).where(t.c.adopted_at.is_(None)).values(adopted_at=t.c.recorded_at,
                                                                       adopted_by=t.c.recorded_by))
    schema.policy_approvals.create(conn, checkfirst=True)


def _add_columns(conn: Connection, table: sa.Table, names: tuple[str, ...]) -> None:
    have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    for name in names:
        if name not in have:
            kind = table.c[name].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


def _provenance(conn: Connection) -> None:
    """Evidence provenance (DESIGN §11). Runs and snapshots stored before it get no class, which
    reads as untrusted: nothing recorded without provenance can count toward live money. A
    strategy in paper or live is taken to have entered its stage at its last update (the best the
    old store knows); snapshots get their stage from their document."""
    _add_columns(conn, schema.strategies, ("stage_entered_at", "code_binding"))
    _add_columns(conn, schema.run_revisions, ("evidence_class", "metric_classes"))
    _add_columns(conn, schema.run_heads, ("evidence_class",))
    _add_columns(conn, schema.risk_snapshots, ("stage", "evidence_class"))
    _add_columns(conn, schema.promotion_requests, ("blocked_reason", "blocked_at"))
    st, t = schema.strategies, schema.risk_snapshots
    conn.execute(sa.update(st).values(stage_entered_at=st.c.updated_at))
    for snapshot_id, document in conn.execute(sa.select(t.c.id, t.c.document)).all():
        stage = ((document or {}).get("provenance") or {}).get("stage")
        conn.execute(sa.update(t).where(t.c.id == snapshot_id).values(stage=stage))
    next(i for i in t.indexes if i.name == "ix_risk_snapshots_world_stage_asof").create(conn, checkfirst=True)


def _ledger_canonical_text(conn: Connection) -> None:
    """Ledger payloads as their canonical text (``schema.CanonicalJSON``). On PostgreSQL the JSONB
    column becomes TEXT; rows written before keep JSONB's spelling, which ``ledger.verify`` checks
    by decoding and re-encoding as it always did (ALTER TABLE fires no row trigger). SQLite's column
    already holds text: new rows are simply written canonically."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("ALTER TABLE ledger ALTER COLUMN payload TYPE TEXT USING payload::text")


def _policy_hash_without_defaults(conn: Connection) -> None:
    """Policy hashes stop counting values equal to their default (``policy.policy_hash``), so a later
    field with a default no longer changes every world's hash (which made an upgraded store answer
    ``policy_version_conflict`` until each version was bumped). Each recorded version is rehashed
    from its stored document, with what is bound to the old hash (the approvals of a proposal,
    runs' ``policy_hash``), and the ledger records each change (``policy.rehashed``), so ``audit
    verify --deep`` still finds every version vouched for. A document this qmtl cannot read keeps
    its hash. Evidence hashes, approvals of promotions and checkpoints bind the policy *version*,
    not its hash, and stay valid."""
    # The ledger and the policy models import the store package, which imports this module.
    from qmtl_core import ledger
    from qmtl_core.policy import WorldPolicy, policy_hash

    pv, pa, revs = schema.policy_versions, schema.policy_approvals, schema.run_revisions
    now = utcnow()
    renamed: dict[str, str] = {}
    for row in conn.execute(sa.select(pv.c.id, pv.c.world_id, pv.c.policy_version, pv.c.content_hash, pv.c.document)
                            .order_by(pv.c.id)).all():
        try:
            new = policy_hash(WorldPolicy.model_validate(row.document))
        except ValueError:  # pydantic's ValidationError and PolicyProblem are ValueErrors
            continue
        if new == row.content_hash:
            continue
        conn.execute(sa.update(pv).where(pv.c.id == row.id).values(content_hash=new))
        conn.execute(sa.update(pa).where(pa.c.world_id == row.world_id, pa.c.policy_version == row.policy_version,
                                         pa.c.content_hash == row.content_hash).values(content_hash=new))
        renamed[row.content_hash] = new
        ledger.append(conn, actor="qmtl", kind="policy.rehashed", now=now, world=row.world_id,
                      subject=f"policy_version {row.policy_version}",
                      reason="schema v9: a policy's hash no longer counts values equal to their default",
                      payload={"policy_version": row.policy_version, "content_hash": new,
                               "previous_hash": row.content_hash})
    if renamed:  # one pass over the revisions, which have no index on it
        conn.execute(sa.update(revs).where(revs.c.policy_hash.in_(list(renamed)))
                     .values(policy_hash=sa.case(renamed, value=revs.c.policy_hash)))


MIGRATIONS: list[Migration] = [
    Migration(1, "initial schema", _initial),
    Migration(2, "api tokens for qmtl serve", _api_tokens),
    Migration(3, "run heads: the latest run per strategy and stage", _run_heads),
    Migration(4, "risk snapshot summaries for the campaign tick", _snapshot_summaries),
    Migration(5, "audit anchors: store id, approvals tied to the ledger, outbox, append-only ledger",
              _audit_anchors),
    Migration(6, "governed policy changes: proposals and their approvals", _policy_proposals),
    Migration(7, "evidence provenance: run and snapshot classes, stage entry, code binding", _provenance),
    Migration(8, "ledger payloads stored as their canonical JSON text", _ledger_canonical_text),
    Migration(9, "policy hashes ignore values equal to their default", _policy_hash_without_defaults),
]


def head_version() -> int:
    """The schema version this qmtl writes."""
    return MIGRATIONS[-1].version


def current_version(conn: Connection) -> int | None:
    """The store's schema version, or ``None`` for an empty database."""
    if not sa.inspect(conn).has_table("schema_version"):
        return None
    value = conn.execute(sa.select(sa.func.max(schema.schema_version.c.version))).scalar()
    return int(value) if value is not None else None


def migrate(conn: Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Bring the store to the head version inside the caller's write transaction.

    Returns the versions applied (empty when the store was current). A store newer than this
    qmtl is refused rather than half-understood.
    """
    steps = MIGRATIONS if migrations is None else migrations
    head = steps[-1].version
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    version = current_version(conn)
    if version is not None and version > head:
        raise StoreVersionError(
            f"the store has schema version {version}, newer than this qmtl understands ({head})",
            hint="upgrade qmtl, or point QMTL_HOME/QMTL_DATABASE_URL at another store")
    if version == head:
        return []
    if version is None:
        # A new store gets today's schema directly; every step is stamped as applied.
        schema.metadata.create_all(conn)
        pending = list(steps)
    else:
        pending = [m for m in steps if m.version > version]
        for step in pending:
            step.apply(conn)
    now = iso(utcnow())
    for step in pending:
        conn.execute(sa.insert(schema.schema_version).values(
            version=step.version, description=step.description, applied_at=now,
            qmtl_version=__version__))
    return [m.version for m in pending]
