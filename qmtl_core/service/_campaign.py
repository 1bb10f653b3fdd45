"""The side-effect half of campaigns: reading a world's state, leases, executing actions once.

Every executed action runs in one write transaction together with the row that records its
idempotency key (primary key of ``campaign_actions``): the key is stored if and only if the action
took effect, so a crash mid-way leaves nothing half-done and the next loop redoes it, and a key
already stored is never executed again.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qmtl_core import ledger, runs
from qmtl_core.campaign import Action, RunSummary, StrategyState, WorldState, tick, worst_exit
from qmtl_core.errors import (
    ConflictError,
    LeaseHeld,
    LiveNotConfirmed,
    PolicyError,
    PolicyVersionConflict,
    QmtlError,
    WorldNotFound,
)
from qmtl_core.governance._activations import StageMove, book_members, set_stage, set_stages
from qmtl_core.governance._requests import apply_if_allowed, governance_state, promote
from qmtl_core.risk import latest_snapshot, latest_summary
from qmtl_core.store import schema
from qmtl_core.timeutil import iso, parse_instant, parse_optional_instant

if TYPE_CHECKING:
    from qmtl_core.service._service import LoadedWorld, WorldService

#: Errors that mean a world's policy could not be loaded.
POLICY_ERRORS = (PolicyError, WorldNotFound, PolicyVersionConflict)

#: How many tick → execute rounds one iteration runs per world (evaluate, then promote, ...).
MAX_ROUNDS = 5


def new_holder() -> str:
    """A lease holder id unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"



def load_state(conn: Connection, loaded: "LoadedWorld") -> WorldState:
    """Read what ``tick`` needs: strategies, the latest run revision per stage, snapshot, halt.

    Runs come from ``run_heads``, one slim row per strategy and stage kept by ``record_run``, so
    the cost is linear in the number of strategies and flat in the length of their history:
    neither past runs nor the returns stored per revision are read.
    """
    world = loaded.world_id
    st, heads = schema.strategies, schema.run_heads
    stages: dict[str, str] = {}
    since: dict[str, str] = {}
    submitters: dict[str, str | None] = {}
    entered: dict[str, datetime | None] = {}
    bindings: dict[str, str | None] = {}
    for sid, stage, updated_at, submitter, entered_at, binding in conn.execute(
            sa.select(st.c.strategy_id, st.c.stage, st.c.updated_at, st.c.submitter, st.c.stage_entered_at,
                      st.c.code_binding).where(st.c.world_id == world)):
        stages[sid], since[sid], submitters[sid] = stage, updated_at, submitter
        entered[sid], bindings[sid] = parse_optional_instant(entered_at), binding
    # Metrics and rule results come back as JSON text (a cast, so PostgreSQL's driver does not decode
    # the JSONB either) and are decoded only for the strategies whose action needs them.
    query = sa.select(heads.c.strategy_id, heads.c.stage, heads.c.run_id, heads.c.revision, heads.c.status,
                      heads.c.policy_version, heads.c.content_hash,
                      sa.cast(heads.c.metrics, sa.Text).label("metrics"),
                      sa.cast(heads.c.rule_results, sa.Text).label("rule_results"),
                      heads.c.window_start, heads.c.window_end, heads.c.n_observations,
                      heads.c.evidence_class).where(heads.c.world_id == world)
    latest: dict[str, dict[str, RunSummary]] = {}
    times: dict[str | None, datetime | None] = {}  # runs of one cohort share their window's ends

    def at(text: str | None) -> datetime | None:
        if text not in times:
            times[text] = parse_optional_instant(text)
        return times[text]

    for sid, stage, run_id, revision, status, policy_version, digest, metrics, rules, start, end, n, klass \
            in conn.execute(query):
        latest.setdefault(sid, {})[stage] = RunSummary(run_id, revision, status, policy_version, digest,
                                                       metrics, rules, at(start), at(end), n, klass)
    halted = conn.execute(sa.select(schema.worlds.c.halted).where(schema.worlds.c.world_id == world)).scalar()
    gov = governance_state(conn, world, submitters=submitters)
    # A strategy's stay in its stage: when it last moved, and under which activation set (which
    # tells two moves apart even within one clock tick).
    strategies = tuple(StrategyState(sid, stage, latest.get(sid, {}), submitters.get(sid),
                                     f"{since.get(sid)}#{gov['set_version']}", entered.get(sid))
                       for sid, stage in sorted(stages.items()))
    # The newest trusted snapshot of each stage: a paper decision reads paper returns, a live one
    # live returns, and neither is hidden by a newer snapshot of the other stage.
    snapshots = {stage: snap for stage in ("backtest", "paper", "live")
                 if (snap := latest_summary(conn, world, stage=stage)) is not None}
    return WorldState(world, loaded.policy, strategies, None, bool(halted),
                      gov["live_strategies"], gov["last_live_promotion_at"], gov["requests"],
                      _portfolios(conn, loaded.policy, [sid for sid, stage in stages.items() if stage == "paper"]),
                      snapshots=snapshots, code_bindings=bindings)


