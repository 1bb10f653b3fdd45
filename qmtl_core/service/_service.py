"""``WorldService``: the one facade through which the CLI and the HTTP server read and change state."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmtl_core.config import Settings
from qmtl_core.errors import BusyError, LiveNotConfirmed, QmtlError, UsageError
from qmtl_core.governance._reentry import withdraw_live
from qmtl_core.service._governance import GovernanceMixin
from qmtl_core.service._strategies import Registration
from qmtl_core.timeutil import iso, utcnow
from qmtl_core.world_files import check_world_id, world_files, world_path

if TYPE_CHECKING:
    from datetime import timedelta

    from qmtl_core.campaign import Action, CampaignView
    from qmtl_core.controlbus import ControlBus, ControlEvent
    from qmtl_core.domains import DecisionEnvelope
    from qmtl_core.service._campaign import WorldOutcome
    from qmtl_core.datafiles import ReturnsTable
    from qmtl_core.evaluation import BookRisk
    from qmtl_core.risk import Freshness, RiskSnapshot, StoredSnapshot
    from qmtl_core.runs import RunRevision
    from qmtl_core.audit import AuditResult
    from qmtl_core.checkpoint import Checkpoint
    from qmtl_core.ledger import LedgerEntry
    from qmtl_core.policy import WorldPolicy
    from qmtl_core.service._policies import PolicyRecord
    from qmtl_core.store import Store


@dataclass
class LoadedWorld:
    """A world's validated policy, where it came from, and its recorded version."""

    policy: "WorldPolicy"
    path: Path
    content_hash: str
    record: "PolicyRecord | None" = None
    newly_recorded: bool = False
    #: The file's content recorded as a proposal awaiting approval (the policy above stays in force).
    proposal: "PolicyRecord | None" = None

    @property
    def world_id(self) -> str:
        """The world's name."""
        return self.policy.world


@dataclass
class ValidationResult:
    """Outcome of validating one policy file."""

    path: str
    ok: bool
    world: str | None = None
    policy_version: int | None = None
    error: dict[str, Any] | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"path": self.path, "ok": self.ok, "world": self.world,
                "policy_version": self.policy_version, "error": self.error}


@dataclass(frozen=True)
class Submitted:
    """What ``record_submission`` wrote: the run revision, the strategy's row (with a
    registration) and whether it changed, and the queue events announced."""

    run: "RunRevision"
    strategy: dict[str, Any] | None
    changed: bool
    events: tuple["ControlEvent", ...] = ()


@dataclass
class WorldSummary:
    """One row of ``qmtl world list``."""

    world: str
    path: str
    ok: bool
    policy: "WorldPolicy | None" = None
    record: "PolicyRecord | None" = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)



#: Parsed policies by file identity (path, mtime, size): a server answering many requests parses a
#: file again only when it changed on disk.
_POLICY_CACHE: dict[tuple[str, int, int], tuple["WorldPolicy", str]] = {}


def _parsed_policy(path: Path, load: Callable[[Path], "WorldPolicy"]) -> tuple["WorldPolicy", str]:
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _POLICY_CACHE:
        return _POLICY_CACHE[key]
    from qmtl_core.policy import policy_hash  # pydantic and the models: local mode only

    policy = load(path)
    value = (policy, policy_hash(policy))
    if key is not None:
        if len(_POLICY_CACHE) > 1000:
            _POLICY_CACHE.clear()
        _POLICY_CACHE[key] = value
    return value


#: The policy in force per world and file content, as an evaluation last found it recorded: later
#: evaluations skip two read transactions and instead confirm, inside their own write transaction,
#: that this is still the version in force (``_policies.in_force_hash``), so a version another
#: host adopted meanwhile is noticed by the very next evaluation. Entries live a few seconds only.
_IN_FORCE_CACHE: dict[tuple[str, str], tuple[float, "LoadedWorld"]] = {}
_IN_FORCE_SECONDS = 5.0


def check_stage(stage: str) -> None:
    """Refuse a stage name that is not backtest, paper, shadow or live."""
    from qmtl_core.policy import STAGES

    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}", hint="use backtest, paper, shadow or live")


