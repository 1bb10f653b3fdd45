"""A policy's hash is its meaning: spellings and values equal to their default do not count, so a
later qmtl adding a field with a default keeps every recorded version recognised, and a store
upgraded from the old hash (schema v9) keeps its versions, its open proposals and their approvals.
"""

from __future__ import annotations

import inspect
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

import qmtl_core.policy as policy_pkg
from qmtl_core.canonical import content_hash
from qmtl_core.policy import WorldPolicy, format_duration, load_policy_file, load_policy_text, policy_hash
from qmtl_core.service import _service
from qmtl_core.store import open_store, schema
from tests._service import Clock, make_service
from tests.conftest import EXAMPLE_WORLDS
from tests.test_governance import Setup, policy_text


def _old_policy_hash(policy: WorldPolicy) -> str:
    """The hash qmtl used up to schema v8: every field, defaults included."""
    return content_hash(policy.model_dump(mode="json"))


def test_a_field_added_with_a_default_leaves_every_hash_alone() -> None:
    class Later(WorldPolicy):  # what a later qmtl's model looks like to a policy that does not set it
        new_knob: int = 5

    for path in sorted(EXAMPLE_WORLDS.glob("*.yaml")):
        now = load_policy_file(path)
        later = Later.model_validate(now.model_dump(mode="json"))
        assert policy_hash(later) == policy_hash(now), path.name
        assert _old_policy_hash(later) != _old_policy_hash(now)  # the hazard the old hash had
        assert policy_hash(Later.model_validate({**now.model_dump(mode="json"), "new_knob": 6})) != policy_hash(now)


def test_a_default_written_out_hashes_as_left_out_and_a_change_does_not() -> None:
    base = policy_text()
    assert policy_hash(load_policy_text(base)) == policy_hash(load_policy_text(base + "periods_per_year: 252\n"))
    assert policy_hash(load_policy_text(base)) != policy_hash(load_policy_text(base + "periods_per_year: 365\n"))
    spelled = base.replace("  - {id: sharpe, metric: sharpe, min: 0.3}", "  - {id: sharpe, metric: sharpe, min: 0.3, "
                           "severity: blocking}")
    assert policy_hash(load_policy_text(base)) == policy_hash(load_policy_text(spelled))


def test_a_stored_document_hashes_as_the_file_it_came_from() -> None:
    for path in sorted(EXAMPLE_WORLDS.glob("*.yaml")):
        parsed = load_policy_file(path)
        assert policy_hash(WorldPolicy.model_validate(parsed.model_dump(mode="json"))) == policy_hash(parsed)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, timedelta):
        return format_duration(value)
    return to_jsonable_python(value)


#: Every default of the policy models. A policy relying on a default means something else when the
#: default changes, yet its hash (which leaves defaults out) would not move and no new version would
#: be recorded or approved: so a default never changes in place. Add a new field (and its line here)
#: instead. Removing or changing a line here is the mistake this test exists to stop.
PINNED_DEFAULTS: dict[str, dict[str, Any]] = {
    "Campaign": {"backtest": None, "live": None, "paper": None, "shadow": None},
    "Consistency": {"against": "backtest", "ks_p_min": None, "max_drop": None, "metric": "sharpe",
                    "min_observations": 20, "severity": "blocking"},
    "Correlation": {"min_overlap": 20},
    "Costs": {"fee_bps": 0.0, "slippage_bps": 0.0},
    "Governance": {"live_promotion": {"approval_ttl": "3d", "approvers": [], "cooldown": "0s", "max_live_slots": 1,
                                      "mode": "disabled", "require_signatures": False, "required_approvals": 1}},
    "Hysteresis": {},
    "LivePromotion": {"approval_ttl": "3d", "approvers": [], "cooldown": "0s", "max_live_slots": 1,
                      "mode": "disabled", "require_signatures": False, "required_approvals": 1},
    "LiveWindow": {"monitor_window": "30d"},
    "MetricDeclaration": {"better": None, "description": None},
    "Notifications": {"webhook": None},
    "Risk": {"decision_ttl": "10m", "future_tolerance": "5m", "portfolio_book": "live", "producers": [],
             "snapshot_max_age": "15m"},
    "Rule": {"description": None, "max": None, "min": None, "severity": "blocking", "stages": None},
    "Selection": {"correlation": None, "hysteresis": None, "top_k": None},
    "StageWindow": {"min_observations": 1},
    "TopK": {"order": "desc"},
    "Validation": {"on_missing_metric": "fail", "on_spacing_mismatch": "warn"},
    "WorldPolicy": {"allow_live": False, "benchmark": None,
                    "campaign": {"backtest": None, "live": None, "paper": None, "shadow": None}, "consistency": [],
                    "costs": {"fee_bps": 0.0, "slippage_bps": 0.0}, "description": None, "governance": None,
                    "metrics": {}, "notifications": {"webhook": None}, "periods_per_year": 252,
                    "risk": {"decision_ttl": "10m", "future_tolerance": "5m", "portfolio_book": "live",
                             "producers": [], "snapshot_max_age": "15m"},
                    "rules": [], "selection": {"correlation": None, "hysteresis": None, "top_k": None},
                    "validation": {"on_missing_metric": "fail", "on_spacing_mismatch": "warn"}},
}


