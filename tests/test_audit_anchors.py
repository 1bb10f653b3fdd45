"""The four tamperings of issue 15 on both backends and through the HTTP API: a rewritten or
truncated chain is caught by a signed checkpoint taken before; a forged approvals row or an
activation written behind qmtl's back is caught by ``audit verify --deep`` (and the forged row never
counts). Plus the checkpoint format itself and PostgreSQL's append-only trigger."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from qmtl_core import checkpoint, ledger
from qmtl_core.errors import CheckpointError, CheckpointUnsigned, ConfigError
from qmtl_core.store import open_store, schema
from qmtl_core.timeutil import iso
from tests import _remote
from tests._service import Clock, make_service
from tests._tamper import as_owner
from tests.cli_helpers import qmtl
from tests.test_governance import Setup, policy_text


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    key = tmp_path / "keys" / "ck.key"
    made = qmtl("audit", "keygen", "--out", str(key), "--name", "ops-test", "--json")
    assert made.exit_code == 0 and made.json()["verifier"].startswith("ops-test+")
    assert key.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("QMTL_CHECKPOINT_KEY", str(key))
    monkeypatch.setenv("QMTL_CHECKPOINT_VERIFIER", str(key) + ".pub")
    return key


@pytest.fixture
def live_world(qmtl_env: dict[str, str], worlds_dir: Path, tmp_path: Path, cli_mode: str,
               monkeypatch: pytest.MonkeyPatch) -> str:
    """World ``gov`` with strategy ``a`` live after alice's and bob's approvals, and ``b`` on paper."""
    monkeypatch.setattr(_remote, "LEDGER_TOKENS", True)
    (worlds_dir / "gov.yaml").write_text(policy_text())
    svc = make_service(qmtl_env["QMTL_DATABASE_URL"], worlds_dir, tmp_path / "h",
                       Clock(datetime.now(timezone.utc))).as_actor("cron")
    Setup(svc).ready("a", "b")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    svc.as_actor("alice").decide_request(rid, decision="approve", reason="sharpe holds")
    assert svc.as_actor("bob").decide_request(rid, decision="approve", reason="agreed").status == "applied"
    svc.close()
    return qmtl_env["QMTL_DATABASE_URL"]


def _rehash_from(conn: sa.Connection, seq: int) -> None:
    """Recompute every hash from ``seq`` on and the head row: what an attacker does after an edit."""
    t = schema.ledger
    prev = conn.execute(sa.select(t.c.hash).where(t.c.seq == seq - 1)).scalar() or ledger.GENESIS_HASH
    for row in conn.execute(sa.select(t).where(t.c.seq >= seq).order_by(t.c.seq)).all():
        entry = ledger._row_to_entry(row)
        digest = ledger.entry_hash(prev, entry.body())
        conn.execute(sa.update(t).where(t.c.seq == row.seq).values(prev_hash=prev, hash=digest))
        prev = digest
    last = conn.execute(sa.select(sa.func.max(t.c.seq))).scalar() or 0
    conn.execute(sa.update(schema.ledger_head).values(seq=last, hash=prev))


def _checkpoint(path: Path) -> Path:
    ran = qmtl("audit", "checkpoint", "--out", str(path), "--json")
    assert ran.exit_code == 0, ran.stderr
    assert ran.json()["seq"] > 0 and path.read_text().startswith(ran.json()["origin"] + "\n")
    return path


@pytest.mark.usefixtures("keys")
def test_rewritten_chain_is_caught_by_an_earlier_checkpoint(live_world: str, tmp_path: Path) -> None:
    cp = _checkpoint(tmp_path / "before.checkpoint")
    assert qmtl("audit", "verify", "--checkpoint", str(cp)).exit_code == 0
    store = open_store(live_world)
    with as_owner(store) as conn:  # change who approved, then recompute every hash and the head
        t = schema.ledger
        seq = conn.execute(sa.select(t.c.seq).where(t.c.kind == "promotion.approved", t.c.actor == "alice")).scalar()
        conn.execute(sa.update(t).where(t.c.seq == seq).values(actor="mallory"))
        _rehash_from(conn, seq)
    store.dispose()
    assert qmtl("audit", "verify").exit_code == 0  # the chain alone cannot tell
    caught = qmtl("audit", "verify", "--checkpoint", str(cp), "--json")
    assert caught.exit_code == 4 and caught.json()["error"] == "checkpoint_mismatch"
    assert str(cp) in caught.stderr and "rewritten" in caught.stderr and caught.stderr.count("\n") == 1


@pytest.mark.usefixtures("keys")
def test_truncated_chain_is_caught_by_an_earlier_checkpoint(live_world: str, tmp_path: Path) -> None:
    cp = _checkpoint(tmp_path / "before.checkpoint")
    store = open_store(live_world)
    with as_owner(store) as conn:  # drop promotion.applied and everything after, move the head back
        t = schema.ledger
        applied = conn.execute(sa.select(t.c.seq).where(t.c.kind == "promotion.applied")).scalar()
        conn.execute(sa.delete(t).where(t.c.seq >= applied))
        _rehash_from(conn, applied)
    store.dispose()
    assert qmtl("audit", "verify").exit_code == 0
    caught = qmtl("audit", "verify", "-c", str(cp))
    assert caught.exit_code == 4 and str(cp) in caught.stderr and "truncated" in caught.stderr


@pytest.mark.usefixtures("keys")
def test_checkpoint_from_another_store_or_key_does_not_vouch(live_world: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cp = _checkpoint(tmp_path / "mine.checkpoint")
    text = cp.read_text()
    forged = tmp_path / "forged.checkpoint"
    forged.write_text(text.replace("\n", "\n", 1).replace(text.split("\n")[1], "999", 1))
    bad_sig = qmtl("audit", "verify", "-c", str(forged), "--json")
    assert bad_sig.exit_code == 4 and bad_sig.json()["error"] == "checkpoint_unsigned"
    other = tmp_path / "other.checkpoint"
    signer = checkpoint.load_signer(Path(str(tmp_path / "keys" / "ck.key")))
    head = checkpoint.parse(text, where="x")[0]
    other.write_text(checkpoint.sign(checkpoint.Checkpoint("qmtl/elsewhere", head.size, head.head_hash), signer))
    foreign = qmtl("audit", "verify", "-c", str(other))
    assert foreign.exit_code == 4 and "another store" in foreign.stderr
    monkeypatch.delenv("QMTL_CHECKPOINT_VERIFIER")
    unset = qmtl("audit", "verify", "-c", str(cp))
    assert unset.exit_code == 2 and "checkpoint_verifier" in unset.stderr
    stranger = checkpoint.generate("ops-test")  # same name, other key
    stranger_pub = stranger.verifier().encode()
    assert qmtl("audit", "verify", "-c", str(cp), "--verifier", stranger_pub).exit_code == 4


def test_forged_approvals_row_does_not_count_and_deep_names_it(qmtl_env: dict[str, str], worlds_dir: Path,
                                                               tmp_path: Path, cli_mode: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_remote, "LEDGER_TOKENS", True)
    (worlds_dir / "gov.yaml").write_text(policy_text())
    url = qmtl_env["QMTL_DATABASE_URL"]
    svc = make_service(url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("cron")
    Setup(svc).ready("a")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    evidence = svc.promotion_requests(world="gov")[0]["evidence_hash"]
    with svc.store.write() as conn:  # bob "approved", says the table; no ledger entry says so
        real = conn.execute(sa.select(sa.func.max(schema.ledger.c.seq))).scalar()
        conn.execute(sa.insert(schema.approvals).values(
            request_id=rid, approver="bob", decision="approve", reason="forged", evidence_hash=evidence,
            created_at=iso(svc.clock()), ledger_seq=real))
    assert qmtl("audit", "verify", "--deep").exit_code == 4
    out = svc.as_actor("alice").decide_request(rid, decision="approve", reason="real one")
    assert out.status == "pending" and out.gate is not None and out.gate.valid_approvals == ("alice",)
    assert svc.activations("gov")["activations"] == [] or all(
        a["stage"] != "live" for a in svc.activations("gov")["activations"])
    assert [e.actor for e in svc.audit_log(kind="promotion.approved")] == ["alice"]
    svc.close()
    deep = qmtl("audit", "verify", "--deep", "--json")
    assert deep.exit_code == 4 and deep.json()["error"] == "ledger_state_mismatch"
    diffs = deep.json()["details"]["differences"]
    assert [(d["kind"], d["key"]) for d in diffs] == [("approval", f"{rid}/bob")]
    assert "no ledger entry" in diffs[0]["problem"]
    assert qmtl("audit", "verify").exit_code == 0  # the chain itself is intact


def test_forged_policy_approval_row_adopts_nothing_and_deep_names_it(live_world: str, worlds_dir: Path,
                                                                     tmp_path: Path) -> None:
    """The same forgery against a governed policy change: a policy_approvals row by bob, then alice's
    real approval, must not bring a weaker policy into force."""
    path = worlds_dir / "gov.yaml"
    path.write_text(policy_text(version=2).replace("max_live_slots: 2", "max_live_slots: 9"))
    svc = make_service(live_world, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("carol")
    [proposal] = svc.policy_status("gov")["proposals"] if svc.load_world("gov").proposal else []
    with svc.store.write() as conn:
        conn.execute(sa.insert(schema.policy_approvals).values(
            world_id="gov", policy_version=2, approver="bob", reason="forged", content_hash=proposal["content_hash"],
            created_at=iso(svc.clock())))
    done = svc.as_actor("alice").approve_policy("gov", version=2, reason="real one")
    assert done["adopted"] is False and done["approvals"] == ["alice"]
    assert svc.load_world("gov").policy.policy_version == 1
    deep = qmtl("audit", "verify", "--deep", "--json")
    assert deep.exit_code == 4
    assert [(d["kind"], d["key"]) for d in deep.json()["details"]["differences"]] == [("policy_approval", "gov/v2/bob")]
    svc.close()


def test_activation_written_behind_qmtls_back_is_named_by_deep(live_world: str) -> None:
    assert qmtl("audit", "verify", "--deep").exit_code == 0
    store = open_store(live_world)
    with store.write() as conn:  # make b live: a new activation set, the stage, no ledger entry
        sets, acts = schema.activation_sets, schema.activations
        version = conn.execute(sa.select(sa.func.max(sets.c.set_version)).where(sets.c.world_id == "gov")).scalar()
        conn.execute(sa.insert(sets).values(world_id="gov", set_version=version + 1, created_at=iso(datetime.now(timezone.utc)),
                                            created_by="mallory", reason="x", etag="e" * 64))
        rows = conn.execute(sa.select(acts).where(acts.c.world_id == "gov", acts.c.set_version == version)).all()
        for r in rows:
            if r.strategy_id != "b":
                conn.execute(sa.insert(acts).values({**r._mapping, "set_version": version + 1}))
        conn.execute(sa.insert(acts).values(world_id="gov", set_version=version + 1, strategy_id="b", stage="live",
                                            weight=1.0, run_id=None, etag="f" * 64,
                                            activated_at=iso(datetime.now(timezone.utc))))
        conn.execute(sa.update(schema.strategies).where(schema.strategies.c.strategy_id == "b").values(stage="live"))
        conn.execute(sa.update(schema.worlds).where(schema.worlds.c.world_id == "gov").values(halted=True))
    store.dispose()
    assert qmtl("audit", "verify").exit_code == 0
    deep = qmtl("audit", "verify", "--deep", "--json")
    assert deep.exit_code == 4
    kinds = {(d["kind"], d["key"]) for d in deep.json()["details"]["differences"]}
    assert kinds == {("activation_set", f"gov/{version + 1}"), ("stage", "gov/b"), ("halt", "gov")}
    human = qmtl("audit", "verify", "--deep")
    assert "activation_set gov/" in human.stderr and "(and 2 more)" in human.stderr


@pytest.mark.postgres
def test_postgresql_ledger_refuses_update_and_delete(pg_cluster) -> None:  # type: ignore[no-untyped-def]
    url = pg_cluster.new_database()
    store = open_store(url)
    with store.write() as conn:
        ledger.append(conn, actor="alice", kind="test.k", now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    for statement in (sa.update(schema.ledger).values(actor="mallory"), sa.delete(schema.ledger),
                      sa.text("TRUNCATE ledger")):
        with pytest.raises(sa.exc.ProgrammingError, match="append-only"):
            with store.write() as conn:
                conn.execute(statement)
    with store.read() as conn:
        assert [e.actor for e in ledger.entries(conn)] == ["alice"]
    store.dispose()


# --- the checkpoint format (C2SP signed note) ------------------------------------------------------------
def test_checkpoint_note_round_trip_and_key_files(tmp_path: Path) -> None:
    pub_path, verifier = checkpoint.write_keypair(tmp_path / "k", "acme-qmtl")
    signer = checkpoint.load_signer(tmp_path / "k")
    assert checkpoint.load_verifier(str(pub_path)) == verifier == checkpoint.load_verifier(verifier.encode())
    cp = checkpoint.Checkpoint("qmtl/abc", 42, "ab" * 32)
    note = checkpoint.sign(cp, signer)
    lines = note.split("\n")
    assert lines[:4] == ["qmtl/abc", "42", "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=", ""]
    assert lines[4].startswith("\u2014 acme-qmtl ") and note.endswith("\n")
    assert checkpoint.verify_note(note, verifier, where="n") == cp
    with pytest.raises(ConfigError, match="already exists"):
        checkpoint.write_keypair(tmp_path / "k", "acme-qmtl")
    with pytest.raises(CheckpointUnsigned):
        checkpoint.verify_note(note.replace("\n42\n", "\n43\n"), verifier, where="n")
    for broken, where in [(note.replace("\n\n", "\n"), "no blank line"), (note.replace("\n42\n", "\n-1\n"), "tree size"),
                          (note.replace("q6ur", "!!", 1), "not base64"), (note.split("\n\n")[0] + "\n\n", "no signature")]:
        with pytest.raises(CheckpointError, match=where):
            checkpoint.verify_note(broken, verifier, where="n")
    with pytest.raises(ConfigError, match="not a private"):
        checkpoint.decode_signer(verifier.encode() + "+x+y")


@pytest.mark.usefixtures("keys")
def test_loop_and_serve_publish_checkpoints_append_only(live_world: str, tmp_path: Path, cli_mode: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    witness = tmp_path / "witness"
    monkeypatch.setenv("QMTL_CHECKPOINT_DIR", str(witness))
    ran = qmtl("world", "campaign-loop", "--world", "gov", "--once", "--execute", "--json")
    assert ran.exit_code in (0, 10, 11), ran.stderr  # cooldown blocks b: the loop still ran
    published = Path(ran.json()["checkpoint"])
    files = sorted(witness.glob("*.checkpoint"))
    assert files and published in files
    seq = int(published.stem.rsplit("-", 1)[1])
    executed = qmtl("audit", "log", "--kind", "campaign.*", "--json").json()["entries"]
    assert executed and seq >= executed[-1]["seq"]  # taken after the loop's last change
    assert qmtl("audit", "verify", *[a for f in files for a in ("-c", str(f))]).exit_code == 0
    before = {f: f.read_text() for f in files}
    assert qmtl("world", "halt", "gov", "--reason", "drill").exit_code == 0
    halted = qmtl("audit", "log", "--kind", "world.halted", "--json").json()["entries"][-1]["seq"]
    after = sorted(witness.glob("*.checkpoint"))
    assert all(f.read_text() == before[f] for f in files)  # never rewritten
    published_after = {int(f.stem.rsplit("-", 1)[1]) for f in after}
    # qmtl serve publishes after each change; a local CLI command leaves it to the loop (or cron)
    assert (halted in published_after) == (cli_mode == "remote")


def test_loop_refuses_to_start_with_a_checkpoint_dir_but_no_key(live_world: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMTL_CHECKPOINT_DIR", str(tmp_path / "witness"))
    ran = qmtl("world", "campaign-loop", "--world", "gov", "--once", "--execute")
    assert ran.exit_code == 2 and "checkpoint key" in ran.stderr


def test_migration_5_ties_existing_approvals_to_their_ledger_entries(tmp_path: Path) -> None:
    """An old store's approvals keep counting only where a ledger entry records them."""
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript((Path(__file__).parent / "fixtures" / "store_v1.sqlite.sql").read_text())
    ts = "2026-01-01T00:00:00.000000Z"
    con.execute("INSERT INTO promotion_requests VALUES ('pr-1','gov','a','e1','{}','carol',NULL,'pending',?,NULL)", (ts,))
    con.execute("INSERT INTO approvals VALUES (1,'pr-1','alice','approve','ok','e1',?)", (ts,))
    con.execute("INSERT INTO approvals VALUES (2,'pr-1','bob','approve','forged','e1',?)", (ts,))
    con.execute("INSERT INTO ledger VALUES (7,?,'alice','gov','promotion.approved','a','ok',?,?,?)",
                (ts, '{"request_id": "pr-1", "evidence_hash": "e1"}', "0" * 64, "1" * 64))
    con.commit()
    con.close()
    store = open_store(f"sqlite:///{path}")
    with store.read() as conn:
        tied = dict(conn.execute(sa.select(schema.approvals.c.approver, schema.approvals.c.ledger_seq)).all())
        store_id = conn.execute(sa.select(schema.store_meta.c.value)).scalar_one()
        assert sa.inspect(conn).has_table("notification_outbox")
    assert tied == {"alice": 7, "bob": None} and len(store_id) == 32
    store.dispose()
