"""A failed submit writes nothing at all (issue 16 item 13).

``qmtl submit`` used to register the strategy, then record its backtest run, then announce its
queues: three writes. A failure after the first (the liquidated short of item 13 was one) left a
strategy with no run, which the campaign loop then reported as stalled forever. Now the three are
one transaction: a failure injected at any step, on either backend, leaves no strategy, no run,
no head and no ledger entry, and the same submission then goes through whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from qmtl_core import ledger, runs
from qmtl_core.service._strategies import Registration
from qmtl_core.store import schema
from qmtl_core.submit import instantiate, load_strategy_file, pick_strategy, submit_strategy
from tests._service import make_service
from tests.test_liquidation_and_params import _write_case

WORLD = "research-sandbox"
TABLES = (schema.strategies, schema.evaluation_runs, schema.run_revisions, schema.run_heads, schema.ledger)


class Injected(RuntimeError):
    """The failure a test injects (not a QmtlError: an unexpected fault mid-transaction)."""


def _counts(svc: Any) -> dict[str, int]:
    with svc.store.read() as conn:
        return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() or 0) for t in TABLES}


def _fail_on_call(real: Callable[..., Any], n: int) -> Callable[..., Any]:
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise Injected(f"injected failure on call {n}")
        return real(*args, **kwargs)

    return wrapper


@pytest.fixture
def new_store(request: pytest.FixtureRequest, store_url: str, tmp_path: Path) -> Callable[[], str]:
    """Another empty store on the same backend as ``store_url``."""
    made = iter(range(1000))
    if store_url.startswith("sqlite"):
        return lambda: f"sqlite:///{tmp_path / f'store-{next(made)}.db'}"
    return request.getfixturevalue("pg_cluster").new_database


@pytest.fixture
def case(tmp_path: Path, store_url: str, worlds_dir: Path) -> Iterator[tuple[Any, Any, Path]]:
    strategy_file, bars = _write_case(tmp_path)
    svc = make_service(store_url, worlds_dir, tmp_path / "home")
    module = load_strategy_file(strategy_file)
    yield svc, instantiate(pick_strategy(module, strategy_file), {}), bars
    svc.store.dispose()


def test_a_submit_failing_at_any_step_writes_nothing(case: tuple[Any, Any, Path], new_store: Callable[[], str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    svc, strategy, bars = case
    appends = []  # what a whole submission appends to the ledger, in order
    real_append = ledger.append

    def counting(*args: Any, **kwargs: Any) -> Any:
        appends.append(kwargs["kind"])
        return real_append(*args, **kwargs)

    # Every step a submission takes: each ledger append (the strategy's entry, the run's, each
    # queue announcement), the run's row and revision, and the run's head.
    with monkeypatch.context() as m:
        m.setattr(ledger, "append", counting)
        probe = submit_strategy(svc, strategy, WORLD, data=bars)
    # The world's policy is recorded once, by its first write, in its own transaction: the
    # world's, not the submission's (``_world_recorded`` does it before each case below).
    assert appends == ["policy.recorded", "strategy.submitted", "run.recorded", "tagquery.upserted",
                       "queue.updated"]
    whole = _counts(svc)
    assert whole == {"strategies": 1, "evaluation_runs": 1, "run_revisions": 1, "run_heads": 1, "ledger": 5}
    del appends[0]

    steps: list[tuple[Any, str, int]] = [(ledger, "append", i + 1) for i in range(len(appends))]
    steps += [(runs, "record_run", 1), (runs, "_advance_head", 1), (runs, "ensure_strategy", 2)]
    for target, name, n in steps:
        fresh = make_service(new_store(), svc.settings.worlds_dir, svc.settings.home)
        fresh.load_world(WORLD)
        empty = {**{t.name: 0 for t in TABLES}, "ledger": 1}  # the policy.recorded entry
        with monkeypatch.context() as m:
            m.setattr(target, name, _fail_on_call(getattr(target, name), n))
            with pytest.raises(Injected) as raised:
                submit_strategy(fresh, strategy, WORLD, data=bars)
            del raised  # its traceback holds the rolled-back connection
        assert _counts(fresh) == empty, (name, n)
        # nothing was left behind that would make the retry different: it goes through whole
        done = submit_strategy(fresh, strategy, WORLD, data=bars)
        assert (done.strategy_id, done.run.run_id, done.run.status, done.status) == (
            probe.strategy_id, probe.run.run_id, "fail", "rejected")
        assert _counts(fresh) == whole, (name, n)
        fresh.store.dispose()


def test_the_liquidated_submission_is_recorded_and_gated(case: tuple[Any, Any, Path]) -> None:
    svc, strategy, bars = case
    done = submit_strategy(svc, strategy, WORLD, data=bars)
    assert (done.status, done.exit_code, done.run.status) == ("rejected", 10, "fail")
    assert done.run.metrics["total_return"] == -1.0 and done.backtest.extra["liquidated_at"].startswith("2024-01-11")
    assert done.registered and done.queues
    again = submit_strategy(svc, strategy, WORLD, data=bars)
    assert not again.registered and not again.run.created  # unchanged: nothing written
    assert _counts(svc)["ledger"] == 5  # policy, strategy, run, two queue announcements


def test_a_conflicting_registration_rolls_the_run_back(case: tuple[Any, Any, Path]) -> None:
    """``qmtl run``'s bars and the run measured on them are one write: when another writer moved
    the bars first (compare-and-set on ``expect_meta``), the run is not recorded either."""
    from qmtl_core.errors import ConflictError

    svc, _, _ = case
    svc.register_strategy(WORLD, strategy_id="s1", meta={"feed": {"bars": "theirs"}})
    before = _counts(svc)
    with pytest.raises(ConflictError):
        svc.record_submission(WORLD, strategy_id="s1", stage="backtest", metrics={"sharpe": 1.0},
                              registration=Registration(meta={"feed": {"bars": "mine"}},
                                                        expect_meta={"feed": None}, kind="strategy.fed"))
    assert _counts(svc) == before
