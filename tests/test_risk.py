"""The risk signal hub: snapshot validation, dedupe vs conflict, freshness reasons, CLI put/show."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from qmtl_core.risk import (
    EXPIRED,
    INCOMPLETE,
    LAGGING,
    MISSING,
    SnapshotError,
    StoredSnapshot,
    freshness,
    parse_snapshot,
)
from qmtl_core.store import open_store, schema
from tests.cli_helpers import qmtl, qmtl_process

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
W = "demo-momentum"


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "world_id": W, "version": "v1", "as_of": "2026-03-02T11:59:00Z", "ttl_sec": 900,
        "weights": {"s1": 0.6, "s2": 0.4},
        "covariance": {"s1,s1": 0.04, "s1,s2": 0.01, "s2,s1": 0.01, "s2,s2": 0.09},
        "realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": 0.01},
                                    {"ts": "2026-03-02T00:00:00Z", "r": -0.005}]},
        "stress": {"crash_2008": -0.31}, "constraints": {"max_weight": 0.7},
        "provenance": {"actor": "risk-engine", "stage": "paper"},
    }
    doc.update(over)
    return doc


def _stored(doc: dict[str, Any], received: datetime = NOW) -> StoredSnapshot:
    snap = parse_snapshot(doc)
    return StoredSnapshot(snap, snap.content_hash, received, "tester")


def test_valid_snapshot_round_trips_and_hash_ignores_spelling() -> None:
    a = parse_snapshot(_doc())
    b = parse_snapshot(_doc(as_of="2026-03-02T12:59:00+01:00"))
    assert a.as_of == b.as_of and a.content_hash == b.content_hash
    assert a.returns_of("s1")[0][1] == 0.01 and a.covered() == {"s1", "s2"}


def test_freshness_fresh() -> None:
    f = freshness(_stored(_doc()), now=NOW, max_age=timedelta(minutes=15), strategy_id="s1")
    assert f.ok and f.reason is None and f.version == "v1"


def test_freshness_missing() -> None:
    f = freshness(None, now=NOW, max_age=timedelta(minutes=15))
    assert (f.status, f.reason) == ("missing", MISSING)


def test_freshness_expired_counts_from_receipt() -> None:
    f = freshness(_stored(_doc(), received=NOW - timedelta(seconds=901)), now=NOW,
                  max_age=timedelta(hours=1))
    assert (f.status, f.reason) == ("stale", EXPIRED)


def test_freshness_lagging_as_of() -> None:
    f = freshness(_stored(_doc(as_of="2026-03-02T11:40:00Z")), now=NOW, max_age=timedelta(minutes=15))
    assert (f.status, f.reason) == ("stale", LAGGING)


def test_freshness_incomplete_for_an_uncovered_strategy() -> None:
    f = freshness(_stored(_doc()), now=NOW, max_age=timedelta(minutes=15), strategy_id="s3")
    assert (f.status, f.reason) == ("stale", INCOMPLETE)


@pytest.mark.parametrize(("over", "fragment"), [
    ({"weights": {"s1": 0.6, "s2": 0.3}}, "weights sum to 0.9, not 1"),
    ({"as_of": "2026-03-02T11:59:00"}, "has no time zone"),
    ({"as_of": "yesterday"}, "not an ISO-8601 date or time"),
    ({"ttl_sec": 86401}, "ttl_sec"),
    ({"ttl_sec": 0}, "ttl_sec"),
    ({"covariance": {"s1,s2": 0.01, "s2,s1": 0.02}}, "not symmetric"),
    ({"covariance": {"s1,s3": 0.01}}, "names 's3', which has no weight"),
    ({"covariance": {"s1": 0.01}}, "must be 'a,b'"),
    ({"realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": float("nan")}]}}, "finite"),
    ({"realized_returns": {"s1": [{"ts": "2026-03-02T00:00:00Z", "r": 0.1},
                                  {"ts": "2026-03-01T00:00:00Z", "r": 0.1}]}}, "not after"),
    ({"weights": {"s1": float("inf")}}, "finite"),
    ({"extra_field": 1}, "extra_field"),
    ({"provenance": {"actor": "x", "stage": "prod"}}, "provenance.stage"),
    ({"covariance_ref": "s3://bucket/cov.parquet"}, "not both"),
    # Each point's problem names the point.
    ({"realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": 0.1},
                                  {"ts": "2026-03-02T00:00:00", "r": 0.1}]}},
     "realized_returns.s1.1.ts: ts '2026-03-02T00:00:00' has no time zone"),
    ({"realized_returns": {"s1": [{"ts": 1772323200, "r": 0.1}]}},
     "realized_returns.s1.0.ts: ts must be an ISO-8601 time with a time zone"),
    ({"realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": float("inf")}]}},
     "realized_returns.s1.0.r: r is inf (must be a finite number)"),
    # A simple return below -1 loses more than everything: refused, located (finding 4 of issue 19).
    ({"realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": 0.1},
                                  {"ts": "2026-03-02T00:00:00Z", "r": -2.0}]}},
     "realized_returns.s1.1.r: r is -2.0: a simple return below -1"),
    ({"realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": -3}]}}, "realized_returns.s1.0.r: r is -3"),
    ({"realized_returns": {"s1": [{"ts": "2026-03-01T00:00:00Z", "r": 0.1, "note": "x"}]}},
     "realized_returns.s1.0.note: Extra inputs are not permitted"),
    ({"realized_returns": {"s1": [{"ts": "2026-03-02T00:00:00Z", "r": 0.1},
                                  {"ts": "2026-03-01T00:00:00Z", "r": 0.1}]}},
     "snapshot: realized_returns['s1']: ts"),
])
def test_bad_snapshots_are_one_clear_line(over: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SnapshotError) as caught:
        parse_snapshot(_doc(**over))
    line = caught.value.one_line()
    assert fragment in line and "\n" not in line and caught.value.exit_code == 2


@pytest.fixture
def hub(qmtl_env: dict[str, str], tmp_path: Path) -> Path:
    """A store where demo-momentum knows s1 and s2 (each has a backtest run)."""
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"s1": {"sharpe": 1.0}, "s2": {"sharpe": 1.0}}))
    assert qmtl("world", "evaluate", W, "--record", "--metrics", str(metrics)).exit_code in (0, 10)
    return tmp_path


def _put(tmp_path: Path, doc: dict[str, Any], *args: str) -> Any:
    path = tmp_path / "snap.json"
    path.write_text(json.dumps(doc))
    return qmtl_process("risk", "put", str(path), *args)


def _count(url: str) -> int:
    store = open_store(url)
    with store.read() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(schema.risk_snapshots)).scalar()
    store.dispose()
    return int(n or 0)


@pytest.mark.usefixtures("cli_mode")
def test_put_dedupes_and_conflicts(hub: Path, qmtl_env: dict[str, str]) -> None:
    doc = _doc(as_of=datetime.now(timezone.utc).isoformat())
    first = _put(hub, doc, "--json")
    assert first.exit_code == 0 and first.json()["created"] is True
    same = _put(hub, doc)
    assert same.exit_code == 0 and "unchanged" in same.stdout
    other = _put(hub, {**doc, "weights": {"s1": 0.5, "s2": 0.5}})
    assert other.exit_code == 4 and "already exists with other content" in other.stderr
    assert _count(qmtl_env["QMTL_DATABASE_URL"]) == 1
    shown = qmtl("risk", "show", W, "--json").json()
    assert shown["version"] == "v1" and shown["freshness"]["status"] == "fresh"
    human = qmtl("risk", "show", W)
    assert human.exit_code == 0 and "fresh" in human.stdout
    log = qmtl("audit", "log", "--kind", "risk.*", "--json").json()["entries"]
    assert len(log) == 1 and log[0]["payload"]["version"] == "v1"


@pytest.mark.usefixtures("cli_mode")
def test_put_from_stdin(hub: Path) -> None:
    ran = qmtl("risk", "put", "-", input=json.dumps(_doc(as_of=datetime.now(timezone.utc).isoformat())))
    assert ran.exit_code == 0 and "stored risk snapshot" in ran.stdout


@pytest.mark.parametrize(("doc", "code", "fragment"), [
    (_doc(weights={"s1": 0.5, "zz": 0.5}, covariance=None), 2, "strategy 'zz' is not known"),
    (_doc(as_of="2026-03-02T11:59:00"), 2, "has no time zone"),
    (_doc(ttl_sec=100000), 2, "ttl_sec"),
    (_doc(weights={"s1": 0.7, "s2": 0.7}), 2, "weights sum to 1.4"),
    (_doc(world_id="nope"), 3, "world 'nope' not found"),
    # An as_of in the future would hide every correct snapshot posted after it (issue 19, finding 4).
    (_doc(as_of="2096-03-02T00:00:00Z"), 2, "snapshot v1: as_of: 2096-03-02T00:00:00Z is "),
    (_doc(realized_returns={"s1": [{"ts": "2026-03-01T00:00:00Z", "r": -2.0}]}), 2,
     "realized_returns.s1.0.r: r is -2.0"),
    (_doc(covariance=None, covariance_ref="missing.json#sha256=" + "0" * 64), 2,
     "covariance_ref: cannot read 'missing.json'"),
])
@pytest.mark.usefixtures("cli_mode")
def test_bad_snapshots_store_nothing(hub: Path, qmtl_env: dict[str, str], doc: dict[str, Any], code: int,
                                     fragment: str) -> None:
    ran = _put(hub, doc)
    assert ran.exit_code == code and fragment in ran.stderr and ran.stderr.count("\n") == 1
    assert _count(qmtl_env["QMTL_DATABASE_URL"]) == 0


@pytest.mark.usefixtures("cli_mode")
def test_bad_json_names_line(hub: Path) -> None:
    path = hub / "bad.json"
    path.write_text('{\n  "world_id": "demo-momentum",\n  oops\n}')
    ran = qmtl("risk", "put", str(path))
    assert ran.exit_code == 2 and "bad.json:3:" in ran.stderr


@pytest.mark.usefixtures("cli_mode")
def test_show_missing_is_not_found(qmtl_env: dict[str, str]) -> None:
    ran = qmtl("risk", "show", W)
    assert ran.exit_code == 3 and "no risk snapshot" in ran.stderr


# --- summaries (schema v4): what the tick reads instead of the document ------------------------------
def _summary_doc() -> dict[str, Any]:
    # Covered by weight and returns, by returns only (s3), by weight only (s2); times in two spellings.
    return _doc(weights={"s1": 0.6, "s2": 0.4},
                realized_returns={"s1": [{"ts": "2026-03-01T00:00:00.250000Z", "r": 1e-05},
                                         {"ts": "2026-03-02T09:00:00+09:00", "r": -0.005}],
                                  "s3": [{"ts": "2026-03-01T12:00:00Z", "r": 0.02}]})


@pytest.mark.parametrize("strategy_id", ["s1", "s2", "s3", "not-covered", ""])
def test_summary_reads_the_same_as_the_whole_snapshot(strategy_id: str) -> None:
    from qmtl_core.risk import SnapshotSummary, summarize

    stored = _stored(_summary_doc())
    # Through JSON, as the store keeps it.
    summary = SnapshotSummary.of(stored, json.loads(json.dumps(summarize(stored.snapshot))))
    assert summary.covered() == stored.covered() == {"s1", "s2", "s3"}
    assert summary.series(strategy_id) == stored.series(strategy_id)
    assert summary.substance_hash(strategy_id) == stored.substance_hash(strategy_id)
    assert (summary.version, summary.as_of, summary.ttl_sec, summary.stage, summary.content_hash) == (
        stored.version, stored.as_of, stored.ttl_sec, stored.stage, stored.content_hash)
    for now in (NOW, NOW + timedelta(minutes=20), NOW + timedelta(hours=1)):
        assert freshness(summary, now=now, max_age=timedelta(minutes=15), strategy_id=strategy_id) == \
            freshness(stored, now=now, max_age=timedelta(minutes=15), strategy_id=strategy_id)
    assert stored.series("s1") == (datetime(2026, 3, 2, 0, 0, tzinfo=timezone.utc), 2)


def test_substance_hash_moves_with_the_strategys_risk_content_only() -> None:
    base = _stored(_summary_doc())
    other_version = _stored({**_summary_doc(), "version": "v2", "as_of": "2026-03-02T11:59:30Z"})
    assert other_version.substance_hash("s1") == base.substance_hash("s1")  # a routine refresh
    changed = _summary_doc()
    changed["realized_returns"]["s1"][0]["r"] = 2e-05
    assert _stored(changed).substance_hash("s1") != base.substance_hash("s1")
    assert _stored(changed).substance_hash("s3") == base.substance_hash("s3")


def test_a_stored_summary_of_another_format_is_remade_from_the_document(tmp_path: Path) -> None:
    from qmtl_core.risk import latest_summary, put_snapshot, summarize

    store = open_store(f"sqlite:///{tmp_path / 'q.db'}")
    snap = parse_snapshot(_summary_doc())
    with store.write() as conn:
        put_snapshot(conn, snap, known_strategies={"s1", "s2", "s3"}, actor="t", now=NOW, evidence_class="hub")
        stored = conn.execute(sa.select(schema.risk_snapshots.c.summary)).scalar_one()
        assert stored == json.loads(json.dumps(summarize(snap)))
        wrong = {**stored, "format": 0, "strategies": {}}
        conn.execute(sa.update(schema.risk_snapshots).values(summary=wrong))
    with store.read() as conn:
        summary = latest_summary(conn, W, stage=snap.provenance.stage)
    assert summary is not None and summary.covered() == {"s1", "s2", "s3"}
    assert summary.series("s3") == (datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc), 1)
    store.dispose()


def test_snapshot_and_substance_hashes_are_those_earlier_versions_stored() -> None:
    """Pending promotion requests and approvals hold these hashes: a change voids them all."""
    stored = _stored({**_summary_doc(), "world_id": "w"})
    assert stored.content_hash == "925974bce25f19c0e9a6eb5ee8624514f4111333737955e7c6a0229b9fb10934"
    # Computed by qmtl at 15b2e3b (before return points were validated natively).
    assert [stored.substance_hash(s)[:16] for s in ("s1", "s2", "s3", "zz")] == [
        "4f932cbf8dc7cb2f", "bd178d78d9c9c1cb", "df85afe62c15b90f", "78a45c2cdc46a0c6"]


def test_times_in_any_iso_spelling_with_a_zone_are_read_as_utc() -> None:
    spellings = [" 2026-03-01T00:00:00Z", "20260301T000000Z", "2026-03-01T09:00:00+09:00", "2026-03-01T00:00:00z",
                 "2026-02-28T19:00:00-05:00"]
    for ts in spellings:
        snap = parse_snapshot(_doc(realized_returns={"s1": [{"ts": ts, "r": 0.01}]}))
        assert snap.returns_of("s1") == [(datetime(2026, 3, 1, tzinfo=timezone.utc), 0.01)], ts


def test_non_finite_stress_is_stored_as_null_and_summarised_as_stored(tmp_path: Path) -> None:
    from qmtl_core.risk import SnapshotSummary, latest_snapshot, latest_summary, put_snapshot

    store = open_store(f"sqlite:///{tmp_path / 'q.db'}")
    snap = parse_snapshot(_doc(stress={"shock": float("nan"), "ok": -0.2}))
    with store.write() as conn:
        put_snapshot(conn, snap, known_strategies={"s1", "s2"}, actor="t", now=NOW, evidence_class="hub")
    with store.read() as conn:
        stage = snap.provenance.stage
        stored, summary = latest_snapshot(conn, W, stage=stage), latest_summary(conn, W, stage=stage)
    assert stored is not None and summary is not None
    assert stored.snapshot.stress == {"shock": None, "ok": -0.2}
    assert summary == SnapshotSummary.of(stored)
    assert all(summary.substance_hash(s) == stored.substance_hash(s) for s in ("s1", "s2", "s9"))
    store.dispose()
