"""The governance half of the ``WorldService`` facade: promote, approve, reject, apply, rollback,
halt, resume, demote, decisions and history. Transactions and notifications live here; decisions
are made by the pure gate in ``qmtl_core.governance``."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmtl_core.domains import DecisionEnvelope
    from qmtl_core.governance._requests import Outcome
    from qmtl_core.service._service import LoadedWorld, WorldService


def require_reason(reason: str | None, what: str) -> str:
    """The reason every state change records, stripped; refused when empty, whoever calls (CLI,
    HTTP or library), so the record never holds an unexplained change."""
    from qmtl_core.errors import UsageError

    if reason is None or not reason.strip():
        raise UsageError(f"{what} needs a reason (--reason)", hint='say why, e.g. --reason "broker outage"')
    return reason.strip()


class GovernanceMixin:
    """Governance methods of ``WorldService`` (mixed in; uses its store, clock and actor)."""

    # -- notifications ------------------------------------------------------------------------------
    def _enqueue(self: "WorldService", conn: Any, loaded: "LoadedWorld", events: list[dict[str, Any]]) -> list[str]:
        """Write the events for the world's webhook into the outbox, inside the change's transaction."""
        url = loaded.policy.notifications.webhook
        if not events or url is None:
            return []
        from qmtl_core import outbox

        return outbox.enqueue(conn, url=str(url), world=loaded.world_id, events=events, actor=self.actor,
                              now=self.clock())

    def flush_outbox(self: "WorldService") -> list[dict[str, Any]]:
        """Deliver every notification that is due (this change's and any an earlier process left)."""
        from qmtl_core import outbox
        from qmtl_core.governance._notify import deliver

        return outbox.flush(self.store, lambda url, events: deliver(url, events, **self._notify_options),
                            actor=self.actor, now=self.clock)

    def _deliver(self: "WorldService", ids: list[str]) -> list[dict[str, Any]]:
        """After the commit: flush the outbox; the fate of the events ``ids`` (enqueued by this change)."""
        if not ids:
            return []
        done = {d["event_id"]: d for d in self.flush_outbox()}
        return [done[i] if i in done else {"event_id": i, "ok": False, "attempts": 0, "error": "queued"}
                for i in ids]

    _notify_options: dict[str, Any] = {}

    # -- promotion ----------------------------------------------------------------------------------
    def promote(self: "WorldService", world: str, strategy_id: str, *, reason: str | None = None,
                dry_run: bool = False) -> "Outcome":
        """Decide a live promotion: open a request, apply, or record the block (dry run: write nothing)."""
        from qmtl_core.governance._requests import promote

        loaded = self.load_world(world, record=not dry_run)
        self._require_strategy(world, strategy_id)
        if dry_run:
            with self.store.read() as conn:
                return promote(conn, loaded.policy, strategy_id, actor=self.actor, reason=reason, now=self.clock(),
                               dry_run=True)
        with self.store.write() as conn:
            outcome = promote(conn, loaded.policy, strategy_id, actor=self.actor, reason=reason, now=self.clock())
            if outcome.status == "applied":
                self.require_live_confirmed(f"promoting {strategy_id} would put it live in {world} now")
            ids = self._enqueue(conn, loaded, outcome.notify)
        outcome.extra["notifications"] = self._deliver(ids)
        return outcome

    def decide_request(self: "WorldService", request_id: str, *, decision: str, reason: str,
                       signature: str | None = None) -> "Outcome":
        """Approve or reject a request as the calling identity (``signature``: an SSH signature of the
        approval message, ``qmtl_core.approval_signing``)."""
        from qmtl_core.governance._requests import decide, load_request

        reason = require_reason(reason, decision)
        with self.store.read() as conn:
            world = load_request(conn, request_id).world_id
        loaded = self.load_world(world)
        with self.store.write() as conn:
            row = load_request(conn, request_id)
            outcome = decide(conn, loaded.policy, row, actor=self.actor, decision=decision, reason=reason,
                             now=self.clock(), signature=signature)
            if outcome.status == "applied":
                self.require_live_confirmed(f"approving request {request_id} would put {row.strategy_id} "
                                            f"live in {world} now (the last approval needed)")
            ids = self._enqueue(conn, loaded, outcome.notify)
        outcome.extra["notifications"] = self._deliver(ids)
        return outcome

    def promotion_requests(self: "WorldService", *, world: str | None = None, include_closed: bool = False,
                           at: datetime | None = None) -> list[dict[str, Any]]:
        """Requests with age and approvals so far (pending only unless ``include_closed``); with
        ``at``, as they stood then (``requests_at``): nothing opened, approved or decided later."""
        from qmtl_core.governance._requests import list_requests, requests_at

        if world is not None:
            self.load_world(world, record=False)
        with self.store.read() as conn:
            # Closed requests are read for the record (``--all``, ``--at``, the report): with each
            # approval's history, so one renewed after a time shows as it stood then.
            rows = list_requests(conn, world=world, include_closed=include_closed or at is not None,
                                 history=include_closed or at is not None)
        if at is not None:
            rows = [r for r in requests_at(rows, at) if include_closed or r["status"] == "pending"]
        now = at or self.clock()
        from qmtl_core.timeutil import parse_instant

        for r in rows:
            r["age_seconds"] = (now - parse_instant(r["created_at"])).total_seconds()
            try:
                lp = self.load_world(r["world"], record=False).policy.live_promotion
                r["required_approvals"] = lp.required_approvals
                r["approvers"] = list(lp.approver_names)
            except Exception:  # a world file removed since: the request still lists
                r["required_approvals"] = None
        return rows

    # -- activations --------------------------------------------------------------------------------
    def activations(self: "WorldService", world: str) -> dict[str, Any]:
        """The world's current activation set."""
        from qmtl_core.governance._activations import current_set

        self.load_world(world, record=False)
        with self.store.read() as conn:
            version, rows = current_set(conn, world)
        return {"world": world, "set_version": version, "activations": [a.to_dict() for a in rows.values()]}

    def rollback(self: "WorldService", world: str, *, reason: str) -> dict[str, Any]:
        """Restore the previous activation set; a strategy that would go live again is restored to
        paper with a promotion request opened (rollback never makes anything live on its own)."""
        from qmtl_core.governance._activations import current_set
        from qmtl_core.governance._reentry import rollback

        reason = require_reason(reason, "rollback")
        loaded = self.load_world(world)
        with self.store.write() as conn:
            result = rollback(conn, loaded.policy, actor=self.actor, now=self.clock(), reason=reason)
            _, restored = current_set(conn, world)
            live = sorted(sid for sid, a in restored.items() if a.stage == "live")
            if live:  # nothing goes live by rollback, but a set that keeps a strategy live is a live change
                self.require_live_confirmed(f"rolling {world} back to activation set "
                                            f"{result.extra['restored_set']} would leave {', '.join(live)} live")
            ids = self._enqueue(conn, loaded, result.notify)
        return {**result.to_dict(), "notifications": self._deliver(ids)}

    def set_halted(self: "WorldService", world: str, *, halted: bool, reason: str) -> dict[str, Any]:
        """The persisted kill switch (``halted=True``), which needs only the world id: it works from
        the policy in force kept in the store, whatever state the world's file is in. Lifting it
        (``halted=False``) re-requests, never re-applies, what was live."""
        from qmtl_core.governance._reentry import halt, resume
        from qmtl_core.service._service import LoadedWorld

        reason = require_reason(reason, "halt" if halted else "resume")
        if halted:
            policy = self.known_world(world)
            with self.store.write() as conn:
                result = halt(conn, world, policy, actor=self.actor, now=self.clock(), reason=reason)
                ids = (self._enqueue(conn, LoadedWorld(policy, self.settings.worlds_dir, ""), result.notify)
                       if policy is not None and result.extra["changed_flag"] else [])
        else:
            loaded = self.load_world(world)
            with self.store.write() as conn:
                result = resume(conn, loaded.policy, actor=self.actor, now=self.clock(), reason=reason)
                if result.extra["changed_flag"]:
                    # Lifting the kill switch is a live change (issue 17's explicit intent), even though
                    # what was live at the halt only gets promotion requests.
                    self.require_live_confirmed(f"resuming {world} would lift its kill switch")
                ids = self._enqueue(conn, loaded, result.notify) if result.extra["changed_flag"] else []
        doc = result.to_dict()
        return {**doc, "world": world, "halted": halted, "changed": doc.pop("changed_flag"),
                "stages_changed": result.changed, "notifications": self._deliver(ids)}

    def demote(self: "WorldService", world: str, strategy_id: str, *, reason: str, to: str = "paper") -> dict[str, Any]:
        """Take a strategy down a stage (live → paper, paper → backtest, or to ``retired``)."""
        from qmtl_core.errors import UsageError
        from qmtl_core.governance._activations import set_stage

        expect = {"paper": ("live",), "backtest": ("paper", "live"), "retired": ("backtest", "paper", "live")}
        if to not in expect:
            raise UsageError(f"cannot demote to {to!r}", hint="use paper, backtest or retired")
        reason = require_reason(reason, "demote")
        loaded = self.load_world(world)
        self._require_strategy(world, strategy_id)
        with self.store.write() as conn:
            version = set_stage(conn, policy=loaded.policy, strategy_id=strategy_id, expect=expect[to], to=to,
                                actor=self.actor, now=self.clock(), kind="strategy.demoted", reason=reason)
            ids = self._enqueue(conn, loaded, [{"event": "strategy.demoted", "world": world, "strategy_id": strategy_id,
                                                "to": to, "reason": reason}])
        sent = self._deliver(ids)
        return {"world": world, "strategy_id": strategy_id, "to": to, "set_version": version, "notifications": sent}

    def decisions(self: "WorldService", world: str, *, strategy_id: str | None = None) -> list["DecisionEnvelope"]:
        """Decision envelopes now for one strategy or every strategy of the world (one read
        transaction; nothing is written)."""
        from qmtl_core.governance._activations import current_decisions

        loaded = self.load_world(world, record=False)
        with self.store.read() as conn:
            return current_decisions(conn, loaded.policy, now=self.clock(), strategy_id=strategy_id)

    def history(self: "WorldService", world: str, *, at: datetime | None = None) -> dict[str, Any]:
        """What was live then, and why (from the ledger)."""
        from qmtl_core import ledger
        from qmtl_core.governance._history import history_at

        self.load_world(world, record=False)
        with self.store.read() as conn:
            entries = ledger.entries(conn, world=world)
        return {"world": world, **history_at(entries, at)}

    def _require_strategy(self: "WorldService", world: str, strategy_id: str) -> None:
        import sqlalchemy as sa

        from qmtl_core.errors import StrategyNotFound
        from qmtl_core.store import schema

        t = schema.strategies
        with self.store.read() as conn:
            found = conn.execute(sa.select(t.c.strategy_id).where(t.c.world_id == world,
                                                                  t.c.strategy_id == strategy_id)).first()
        if found is None:
            raise StrategyNotFound(f"strategy {strategy_id!r} is not in world {world}",
                                   hint="qmtl world campaign W lists the world's strategies")

    def run_returns(self: "WorldService", world: str, *, strategy_id: str | None = None, stage: str | None = None,
                    history: bool = False, latest_per_stage: bool = False,
                    at: datetime | None = None) -> list[dict[str, Any]]:
        """Read-only: the returns stored with run revisions, for charts (reports, sparklines).

        The same rows as ``list_runs`` (latest revision of each run; every revision with ``history``),
        or with ``latest_per_stage`` one row per strategy and stage: the latest revision of its latest
        run, as ``load_state`` picks it. With ``at``, only revisions recorded at or before it count (newest
        recorded first; with ``latest_per_stage``, the newest per strategy and stage). Each row:
        ``{strategy_id, stage, run_id, revision, recorded_at, returns: [[iso_ts, r], ...]}``.
        Only the chosen revisions' returns are read and decoded.
        """
        import sqlalchemy as sa

        from qmtl_core.service._service import check_stage
        from qmtl_core.store import schema
        from qmtl_core.timeutil import iso
        from qmtl_core.world_files import world_path

        if stage is not None:
            check_stage(stage)
        world_path(self.settings.worlds_dir, world)
        er, rr = schema.evaluation_runs, schema.run_revisions
        query = (sa.select(rr.c.id, er.c.strategy_id, er.c.stage, er.c.run_id, rr.c.revision, rr.c.recorded_at)
                 .join(er, rr.c.run_pk == er.c.id).where(er.c.world_id == world))
        if strategy_id is not None:
            query = query.where(er.c.strategy_id == strategy_id)
        if stage is not None:
            query = query.where(er.c.stage == stage)
        if at is not None:
            query = query.where(rr.c.recorded_at <= iso(at)).order_by(rr.c.recorded_at.desc(), rr.c.id.desc())
        else:
            if not history:
                query = query.where(rr.c.revision == er.c.latest_revision)
            query = query.order_by(er.c.updated_at.desc(), er.c.id.desc(), rr.c.revision.desc())
        with self.store.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
            if latest_per_stage:
                seen: set[tuple[str, str]] = set()
                rows = [r for r in rows if (r["strategy_id"], r["stage"]) not in seen
                        and not seen.add((r["strategy_id"], r["stage"]))]  # type: ignore[func-returns-value]
            returns: dict[int, Any] = {}
            ids = [r["id"] for r in rows]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                returns.update(conn.execute(sa.select(rr.c.id, rr.c.returns).where(rr.c.id.in_(chunk))).all())
        return [{"strategy_id": r["strategy_id"], "stage": r["stage"], "run_id": r["run_id"],
                 "revision": r["revision"], "recorded_at": r["recorded_at"],
                 "returns": returns.get(r["id"]) or []} for r in rows]