def _portfolios(conn: Connection, policy: Any, candidates: Sequence[str]) -> dict[str, Any]:
    """Portfolio metrics of each paper strategy against the book, for the live gate; read (and the
    snapshot's document parsed) only when a rule gates on them."""
    if not candidates or not runs.portfolio_rules(policy):
        return {}
    snapshot = latest_snapshot(conn, policy.world, stage="paper")
    book = book_members(conn, policy)
    risks = {sid: runs.book_risk(policy, sid, snapshot, None, book, check_fresh=False) for sid in candidates}
    return {sid: risk for sid, risk in risks.items() if risk is not None}


# --- leases ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    """Who holds a world's campaign lease, until when."""

    world: str
    holder: str
    expires_at: datetime
    acquired: bool


def acquire_lease(conn: Connection, world: str, holder: str, now: datetime, ttl: timedelta) -> Lease:
    """Take (or renew) the world's lease unless another live holder has it; an expired one is taken over."""
    ledger.lock(conn)  # one writer at a time on both backends: no lost race on the lease row
    t = schema.leases
    row = conn.execute(sa.select(t).where(t.c.world_id == world)).first()
    expires = now + ttl
    if row is not None and row.holder != holder and parse_instant(row.expires_at) > now:
        return Lease(world, row.holder, parse_instant(row.expires_at), False)
    if row is None:
        conn.execute(sa.insert(t).values(world_id=world, holder=holder, acquired_at=iso(now),
                                         expires_at=iso(expires)))
    else:
        if row.holder != holder:
            ledger.append(conn, actor=holder, kind="campaign.lease_taken_over", now=now, world=world,
                          subject=f"lease held by {row.holder}",
                          reason=f"expired at {row.expires_at}")
        conn.execute(sa.update(t).where(t.c.world_id == world).values(
            holder=holder, acquired_at=iso(now) if row.holder != holder else row.acquired_at,
            expires_at=iso(expires)))
    return Lease(world, holder, expires, True)


def release_lease(conn: Connection, world: str, holder: str) -> None:
    """Give the lease back (only if we still hold it)."""
    t = schema.leases
    conn.execute(sa.delete(t).where(t.c.world_id == world, t.c.holder == holder))


# --- execution --------------------------------------------------------------------------------------
def executed(conn: Connection, key: str) -> bool:
    """Whether an action with this idempotency key was ever executed."""
    t = schema.campaign_actions
    return conn.execute(sa.select(t.c.idempotency_key).where(t.c.idempotency_key == key)).first() is not None


