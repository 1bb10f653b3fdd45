"""Clients: the facade's results as JSON documents, in-process (``LocalClient``) or over HTTP
(``HttpClient``), with the same methods and the same documents.

The CLI renders only these documents and the HTTP API returns exactly them, so local and remote
mode print the same output and exit with the same codes by construction. ``LocalClient`` is also
what the server's routes call: there is no logic in the handlers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from qmtl_core.errors import BadInputError, QmtlError
from qmtl_core.grammar import GrammarError, parse_number

if TYPE_CHECKING:
    from qmtl_core.datafiles import ReturnsTable
    from qmtl_core.service._service import WorldService


# --- documents <-> values -------------------------------------------------------------------------------
def returns_doc(series: Sequence[tuple[datetime, float]] | None) -> list[list[Any]] | None:
    """``[(aware datetime, r)]`` as ``[[iso, r], ...]``."""
    if series is None:
        return None
    return [[t.isoformat(), float(r)] for t, r in series]


def returns_from_doc(doc: Any, *, what: str = "returns") -> list[tuple[datetime, float]] | None:
    """Inverse of ``returns_doc``; malformed input is bad input."""
    from qmtl_core.timeutil import parse_instant

    if doc is None:
        return None
    if not isinstance(doc, list):
        raise BadInputError(f"{what} must be a list of [timestamp, return] pairs")
    out = []
    for i, item in enumerate(doc):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise BadInputError(f"{what}[{i}] must be [timestamp, return]")
        try:
            value = parse_number(item[1], missing_ok=False)
        except GrammarError as exc:
            raise BadInputError(f"{what}[{i}]: {exc.message}", hint=exc.hint) from None
        out.append((parse_instant(str(item[0]), what=f"{what}[{i}] timestamp"), value))
    return out


def table_doc(table: "ReturnsTable | None") -> dict[str, Any] | None:
    """A returns table as JSON (NaN as null)."""
    if table is None:
        return None
    import numpy as np

    matrix = [[None if np.isnan(v) else float(v) for v in row] for row in table.matrix]
    return {"strategies": list(table.strategies), "timestamps": [t.isoformat() for t in table.timestamps],
            "matrix": matrix}


def table_from_doc(doc: Any) -> "ReturnsTable | None":
    """Inverse of ``table_doc``."""
    if doc is None:
        return None
    import numpy as np

    from qmtl_core.datafiles import ReturnsTable
    from qmtl_core.timeutil import parse_instant

    try:
        strategies = tuple(str(s) for s in doc["strategies"])
        stamps = tuple(parse_instant(str(t), what="timestamp") for t in doc["timestamps"])
        matrix = np.array([[parse_number(v) for v in row] for row in doc["matrix"]],
                          dtype=np.float64).reshape(len(strategies), len(stamps))
    except GrammarError as exc:
        raise BadInputError(f"returns table: matrix: {exc.message}", hint=exc.hint) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"returns table: {exc}",
                            hint="send {strategies: [...], timestamps: [...], matrix: [[...]]}") from None
    return ReturnsTable(strategies, stamps, matrix)


def promotion_mode(document: Mapping[str, Any]) -> str:
    """A policy document's live promotion mode (absent governance = disabled)."""
    governance = document.get("governance") or {}
    return (governance.get("live_promotion") or {}).get("mode", "disabled")