class WorldService(GovernanceMixin):
    """Facade over policies, store and ledger; the only place state changes happen."""

    def __init__(self, settings: Settings, *, store: "Store | None" = None,
                 clock: Callable[[], datetime] = utcnow, actor: str | None = None,
                 role: str | None = None, live_confirmed: bool = False) -> None:
        if actor is not None and (not actor.strip() or actor != actor.strip() or not actor.isprintable()):
            raise UsageError(f"invalid actor {actor!r}: every change is recorded with who made it",
                             hint="a token's actor or an OS account name", code="invalid_actor")
        self.settings = settings
        self._store = store
        self.clock = clock
        self._bus: "ControlBus | None" = None
        self._actor = actor
        self._role = role
        #: The caller said it means to change what is live (``X-Allow-Live: true`` /
        #: ``--allow-live``). Without it every call that would make or keep a strategy live is
        #: refused (``LiveNotConfirmed``) inside its transaction, so nothing is written.
        self.live_confirmed = live_confirmed

    def as_actor(self, actor: str, *, role: str | None = None, live_confirmed: bool | None = None) -> "WorldService":
        """The same facade (store, clock, bus) acting as ``actor`` with a token's ``role``: the
        server uses it for the token's actor; local mode never does (there the actor is the OS
        user, with no role: what it may do follows from the world's policy). The live intent is
        this facade's unless given (the server always gives the request's)."""
        other = WorldService(self.settings, store=self.store, clock=self.clock, actor=actor, role=role,
                             live_confirmed=self.live_confirmed if live_confirmed is None else live_confirmed)
        other._bus = self.bus
        return other

    def confirming_live(self, confirmed: bool = True) -> "WorldService":
        """The same facade, same identity, with the caller's live intent set (local ``--allow-live``)."""
        other = WorldService(self.settings, store=self.store, clock=self.clock, actor=self._actor,
                             role=self._role, live_confirmed=confirmed)
        other._bus = self.bus
        return other

    def require_live_confirmed(self, what: str) -> None:
        """The one check of the caller's live intent: raise ``LiveNotConfirmed`` saying what the call
        would have done. Callers invoke it inside the write transaction, before it commits."""
        if not self.live_confirmed:
            raise LiveNotConfirmed(
                f"{what}; refused without the explicit live intent, nothing was changed",
                hint="repeat with --allow-live (HTTP: header X-Allow-Live: true)")

    @property
    def role(self) -> str | None:
        """The token's role behind the server; ``None`` in local mode."""
        return self._role

    # -- provenance and ownership (DESIGN §11) -------------------------------------------------------
    def is_producer(self, policy: "WorldPolicy") -> bool:
        """Whether this identity's realized returns are trusted evidence in the world: a token with
        role ``producer``, or a local identity listed in ``risk.producers``."""
        if self._role is not None:
            return self._role == "producer"
        return self.actor in policy.risk.producers

    def _request_class(self, policy: "WorldPolicy", claimed: str | None) -> tuple[str, list[str]]:
        """The class a request's metrics and returns are recorded as, and a note when a claim is
        not honoured. Only qmtl's own replay is trusted: in-process (local mode), or posted by a
        producer or operator token; a submitter's client-side replay cannot be checked."""
        from qmtl_core.evidence_class import EvidenceClass

        if claimed is None:
            return EvidenceClass.UNVERIFIED, []
        if claimed != EvidenceClass.REPLAY:
            raise UsageError(f"evidence_class {claimed!r} cannot be claimed by a request",
                             hint="only qmtl's own replay may say 'qmtl replay'; hub returns go to qmtl risk put")
        if self._role in (None, "producer", "operator"):
            return EvidenceClass.REPLAY, []
        return EvidenceClass.UNVERIFIED, [f"{self.actor} ({self._role}) claimed qmtl replay; a replay run on "
                                          "a submitter's machine cannot be verified, so it is unverified"]

    def _check_owner(self, conn: Any, policy: "WorldPolicy", strategy_id: str) -> None:
        """A submitter acts only on strategies it submitted: a token with role ``submitter``, or
        any local identity that is not a producer. Operators and producers act on any strategy
        (a producer's replay is the feed). Call inside the write transaction, after the lock."""
        import sqlalchemy as sa

        from qmtl_core.errors import NotOwner
        from qmtl_core.store import schema

        if self._role not in (None, "submitter") or (self._role is None and self.is_producer(policy)):
            return
        t = schema.strategies
        owner = conn.execute(sa.select(t.c.submitter).where(t.c.world_id == policy.world,
                                                            t.c.strategy_id == strategy_id)).scalar()
        if owner is not None and owner != self.actor:
            raise NotOwner(f"{self.actor} did not submit {strategy_id} in {policy.world} ({owner} did): only its "
                           "submitter posts runs, returns or submissions for it",
                           hint="ask its submitter, or an operator; realized returns come from a producer "
                                "through the risk hub")

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def store(self) -> "Store":
        """The store, opened (and migrated) on first use."""
        if self._store is None:
            from qmtl_core.store import open_store

            self._store = open_store(self.settings.store_url)
        return self._store

    @property
    def bus(self) -> "ControlBus":
        """The in-process control bus this facade publishes events on."""
        if self._bus is None:
            from qmtl_core.controlbus import ControlBus

            self._bus = ControlBus()
        return self._bus

    @property
    def actor(self) -> str:
        """Who is acting: the OS user in local mode, the token's actor behind the server."""
        return self._actor if self._actor is not None else self.settings.identity()

    def close(self) -> None:
        """Release the store's connections."""
        if self._store is not None:
            self._store.dispose()

    # -- policies --------------------------------------------------------------------------------
    def validate(self, paths: Sequence[Path] | None = None) -> list[ValidationResult]:
        """Validate policy files (all worlds when ``paths`` is empty); never touches the store."""
        from qmtl_core.policy import load_policy_file

        targets = list(paths) if paths else world_files(self.settings.worlds_dir)
        results = []
        for path in targets:
            try:
                policy = load_policy_file(path)
            except QmtlError as exc:
                results.append(ValidationResult(str(path), False, error=exc.to_dict(),
                                                message=exc.one_line()))
            else:
                results.append(ValidationResult(str(path), True, policy.world, policy.policy_version))
        return results

    def load_world(self, world: str, *, record: bool = True) -> LoadedWorld:
        """Load and validate a world's policy file and return the policy **in force**.

        With ``record`` (commands that act), new file content is recorded: adopted directly, or as a
        proposal when the world has paper or live strategies. The policy returned is the newest
        adopted version the store keeps, which is the file's only when the file's version is in
        force (or the world was never recorded); ``LoadedWorld.proposal`` names a pending proposal.
        """
        from qmtl_core.policy import load_policy_file

        path = world_path(self.settings.worlds_dir, world)
        policy, digest = _parsed_policy(path, load_policy_file)
        loaded = LoadedWorld(policy, path, digest)
        if record:
            self._record(loaded)
        return self._in_force(loaded)

    def _world_for_write(self, world: str, *, cached: bool) -> LoadedWorld:
        """``load_world(world)`` for a write that confirms the version in force itself (see
        ``_IN_FORCE_CACHE``); ``cached=False`` asks the store again."""
        from qmtl_core.policy import load_policy_file

        path = world_path(self.settings.worlds_dir, world)
        _, digest = _parsed_policy(path, load_policy_file)
        key, now = (str(path), digest), time.monotonic()
        found = _IN_FORCE_CACHE.get(key)
        if cached and found is not None and found[0] > now:
            return found[1]
        loaded = self.load_world(world)
        if len(_IN_FORCE_CACHE) > 1000:
            _IN_FORCE_CACHE.clear()
        _IN_FORCE_CACHE[key] = (now + _IN_FORCE_SECONDS, loaded)
        return loaded

    def _in_force(self, from_file: LoadedWorld) -> LoadedWorld:
        from qmtl_core.policy import WorldPolicy
        from qmtl_core.service._policies import as_record, in_force_row

        with self.store.read() as conn:
            row = in_force_row(conn, from_file.world_id)
        if row is None or row.content_hash == from_file.content_hash:
            return from_file
        proposal = from_file.record if from_file.record is not None and from_file.record.status == "proposed" else None
        return LoadedWorld(WorldPolicy.model_validate(row.document), from_file.path, row.content_hash,
                           as_record(row), from_file.newly_recorded, proposal=proposal)

    def known_world(self, world: str) -> "WorldPolicy | None":
        """The policy in force of a world the store knows (``None`` for one it has only a file for),
        read from the store alone; ``WorldNotFound`` when neither knows it."""
        from qmtl_core.service._policies import policy_in_force

        check_world_id(world)
        with self.store.read() as conn:
            policy = policy_in_force(conn, world)
        if policy is None:
            world_path(self.settings.worlds_dir, world)
        return policy

    def _record(self, loaded: LoadedWorld) -> None:
        from qmtl_core.service._policies import as_record, in_force_row, latest_policy, record_policy

        with self.store.read() as conn:  # the common case: already recorded, no write lock needed
            known = [latest_policy(conn, loaded.world_id), in_force_row(conn, loaded.world_id)]
        for row in known:
            if row is not None and row.content_hash == loaded.content_hash:
                loaded.record, loaded.newly_recorded = as_record(row), False
                return
        try:
            text = loaded.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # validated a moment ago; a race with an editor
            text = ""
        with self.store.write() as conn:
            loaded.record, loaded.newly_recorded = record_policy(
                conn, world_id=loaded.world_id, policy_version=loaded.policy.policy_version,
                content_hash=loaded.content_hash, document=loaded.policy.model_dump(mode="json"),
                source_path=str(loaded.path), source_text=text, actor=self.actor, now=self.clock())
            if loaded.newly_recorded and loaded.record.status == "adopted" and not loaded.policy.allow_live:
                withdraw_live(conn, loaded.policy, actor=self.actor, now=self.clock(),
                              reason=f"policy_version {loaded.policy.policy_version} sets allow_live: false")

    def policy_status(self, world: str) -> dict[str, Any]:
        """The version in force, open proposals with their diff and approvals (reads only)."""
        from qmtl_core.service._policies import policy_status

        check_world_id(world)
        with self.store.read() as conn:
            status = policy_status(conn, world)
        if status["in_force"] is None:
            world_path(self.settings.worlds_dir, world)  # WorldNotFound for a typo
        return status

    def approve_policy(self, world: str, *, version: int, reason: str) -> dict[str, Any]:
        """Approve a proposed policy version as the calling identity; the last required approval
        brings it into force (and, under ``allow_live: false``, takes live strategies to paper)."""
        from qmtl_core.service._governance import require_reason
        from qmtl_core.service._policies import approve_policy

        reason = require_reason(reason, "policy approve")
        check_world_id(world)
        now = self.clock()
        with self.store.write() as conn:
            result, adopted = approve_policy(conn, world, version=version, actor=self.actor, reason=reason, now=now)
            if adopted is not None and not adopted.allow_live:
                withdraw_live(conn, adopted, actor=self.actor, now=now,
                              reason=f"policy_version {version} sets allow_live: false")
        return result

    def list_worlds(self) -> list[WorldSummary]:
        """Every world file with its validity and recorded version, plus every world the store has
        paper or live strategies in whose file is gone. Reads only: nothing is recorded here."""
        from qmtl_core.policy import load_policy_file
        from qmtl_core.service._campaign import active_worlds
        from qmtl_core.service._policies import as_record, in_force_row

        out = []
        with self.store.read() as conn:
            for path in world_files(self.settings.worlds_dir):
                try:
                    policy = load_policy_file(path)
                except QmtlError as exc:
                    out.append(WorldSummary(path.stem, str(path), False, error=exc.one_line()))
                    continue
                in_force = in_force_row(conn, policy.world)
                out.append(WorldSummary(policy.world, str(path), True, policy,
                                        as_record(in_force) if in_force is not None else None))
            missing = sorted(active_worlds(conn) - {w.world for w in out})
        for world in missing:
            out.append(WorldSummary(world, str(self.settings.worlds_dir / f"{world}.yaml"), False,
                                    error=f"world {world} has paper or live strategies but no policy file "
                                          f"in {self.settings.worlds_dir} (restore it; qmtl world halt {world} "
                                          "works without it)"))
        return out

    def policy_diff(self, world: str, old_version: int, new_version: int) -> str | None:
        """The unified diff between two recorded policy versions (``None`` if either is unknown)."""
        from qmtl_core.service._policies import version_diff

        with self.store.read() as conn:
            return version_diff(conn, world, old_version, new_version)

    def policy_history(self, world: str) -> list["PolicyRecord"]:
        """Recorded policy versions of a world, oldest first."""
        from qmtl_core.service._policies import policy_history

        with self.store.read() as conn:
            return policy_history(conn, world)

    # -- evaluation ------------------------------------------------------------------------------
    def record_evaluation(self, world: str, *, strategy_id: str, stage: str, run_id: str | None = None,
                          metrics: Mapping[str, Any] | None = None,
                          returns: Sequence[tuple[datetime, float]] | None = None,
                          evidence_class: str | None = None) -> "RunRevision":
        """Record an evaluation run of one strategy at one stage, sourcing metrics per DESIGN §5.

        What the request supplies is ``unverified`` unless it is qmtl's own replay (``evidence_class``
        claimed, and honoured for who is calling); a submitter may record only its own strategies."""
        return self.record_submission(world, strategy_id=strategy_id, stage=stage, run_id=run_id,
                                      metrics=metrics, returns=returns, evidence_class=evidence_class).run

    def record_submission(self, world: str, *, strategy_id: str, stage: str, run_id: str | None = None,
                          metrics: Mapping[str, Any] | None = None,
                          returns: Sequence[tuple[datetime, float]] | None = None,
                          evidence_class: str | None = None, registration: Registration | None = None,
                          queues: Sequence[Mapping[str, Any]] = ()) -> "Submitted":
        """``record_evaluation`` plus, in the same transaction, the strategy's row
        (``registration``, as ``register_strategy``) and its announced ``queues`` (as
        ``announce_queues``): what ``qmtl submit`` and ``qmtl run`` write. All or nothing: a
        failure at any step leaves no strategy, no run and no ledger entry. The queue events are
        published after the commit."""
        from qmtl_core import ledger, runs
        from qmtl_core.governance._activations import book_members
        from qmtl_core.service._policies import in_force_hash
        from qmtl_core.service._strategies import announce, register
        from qmtl_core.store import locks

        check_stage(stage)
        row, changed = None, False
        for attempt in range(3):
            loaded = self._world_for_write(world, cached=attempt == 0)
            klass, notes = self._request_class(loaded.policy, evidence_class)
            now = self.clock()
            with self.store.write() as conn:
                if registration is None and not queues:
                    # An evaluation alone: those of other strategies go on side by side (store/locks.py).
                    locks.evaluation(conn, loaded.world_id, strategy_id)
                else:  # a submission writes the strategy's row and its queues too: one writer at a time
                    ledger.lock(conn)
                if in_force_hash(conn, loaded.world_id) != loaded.content_hash:
                    continue  # another version came into force since it was read: read it again
                self._check_owner(conn, loaded.policy, strategy_id)
                if registration is not None:
                    row, changed = register(conn, policy=loaded.policy, strategy_id=strategy_id, reg=registration,
                                            actor=self.actor, now=now)
                book = book_members(conn, loaded.policy) if runs.portfolio_rules(loaded.policy, stage) else frozenset()
                rev = runs.evaluate_and_record(conn, policy=loaded.policy, policy_hash=loaded.content_hash,
                                               strategy_id=strategy_id, stage=stage, run_id=run_id,
                                               metrics=metrics, returns=returns, actor=self.actor,
                                               now=now, book=book, request_class=klass, extra_notes=notes)
                events = announce(conn, world=world, updates=queues, actor=self.actor, now=now) if queues else []
            for ev in events:
                self.bus.publish(ev)
            return Submitted(rev, row, changed, tuple(events))
        raise BusyError(f"the policy of {world} kept changing while this evaluation was recorded",
                        hint="try again")

    def evaluate_cohort(self, world: str, *, stage: str, returns: "ReturnsTable | None" = None,
                        metrics: Mapping[str, Mapping[str, Any]] | None = None,
                        run_id: str | None = None) -> list["RunRevision"]:
        """Record one run per strategy of a cohort, with metrics from the vectorised path."""
        from qmtl_core import ledger, runs
        from qmtl_core.evaluation import add_extras, cohort_metrics, merge_metrics, uses_metric
        from qmtl_core.evidence_class import EvidenceClass
        from qmtl_core.governance._activations import book_members
        from qmtl_core.metric_names import is_portfolio_metric
        from qmtl_core.risk import freshness, latest_snapshot

        check_stage(stage)
        loaded = self.load_world(world)
        policy = loaded.policy
        now = self.clock()
        if returns is not None:
            from qmtl_core.timeutil import refuse_future

            refuse_future(returns.timestamps, now=now, tolerance=policy.risk.future_tolerance,
                          where=lambda i: f"{stage} cohort returns, row {i + 1}")
        computed = cohort_metrics(returns, policy.periods_per_year,
                                  len(returns.strategies) if uses_metric(policy, "dsr") else None) \
            if returns is not None else {}
        ids = sorted(set(computed) | set(metrics or {}))
        bench = (returns.row(policy.benchmark) if returns is not None and policy.benchmark in returns.strategies
                 else None)
        out = []
        with self.store.write() as conn:
            ledger.lock(conn)
            snapshot = latest_snapshot(conn, world, stage=stage) if runs.portfolio_rules(policy, stage) else None
            book = book_members(conn, policy)
            risks = {}
            for sid in ids:  # every strategy checked before anything is written: all or nothing
                fresh = (freshness(snapshot, now=now, max_age=policy.risk.snapshot_max_age, strategy_id=sid)
                         if snapshot is not None else None)
                risks[sid] = runs.book_risk(policy, sid, snapshot, fresh, book)
                runs.require_portfolio(policy, stage, risks[sid], fresh)
            for sid in ids:
                self._check_owner(conn, loaded.policy, sid)
            series_of = {sid: returns.series(sid) if returns is not None and sid in returns.strategies else None
                         for sid in ids}
            # the policy's spacing rule may refuse one: before anything is written
            windows = {sid: runs.window_of(series_of[sid], "request.returns", policy) for sid in ids}
            for sid in ids:
                runs.ensure_strategy(conn, world_id=world, strategy_id=sid, now=now, submitter=self.actor)
                series = series_of[sid]
                given = {k: v for k, v in (metrics or {}).get(sid, {}).items() if not is_portfolio_metric(k)}
                values, where = merge_metrics(computed.get(sid, {}), given)
                add_extras(policy, values, where, series=returns.row(sid) if series else None,
                           benchmark=bench, source="request.returns")
                risk = risks[sid]
                for name, value in (risk.metrics.items() if risk is not None else ()):
                    if value is not None:
                        values[name], where[name] = value, risk.source
                sourced = runs.Sourced(
                    values, where, windows[sid],
                    [(iso(t), r) for t, r in series] if series else None,
                    metric_classes={k: EvidenceClass.HUB if risk is not None and where.get(k) == risk.source
                                    else EvidenceClass.UNVERIFIED for k in values})
                end = series[-1][0] if series else None
                key = run_id or runs.suggested_run_id(stage, end, now)
                out.append(runs.record_run(conn, policy=loaded.policy, strategy_id=sid, stage=stage,
                                           run_id=key, sourced=sourced, actor=self.actor, now=now,
                                           policy_hash=loaded.content_hash))
        return out

    def list_runs(self, world: str, *, strategy_id: str | None = None, stage: str | None = None,
                  history: bool = False) -> list["RunRevision"]:
        """Runs of a world, newest first (every revision with ``history``)."""
        from qmtl_core import runs

        if stage is not None:
            check_stage(stage)
        world_path(self.settings.worlds_dir, world)  # WorldNotFound for a typo, not an empty list
        with self.store.read() as conn:
            return runs.list_runs(conn, world_id=world, strategy_id=strategy_id, stage=stage,
                                  history=history)

    # -- campaign ----------------------------------------------------------------------------------
    def campaign(self, world: str, *, strategy_id: str | None = None) -> list["CampaignView"]:
        """Per strategy: phase, window progress on data, metrics vs gates, next action."""
        from qmtl_core.campaign import campaign_view
        from qmtl_core.errors import StrategyNotFound
        from qmtl_core.service._campaign import load_state

        loaded = self.load_world(world, record=False)
        with self.store.read() as conn:
            state = load_state(conn, loaded)
        views = campaign_view(state, self.clock())
        if strategy_id is not None:
            views = [v for v in views if v.strategy_id == strategy_id]
            if not views:
                raise StrategyNotFound(f"strategy {strategy_id!r} is not in world {world}",
                                       hint="qmtl world campaign W lists the world's strategies")
        return views

    def campaign_tick(self, world: str) -> list["Action"]:
        """The recommended actions for a world now; changes nothing (POST /campaign/tick)."""
        from qmtl_core.service._campaign import plan_world

        return plan_world(self, world)[1]

    def campaign_iteration(self, worlds: Sequence[str], *, execute: bool, holder: str,
                           lease_ttl: "timedelta", on_action: Callable[[dict[str, Any]], None] | None = None,
                           on_world: Callable[[str], None] | None = None,
                           raise_refusal: bool = False) -> list["WorldOutcome"]:
        """One pass of the campaign loop: plan, or execute under each world's lease. ``raise_refusal``
        (a call about one world): a missing live intent raises ``LiveNotConfirmed`` (HTTP 428, exit
        10) instead of being that world's outcome, since it is the whole answer."""
        from qmtl_core.service._campaign import run_iteration

        return run_iteration(self, worlds, execute_actions=execute, holder=holder, lease_ttl=lease_ttl,
                             on_action=on_action, on_world=on_world, raise_refusal=raise_refusal)

    def world_names(self) -> list[str]:
        """Every world in the worlds directory, and every world with paper or live strategies in
        the store even when its file is gone (the loop reports it, never skips it)."""
        from qmtl_core.service._campaign import active_worlds

        with self.store.read() as conn:
            active = active_worlds(conn)
        return sorted({p.stem for p in world_files(self.settings.worlds_dir)} | active)

    # -- submissions -------------------------------------------------------------------------------
    def strategy_rows(self, world: str) -> list[dict[str, Any]]:
        """Every strategy the world has seen: id, name, stage, submitter, submitted_at (by id)."""
        import sqlalchemy as sa

        from qmtl_core.store import schema

        world_path(self.settings.worlds_dir, world)
        t = schema.strategies
        with self.store.read() as conn:
            rows = conn.execute(sa.select(t.c.strategy_id, t.c.name, t.c.stage, t.c.submitter, t.c.submitted_at)
                                .where(t.c.world_id == world).order_by(t.c.strategy_id)).all()
        return [dict(r._mapping) for r in rows]

    def strategy_info(self, world: str, strategy_id: str) -> dict[str, Any] | None:
        """The world's row for a strategy (stage, name, code_hash, submitter, meta ...); ``None``
        when the world has never seen it."""
        import sqlalchemy as sa

        from qmtl_core.store import schema

        world_path(self.settings.worlds_dir, world)
        t = schema.strategies
        with self.store.read() as conn:
            row = conn.execute(sa.select(t).where(t.c.world_id == world,
                                                  t.c.strategy_id == strategy_id)).first()
        return None if row is None else dict(row._mapping)

    def register_strategy(self, world: str, *, strategy_id: str, name: str | None = None,
                          code_hash: str | None = None, meta: Mapping[str, Any] | None = None,
                          expect_meta: Mapping[str, Any] | None = None, kind: str = "strategy.submitted",
                          reason: str | None = None) -> tuple[dict[str, Any], bool]:
        """Create or update a strategy's row: name, code hash, and ``meta`` merged key by key.

        ``expect_meta`` maps meta keys to the values they must still hold (``None``: absent), else
        ``ConflictError`` (a concurrent writer got there first). A ledger entry ``kind`` is written
        only when something changed, so an unchanged resubmission changes nothing. Returns the row
        and whether it changed.
        """
        from qmtl_core import ledger
        from qmtl_core.service._strategies import register

        loaded = self.load_world(world)
        reg = Registration(name=name, code_hash=code_hash, meta=dict(meta or {}), expect_meta=expect_meta,
                           kind=kind, reason=reason)
        with self.store.write() as conn:
            ledger.lock(conn)
            self._check_owner(conn, loaded.policy, strategy_id)
            return register(conn, policy=loaded.policy, strategy_id=strategy_id, reg=reg, actor=self.actor,
                            now=self.clock())

    # -- decisions ---------------------------------------------------------------------------------
    def decision(self, world: str, strategy_id: str) -> "DecisionEnvelope":
        """The world's decision envelope for a strategy now; recorded when it changes (by etag)."""
        return self.decisions(world, strategy_id=strategy_id)[0]

    # -- risk hub ----------------------------------------------------------------------------------
    def put_risk_snapshot(self, snapshot: "RiskSnapshot") -> tuple["StoredSnapshot", bool]:
        """Store a snapshot (dedupe by content hash, conflict on changed content), emit the event."""
        from qmtl_core import controlbus
        from qmtl_core.risk import put_snapshot
        from qmtl_core.store import schema

        import sqlalchemy as sa

        from qmtl_core.evidence_class import EvidenceClass
        from qmtl_core.risk import resolve_refs

        loaded = self.load_world(snapshot.world_id)  # the world must exist
        snapshot, refs = resolve_refs(snapshot, refs_dir=self.settings.risk_refs_dir)
        klass = EvidenceClass.HUB if self.is_producer(loaded.policy) else EvidenceClass.UNVERIFIED
        now = self.clock()
        with self.store.write() as conn:
            t = schema.strategies
            known = {r.strategy_id for r in conn.execute(
                sa.select(t.c.strategy_id).where(t.c.world_id == snapshot.world_id))}
            stored, created = put_snapshot(conn, snapshot, known_strategies=known, actor=self.actor,
                                           now=now, evidence_class=klass,
                                           future_tolerance=loaded.policy.risk.future_tolerance, refs=refs)
        if created:
            self.bus.publish(controlbus.risk_snapshot_updated(
                world_id=snapshot.world_id, snapshot_hash=stored.content_hash,
                as_of=snapshot.as_of, ttl_sec=snapshot.ttl_sec))
        return stored, created

    def offline_risk(self, policy: "WorldPolicy", stage: str, candidates: Sequence[str]
                     ) -> tuple[dict[tuple[str, str], float] | None, "BookRisk"]:
        """What an offline evaluation at ``stage`` reads from the store, writing nothing: the newest
        trusted snapshot of that stage when fresh, as selection's covariance (keyed ``(a, b)`` both
        ways; ``None`` without a correlation step or a covariance), and each candidate's portfolio
        metrics against the world's current book (``runs.book_risk``), or why there are none."""
        from qmtl_core import runs
        from qmtl_core.evaluation import BookRisk
        from qmtl_core.governance._activations import book_members
        from qmtl_core.risk import freshness, latest_snapshot

        wants_book = bool(runs.portfolio_rules(policy, stage))
        if policy.selection.correlation is None and not wants_book:
            return None, BookRisk()
        now = self.clock()
        with self.store.read() as conn:
            stored = latest_snapshot(conn, policy.world, stage=stage)
            book = book_members(conn, policy) if wants_book else frozenset()
        if stored is None:
            return None, BookRisk(why_not={sid: f"the world has no trusted {stage} risk snapshot"
                                           for sid in candidates})
        covariance: dict[tuple[str, str], float] | None = None
        if (policy.selection.correlation is not None and stored.snapshot.covariance is not None
                and freshness(stored, now=now, max_age=policy.risk.snapshot_max_age).ok):
            covariance = {}
            for key, value in stored.snapshot.covariance.items():
                a, b = (p.strip() for p in key.split(","))
                covariance[(a, b)] = covariance[(b, a)] = value
        risks, why_not = {}, {}
        for sid in candidates if wants_book else ():
            fresh = freshness(stored, now=now, max_age=policy.risk.snapshot_max_age, strategy_id=sid)
            risk = runs.book_risk(policy, sid, stored, fresh, book)
            if risk is not None:
                risks[sid] = risk
            else:
                why_not[sid] = f"{fresh.reason}: {fresh.detail}"
        return covariance, BookRisk(risks, why_not)

    def announce_queues(self, world: str, updates: Sequence[Mapping[str, Any]]) -> list["ControlEvent"]:
        """Announce a strategy's input queues (DESIGN §8): each update (``tags, interval, queues,
        match_mode, execution_domain``) becomes its ``tagquery.upsert`` and ``queue_update``,
        recorded in the ledger (``service._strategies.announce``: a repeat writes nothing), then
        published on the in-process bus."""
        from qmtl_core import ledger
        from qmtl_core.service._strategies import announce

        self.load_world(world, record=False)
        with self.store.write() as conn:
            ledger.lock(conn)  # the repeat check and the append see one chain
            written = announce(conn, world=world, updates=updates, actor=self.actor, now=self.clock())
        for ev in written:
            self.bus.publish(ev)
        return written

    def risk_snapshot(self, world: str, *, version: str | None = None,
                      stage: str | None = None) -> tuple["StoredSnapshot", "Freshness"]:
        """The latest (or a named) snapshot of a world, of any class and stage unless ``stage`` is
        given, and its freshness now (an ``unverified`` one is shown, never decided on)."""
        from qmtl_core.errors import NotFoundError
        from qmtl_core.risk import freshness, get_snapshot, latest_snapshot

        loaded = self.load_world(world, record=False)
        with self.store.read() as conn:
            stored = (get_snapshot(conn, world, version) if version
                      else latest_snapshot(conn, world, stage=stage, trusted_only=False))
        if stored is None:
            what = f" version {version!r}" if version else ""
            raise NotFoundError(f"world {world} has no risk snapshot{what}",
                                hint="post one with: qmtl risk put FILE", code="risk_snapshot_missing")
        return stored, freshness(stored, now=self.clock(), max_age=loaded.policy.risk.snapshot_max_age)

    # -- ledger ----------------------------------------------------------------------------------
    def audit_log(self, *, world: str | None = None, since: datetime | None = None,
                  kind: str | None = None, limit: int | None = None) -> list["LedgerEntry"]:
        """Ledger entries in chain order, filtered."""
        from qmtl_core import ledger

        with self.store.read() as conn:
            return ledger.entries(conn, world=world, since=since, kind=kind, limit=limit)

    def audit_head(self) -> dict[str, Any]:
        """The chain's head and this store's identity: what a checkpoint signs."""
        from qmtl_core import ledger
        from qmtl_core.audit import store_origin

        with self.store.read() as conn:
            seq, digest = ledger.head(conn)
            return {"origin": store_origin(conn), "seq": seq, "hash": digest}

    def audit_verify(self, *, checkpoints: "Sequence[tuple[str, Checkpoint]]" = (),
                     deep: bool = False) -> "AuditResult":
        """Verify the hash chain, that it holds each checkpoint's head, and (``deep``) that the decision
        tables hold exactly what the ledger records, approval signatures included."""
        from qmtl_core.audit import verify_store

        with self.store.read() as conn:
            return verify_store(conn, checkpoints=checkpoints, deep=deep)