def execute(conn: Connection, loaded: "LoadedWorld", action: Action, *, actor: str, now: datetime) -> dict[str, Any]:
    """Execute one action with its key, in the caller's write transaction. Returns the outcome."""
    ledger.lock(conn)
    if executed(conn, action.idempotency_key):
        return {"status": "skipped", "why": "already_executed"}
    notify: list[dict[str, Any]] = []
    if action.action == "evaluate":
        rev = runs.evaluate_and_record(conn, policy=loaded.policy, policy_hash=loaded.content_hash,
                                       strategy_id=action.strategy_id, stage=action.stage,
                                       run_id=action.suggested_run_id, metrics=None, returns=None,
                                       actor=actor, now=now)
        result: dict[str, Any] = {"run_id": rev.run_id, "revision": rev.revision, "run_status": rev.status,
                                  "created": rev.created}
    elif action.action == "promote_to_paper":
        evidence = (action.suggested_body or {}).get("evidence") or {}
        version = set_stage(conn, policy=loaded.policy, strategy_id=action.strategy_id, expect="backtest", to="paper",
                            actor=actor, now=now, kind="strategy.promoted", reason=action.detail,
                            run_id=evidence.get("run_id"),
                            payload={"evidence": evidence, "idempotency_key": action.idempotency_key})
        result = {"from": "backtest", "to": "paper", "set_version": version}
    elif action.action == "demote":
        version = set_stage(conn, policy=loaded.policy, strategy_id=action.strategy_id, expect="live", to="paper",
                            actor=actor, now=now, kind="strategy.demoted", reason=action.detail,
                            payload={"evidence": (action.suggested_body or {}).get("evidence"),
                                     "idempotency_key": action.idempotency_key})
        result = {"from": "live", "to": "paper", "set_version": version}
    elif action.action in ("request_live_approval", "apply_live"):
        if action.action == "request_live_approval":
            outcome = promote(conn, loaded.policy, action.strategy_id, actor=actor, now=now,
                              reason="campaign loop: paper window and gates satisfied")
        else:
            outcome = apply_if_allowed(conn, loaded.policy, action.strategy_id,
                                       expected_evidence=(action.suggested_body or {}).get("evidence_hash"),
                                       actor=actor, now=now)
        result = {"governance": outcome.status, "request_id": outcome.request_id, "message": outcome.message}
        notify = outcome.notify
        if outcome.status == "blocked":
            # The block is recorded (ledger), but the key stays free: when the block clears, the
            # same evidence must be able to go live.
            return {"status": "blocked", **result, **({"notify": notify} if notify else {})}
    else:
        return {"status": "not_executed", "why": f"{action.action} is not executed by the campaign loop"}
    _record_executed(conn, [(action, result)], actor=actor, now=now)
    return {"status": "executed", **result, **({"notify": notify} if notify else {})}


def _record_executed(conn: Connection, done: Sequence[tuple[Action, dict[str, Any]]], *, actor: str,
                     now: datetime) -> None:
    """Store each action's idempotency key with its result (one INSERT for them all), and its
    ``campaign.executed`` entry."""
    conn.execute(sa.insert(schema.campaign_actions), [dict(
        idempotency_key=action.idempotency_key, world_id=action.world, strategy_id=action.strategy_id,
        action=action.action, stage=action.stage, status="executed", result=result,
        executed_at=iso(now), executed_by=actor) for action, result in done])
    ledger.append_many(conn, [ledger.Draft(
        "campaign.executed", action.world, f"{action.action} {action.strategy_id} ({action.stage})", action.detail,
        {"idempotency_key": action.idempotency_key, "action": action.action, "result": result})
        for action, result in done], actor=actor, now=now)


