"""The store's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Times are stored as fixed-width ISO-8601 UTC strings (``2026-01-31T00:00:00.000000Z``): they sort
as text, compare the same on both backends and never lose their time zone. Documents are JSON.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from qmtl_core.canonical import canonical_json, exact_json_loads

metadata = sa.MetaData()


class _JSONDoc(sa.types.TypeDecorator[Any]):
    """JSON, stored as JSONB on PostgreSQL.

    The JSONB type is looked up from the dialect in use, so a SQLite process never imports
    SQLAlchemy's PostgreSQL dialect (a sixth of a CLI read's start-up)."""

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB  # already loaded: the dialect in use

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(sa.JSON())


Time = sa.String(32)
JSONDoc = _JSONDoc()
Hash = sa.String(64)


class CanonicalJSON(sa.types.TypeDecorator[Any]):
    """A JSON document stored as its canonical text (``canonical_json``), byte for byte, on both
    backends (schema v8; PostgreSQL's JSONB would re-spell it).

    The ledger hashes that same text inside each entry, so ``ledger.verify`` checks the stored
    bytes without decoding and re-encoding them, and what a reader decodes is exactly what was
    hashed.
    """

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else canonical_json(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else exact_json_loads(value)

Name = sa.String(200)

#: Applied migrations, one row each; the highest ``version`` is the store's schema version.
schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", Time, nullable=False),
    sa.Column("qmtl_version", sa.String(40), nullable=False),
)

worlds = sa.Table(
    "worlds", metadata,
    sa.Column("world_id", Name, primary_key=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("halted", sa.Boolean, nullable=False, default=False),
    sa.Column("halted_reason", sa.Text),
    sa.Column("halted_by", Name),
    sa.Column("halted_at", Time),
)

#: One row per distinct policy content a world has had; (world, policy_version) never repeats.
policy_versions = sa.Table(
    "policy_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("world_id", Name, sa.ForeignKey("worlds.world_id"), nullable=False),
    sa.Column("policy_version", sa.Integer, nullable=False),
    sa.Column("content_hash", Hash, nullable=False),
    sa.Column("source_path", sa.Text, nullable=False),
    sa.Column("source_text", sa.Text, nullable=False),
    sa.Column("document", JSONDoc, nullable=False),
    sa.Column("recorded_at", Time, nullable=False),
    sa.Column("recorded_by", Name, nullable=False),
    # adopted (in force when it is the newest adopted) | proposed (awaiting approval) | superseded
    sa.Column("status", sa.String(16), nullable=False, server_default="adopted"),
    sa.Column("adopted_at", Time),
    sa.Column("adopted_by", Name),
    sa.UniqueConstraint("world_id", "policy_version", name="uq_policy_versions_world_version"),
)

#: Approvals of a proposed policy version, by approvers of the version in force; each counts once.
policy_approvals = sa.Table(
    "policy_approvals", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("world_id", Name, nullable=False),
    sa.Column("policy_version", sa.Integer, nullable=False),
    sa.Column("approver", Name, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("content_hash", Hash, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.UniqueConstraint("world_id", "policy_version", "approver", name="uq_policy_approvals_once"),
)

strategies = sa.Table(
    "strategies", metadata,
    sa.Column("world_id", Name, sa.ForeignKey("worlds.world_id"), primary_key=True),
    sa.Column("strategy_id", Name, primary_key=True),
    sa.Column("name", Name),
    sa.Column("code_hash", Hash),
    sa.Column("stage", sa.String(16), nullable=False, default="backtest"),
    sa.Column("submitter", Name),
    sa.Column("submitted_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("meta", JSONDoc),
    #: Schema v6: when the strategy last entered its stage (observations before it never count),
    #: and the hash of what was submitted (code hash, parameters, data) that evidence is bound to.
    sa.Column("stage_entered_at", Time),
    sa.Column("code_binding", Hash),
)

#: An evaluation run's identity; its content lives in revisions (same key again = new revision).
evaluation_runs = sa.Table(
    "evaluation_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("world_id", Name, nullable=False),
    sa.Column("strategy_id", Name, nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("run_id", Name, nullable=False),
    sa.Column("latest_revision", sa.Integer, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.UniqueConstraint("world_id", "strategy_id", "stage", "run_id", name="uq_evaluation_runs_key"),
)

run_revisions = sa.Table(
    "run_revisions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_pk", sa.Integer, sa.ForeignKey("evaluation_runs.id"), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("policy_version", sa.Integer),
    sa.Column("policy_hash", Hash),
    sa.Column("metrics", JSONDoc),
    sa.Column("metric_sources", JSONDoc),
    sa.Column("rule_results", JSONDoc),
    sa.Column("window", JSONDoc),
    sa.Column("returns", JSONDoc),
    sa.Column("reason", sa.Text),
    sa.Column("content_hash", Hash, nullable=False),
    sa.Column("recorded_at", Time, nullable=False),
    sa.Column("recorded_by", Name, nullable=False),
    #: Schema v6: the provenance class of the run's evidence (``qmtl_core.evidence_class``) and of
    #: each metric; NULL (a store older than v5) reads as untrusted.
    sa.Column("evidence_class", sa.String(16)),
    sa.Column("metric_classes", JSONDoc),
    sa.UniqueConstraint("run_pk", "revision", name="uq_run_revisions_revision"),
)

#: The latest revision of each strategy's latest run per stage (schema v3), kept by ``record_run``
#: in the same transaction: what the campaign tick and the promotion gate read, one slim row per
#: (strategy, stage), so their cost does not grow with past runs or the returns stored per revision.
run_heads = sa.Table(
    "run_heads", metadata,
    sa.Column("world_id", Name, primary_key=True),
    sa.Column("strategy_id", Name, primary_key=True),
    sa.Column("stage", sa.String(16), primary_key=True),
    sa.Column("run_pk", sa.Integer, sa.ForeignKey("evaluation_runs.id"), nullable=False),
    sa.Column("run_id", Name, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("policy_version", sa.Integer),
    sa.Column("content_hash", Hash, nullable=False),
    sa.Column("window_start", Time),
    sa.Column("window_end", Time),
    sa.Column("n_observations", sa.Integer, nullable=False),
    sa.Column("metrics", JSONDoc),
    sa.Column("rule_results", JSONDoc),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("evidence_class", sa.String(16)),  # schema v6, as on run_revisions
)

risk_snapshots = sa.Table(
    "risk_snapshots", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("world_id", Name, nullable=False),
    sa.Column("version", Name, nullable=False),
    sa.Column("as_of", Time, nullable=False),
    sa.Column("ttl_sec", sa.Integer, nullable=False),
    sa.Column("content_hash", Hash, nullable=False),
    sa.Column("document", JSONDoc, nullable=False),
    sa.Column("recorded_at", Time, nullable=False),
    sa.Column("recorded_by", Name, nullable=False),
    #: Schema v4: ``risk.summarize(document)``, what the campaign tick reads instead of the document.
    sa.Column("summary", JSONDoc),
    #: Schema v6: the stage of its realized returns (the latest snapshot is chosen per stage), and
    #: ``hub`` when a trusted producer posted it, else ``unverified`` (never decided on).
    sa.Column("stage", sa.String(16)),
    sa.Column("evidence_class", sa.String(16)),
    sa.UniqueConstraint("world_id", "version", name="uq_risk_snapshots_version"),
)
sa.Index("ix_risk_snapshots_world_asof", risk_snapshots.c.world_id, risk_snapshots.c.as_of)
sa.Index("ix_risk_snapshots_world_stage_asof", risk_snapshots.c.world_id, risk_snapshots.c.stage,
         risk_snapshots.c.evidence_class, risk_snapshots.c.as_of)

#: Executed campaign actions; the primary key makes "each idempotency key at most once, ever".
campaign_actions = sa.Table(
    "campaign_actions", metadata,
    sa.Column("idempotency_key", Hash, primary_key=True),
    sa.Column("world_id", Name, nullable=False),
    sa.Column("strategy_id", Name, nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("stage", sa.String(16)),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("result", JSONDoc),
    sa.Column("executed_at", Time, nullable=False),
    sa.Column("executed_by", Name, nullable=False),
)

#: One lease per world: who may run the campaign loop on it, until when.
leases = sa.Table(
    "leases", metadata,
    sa.Column("world_id", Name, primary_key=True),
    sa.Column("holder", Name, nullable=False),
    sa.Column("acquired_at", Time, nullable=False),
    sa.Column("expires_at", Time, nullable=False),
)

promotion_requests = sa.Table(
    "promotion_requests", metadata,
    sa.Column("request_id", Name, primary_key=True),
    sa.Column("world_id", Name, nullable=False),
    sa.Column("strategy_id", Name, nullable=False),
    sa.Column("evidence_hash", Hash, nullable=False),
    sa.Column("evidence", JSONDoc, nullable=False),
    sa.Column("requester", Name, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("decided_at", Time),
    #: Schema v6: the latest block the campaign loop met on this request's evidence, and when.
    sa.Column("blocked_reason", sa.Text),
    sa.Column("blocked_at", Time),
)

approvals = sa.Table(
    "approvals", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", Name, sa.ForeignKey("promotion_requests.request_id"), nullable=False),
    sa.Column("approver", Name, nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence_hash", Hash, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    #: Schema v5: the ledger entry that records this decision. Only a row whose entry exists and
    #: agrees with it counts (``governance._requests.request_view``): a row alone proves nothing.
    sa.Column("ledger_seq", sa.BigInteger().with_variant(sa.Integer, "sqlite")),
    sa.UniqueConstraint("request_id", "approver", "evidence_hash", name="uq_approvals_once"),
)

#: Versioned activation sets: every change writes a new set, so rollback restores the previous one.
activation_sets = sa.Table(
    "activation_sets", metadata,
    sa.Column("world_id", Name, primary_key=True),
    sa.Column("set_version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("created_by", Name, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("etag", Hash, nullable=False),
)

activations = sa.Table(
    "activations", metadata,
    sa.Column("world_id", Name, primary_key=True),
    sa.Column("set_version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("strategy_id", Name, primary_key=True),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("run_id", Name),
    sa.Column("etag", Hash, nullable=False),
    sa.Column("activated_at", Time, nullable=False),
    sa.ForeignKeyConstraint(["world_id", "set_version"],
                            ["activation_sets.world_id", "activation_sets.set_version"]),
)

#: Decision envelopes: the world's answer to "in which domain may this strategy execute".
decisions = sa.Table(
    "decisions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("world_id", Name, nullable=False),
    sa.Column("strategy_id", Name, nullable=False),
    sa.Column("effective_mode", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("as_of", Time, nullable=False),
    sa.Column("ttl_sec", sa.Integer, nullable=False),
    sa.Column("etag", Hash, nullable=False),
    sa.Column("policy_version", sa.Integer, nullable=False),
    sa.Column("created_at", Time, nullable=False),
)
sa.Index("ix_decisions_world_strategy", decisions.c.world_id, decisions.c.strategy_id, decisions.c.id)

#: The audit ledger: append-only, hash-chained; ``seq`` is contiguous from 1.
ledger = sa.Table(
    "ledger", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=False),
    sa.Column("ts", Time, nullable=False),
    sa.Column("actor", Name, nullable=False),
    sa.Column("world_id", Name),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("subject", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("payload", CanonicalJSON),
    sa.Column("prev_hash", Hash, nullable=False),
    sa.Column("hash", Hash, nullable=False),
)
sa.Index("ix_ledger_world_ts", ledger.c.world_id, ledger.c.ts)

#: PostgreSQL refuses UPDATE, DELETE and TRUNCATE on the ledger for every role but a superuser or
#: the table's owner disabling the trigger (schema v5). That owner can still rewrite history,
#: which is what signed checkpoints kept outside the database catch.
LEDGER_GUARD_DDL = (
    "CREATE OR REPLACE FUNCTION qmtl_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION USING MESSAGE = 'the qmtl ledger is append-only: ' || TG_OP || ' refused', "
    "ERRCODE = 'insufficient_privilege'; END $$",
    "DROP TRIGGER IF EXISTS ledger_append_only ON ledger",
    "CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger "
    "FOR EACH ROW EXECUTE FUNCTION qmtl_ledger_append_only()",
    "DROP TRIGGER IF EXISTS ledger_no_truncate ON ledger",
    "CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger "
    "FOR EACH STATEMENT EXECUTE FUNCTION qmtl_ledger_append_only()",
)
for _statement in LEDGER_GUARD_DDL:
    sa.event.listen(ledger, "after_create", sa.DDL(_statement).execute_if(dialect="postgresql"))

#: One row (id = 1) holding the chain's tail: appends serialise on it, and it exposes a deleted tail.
ledger_head = sa.Table(
    "ledger_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("hash", Hash, nullable=False),
)

#: Bearer tokens of ``qmtl serve`` (schema v2): only a hash is stored; the token is shown once.
api_tokens = sa.Table(
    "api_tokens", metadata,
    sa.Column("token_hash", Hash, primary_key=True),
    sa.Column("token_id", sa.String(32), nullable=False, unique=True),
    sa.Column("actor", Name, nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("created_by", Name, nullable=False),
    sa.Column("revoked_at", Time),
)

#: Facts about the store itself (schema v5); ``store_id`` is its identity, the origin of its checkpoints.
store_meta = sa.Table(
    "store_meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def _stamp_store_id(target: sa.Table, connection: sa.Connection, **_: object) -> None:
    import uuid

    connection.execute(target.insert().values(key="store_id", value=uuid.uuid4().hex))


sa.event.listen(store_meta, "after_create", _stamp_store_id)

#: Webhook deliveries written in the same transaction as the change they announce (schema v5), and
#: delivered after commit by whichever qmtl process runs next; ``event_id`` is the idempotency key
#: a receiver sees, so a delivery retried after a crash is recognisable as the same event.
notification_outbox = sa.Table(
    "notification_outbox", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("world_id", Name),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event", JSONDoc, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | delivered | failed
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("next_attempt_at", Time, nullable=False),
    sa.Column("claimed_until", Time),
    sa.Column("delivered_at", Time),
    sa.Column("last_error", sa.Text),
)
sa.Index("ix_outbox_status_next", notification_outbox.c.status, notification_outbox.c.next_attempt_at)
