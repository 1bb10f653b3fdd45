"""Approvals signed with the approver's own SSH key (real ``ssh-keygen`` keys and signatures).

A signature by the wrong key, over other evidence, or by an approver not listed does not count; a
valid one does, in local and remote mode (``qmtl approve --key``); ``audit verify --deep`` catches
a signature edited in the ledger even when the chain was rehashed to hide the edit."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from qmtl_core.approval_signing import approval_message, sign
from qmtl_core.config import Settings
from qmtl_core.errors import BlockedError
from qmtl_core.policy import load_policy_text
from qmtl_core.store import open_store, schema
from tests import _remote
from tests._service import Clock, make_service
from tests._tamper import as_owner
from tests.cli_helpers import qmtl
from tests.test_audit_anchors import _rehash_from
from tests.test_governance import Setup, policy_text


def _keygen(path: Path) -> tuple[Path, str]:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path, path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def ssh_keys(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    d = tmp_path / "ssh"
    d.mkdir()
    return {who: _keygen(d / who) for who in ("alice", "me", "mallory")}


def _signed_policy(me: str, keys: dict[str, tuple[Path, str]]) -> str:
    listed = (f'    approvers: [{{name: alice, ssh_key: "{keys["alice"][1]}"}}, '
              f'{{name: "{me}", ssh_key: "{keys["me"][1]}"}}]\n    required_approvals: 2\n'
              "    require_signatures: true\n")
    return policy_text().replace("    approvers: [alice, bob, carol]\n    required_approvals: 2\n", listed)


def test_only_a_valid_signature_by_the_listed_key_counts(qmtl_env: dict[str, str], worlds_dir: Path,
                                                         tmp_path: Path, cli_mode: str,
                                                         ssh_keys: dict[str, tuple[Path, str]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_remote, "LEDGER_TOKENS", True)
    me = Settings.resolve().identity()  # the CLI's actor in both modes
    (worlds_dir / "gov.yaml").write_text(_signed_policy(me, ssh_keys))
    assert load_policy_text(_signed_policy(me, ssh_keys)).live_promotion.ssh_keys["alice"] == ssh_keys["alice"][1]
    url = qmtl_env["QMTL_DATABASE_URL"]
    svc = make_service(url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("cron")
    Setup(svc).ready("a")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    evidence = svc.promotion_requests(world="gov")[0]["evidence_hash"]
    right = approval_message(world="gov", strategy_id="a", request_id=rid, evidence_hash=evidence)
    alice = svc.as_actor("alice")

    def refused(signature: str | None, code: str, who: str = "alice") -> None:
        with pytest.raises(BlockedError) as caught:
            svc.as_actor(who).decide_request(rid, decision="approve", reason="ok", signature=signature)
        assert caught.value.code == code and caught.value.exit_code == 10

    refused(None, "signature_required")
    refused(sign(ssh_keys["mallory"][0], right), "signature_invalid")  # another key
    other = approval_message(world="gov", strategy_id="a", request_id=rid, evidence_hash="0" * 64)
    refused(sign(ssh_keys["alice"][0], other), "signature_invalid")  # other evidence
    refused(sign(ssh_keys["mallory"][0], right), "not_an_approver", who="mallory")  # not listed
    refused(sign(ssh_keys["alice"][0], right), "signature_invalid", who=me)  # alice's key is not mine
    assert svc.audit_log(kind="promotion.approved") == []  # nothing refused was recorded
    first = alice.decide_request(rid, decision="approve", reason="signed", signature=sign(ssh_keys["alice"][0], right))
    assert first.status == "pending" and first.gate is not None and first.gate.valid_approvals == ("alice",)
    entry = svc.audit_log(kind="promotion.approved")[-1]
    assert (entry.payload or {})["signature"].startswith("-----BEGIN SSH SIGNATURE-----")
    svc.close()

    unsigned = qmtl("approve", rid, "--reason", "no key")
    assert unsigned.exit_code == 10 and "--key" in unsigned.stderr
    done = qmtl("approve", rid, "--reason", "signed too", "--key", str(ssh_keys["me"][0]), "--json", "--allow-live")
    assert done.exit_code == 0 and done.json()["status"] == "applied", done.stderr
    assert qmtl("audit", "verify", "--deep").exit_code == 0

    store = open_store(url)  # swap alice's signature for mallory's over the same message, rehash
    with as_owner(store) as conn:
        t = schema.ledger
        seq, payload = conn.execute(sa.select(t.c.seq, t.c.payload).where(t.c.kind == "promotion.approved",
                                                                          t.c.actor == "alice")).one()
        conn.execute(sa.update(t).where(t.c.seq == seq).values(
            payload={**payload, "signature": sign(ssh_keys["mallory"][0], right)}))
        _rehash_from(conn, seq)
    store.dispose()
    assert qmtl("audit", "verify").exit_code == 0  # the chain was rehashed: only --deep can tell
    deep = qmtl("audit", "verify", "--deep", "--json")
    assert deep.exit_code == 4
    diffs = deep.json()["details"]["differences"]
    assert [(d["kind"], d["key"]) for d in diffs] == [("signature", f"{rid}/alice")]
    assert "another key" in diffs[0]["problem"]


def test_policy_with_required_signatures_needs_every_key(ssh_keys: dict[str, tuple[Path, str]]) -> None:
    text = _signed_policy("bob", ssh_keys).replace(f'{{name: "bob", ssh_key: "{ssh_keys["me"][1]}"}}', "bob")
    with pytest.raises(Exception, match=r"approvers\[1\].*bob.*has no ssh_key"):
        load_policy_text(text)
    bad = _signed_policy("bob", ssh_keys).replace(ssh_keys["me"][1], "ssh-ed25519 AAAAnotakey")
    with pytest.raises(Exception, match=r"ssh_key: not an OpenSSH public key"):
        load_policy_text(bad)


def test_the_gate_counts_a_stored_approval_only_with_a_valid_signature(ssh_keys: dict[str, tuple[Path, str]]) -> None:
    """Even an approval that reached the store (say, written with the ledger entry forged and the chain
    rehashed) counts at the gate only if its signature verifies for this request and evidence."""
    from dataclasses import replace
    from datetime import timedelta

    from qmtl_core.campaign import RunSummary
    from qmtl_core.governance import Approval, GateInput, RequestView, promotion_gate
    from qmtl_core.risk import StoredSnapshot, parse_snapshot

    now = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
    policy = load_policy_text(_signed_policy("bob", ssh_keys).replace("required_approvals: 2", "required_approvals: 1"))
    run = RunSummary("paper-r", 1, "pass", 1, "h", {"sharpe": 1.0}, (), now - timedelta(days=12),
                     now - timedelta(days=1), 12)
    snap = parse_snapshot({"world_id": "gov", "version": "v", "as_of": now.isoformat(), "weights": {"a": 1.0},
                           "provenance": {"actor": "r", "stage": "paper"}})
    base = GateInput(policy, "a", "paper", run, StoredSnapshot(snap, snap.content_hash, now, "r"))
    evidence = promotion_gate(base, now).evidence_hash
    msg = approval_message(world="gov", strategy_id="a", request_id="pr-1", evidence_hash=evidence)

    def gate(signature: str | None) -> tuple[str, ...]:
        request = RequestView("pr-1", "carol", evidence, now, (Approval("alice", "approve", evidence, now, "ok",
                                                                        signature),))
        return promotion_gate(replace(base, request=request), now).valid_approvals

    assert gate(sign(ssh_keys["alice"][0], msg)) == ("alice",)
    assert gate(None) == ()
    assert gate(sign(ssh_keys["mallory"][0], msg)) == ()
    other_request = approval_message(world="gov", strategy_id="a", request_id="pr-2", evidence_hash=evidence)
    assert gate(sign(ssh_keys["alice"][0], other_request)) == ()


# --- key rotation: a signature is checked against the key in force when the approval was made ----------
def _rotation_policy(keys: dict[str, tuple[Path, str]], alice_key: str, version: int) -> str:
    listed = (f'    approvers: [{{name: alice, ssh_key: "{keys[alice_key][1]}"}}, '
              f'{{name: bob, ssh_key: "{keys["bob"][1]}"}}]\n    required_approvals: 2\n'
              "    require_signatures: true\n")
    return policy_text(version=version).replace("    approvers: [alice, bob, carol]\n    required_approvals: 2\n",
                                                listed)


def _signed_approval(svc, keys: dict[str, tuple[Path, str]], rid: str, who: str, key: str):  # type: ignore[no-untyped-def]
    request = next(r for r in svc.promotion_requests(world="gov") if r["request_id"] == rid)
    message = approval_message(world="gov", strategy_id=request["strategy_id"], request_id=rid,
                               evidence_hash=request["evidence_hash"])
    return svc.as_actor(who).decide_request(rid, decision="approve", reason="signed",
                                            signature=sign(keys[key][0], message))


def _alice_approved_under_her_old_key(store_url: str, worlds_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """World ``gov`` requiring signatures of alice and bob, strategy ``a`` promoted and approved by
    alice with her first key; returns ``(service, keys, request id, policy path)``."""
    d = tmp_path / "ssh"
    d.mkdir()
    keys = {who: _keygen(d / who) for who in ("alice_old", "alice_new", "bob", "mallory")}
    path = worlds_dir / "gov.yaml"
    path.write_text(_rotation_policy(keys, "alice_old", 1))
    svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("cron")
    Setup(svc).ready("a")
    rid = svc.as_actor("carol").promote("gov", "a").request_id
    _signed_approval(svc, keys, rid, "alice", "alice_old")
    return svc, keys, rid, path


def test_rotating_a_key_through_a_governed_change_keeps_earlier_approvals_valid(
        store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    svc, keys, rid, path = _alice_approved_under_her_old_key(store_url, worlds_dir, tmp_path)
    assert _signed_approval(svc, keys, rid, "bob", "bob").status == "applied"
    assert svc.audit_verify(deep=True).ok

    # alice rotates her key; the world runs a live strategy, so the change is a proposal until the
    # approvers in force agree
    path.write_text(_rotation_policy(keys, "alice_new", 2))
    assert svc.as_actor("carol").load_world("gov").proposal is not None
    svc.as_actor("alice").approve_policy("gov", version=2, reason="my new key")
    assert svc.as_actor("bob").approve_policy("gov", version=2, reason="checked")["adopted"] is True
    assert svc.load_world("gov").policy.live_promotion.ssh_keys["alice"] == keys["alice_new"][1]
    result = svc.audit_verify(deep=True)
    assert result.ok, [d.line() for d in result.differences]  # alice's approval was made under version 1
    svc.close()

    store = open_store(store_url)
    t = schema.ledger
    with as_owner(store) as conn:  # her new key over the same approval, made under the old key; rehash
        seq, payload = conn.execute(sa.select(t.c.seq, t.c.payload).where(t.c.kind == "promotion.approved",
                                                                          t.c.actor == "alice")).one()
        request = conn.execute(sa.select(schema.promotion_requests).where(
            schema.promotion_requests.c.request_id == rid)).one()
        message = approval_message(world="gov", strategy_id="a", request_id=rid, evidence_hash=request.evidence_hash)
        conn.execute(sa.update(t).where(t.c.seq == seq).values(
            payload={**payload, "signature": sign(keys["alice_new"][0], message)}))
        _rehash_from(conn, seq)
    svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc)))
    result = svc.audit_verify(deep=True)
    assert result.chain.ok and [(d.kind, d.key) for d in result.differences] == [("signature", f"{rid}/alice")]
    assert "another key" in result.differences[0].problem
    svc.close()
    store.dispose()


def test_a_policy_version_forged_to_swap_a_key_is_caught(store_url: str, worlds_dir: Path, tmp_path: Path) -> None:
    """Whoever can write the store could swap an approver's key in a recorded version (to make their
    own signature verify) or slip in a version of their own; the ledger recorded each version's hash."""
    from qmtl_core.policy import load_policy_text, policy_hash

    svc, keys, rid, _ = _alice_approved_under_her_old_key(store_url, worlds_dir, tmp_path)
    assert svc.audit_verify(deep=True).ok
    pv = schema.policy_versions
    forged = load_policy_text(_rotation_policy(keys, "mallory", 1))
    store = open_store(store_url)
    with store.read() as conn:
        original = dict(conn.execute(sa.select(pv).where(pv.c.world_id == "gov")).one()._mapping)

    def tamper(**values: object) -> dict[tuple[str, str], str]:
        with store.write() as conn:
            conn.execute(sa.update(pv).where(pv.c.id == original["id"]).values(
                document=original["document"], content_hash=original["content_hash"]))
            if values:
                conn.execute(sa.update(pv).where(pv.c.id == original["id"]).values(**values))
        return {(x.kind, x.key): x.problem for x in svc.audit_verify(deep=True).differences}

    # version 1 now lists mallory's key as alice's, its hash recomputed to match
    found = tamper(document=forged.model_dump(mode="json"), content_hash=policy_hash(forged))
    assert set(found) == {("policy", "gov/v1"), ("signature", f"{rid}/alice")}
    assert "the ledger says" in found[("policy", "gov/v1")]
    assert "does not hold as the ledger recorded it" in found[("signature", f"{rid}/alice")]
    # the document swapped, the hash left as the ledger recorded it
    found = tamper(document=forged.model_dump(mode="json"))
    assert set(found) == {("policy", "gov/v1"), ("signature", f"{rid}/alice")}
    assert "(edited)" in found[("policy", "gov/v1")]
    # a whole version slipped in as adopted, never recorded in the ledger
    assert tamper() == {}
    v2 = forged.model_copy(update={"policy_version": 2})
    with store.write() as conn:
        conn.execute(sa.insert(pv).values({**{k: v for k, v in original.items() if k != "id"}, "policy_version": 2,
                                           "document": v2.model_dump(mode="json"), "content_hash": policy_hash(v2)}))
    found = {(x.kind, x.key): x.problem for x in svc.audit_verify(deep=True).differences}
    assert set(found) == {("policy", "gov/v2")} and "no ledger entry records it" in found[("policy", "gov/v2")]
    svc.close()
    store.dispose()