def execute_promotions(conn: Connection, loaded: "LoadedWorld", actions: Sequence[Action], *, actor: str,
                       now: datetime) -> dict[str, dict[str, Any]]:
    """Execute a round's ``promote_to_paper`` actions together, in the caller's write transaction:
    one new activation set for all of them (``set_stages``), and per action what ``execute`` writes
    (its key, its ``strategy.promoted`` and ``campaign.executed`` entries). Outcomes by key; an
    action whose key is taken, or whose strategy is no longer in backtest, is skipped as
    ``execute`` skips it."""
    ledger.lock(conn)
    done = _executed_keys(conn, [a.idempotency_key for a in actions])
    st = schema.strategies
    stages = {r.strategy_id: r.stage for r in conn.execute(
        sa.select(st.c.strategy_id, st.c.stage).where(st.c.world_id == loaded.policy.world,
                                                       st.c.strategy_id.in_([a.strategy_id for a in actions])))}
    outcomes: dict[str, dict[str, Any]] = {}
    fresh: list[Action] = []
    moving: set[str] = set()
    for action in actions:
        if action.idempotency_key in done:
            outcomes[action.idempotency_key] = {"status": "skipped", "why": "already_executed"}
        elif stages.get(action.strategy_id) != "backtest" or action.strategy_id in moving:
            stage = stages.get(action.strategy_id)
            outcomes[action.idempotency_key] = {
                "status": "skipped", "why": "stale_plan",
                "message": f"{action.strategy_id} is {stage or 'not known'} in {action.world}, not backtest"}
        else:
            fresh.append(action)
            moving.add(action.strategy_id)
    if not fresh:
        return outcomes
    evidence = {a.idempotency_key: (a.suggested_body or {}).get("evidence") or {} for a in fresh}
    version = set_stages(conn, policy=loaded.policy, expect="backtest", to="paper", actor=actor, now=now,
                         kind="strategy.promoted", moves=[
                             StageMove(a.strategy_id, a.detail, run_id=evidence[a.idempotency_key].get("run_id"),
                                       payload={"evidence": evidence[a.idempotency_key],
                                                "idempotency_key": a.idempotency_key}) for a in fresh])
    result = {"from": "backtest", "to": "paper", "set_version": version}
    _record_executed(conn, [(action, result) for action in fresh], actor=actor, now=now)
    outcomes.update((action.idempotency_key, {"status": "executed", **result}) for action in fresh)
    return outcomes


def record_blocks(conn: Connection, actions: Sequence[Action], *, actor: str, now: datetime) -> list[str]:
    """Write each ``blocked`` action the loop met to the ledger once per idempotency key (which
    hashes the evidence and the reason: a block on the same evidence is not written again at
    every tick), and show the latest block on the strategy's pending request; a request whose
    strategy is no longer blocked stops showing one. Returns the keys written.

    Cost is in what changed, not in the world's size: the keys already written and the pending
    requests are each read in one statement, the blocks written in one INSERT and one ledger append
    (a world of 1,000 strategies used to cost 1,000 UPDATEs a pass, one per strategy not blocked)."""
    ledger.lock(conn)
    t, requests = schema.campaign_actions, schema.promotion_requests
    done = _executed_keys(conn, [a.idempotency_key for a in actions if a.action == "blocked"])
    pending = {(r.world_id, r.strategy_id): r.blocked_reason is not None for r in conn.execute(
        sa.select(requests.c.world_id, requests.c.strategy_id, requests.c.blocked_reason).where(
            requests.c.world_id.in_(sorted({a.world for a in actions})), requests.c.status == "pending"))}
    showing = {pair for pair, blocked in pending.items() if blocked}
    last: dict[tuple[str, str], str] = {}  # per strategy, the last thing this pass does to its request
    written = []
    rows: list[dict[str, Any]] = []
    drafts: list[ledger.Draft] = []
    for action in actions:
        pair = (action.world, action.strategy_id)
        if action.action != "blocked":
            last[pair] = "clear"
            continue
        if action.idempotency_key in done:
            continue
        done.add(action.idempotency_key)
        why = f"{action.reason}: {action.detail}"
        rows.append(dict(
            idempotency_key=action.idempotency_key, world_id=action.world, strategy_id=action.strategy_id,
            action="blocked", stage=action.stage, status="blocked",
            result={"reason": action.reason, "detail": action.detail}, executed_at=iso(now), executed_by=actor))
        drafts.append(ledger.Draft(
            "campaign.blocked", action.world, f"{action.strategy_id} ({action.stage})", why,
            {"idempotency_key": action.idempotency_key, "reason": action.reason, "detail": action.detail,
             "strategy_id": action.strategy_id}))
        if pair in pending:
            conn.execute(sa.update(requests).where(_pending(requests, *pair))
                         .values(blocked_reason=why, blocked_at=iso(now)))
            showing.add(pair)
        last[pair] = "block"
        written.append(action.idempotency_key)
    if rows:
        conn.execute(sa.insert(t), rows)
    ledger.append_many(conn, drafts, actor=actor, now=now)
    for pair in sorted(p for p, op in last.items() if op == "clear" and p in showing):
        conn.execute(sa.update(requests).where(_pending(requests, *pair) & requests.c.blocked_reason.is_not(None))
                     .values(blocked_reason=None, blocked_at=None))
    return written