class LocalClient:
    """The ``WorldService`` facade, answering in documents."""

    def __init__(self, service: "WorldService") -> None:
        self.service = service

    def close(self) -> None:
        """Release the store."""
        self.service.close()

    # -- worlds ---------------------------------------------------------------------------------------
    def worlds(self) -> dict[str, Any]:
        """``qmtl world list``."""
        from qmtl_core.policy import policy_hash

        rows = []
        for w in self.service.list_worlds():
            doc = w.policy.model_dump(mode="json") if w.policy is not None else {}
            rows.append({
                "world": w.world, "path": w.path, "valid": w.ok, "error": w.error,
                "policy_version": doc.get("policy_version"), "allow_live": doc.get("allow_live"),
                "live_promotion": promotion_mode(doc) if w.ok else None,
                "rules": len(doc.get("rules", [])) if w.ok else None,
                "content_hash": policy_hash(w.policy) if w.policy is not None else None,
                "in_force_version": w.record.policy_version if w.record else None,
                "description": doc.get("description")})
        return {"worlds": rows, "worlds_dir": str(self.service.settings.worlds_dir)}

    def world(self, world: str) -> dict[str, Any]:
        """``qmtl world show``."""
        loaded = self.service.load_world(world, record=False)  # a read: records nothing
        history = self.service.policy_history(world)
        return {"world": loaded.world_id, "path": str(loaded.path), "content_hash": loaded.content_hash,
                "policy": loaded.policy.model_dump(mode="json"),
                "policy_versions": [h.to_dict() for h in history], "newly_recorded": False}

    def policy_status(self, world: str) -> dict[str, Any]:
        """``qmtl world policy status``."""
        return self.service.policy_status(world)

    def approve_policy(self, world: str, *, version: int, reason: str) -> dict[str, Any]:
        """``qmtl world policy approve``."""
        return self.service.approve_policy(world, version=version, reason=reason)

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate_offline(self, world: str, *, stage: str, returns: "ReturnsTable | None",
                         metrics: Mapping[str, Mapping[str, Any]] | None, previous_active: Sequence[str] = (),
                         n_trials: int | None = None) -> dict[str, Any]:
        """``qmtl world evaluate`` without recording."""
        from qmtl_core.errors import UsageError
        from qmtl_core.evaluation import evaluate_cohort
        from qmtl_core.service._service import check_stage

        check_stage(stage)
        if returns is None and metrics is None:
            raise UsageError("give --returns FILE or --metrics FILE to evaluate",
                             hint="e.g. qmtl world evaluate W --returns returns.csv --explain")
        loaded = self.service.load_world(world, record=False)
        candidates = sorted(set(returns.strategies if returns is not None else ()) | set(metrics or {}))
        covariance, book = self.service.offline_risk(loaded.policy, stage, candidates)
        return evaluate_cohort(loaded.policy, stage=stage, metrics=metrics, returns=returns,
                               previous_active=previous_active, n_trials=n_trials,
                               covariance=covariance, book=book).to_dict()

    def record_evaluation(self, world: str, *, strategy_id: str, stage: str, run_id: str | None = None,
                          metrics: Mapping[str, Any] | None = None,
                          returns: Sequence[tuple[datetime, float]] | None = None,
                          evidence_class: str | None = None) -> dict[str, Any]:
        """``qmtl world evaluate --strategy``: one recorded run revision. ``evidence_class`` is
        what the caller claims (``qmtl replay`` from ``qmtl submit``/``qmtl run``); the facade
        decides what it is recorded as."""
        rev = self.service.record_evaluation(world, strategy_id=strategy_id, stage=stage, run_id=run_id,
                                             metrics=metrics, returns=returns, evidence_class=evidence_class)
        return {**rev.to_dict(), "created": rev.created}

    def record_submission(self, world: str, *, strategy_id: str, stage: str, run_id: str | None = None,
                          metrics: Mapping[str, Any] | None = None,
                          returns: Sequence[tuple[datetime, float]] | None = None,
                          evidence_class: str | None = None, registration: Mapping[str, Any] | None = None,
                          queues: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """``qmtl submit`` / ``qmtl run``: the strategy's row (``registration``: name, code_hash,
        meta, expect_meta, kind, reason), its run and its announced queues in one transaction;
        ``{run, strategy, changed, events}``."""
        from qmtl_core.service._strategies import Registration

        done = self.service.record_submission(
            world, strategy_id=strategy_id, stage=stage, run_id=run_id, metrics=metrics, returns=returns,
            evidence_class=evidence_class, queues=queues,
            registration=Registration(**registration) if registration is not None else None)
        return {"run": {**done.run.to_dict(), "created": done.run.created}, "strategy": done.strategy,
                "changed": done.changed, "events": [e.to_json() for e in done.events]}

    def evaluate_cohort(self, world: str, *, stage: str, returns: "ReturnsTable | None",
                        metrics: Mapping[str, Mapping[str, Any]] | None, run_id: str | None = None) -> dict[str, Any]:
        """``qmtl world evaluate --record``: one run per strategy (vectorised)."""
        revs = self.service.evaluate_cohort(world, stage=stage, returns=returns, metrics=metrics, run_id=run_id)
        return {"runs": [{**r.to_dict(), "created": r.created} for r in revs]}

    def runs(self, world: str, *, strategy_id: str | None = None, stage: str | None = None,
             history: bool = False) -> dict[str, Any]:
        """``qmtl world runs``."""
        revs = self.service.list_runs(world, strategy_id=strategy_id, stage=stage, history=history)
        return {"runs": [r.to_dict() for r in revs]}

    # -- submissions (qmtl submit / qmtl run; the strategy itself runs on the client) -------------------
    def strategies(self, world: str) -> dict[str, Any]:
        """Every strategy of the world with its name and stage (short ids and prefixes in the CLI)."""
        self.service.load_world(world, record=False)  # an unknown world is world_not_found
        return {"world": world, "strategies": self.service.strategy_rows(world)}

    def strategy(self, world: str, strategy_id: str) -> dict[str, Any]:
        """The world's row for a strategy (stage, name, code_hash, submitter, meta ...);
        ``StrategyNotFound`` (exit 3, HTTP 404) when the world has never seen it."""
        from qmtl_core.errors import StrategyNotFound

        self.service.load_world(world, record=False)  # an unknown world is world_not_found
        row = self.service.strategy_info(world, strategy_id)
        if row is None:
            raise StrategyNotFound(f"world {world} has no strategy {strategy_id}",
                                   hint=f"qmtl world campaign {world} lists its strategies")
        return row

    def register_strategy(self, world: str, *, strategy_id: str, name: str | None = None,
                          code_hash: str | None = None, meta: Mapping[str, Any] | None = None,
                          expect_meta: Mapping[str, Any] | None = None, kind: str = "strategy.submitted",
                          reason: str | None = None) -> dict[str, Any]:
        """Create or update a strategy's row (``meta`` merged key by key, compare-and-set on
        ``expect_meta``); ``{strategy: row, changed}``."""
        row, changed = self.service.register_strategy(world, strategy_id=strategy_id, name=name,
                                                      code_hash=code_hash, meta=meta, expect_meta=expect_meta,
                                                      kind=kind, reason=reason)
        return {"strategy": row, "changed": changed}

    def run_returns(self, world: str, *, strategy_id: str | None = None, stage: str | None = None,
                    history: bool = False, latest_per_stage: bool = False) -> dict[str, Any]:
        """The returns stored with run revisions (sparklines, charts)."""
        return {"runs": self.service.run_returns(world, strategy_id=strategy_id, stage=stage, history=history,
                                                 latest_per_stage=latest_per_stage)}

    # -- campaign -------------------------------------------------------------------------------------
    def campaign(self, world: str, *, strategy_id: str | None = None) -> dict[str, Any]:
        """``qmtl world campaign``."""
        return {"world": world,
                "strategies": [v.to_dict() for v in self.service.campaign(world, strategy_id=strategy_id)]}

    def campaign_tick(self, world: str) -> dict[str, Any]:
        """``POST /worlds/{id}/campaign/tick``: the recommended actions, nothing changed."""
        return {"world": world, "actions": [a.to_dict() for a in self.service.campaign_tick(world)]}

    def campaign_run(self, world: str, *, execute: bool, holder: str, lease_ttl_seconds: float) -> dict[str, Any]:
        """One campaign-loop iteration over one world (under its lease when executing)."""
        out = self.service.campaign_iteration([world], execute=execute, holder=holder,
                                              lease_ttl=timedelta(seconds=lease_ttl_seconds), raise_refusal=True)
        return out[0].to_dict()

    def world_names(self) -> list[str]:
        """Every world the service knows."""
        return self.service.world_names()

    def announce_queues(self, world: str, updates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``POST /worlds/{id}/queues``: a strategy's input queues, announced as control events
        (recorded, so remote ``/events`` subscribers see them); repeats write nothing."""
        return {"world": world, "events": [e.to_json() for e in self.service.announce_queues(world, updates)]}

    # -- governance -----------------------------------------------------------------------------------
    def promote(self, world: str, strategy_id: str, *, reason: str | None = None,
                dry_run: bool = False) -> dict[str, Any]:
        """``qmtl promote``."""
        return self.service.promote(world, strategy_id, reason=reason, dry_run=dry_run).to_dict()

    def decide(self, request_id: str, *, decision: str, reason: str, signature: str | None = None) -> dict[str, Any]:
        """``qmtl approve`` / ``qmtl reject``; changed evidence raises ``EvidenceChanged`` (exit 4)."""
        from qmtl_core.errors import EvidenceChanged

        outcome = self.service.decide_request(request_id, decision=decision, reason=reason, signature=signature)
        if outcome.status == "voided":
            raise EvidenceChanged(outcome.message, details=outcome.to_dict())
        return outcome.to_dict()

    def promotions(self, *, world: str | None = None, include_closed: bool = False,
                   at: datetime | None = None) -> dict[str, Any]:
        """``qmtl promote --list [--at T]``."""
        return {"requests": self.service.promotion_requests(world=world, include_closed=include_closed, at=at),
                "at": at.isoformat() if at is not None else None}

    def approval_view(self, request_id: str) -> dict[str, Any]:
        """``qmtl promote --show REQ``: what an approver reads, from reads only (the gate as a dry run)."""
        from qmtl_core.approval_view import approval_view
        from qmtl_core.errors import NotFoundError, RequestNotFound

        request = next((r for r in self.service.promotion_requests(include_closed=True)
                        if r["request_id"] == request_id), None)
        if request is None:
            raise RequestNotFound(f"no promotion request {request_id!r}", hint="qmtl promote --list --all lists them")
        world, sid = request["world"], request["strategy_id"]
        gate = self.service.promote(world, sid, dry_run=True).to_dict().get("gate") or {}
        runs = [r.to_dict() for r in self.service.list_runs(world, strategy_id=sid)]
        try:
            snapshot: dict[str, Any] | None = self.risk_show(world)
        except NotFoundError:
            snapshot = None
        live = [a["strategy_id"] for a in self.service.activations(world)["activations"]
                if a["stage"] == "live" and a["strategy_id"] != sid]
        policy = self.world(world)["policy"]
        opened, now = request.get("policy_version"), policy.get("policy_version")
        diff = (self.service.policy_diff(world, int(opened), int(now))
                if isinstance(opened, int) and isinstance(now, int) and opened != now else None)
        returns = {r["stage"]: r["returns"] for r in self.service.run_returns(world, strategy_id=sid,
                                                                             latest_per_stage=True)}
        return approval_view(request, gate, runs, policy=policy, snapshot=snapshot, live=live, policy_diff=diff,
                             returns=returns)

    def decisions(self, world: str, *, strategy_id: str | None = None) -> dict[str, Any]:
        """``qmtl world decision``."""
        from qmtl_core.governance import envelope_to_dict

        return {"world": world,
                "decisions": [envelope_to_dict(e) for e in self.service.decisions(world, strategy_id=strategy_id)]}

    def rollback(self, world: str, *, reason: str) -> dict[str, Any]:
        """``qmtl world rollback``."""
        return self.service.rollback(world, reason=reason)

    def set_halted(self, world: str, *, halted: bool, reason: str) -> dict[str, Any]:
        """``qmtl world halt`` / ``resume``."""
        return self.service.set_halted(world, halted=halted, reason=reason)

    def demote(self, world: str, strategy_id: str, *, reason: str, to: str = "paper") -> dict[str, Any]:
        """``qmtl world demote``."""
        return self.service.demote(world, strategy_id, reason=reason, to=to)

    def history(self, world: str, *, at: datetime | None = None) -> dict[str, Any]:
        """``qmtl world history``."""
        return self.service.history(world, at=at)

    def activations(self, world: str) -> dict[str, Any]:
        """The current activation set."""
        return self.service.activations(world)

    def report(self, world: str, *, strategy_id: str | None = None, at: datetime | None = None, top: int = 10,
               fmt: str = "html", progress: Any = None) -> dict[str, Any]:
        """``qmtl world report``: the summary and the rendered page or charts."""
        from qmtl_core.report._document import report_document

        return report_document(self.service, world, strategy=strategy_id, at=at, top=top, fmt=fmt,
                               progress=progress)

    # -- risk hub -------------------------------------------------------------------------------------
    def risk_put(self, document: Mapping[str, Any], *, source: str = "snapshot") -> dict[str, Any]:
        """``qmtl risk put``."""
        from qmtl_core.risk import parse_snapshot

        snapshot = parse_snapshot(document, source=source)
        stored, created = self.service.put_risk_snapshot(snapshot)
        return {"world": snapshot.world_id, "version": snapshot.version, "created": created,
                "content_hash": stored.content_hash, "as_of": stored.to_dict()["as_of"]}

    def risk_show(self, world: str, *, version: str | None = None) -> dict[str, Any]:
        """``qmtl risk show``."""
        stored, fresh = self.service.risk_snapshot(world, version=version)
        return {**stored.to_dict(), "freshness": {**fresh.to_dict(), "ok": fresh.ok}}

    # -- ledger ---------------------------------------------------------------------------------------
    def audit_log(self, *, world: str | None = None, since: datetime | None = None, kind: str | None = None,
                  limit: int | None = None) -> dict[str, Any]:
        """``qmtl audit log``."""
        entries = self.service.audit_log(world=world, since=since, kind=kind, limit=limit)
        return {"entries": [e.to_dict() for e in entries]}

    def audit_head(self) -> dict[str, Any]:
        """The ledger head and the store's origin (what ``qmtl audit checkpoint`` signs)."""
        return self.service.audit_head()

    def audit_verify(self, *, checkpoints: Sequence[Mapping[str, Any]] = (), deep: bool = False) -> dict[str, Any]:
        """``qmtl audit verify``: a broken chain, a checkpoint the chain does not hold, or (``deep``) a table
        the ledger does not vouch for raises (exit 4). ``checkpoints`` are ``{label, origin, seq, hash}``
        claims whose signatures the caller has checked."""
        from qmtl_core.checkpoint import Checkpoint

        claims = [(str(c["label"]), Checkpoint(str(c["origin"]), int(c["seq"]), str(c["hash"]))) for c in checkpoints]
        result = self.service.audit_verify(checkpoints=claims, deep=deep)
        result.raise_for_problems()
        return result.to_dict()


def _world(world: str) -> str:
    """A world id checked by the one rule before it becomes part of a URL: ``..`` or ``/`` in an
    id must never reach another route or another world."""
    from qmtl_core.world_files import check_world_id

    return check_world_id(world)


# --- errors across the wire -------------------------------------------------------------------------------
def _error_classes() -> dict[str, type[QmtlError]]:
    out: dict[str, type[QmtlError]] = {}
    stack: list[type[QmtlError]] = [QmtlError]
    while stack:
        cls = stack.pop()
        out.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return out


def error_from_doc(doc: Mapping[str, Any]) -> QmtlError:
    """Rebuild the ``QmtlError`` a server reported (same class when known, same exit code always)."""
    cls = _error_classes().get(str(doc.get("error")), QmtlError)
    message = str(doc.get("message") or doc.get("error") or "error")
    if cls.__init__ is QmtlError.__init__:
        err = cls(message, hint=doc.get("hint"), code=str(doc.get("error")), details=doc.get("details"))
    else:  # a class with its own constructor (PolicyError): the message already says everything
        err = QmtlError(message, hint=doc.get("hint"), code=str(doc.get("error")), details=doc.get("details"))
    exit_code = doc.get("exit_code")
    if isinstance(exit_code, int):
        err.exit_code = exit_code
    return err


class HttpClient:
    """``LocalClient``'s methods over HTTP to a ``qmtl serve`` (remote mode)."""

    def __init__(self, server: str, token: str | None, *, transport: Any = None, timeout: float = 60.0,
                 allow_live: bool = False) -> None:
        import httpx

        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=transport)
        #: Send ``X-Allow-Live: true`` on the calls that can change what is live (``--allow-live``).
        self.allow_live = allow_live

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
              body: Any = None, confirm: bool = False, live: bool = False) -> Any:
        """One request; errors come back as the server's ``QmtlError``. A change that cannot be
        confirmed (connection lost after sending) is fail-closed (exit 12), never a silent success."""
        import httpx

        from qmtl_core.errors import FailClosedError, StoreUnavailable

        clean = {k: v for k, v in (params or {}).items() if v is not None and v is not False}
        try:
            headers = {"X-Allow-Live": "true"} if live and self.allow_live else None
            response = self._http.request(method, path, params=clean, json=body, headers=headers)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            from qmtl_core.errors import ConfigError

            raise ConfigError(f"--server {self.server!r} is not a usable URL ({exc})",
                              hint="use e.g. http://qmtl.internal:8765") from None
        except httpx.ConnectError as exc:
            raise StoreUnavailable(f"cannot reach qmtl server {self.server}: {exc}",
                                   hint="check --server / QMTL_SERVER and that qmtl serve is running") from None
        except httpx.HTTPError as exc:
            if confirm:
                raise FailClosedError(f"{method} {path} to {self.server} was not confirmed: {type(exc).__name__}",
                                      hint="the change may or may not have happened: check with a read "
                                           "(qmtl audit log) before retrying", code="unconfirmed") from None
            raise StoreUnavailable(f"request to {self.server} failed: {type(exc).__name__}: {exc}") from None
        try:
            doc = response.json()
        except ValueError:
            raise FailClosedError(f"{self.server} answered {response.status_code} without JSON",
                                  code="bad_server_response", hint="is --server a qmtl serve?") from None
        if response.status_code >= 400:
            raise error_from_doc(doc if isinstance(doc, dict) else {"message": str(doc), "exit_code": 1})
        return doc

    # -- worlds ---------------------------------------------------------------------------------------
    def worlds(self) -> dict[str, Any]:
        return self._call("GET", "/worlds")

    def world(self, world: str) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}")

    def world_names(self) -> list[str]:
        return [w["world"] for w in self.worlds()["worlds"]]

    def policy_status(self, world: str) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/policy")

    def approve_policy(self, world: str, *, version: int, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/policy/approve", confirm=True,
                          body={"version": version, "reason": reason})

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate_offline(self, world: str, *, stage: str, returns: "ReturnsTable | None",
                         metrics: Mapping[str, Mapping[str, Any]] | None, previous_active: Sequence[str] = (),
                         n_trials: int | None = None) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/evaluate-cohort", body={
            "stage": stage, "record": False, "returns": table_doc(returns),
            "metrics": _json_metrics(metrics), "previous_active": list(previous_active), "n_trials": n_trials})

    def record_evaluation(self, world: str, *, strategy_id: str, stage: str, run_id: str | None = None,
                          metrics: Mapping[str, Any] | None = None,
                          returns: Sequence[tuple[datetime, float]] | None = None,
                          evidence_class: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/evaluate", confirm=True, body={
            "strategy_id": strategy_id, "stage": stage, "run_id": run_id,
            "metrics": _json_metric_row(metrics), "returns": returns_doc(returns),
            **({"evidence_class": evidence_class} if evidence_class else {})})

    def record_submission(self, world: str, *, strategy_id: str, stage: str, run_id: str | None = None,
                          metrics: Mapping[str, Any] | None = None,
                          returns: Sequence[tuple[datetime, float]] | None = None,
                          evidence_class: str | None = None, registration: Mapping[str, Any] | None = None,
                          queues: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/submissions", confirm=True, body={
            "strategy_id": strategy_id, "stage": stage, "run_id": run_id,
            "metrics": _json_metric_row(metrics), "returns": returns_doc(returns),
            **({"evidence_class": evidence_class} if evidence_class else {}),
            "registration": dict(registration) if registration is not None else None,
            "queues": [dict(q) for q in queues]})

    def evaluate_cohort(self, world: str, *, stage: str, returns: "ReturnsTable | None",
                        metrics: Mapping[str, Mapping[str, Any]] | None, run_id: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/evaluate-cohort", confirm=True, body={
            "stage": stage, "record": True, "run_id": run_id, "returns": table_doc(returns),
            "metrics": _json_metrics(metrics)})

    def runs(self, world: str, *, strategy_id: str | None = None, stage: str | None = None,
             history: bool = False) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/runs",
                          params={"strategy": strategy_id, "stage": stage, "history": history})

    # -- submissions ----------------------------------------------------------------------------------
    def strategies(self, world: str) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{world}/strategies")

    def strategy(self, world: str, strategy_id: str) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/strategies/{strategy_id}")

    def register_strategy(self, world: str, *, strategy_id: str, name: str | None = None,
                          code_hash: str | None = None, meta: Mapping[str, Any] | None = None,
                          expect_meta: Mapping[str, Any] | None = None, kind: str = "strategy.submitted",
                          reason: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/strategies", confirm=True, body={
            "strategy_id": strategy_id, "name": name, "code_hash": code_hash,
            "meta": dict(meta) if meta is not None else None,
            "expect_meta": dict(expect_meta) if expect_meta is not None else None, "kind": kind,
            "reason": reason})

    def run_returns(self, world: str, *, strategy_id: str | None = None, stage: str | None = None,
                    history: bool = False, latest_per_stage: bool = False) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/returns", params={
            "strategy": strategy_id, "stage": stage, "history": history, "latest_per_stage": latest_per_stage})

    # -- campaign -------------------------------------------------------------------------------------
    def campaign(self, world: str, *, strategy_id: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/campaign", params={"strategy": strategy_id})

    def campaign_tick(self, world: str) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/campaign/tick")

    def announce_queues(self, world: str, updates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{world}/queues", body={"updates": [dict(u) for u in updates]})

    def campaign_run(self, world: str, *, execute: bool, holder: str, lease_ttl_seconds: float) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/campaign/run", confirm=execute, live=execute, body={
            "execute": execute, "holder": holder, "lease_ttl_seconds": lease_ttl_seconds})

    # -- governance -----------------------------------------------------------------------------------
    def promote(self, world: str, strategy_id: str, *, reason: str | None = None,
                dry_run: bool = False) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/promotions", confirm=not dry_run, live=not dry_run,
                          body={"strategy_id": strategy_id, "reason": reason, "dry_run": dry_run})

    def decide(self, request_id: str, *, decision: str, reason: str, signature: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"reason": reason}
        if signature is not None:
            body["signature"] = signature
        return self._call("POST", f"/promotions/{request_id}/{decision}", confirm=True,
                          live=decision == "approve", body=body)

    def approval_view(self, request_id: str) -> dict[str, Any]:
        return self._call("GET", f"/promotions/{request_id}/view")

    def promotions(self, *, world: str | None = None, include_closed: bool = False,
                   at: datetime | None = None) -> dict[str, Any]:
        return self._call("GET", "/promotions", params={"world": world, "all": include_closed,
                                                        "at": at.isoformat() if at is not None else None})

    def decisions(self, world: str, *, strategy_id: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/decision", params={"strategy": strategy_id})

    def rollback(self, world: str, *, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/rollback", confirm=True, live=True, body={"reason": reason})

    def set_halted(self, world: str, *, halted: bool, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/{'halt' if halted else 'resume'}", confirm=True,
                          live=not halted, body={"reason": reason})

    def demote(self, world: str, strategy_id: str, *, reason: str, to: str = "paper") -> dict[str, Any]:
        return self._call("POST", f"/worlds/{_world(world)}/demote", confirm=True,
                          body={"strategy_id": strategy_id, "reason": reason, "to": to})

    def history(self, world: str, *, at: datetime | None = None) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/history", params={"at": at.isoformat() if at else None})

    def activations(self, world: str) -> dict[str, Any]:
        return self._call("GET", f"/worlds/{_world(world)}/activations")

    def report(self, world: str, *, strategy_id: str | None = None, at: datetime | None = None, top: int = 10,
               fmt: str = "html", progress: Any = None) -> dict[str, Any]:
        # Rendered by the server (it holds the store); no progress to show meanwhile.
        return self._call("GET", f"/worlds/{_world(world)}/report", params={
            "strategy": strategy_id, "at": at.isoformat() if at else None, "top": top, "format": fmt})

    # -- risk hub -------------------------------------------------------------------------------------
    def risk_put(self, document: Mapping[str, Any], *, source: str = "snapshot") -> dict[str, Any]:
        from qmtl_core.risk import parse_snapshot

        parse_snapshot(document, source=source)  # the same one-line error locally, before sending
        return self._call("POST", "/risk-hub/snapshots", confirm=True, body=dict(document))

    def risk_show(self, world: str, *, version: str | None = None) -> dict[str, Any]:
        return self._call("GET", f"/risk-hub/worlds/{_world(world)}", params={"version": version})

    # -- ledger ---------------------------------------------------------------------------------------
    def audit_log(self, *, world: str | None = None, since: datetime | None = None, kind: str | None = None,
                  limit: int | None = None) -> dict[str, Any]:
        return self._call("GET", "/audit", params={"world": world, "since": since.isoformat() if since else None,
                                                   "kind": kind, "limit": limit})

    def audit_head(self) -> dict[str, Any]:
        return self._call("GET", "/audit/head")

    def audit_verify(self, *, checkpoints: Sequence[Mapping[str, Any]] = (), deep: bool = False) -> dict[str, Any]:
        return self._call("POST", "/audit/verify", body={"checkpoints": [dict(c) for c in checkpoints], "deep": deep})


def _json_metric_row(row: Mapping[str, Any] | None) -> dict[str, float | None] | None:
    from qmtl_core.policy._engine import clean_number

    if row is None:
        return None
    return {k: clean_number(v) for k, v in row.items()}


def _json_metrics(metrics: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {sid: _json_metric_row(row) for sid, row in metrics.items()}