def test_no_default_changes_in_place() -> None:
    models = {name: cls for name in policy_pkg.__all__ if inspect.isclass(cls := getattr(policy_pkg, name))
              and issubclass(cls, BaseModel)}
    assert set(PINNED_DEFAULTS) <= set(models), "a policy model was removed or renamed"
    for name, pinned in PINNED_DEFAULTS.items():
        fields = models[name].model_fields
        for field, value in pinned.items():
            assert field in fields and not fields[field].is_required(), f"{name}.{field} lost its default"
            found = _jsonable(fields[field].get_default(call_default_factory=True))
            if isinstance(found, dict) and isinstance(value, dict):  # a nested model may gain fields
                found = {k: v for k, v in found.items() if k in value}
            assert found == value, f"the default of {name}.{field} changed from {value!r} to {found!r}"


def test_an_upgraded_store_keeps_its_versions_proposals_and_approvals(store_url: str, worlds_dir: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written with the old hash (every field) is opened by this qmtl: no 409
    policy_version_conflict, no spurious new version, the open proposal keeps its approval and
    adopts with one more, and ``audit verify --deep`` vouches for every version."""
    path = worlds_dir / "gov.yaml"
    path.write_text(policy_text())
    with monkeypatch.context() as old:
        old.setattr(policy_pkg, "policy_hash", _old_policy_hash)
        _service._POLICY_CACHE.clear()
        svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("cron")
        Setup(svc).ready("a")
        rid = svc.as_actor("carol").promote("gov", "a").request_id
        svc.as_actor("alice").decide_request(rid, decision="approve", reason="ok")
        assert svc.as_actor("bob").decide_request(rid, decision="approve", reason="ok").status == "applied"
        path.write_text(policy_text(version=2, cooldown="12h"))  # a proposal, the world runs a live strategy
        assert svc.as_actor("carol").load_world("gov").proposal is not None
        svc.as_actor("alice").approve_policy("gov", version=2, reason="fine")
        svc.close()
    _service._POLICY_CACHE.clear()
    store = open_store(store_url)
    pv = schema.policy_versions
    with store.write() as conn:  # as qmtl left it at schema v8
        old_hashes = dict(conn.execute(sa.select(pv.c.policy_version, pv.c.content_hash)).all())
        conn.execute(sa.delete(schema.schema_version).where(schema.schema_version.c.version >= 9))
    store.dispose()
    assert old_hashes[2] == _old_policy_hash(load_policy_text(policy_text(version=2, cooldown="12h")))

    svc = make_service(store_url, worlds_dir, tmp_path / "h", Clock(datetime.now(timezone.utc))).as_actor("carol")
    loaded = svc.load_world("gov")  # records nothing new and raises no policy_version_conflict
    assert loaded.policy.policy_version == 1 and loaded.proposal is not None
    new_hashes = {r.policy_version: r.content_hash for r in svc.policy_history("gov")}
    assert set(new_hashes) == {1, 2}
    assert new_hashes[2] == policy_hash(load_policy_text(policy_text(version=2, cooldown="12h"))) != old_hashes[2]
    rehashed = svc.audit_log(world="gov", kind="policy.rehashed")
    assert [(e.payload["policy_version"], e.payload["previous_hash"], e.payload["content_hash"]) for e in rehashed] == [
        (v, old_hashes[v], new_hashes[v]) for v in (1, 2)]
    [proposal] = svc.policy_status("gov")["proposals"]
    assert [a["approver"] for a in proposal["approvals"]] == ["alice"]
    result = svc.audit_verify(deep=True)
    assert result.ok, [d.line() for d in result.differences]
    assert svc.as_actor("bob").approve_policy("gov", version=2, reason="agreed")["adopted"] is True
    assert svc.load_world("gov").policy.policy_version == 2
    assert svc.audit_verify(deep=True).ok
    svc.close()