def _pending(requests: sa.Table, world: str, strategy_id: str) -> sa.ColumnElement[bool]:
    return (requests.c.world_id == world) & (requests.c.strategy_id == strategy_id) & (requests.c.status == "pending")


def _executed_keys(conn: Connection, keys: Sequence[str], chunk: int = 500) -> set[str]:
    """Which of ``keys`` were ever executed (or recorded as blocks), in one read per ``chunk`` keys."""
    t = schema.campaign_actions
    found: set[str] = set()
    for start in range(0, len(keys), chunk):
        found.update(conn.execute(sa.select(t.c.idempotency_key)
                                  .where(t.c.idempotency_key.in_(keys[start:start + chunk]))).scalars())
    return found


# --- one loop iteration -------------------------------------------------------------------------------
@dataclass
class WorldOutcome:
    """What an iteration did for one world."""

    world: str
    status: str  # planned | executed | busy | refused | error
    actions: list[dict[str, Any]] = field(default_factory=list)
    holder: str | None = None
    message: str | None = None
    exit_code: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"world": self.world, "status": self.status, "exit_code": self.exit_code,
                "holder": self.holder, "message": self.message, "error": self.error, "actions": self.actions}


def plan_world(service: "WorldService", world: str) -> tuple["LoadedWorld", list[Action]]:
    """Tick one world from the store, changing nothing."""
    loaded = service.load_world(world, record=False)
    with service.store.read() as conn:
        state = load_state(conn, loaded)
    return loaded, tick(state, service.clock())


def run_world(service: "WorldService", world: str, *, execute_actions: bool, holder: str,
              lease_ttl: timedelta, on_action: Callable[[dict[str, Any]], None] | None = None) -> WorldOutcome:
    """Plan (and with ``execute_actions``, execute) one world under its lease."""
    if not execute_actions:
        _, actions = plan_world(service, world)
        docs = [{**a.to_dict(), "outcome": "planned"} for a in actions]
        return WorldOutcome(world, "planned", docs,
                            exit_code=worst_exit([a.exit_class for a in actions]))
    loaded = service.load_world(world)
    with service.store.write() as conn:
        lease = acquire_lease(conn, world, holder, service.clock(), lease_ttl)
    if not lease.acquired:
        return WorldOutcome(world, "busy", holder=lease.holder, exit_code=75,
                            message=f"leased by {lease.holder} until {iso(lease.expires_at)[:19]}Z")
    docs: list[dict[str, Any]] = []
    seen: set[str] = set()
    failed: list[str] = []
    refused = False
    final: list[Action] = []
    try:
        for _ in range(MAX_ROUNDS):
            with service.store.read() as conn:
                final = tick(load_state(conn, loaded), service.clock())
            todo = [a for a in final if a.executable and a.idempotency_key not in seen]
            if not docs and not service.live_confirmed:
                _refuse_live_actions(service, world, todo)  # before the first action runs
            if not todo:
                break
            promoted = _promote_round(service, loaded, [a for a in todo if a.action == "promote_to_paper"],
                                      holder, lease_ttl, failed)
            for action in todo:
                seen.add(action.idempotency_key)
                if action.idempotency_key in promoted:
                    doc = {**action.to_dict(), "outcome": promoted[action.idempotency_key]["status"],
                           "result": promoted[action.idempotency_key]}
                    docs.append(doc)
                    if on_action is not None:
                        on_action(doc)
                    continue
                try:
                    with service.store.write() as conn:
                        if acquire_lease(conn, world, holder, service.clock(), lease_ttl).acquired is False:
                            raise LeaseHeld("lost the lease mid-iteration", code="lease_lost")
                        outcome = execute(conn, loaded, action, actor=service.actor, now=service.clock())
                        if outcome.get("governance") == "applied":
                            service.require_live_confirmed(
                                f"the campaign loop would put {action.strategy_id} live in {world} now")
                        ids = service._enqueue(conn, loaded, outcome.pop("notify", []))
                except ConflictError as exc:
                    outcome, ids = {"status": "skipped", "why": exc.code, "message": exc.message}, []
                except LiveNotConfirmed as exc:  # went live-ready after the pre-check: rolled back
                    outcome, ids = {"status": "refused", "why": exc.code, "message": exc.message}, []
                    refused = True
                except QmtlError as exc:
                    # One strategy's bad evidence (a snapshot stored before the hub refused it, a
                    # series that cannot be measured) fails closed for that action only: the other
                    # strategies and worlds still run, and the world exits 12 naming it.
                    failed.append(action.idempotency_key)
                    outcome, ids = {"status": "error", "why": exc.code,
                                    "message": f"{world} {action.strategy_id}: {exc.message}"}, []
                if ids:
                    outcome["notifications"] = service._deliver(ids)
                doc = {**action.to_dict(), "outcome": outcome["status"], "result": outcome}
                docs.append(doc)
                if on_action is not None:
                    on_action(doc)
        with service.store.write() as conn:
            if acquire_lease(conn, world, holder, service.clock(), lease_ttl).acquired:
                record_blocks(conn, final, actor=service.actor, now=service.clock())
    finally:
        with service.store.write() as conn:
            release_lease(conn, world, holder)
    # Report the state the world is left in: what was done, then what still stands.
    done = {d["idempotency_key"] for d in docs}
    for action in final:
        if action.idempotency_key not in done:
            docs.append({**action.to_dict(), "outcome": "planned" if action.executable else "reported"})
    pending = ([a.exit_class for a in final if not a.executable] + [12] * len(failed)
               + ([10] if refused else []))
    return WorldOutcome(world, "executed", docs, exit_code=worst_exit(pending))


def _promote_round(service: "WorldService", loaded: "LoadedWorld", actions: Sequence[Action], holder: str,
                   lease_ttl: timedelta, failed: list[str]) -> dict[str, dict[str, Any]]:
    """A round's promotions into paper, in one write transaction (``execute_promotions``); on an
    error every one of them fails closed (rolled back, each reported, the world exits 12)."""
    if not actions:
        return {}
    try:
        with service.store.write() as conn:
            if acquire_lease(conn, loaded.policy.world, holder, service.clock(), lease_ttl).acquired is False:
                raise LeaseHeld("lost the lease mid-iteration", code="lease_lost")
            return execute_promotions(conn, loaded, actions, actor=service.actor, now=service.clock())
    except ConflictError as exc:
        return {a.idempotency_key: {"status": "skipped", "why": exc.code, "message": exc.message} for a in actions}
    except QmtlError as exc:
        failed.extend(a.idempotency_key for a in actions)
        return {a.idempotency_key: {"status": "error", "why": exc.code,
                                    "message": f"{loaded.policy.world} {a.strategy_id}: {exc.message}"}
                for a in actions}


def active_worlds(conn: Connection) -> set[str]:
    """Worlds with a strategy in paper or live: the ones a loop must never skip."""
    st = schema.strategies
    return {r.world_id for r in conn.execute(sa.select(st.c.world_id).where(st.c.stage.in_(("paper", "live")))
                                             .distinct())}


def failed_world(service: "WorldService", world: str, exc: Exception) -> WorldOutcome:
    """The outcome of a world the loop could not run: its error and exit code, so the loop carries on.

    A world with paper or live strategies whose policy cannot be loaded (missing, broken, or changed
    without a version bump) exits 12 ``policy_unavailable``: its campaign is not being watched,
    which is fail-closed territory, not a typo to fix at leisure.
    """
    if isinstance(exc, LiveNotConfirmed):  # the caller's live intent is missing: refused, nothing written
        return WorldOutcome(world, "refused", exit_code=exc.exit_code, error=exc.code, message=exc.message)
    if not isinstance(exc, QmtlError):
        return WorldOutcome(world, "error", exit_code=1, error="internal_error",
                            message=f"internal error: {type(exc).__name__}: {exc}")
    if isinstance(exc, POLICY_ERRORS):
        try:
            with service.store.read() as conn:
                active = world in active_worlds(conn)
        except QmtlError:
            active = True  # cannot tell: assume the worst
        if active:
            return WorldOutcome(world, "error", exit_code=12, error="policy_unavailable",
                                message=f"policy unavailable for a world with paper or live strategies: "
                                        f"{exc.one_line()}")
    return WorldOutcome(world, "error", exit_code=exc.exit_code, error=exc.code, message=exc.one_line())


def _refuse_live_actions(service: "WorldService", world: str, todo: Sequence[Action]) -> None:
    """Without the caller's live intent an execution whose plan applies live does nothing at all:
    refused before any action runs, naming what it would have done (HTTP 428, CLI exit 10). An
    apply that only becomes due after other actions ran is refused on its own (rolled back)."""
    live = [a for a in todo if a.action == "apply_live"]
    if live:
        service.require_live_confirmed(
            f"the campaign loop would put {', '.join(a.strategy_id for a in live)} live in {world} "
            "(apply_live)")


def run_iteration(service: "WorldService", worlds: Sequence[str], *, execute_actions: bool, holder: str,
                  lease_ttl: timedelta, on_action: Callable[[dict[str, Any]], None] | None = None,
                  on_world: Callable[[str], None] | None = None, raise_refusal: bool = False) -> list[WorldOutcome]:
    """One pass of the loop over ``worlds`` (first delivering notifications an earlier process left);
    one world's failure (bad data, a broken policy, a bug) is that world's outcome, and the others
    still run. ``raise_refusal``: a refusal for want of the live intent is raised, not isolated."""
    if execute_actions:
        service.flush_outbox()
    out = []
    for world in worlds:
        if on_world is not None:
            on_world(world)
        try:
            out.append(run_world(service, world, execute_actions=execute_actions, holder=holder,
                                 lease_ttl=lease_ttl, on_action=on_action))
        except Exception as exc:  # isolation: reported in the world's outcome, never ends the loop
            if raise_refusal and isinstance(exc, LiveNotConfirmed):
                raise
            out.append(failed_world(service, world, exc))
    return out


#: Most severe first, over worlds: evidence or policy missing for running strategies, then a bug,
#: bad input or setup, a conflict, not found, blocked, waiting.
LOOP_SEVERITY = (12, 1, 2, 4, 3, 10, 11, 0)


def iteration_exit(outcomes: Sequence[WorldOutcome]) -> int:
    """75 when every world was busy; else the most severe exit over the worlds."""
    return worst_outcome([o.to_dict() for o in outcomes])


def worst_outcome(outcomes: Sequence[dict[str, Any]]) -> int:
    """``iteration_exit`` over outcome documents (what the CLI gets, locally or over HTTP)."""
    if outcomes and all(o["status"] == "busy" for o in outcomes):
        return 75
    codes = {int(o["exit_code"]) for o in outcomes if o["status"] != "busy"}
    return next((c for c in LOOP_SEVERITY if c in codes), max(codes, default=0))
