"""``qmtl serve``: the WorldService HTTP API (FastAPI) over the same facade the CLI uses locally.

Handlers only call ``LocalClient``; the edge (``_edge.Edge``) has already refused oversized bodies,
checked the token before reading any body, and will scrub what leaves (server paths for everyone,
secrets for every role but operator). Errors travel as the same JSON document the CLI prints with
``--json`` (``{error, message, exit_code, hint, details}``), so a remote CLI exits exactly as a local
one would. Every route declares its response model (``_models``), so the OpenAPI schema describes
what is returned. State lives only in the store (leases, unique keys, the ledger), never in this
process: any number of servers (or ``--workers``) on any number of hosts can share one PostgreSQL.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from fastapi import Body, Depends, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qmtl_core._version import __version__
from qmtl_core.config import Settings
from qmtl_core.errors import Forbidden, NotFoundError, QmtlError, UsageError
from qmtl_core.service import _models as m
from qmtl_core.telemetry import HttpMetrics, LoopMetrics, exposition, new_registry
from qmtl_core.service._auth import TOKEN_CACHE_SECONDS, Principal, TokenCache, authenticate
from qmtl_core.service._client import LocalClient, returns_from_doc, table_from_doc
from qmtl_core.service._edge import DEFAULT_MAX_BODY, PRINCIPAL_KEY, BodyTooLarge, Edge, Scrubber, too_large
from qmtl_core.service._events import decision_at, entries_after, events_from_entry
from qmtl_core.service._service import WorldService
from qmtl_core.store import schema
from qmtl_core.timeutil import parse_instant, utcnow
from qmtl_core.world_files import world_files

#: HTTP status per exit code family (the body's ``exit_code`` is what the CLI exits with).
STATUS = {1: 500, 2: 400, 3: 404, 4: 409, 10: 422, 11: 409, 12: 503, 75: 423}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvaluateBody(_Body):
    """``POST /worlds/{id}/evaluate``: one strategy at one stage; metrics are sourced when absent."""

    strategy_id: str = Field(min_length=1)
    stage: str = "backtest"
    run_id: str | None = None
    metrics: dict[str, float | None] | None = None
    returns: list[list[Any]] | None = Field(None, description="[[ISO timestamp, return], ...]")
    evidence_class: Literal["qmtl replay"] | None = Field(
        None, description="claimed by qmtl's own replay (qmtl submit / qmtl run); honoured only for a "
                          "producer or operator token, else the run is recorded as unverified")


class CohortBody(_Body):
    """``POST /worlds/{id}/evaluate-cohort``: many strategies through the vectorised path."""

    stage: str = "backtest"
    record: bool = True
    run_id: str | None = None
    returns: dict[str, Any] | None = Field(None, description="{strategies, timestamps, matrix}")
    metrics: dict[str, dict[str, float | None]] | None = None
    previous_active: list[str] = Field(default_factory=list)
    n_trials: int | None = Field(None, ge=1)


class RunBody(_Body):
    """``POST /worlds/{id}/campaign/run``: one campaign-loop iteration over the world."""

    execute: bool = False
    holder: str = Field(min_length=1)
    lease_ttl_seconds: float = Field(600, gt=0, le=86400)


class StrategyBody(_Body):
    """``POST /worlds/{id}/strategies``: create or update a submitted strategy's row (``qmtl submit``
    and ``qmtl run`` load and backtest the strategy on the client; only this document is sent)."""

    strategy_id: str = Field(min_length=1)
    name: str | None = None
    code_hash: str | None = None
    meta: dict[str, Any] | None = Field(None, description="merged key by key into the row's meta")
    expect_meta: dict[str, Any] | None = Field(
        None, description="meta keys and the values they must still hold (null: absent), else 409")
    kind: Literal["strategy.submitted", "strategy.fed"] = "strategy.submitted"
    reason: str | None = None


class QueueUpdateBody(_Body):
    """One announced tag query: the queues matching it in a world's execution domain."""

    tags: list[str] = Field(min_length=1)
    interval: int = Field(gt=0)
    queues: list[dict[str, Any]] = Field(default_factory=list, description="[{queue, global}, ...]")
    match_mode: Literal["any", "all"] = "any"
    execution_domain: str


class QueuesBody(_Body):
    """``POST /worlds/{id}/queues``: a submission's input queues (``qmtl submit`` sends them)."""

    updates: list[QueueUpdateBody] = Field(min_length=1, max_length=1000)


class RegistrationBody(_Body):
    """What a submission sets on the strategy's row (as ``POST /worlds/{id}/strategies``)."""

    name: str | None = None
    code_hash: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict, description="merged key by key into the row's meta")
    expect_meta: dict[str, Any] | None = Field(
        None, description="meta keys and the values they must still hold (null: absent), else 409")
    kind: Literal["strategy.submitted", "strategy.fed"] = "strategy.submitted"
    reason: str | None = None


class SubmissionBody(EvaluateBody):
    """``POST /worlds/{id}/submissions``: what ``qmtl submit`` and ``qmtl run`` write, in one
    transaction: the strategy's row, its run, its announced queues. Any failure writes nothing."""

    registration: RegistrationBody | None = None
    queues: list[QueueUpdateBody] = Field(default_factory=list, max_length=1000)


class PromoteBody(_Body):
    """``POST /worlds/{id}/promotions``."""

    strategy_id: str = Field(min_length=1)
    reason: str | None = None
    dry_run: bool = False


class ReasonBody(_Body):
    """A change that needs a reason."""

    reason: str = ""


class PolicyApproveBody(_Body):
    """``POST /worlds/{id}/policy/approve``: approve a proposed policy version."""

    version: int = Field(ge=1)
    reason: str = ""


class DecideBody(_Body):
    """``POST /promotions/{id}/approve|reject``."""

    reason: str = ""
    signature: str | None = Field(None, max_length=20_000,
                                  description="armored SSH signature (namespace qmtl-approval) of the approval message")


class DemoteBody(_Body):
    """``POST /worlds/{id}/demote``."""

    strategy_id: str = Field(min_length=1)
    to: str = "paper"
    reason: str = ""


class CheckpointClaim(_Body):
    """A signed checkpoint's claim, its signature already checked by the caller."""

    label: str = Field(min_length=1, max_length=500)
    origin: str = Field(min_length=1, max_length=500)
    seq: int = Field(ge=0)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class VerifyBody(_Body):
    """``POST /audit/verify``."""

    checkpoints: list[CheckpointClaim] = Field(default_factory=list, max_length=1000)
    deep: bool = False


#: The header a caller sets to say it means to change what is live (DESIGN §11).
ALLOW_LIVE_HEADER = "X-Allow-Live"


def live_intent(request: Request) -> bool:
    """``X-Allow-Live``: ``true`` or ``false`` (any case); absent is false; anything else is an error
    rather than a guess, so a typo never reads as consent."""
    raw = request.headers.get(ALLOW_LIVE_HEADER)
    if raw is None or raw.strip().lower() == "false":
        return False
    if raw.strip().lower() == "true":
        return True
    raise UsageError(f"header {ALLOW_LIVE_HEADER} must be true or false, got {raw[:40]!r}",
                     hint=f"send {ALLOW_LIVE_HEADER}: true to confirm a live change")


#: The error document's status beyond the exit-code families.
_CODE_STATUS = {"unauthorized": 401, "forbidden": 403, "request_too_large": 413, "allow_live_required": 428}
#: Every route may answer with the error document under these statuses.
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": m.ErrorDoc, "description": what} for status, what in (
        (400, "bad input (exit 2)"), (401, "no token, or a token not accepted"),
        (403, "the token's role may not do this"), (404, "unknown world, strategy, request or snapshot (exit 3)"),
        (409, "conflict (exit 4, 11)"), (413, "request body over the server's limit"),
        (422, "blocked by the policy (exit 10)"), (423, "locked: another loop holds the lease (exit 75)"),
        (428, "a live change without X-Allow-Live: true"),
        (500, "a bug in qmtl (exit 1)"), (503, "fail-closed: evidence or the store unavailable (exit 12)"))}
#: How often an open /events socket re-checks its token (a revoked token closes it within this).
TOKEN_RECHECK_SECONDS = 1.0
#: WebSocket close codes: the token is not (or no longer) accepted, or its role may not read.
WS_UNAUTHORIZED, WS_FORBIDDEN = 4401, 4403


def error_status(exc: QmtlError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of an error."""
    if isinstance(exc, Forbidden):  # every kind of refusal by role or ownership
        return 403, exc.to_dict()
    return _CODE_STATUS.get(exc.code) or STATUS.get(exc.exit_code, 400), exc.to_dict()


def _error_response(exc: QmtlError) -> JSONResponse:
    status, body = error_status(exc)
    return JSONResponse(status_code=status, content=body)


class _SecretsCache:
    """Secret values to scrub from what readers see: every webhook URL any recorded policy version
    of any world ever had (a diff in the ledger still carries the old ones) and every current
    policy file's, re-read only when the recorded versions change. Whether they changed is asked
    at most every ``ttl`` seconds (the bound within which a token revocation is honoured too)."""

    def __init__(self, service: WorldService, *, ttl: float = TOKEN_CACHE_SECONDS) -> None:
        self.service = service
        self._key: Any = None
        self._scrubber: Scrubber | None = None
        self._ttl, self._checked_until = ttl, 0.0

    def fresh(self) -> Scrubber | None:
        """The scrubber while it was checked less than ``ttl`` seconds ago, else ``None``."""
        return self._scrubber if time.monotonic() < self._checked_until else None

    def __call__(self) -> Scrubber:
        checked_until = time.monotonic() + self._ttl
        scrubber = self._current()
        self._checked_until = checked_until
        return scrubber

    def _current(self) -> Scrubber:
        settings = self.service.settings
        pv = schema.policy_versions
        files = world_files(settings.worlds_dir) if settings.worlds_dir.is_dir() else []
        with self.service.store.read() as conn:
            key = (tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(pv.c.recorded_at))).one()),
                   tuple((f.name, _mtime(f)) for f in files))
            if self._scrubber is not None and key == self._key:
                return self._scrubber
            documents = [row.document for row in conn.execute(sa.select(pv.c.document))]
        hooks = {_webhook(d) for d in documents}
        for path in files:  # the raw text, so an invalid or unrecorded file's URL is known too
            try:
                hooks.update(m.group(1).strip("\"'") for m in _WEBHOOK_VALUE.finditer(path.read_text("utf-8")))
            except (OSError, UnicodeDecodeError):
                continue
        url = settings.database_url or ""
        self._scrubber = Scrubber.for_server(worlds_dir=settings.worlds_dir, home=settings.home,
                                             secrets={h for h in hooks if h and "://" in h}
                                             | ({url} if "@" in url else set()))
        self._key = key
        return self._scrubber


_WEBHOOK_VALUE = re.compile(r"webhook\s*:\s*(\"[^\"\n]+\"|'[^'\n]+'|[^\s,}\n#]+)")


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _webhook(document: Any) -> str | None:
    if isinstance(document, str):  # JSON text on SQLite
        try:
            document = json.loads(document)
        except ValueError:
            return None
    if not isinstance(document, dict):
        return None
    hook = (document.get("notifications") or {}).get("webhook")
    return hook if isinstance(hook, str) else None


def _docs_page(schema_doc: dict[str, Any]) -> str:
    """A self-contained page describing the API: no script, no asset from anywhere."""
    rows = []
    for path, ops in sorted(schema_doc.get("paths", {}).items()):
        for method, op in ops.items():
            ok = (op.get("responses", {}).get("200", {}).get("content", {}).get("application/json", {})
                  .get("schema", {}).get("$ref", "").rsplit("/", 1)[-1])
            rows.append(f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}</code>"
                        f"</td><td>{html.escape(op.get('description') or op.get('summary') or '')}</td>"
                        f"<td><code>{html.escape(ok)}</code></td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>qmtl WorldService API</title>"
            "<style>body{font-family:sans-serif;margin:2em}td{padding:.2em .8em;vertical-align:top}"
            "tr:nth-child(even){background:#f4f4f4}</style></head><body>"
            f"<h1>qmtl WorldService API {html.escape(__version__)}</h1>"
            "<p>Every route but this page, <code>/healthz</code> and <code>/openapi.json</code> needs "
            "<code>Authorization: Bearer TOKEN</code> (<code>qmtl token create</code>). The full schema, for "
            "tools and clients, is <a href='/openapi.json'>/openapi.json</a>; the WebSocket <code>/events</code> "
            "streams control events.</p><table><tr><th>method</th><th>path</th><th>what</th><th>returns</th></tr>"
            + "".join(rows) + "</table></body></html>")


def create_app(settings: Settings, *, clock: Callable[[], datetime] = utcnow,
               max_body: int = DEFAULT_MAX_BODY, metrics_max_age: float = 0.0) -> FastAPI:
    """The API over one ``WorldService`` (shared store, per-request actor); ``/metrics`` reads the
    store at most once per ``metrics_max_age`` seconds (``telemetry``: scrape cost)."""
    # Swagger UI and ReDoc load their scripts from a CDN: /docs is a plain page instead (_docs_page).
    app = FastAPI(title="qmtl WorldService", version=__version__, docs_url=None, redoc_url=None,
                  description="Worlds, evaluation runs, campaigns, governance and the risk hub.",
                  responses=_ERRORS)
    # Configuration errors first: the store is opened next, and an app that fails to build after
    # that would leave its connections to the garbage collector.
    checkpoints = None
    if settings.checkpoint_dir is not None:
        from qmtl_core.checkpoint import publish, require_signer

        checkpoints = (require_signer(settings.checkpoint_key), settings.checkpoint_dir)
    base = WorldService(settings, clock=clock)
    registry = new_registry(base.store, clock, max_age=metrics_max_age)
    http_metrics, loop_metrics = HttpMetrics(registry), LoopMetrics(registry)

    @app.middleware("http")
    async def _timed(request: Request, call_next: Callable[[Request], Any]) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        http_metrics.observe(request.method, getattr(route, "path", "unmatched"), response.status_code,
                             time.perf_counter() - started)
        return response

    def check_token(header: str | None) -> Principal:
        with base.store.read() as conn:
            return authenticate(conn, header)

    tokens, secrets = TokenCache(check_token), _SecretsCache(base)
    app.add_middleware(Edge, max_body=max_body, authenticate=tokens, scrubber=secrets, error_body=error_status,
                       fresh_principal=tokens.fresh, fresh_scrubber=secrets.fresh)

    @app.exception_handler(QmtlError)
    async def _qmtl_error(request: Request, exc: QmtlError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(status_code=400, content={"error": "bad_input", "exit_code": 2,
                                                      "message": f"request {where}: {first.get('msg')}"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return _error_response(too_large(exc.limit))
        if exc.status_code == 404:
            return _error_response(NotFoundError(f"no route {request.url.path}", hint="see /docs for the routes"))
        if exc.status_code == 413:
            return _error_response(too_large(max_body))
        return JSONResponse(status_code=exc.status_code, content=UsageError(
            f"{request.method} {request.url.path}: {exc.detail}", code="bad_request").to_dict())

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # The body names the incident, never the exception's text or a traceback (they carry
        # server paths); the server's stderr has the whole story under the same id.
        incident = uuid.uuid4().hex[:12]
        sys.stderr.write(f"qmtl serve: incident {incident} on {request.method} {request.url.path}\n"
                         + "".join(traceback.format_exception(exc)))
        return JSONResponse(status_code=500, content={
            "error": "internal_error", "exit_code": 1,
            "message": f"internal error on the server ({type(exc).__name__}, incident {incident})",
            "hint": "the server's log has the details under this incident id"})

    if checkpoints is not None:
        signer, directory = checkpoints

        @app.middleware("http")
        async def _publish_checkpoint(request: Request, call_next: Callable[..., Any]) -> Any:
            """After each change, a signed checkpoint of the new head into ``checkpoint_dir``."""
            response = await call_next(request)
            if request.method not in ("GET", "HEAD", "OPTIONS") and response.status_code < 400:
                await asyncio.to_thread(lambda: publish(base.audit_head(), signer, directory))
            return response

    # Async dependencies: they do no I/O (the edge found the principal), so they run on the event
    # loop rather than costing a trip through the thread pool each.
    async def principal(request: Request) -> Principal:
        found = request.scope.get(PRINCIPAL_KEY)
        if isinstance(found, Principal):
            return found
        return await asyncio.to_thread(tokens, request.headers.get("authorization"))

    def client(permission: str) -> Callable[..., Any]:
        async def dependency(request: Request, who: Principal = Depends(principal)) -> LocalClient:
            who.require(permission)
            # Only the calls that would make or keep something live read the intent (the facade).
            return LocalClient(base.as_actor(who.actor, role=who.role, live_confirmed=live_intent(request)))
        return dependency

    read, evaluate, risk, tick, promote, approve, operate = (
        client("read"), client("evaluate"), client("risk"), client("tick"), client("promote"), client("approve"),
        client("operate"))
    doc = {"response_model_exclude_unset": True}

    @app.get("/healthz", response_model=m.Health)
    def healthz() -> dict[str, Any]:
        """Liveness: the process answers and the store opens (no token needed)."""
        with base.store.read():
            pass
        return {"ok": True, "version": __version__, "store": base.store.backend}

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        """The routes, as a page that loads nothing from anywhere (no token needed)."""
        return HTMLResponse(_docs_page(app.openapi()), headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                         "description": "Prometheus text exposition"}})
    def metrics(_: LocalClient = Depends(read)) -> Response:
        """Prometheus exposition: the store families (snapshot age, approvals, live strategies, actions,
        blocks, campaign progress), loop runs through this server, and HTTP latency. Needs a read token."""
        return Response(exposition(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/worlds", response_model=m.WorldList, **doc)
    def worlds(c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Every world with its version and live settings."""
        return c.worlds()

    @app.get("/worlds/{world}", response_model=m.WorldDoc, **doc)
    def world(world: str, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """A world's policy and recorded policy versions."""
        return c.world(world)

    @app.post("/worlds/{world}/evaluate", response_model=m.RunDoc, **doc)
    def evaluate_one(world: str, body: EvaluateBody, c: LocalClient = Depends(evaluate)) -> dict[str, Any]:
        """Record an evaluation run (a new revision when the key exists with other content)."""
        return c.record_evaluation(world, strategy_id=body.strategy_id, stage=body.stage, run_id=body.run_id,
                                   metrics=body.metrics, returns=returns_from_doc(body.returns),
                                   evidence_class=body.evidence_class)

    @app.post("/worlds/{world}/submissions", response_model=m.SubmissionDoc, **doc)
    def record_submission(world: str, body: SubmissionBody, c: LocalClient = Depends(evaluate)) -> dict[str, Any]:
        """Register a submission, record its run and announce its queues, all or nothing."""
        return c.record_submission(world, strategy_id=body.strategy_id, stage=body.stage, run_id=body.run_id,
                                   metrics=body.metrics, returns=returns_from_doc(body.returns),
                                   evidence_class=body.evidence_class,
                                   registration=body.registration.model_dump() if body.registration else None,
                                   queues=[q.model_dump() for q in body.queues])

    @app.post("/worlds/{world}/evaluate-cohort", response_model=m.CohortDoc, **doc)
    def evaluate_cohort(world: str, body: CohortBody, c: LocalClient = Depends(evaluate)) -> dict[str, Any]:
        """Evaluate many strategies (vectorised); ``record: false`` gates and selects, recording nothing."""
        table = table_from_doc(body.returns)
        if body.record:
            return c.evaluate_cohort(world, stage=body.stage, returns=table, metrics=body.metrics, run_id=body.run_id)
        return c.evaluate_offline(world, stage=body.stage, returns=table, metrics=body.metrics,
                                  previous_active=body.previous_active, n_trials=body.n_trials)

    @app.get("/worlds/{world}/runs", response_model=m.RunList, **doc)
    def runs(world: str, strategy: str | None = None, stage: str | None = None, history: bool = False,
             c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Evaluation runs, newest first."""
        return c.runs(world, strategy_id=strategy, stage=stage, history=history)

    @app.get("/worlds/{world}/strategies", response_model=m.StrategyList, **doc)
    def strategies(world: str, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Every strategy of the world with its name and stage."""
        return c.strategies(world)

    @app.get("/worlds/{world}/strategies/{strategy_id}", response_model=m.StrategyRow, **doc)
    def strategy(world: str, strategy_id: str, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """A strategy's row in the world (404 when the world has never seen it)."""
        return c.strategy(world, strategy_id)

    @app.post("/worlds/{world}/strategies", response_model=m.StrategyChange, **doc)
    def register_strategy(world: str, body: StrategyBody, c: LocalClient = Depends(evaluate)) -> dict[str, Any]:
        """Register a submission (or the bars fed to it); unchanged content changes nothing."""
        return c.register_strategy(world, strategy_id=body.strategy_id, name=body.name, code_hash=body.code_hash,
                                   meta=body.meta, expect_meta=body.expect_meta, kind=body.kind,
                                   reason=body.reason)

    @app.post("/worlds/{world}/queues", response_model=m.QueuesDoc, **doc)
    def announce_queues(world: str, body: QueuesBody, c: LocalClient = Depends(evaluate)) -> dict[str, Any]:
        """Announce queues: ``tagquery.upsert`` and ``queue_update`` for ``/events`` subscribers."""
        return c.announce_queues(world, [u.model_dump() for u in body.updates])

    @app.get("/worlds/{world}/returns", response_model=m.ReturnsList, **doc)
    def returns(world: str, strategy: str | None = None, stage: str | None = None, history: bool = False,
                latest_per_stage: bool = False, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """The returns stored with run revisions (for sparklines and charts)."""
        return c.run_returns(world, strategy_id=strategy, stage=stage, history=history,
                             latest_per_stage=latest_per_stage)

    @app.get("/worlds/{world}/campaign", response_model=m.CampaignDoc, **doc)
    def campaign(world: str, strategy: str | None = None, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Campaign state per strategy."""
        return c.campaign(world, strategy_id=strategy)

    @app.post("/worlds/{world}/campaign/tick", response_model=m.TickDoc, **doc)
    def campaign_tick(world: str, c: LocalClient = Depends(tick)) -> dict[str, Any]:
        """The recommended actions now; side-effect free."""
        return c.campaign_tick(world)

    @app.post("/worlds/{world}/campaign/run", response_model=m.IterationDoc, **doc)
    def campaign_run(world: str, body: RunBody, request: Request,
                     who: Principal = Depends(principal)) -> dict[str, Any]:
        """One loop iteration: plan (``tick`` permission) or execute under the lease (``operate``);
        an execution that would apply live needs ``X-Allow-Live: true`` (428 otherwise)."""
        who.require("operate" if body.execute else "tick")
        outcome = LocalClient(base.as_actor(who.actor, role=who.role, live_confirmed=live_intent(request))).campaign_run(
            world, execute=body.execute, holder=body.holder, lease_ttl_seconds=body.lease_ttl_seconds)
        loop_metrics.observe(outcome, clock())
        return outcome

    @app.get("/worlds/{world}/decision", response_model=m.DecisionList, **doc)
    def decision(world: str, strategy: str | None = None, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Decision envelopes now."""
        return c.decisions(world, strategy_id=strategy)

    @app.get("/worlds/{world}/activations", response_model=m.ActivationSet, **doc)
    def activations(world: str, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """The current activation set."""
        return c.activations(world)

    @app.get("/worlds/{world}/report", response_model=m.ReportDoc, **doc)
    def report(world: str, strategy: str | None = None, at: str | None = None, top: int = Query(10, ge=1),
               format: Literal["html", "png"] = "html", c: LocalClient = Depends(read)) -> dict[str, Any]:
        """The world's report: its summary and the HTML page, or the charts as base64 PNGs."""
        return c.report(world, strategy_id=strategy, at=parse_instant(at, what="at") if at else None, top=top,
                        fmt=format)

    @app.get("/worlds/{world}/history", response_model=m.HistoryDoc, **doc)
    def history(world: str, at: str | None = None, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """What was live at a moment, and why."""
        return c.history(world, at=parse_instant(at, what="at") if at else None)

    @app.post("/worlds/{world}/promotions", response_model=m.OutcomeDoc, **doc)
    def promote_(world: str, body: PromoteBody, c: LocalClient = Depends(promote)) -> dict[str, Any]:
        """Ask for a live promotion (manual: a request; auto: apply; else the block reasons)."""
        return c.promote(world, body.strategy_id, reason=body.reason, dry_run=body.dry_run)

    @app.get("/promotions", response_model=m.RequestList, **doc)
    def promotions(world: str | None = None, all: bool = Query(False), at: str | None = None,
                   c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Promotion requests (pending unless ``all``), as they stood at ``at`` when given."""
        return c.promotions(world=world, include_closed=all, at=parse_instant(at, what="at") if at else None)

    @app.get("/promotions/{request_id}/view", response_model=m.ApprovalView, **doc)
    def approval_view(request_id: str, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """What an approver reads: the gate checklist now, stages side by side, risk evidence, caveats."""
        return c.approval_view(request_id)

    @app.post("/promotions/{request_id}/approve", response_model=m.OutcomeDoc, **doc)
    def approve_(request_id: str, body: DecideBody, c: LocalClient = Depends(approve)) -> dict[str, Any]:
        """Approve as the token's actor."""
        return c.decide(request_id, decision="approve", reason=body.reason, signature=body.signature)

    @app.post("/promotions/{request_id}/reject", response_model=m.OutcomeDoc, **doc)
    def reject_(request_id: str, body: ReasonBody, c: LocalClient = Depends(approve)) -> dict[str, Any]:
        """Reject as the token's actor."""
        return c.decide(request_id, decision="reject", reason=body.reason)

    @app.get("/worlds/{world}/policy", response_model=m.PolicyStatusDoc, **doc)
    def policy_status(world: str, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """The policy version in force and open proposals (diff, approvals)."""
        return c.policy_status(world)

    @app.post("/worlds/{world}/policy/approve", response_model=m.PolicyApprovalDoc, **doc)
    def policy_approve(world: str, body: PolicyApproveBody, c: LocalClient = Depends(approve)) -> dict[str, Any]:
        """Approve a proposed policy version (approvers of the version in force)."""
        return c.approve_policy(world, version=body.version, reason=body.reason)

    @app.post("/worlds/{world}/rollback", response_model=m.RollbackDoc, **doc)
    def rollback(world: str, body: ReasonBody, c: LocalClient = Depends(operate)) -> dict[str, Any]:
        """Restore the previous activation set."""
        return c.rollback(world, reason=body.reason)

    @app.post("/worlds/{world}/halt", response_model=m.HaltDoc, **doc)
    def halt(world: str, body: ReasonBody, c: LocalClient = Depends(operate)) -> dict[str, Any]:
        """The kill switch."""
        return c.set_halted(world, halted=True, reason=body.reason)

    @app.post("/worlds/{world}/resume", response_model=m.HaltDoc, **doc)
    def resume(world: str, body: ReasonBody, c: LocalClient = Depends(operate)) -> dict[str, Any]:
        """Lift the kill switch."""
        return c.set_halted(world, halted=False, reason=body.reason)

    @app.post("/worlds/{world}/demote", response_model=m.DemoteDoc, **doc)
    def demote(world: str, body: DemoteBody, c: LocalClient = Depends(operate)) -> dict[str, Any]:
        """Take a strategy down a stage."""
        return c.demote(world, body.strategy_id, reason=body.reason, to=body.to)

    @app.post("/risk-hub/snapshots", response_model=m.SnapshotStored, **doc)
    def risk_put(document: dict[str, Any] = Body(...), c: LocalClient = Depends(risk)) -> dict[str, Any]:
        """Store a risk snapshot (same key + same content: no-op; other content: 409)."""
        return c.risk_put(document, source="request")

    @app.get("/risk-hub/worlds/{world}", response_model=m.SnapshotDoc, **doc)
    def risk_show(world: str, version: str | None = None, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """A world's snapshot and its freshness now."""
        return c.risk_show(world, version=version)

    @app.get("/audit", response_model=m.AuditLog, **doc)
    def audit_log(world: str | None = None, since: str | None = None, kind: str | None = None,
                  limit: int | None = Query(None, ge=1), c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Ledger entries, oldest first."""
        return c.audit_log(world=world, since=parse_instant(since, what="since") if since else None, kind=kind,
                           limit=limit)

    @app.get("/audit/verify", response_model=m.VerifyDoc, **doc)
    def audit_verify(deep: bool = False, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Verify the hash chain (409 naming the first broken entry); ``deep`` also replays the decision
        tables from the ledger (409 naming the first difference)."""
        return c.audit_verify(deep=deep)

    @app.post("/audit/verify", response_model=m.VerifyDoc, **doc)
    def audit_verify_checkpoints(body: VerifyBody, c: LocalClient = Depends(read)) -> dict[str, Any]:
        """Verify the chain and that it holds each checkpoint's head at its position (409 naming the
        first checkpoint it does not hold)."""
        return c.audit_verify(checkpoints=[cp.model_dump() for cp in body.checkpoints], deep=body.deep)

    @app.get("/audit/head", response_model=m.LedgerHead, **doc)
    def audit_head(c: LocalClient = Depends(read)) -> dict[str, Any]:
        """The ledger's head and the store's origin, for a checkpoint signed by the caller's key."""
        return c.audit_head()

    @app.websocket("/events")
    async def events(ws: WebSocket, world: str | None = None, domain: str | None = None,
                     since: int = 0) -> None:
        """Control events derived from the shared ledger (so every server sees every host's changes),
        filtered by world and execution domain, as JSON messages. The token comes in the
        ``Authorization: Bearer`` header only, and is checked again every ``TOKEN_RECHECK_SECONDS``:
        a revoked token closes the socket (4401). A ``token`` in the URL is refused (4401): URLs end
        up in access logs and proxies, so such a token should be revoked, not used."""
        if "token" in ws.query_params:
            await ws.close(code=WS_UNAUTHORIZED, reason="a token in the URL is refused (URLs are logged): send "
                                                        "Authorization: Bearer, and revoke that token")
            return
        header = ws.headers.get("authorization")

        def allowed() -> QmtlError | None:
            try:
                check_token(header).require("read")
            except QmtlError as exc:
                return exc
            return None

        refused = await asyncio.to_thread(allowed)
        if refused is not None:
            await ws.close(code=WS_UNAUTHORIZED if refused.code == "unauthorized" else WS_FORBIDDEN,
                           reason=refused.message[:120])
            return
        await ws.accept()
        last, checked = since, time.monotonic()
        policies: dict[str, bool] = {}

        def allow_live(world_id: str) -> bool:
            if world_id not in policies:
                try:
                    policies[world_id] = base.load_world(world_id, record=False).policy.allow_live
                except QmtlError:  # a world whose policy is gone: report it as not allowing live
                    policies[world_id] = False
            return policies[world_id]

        try:
            while True:
                if time.monotonic() - checked >= TOKEN_RECHECK_SECONDS:
                    refused, checked = await asyncio.to_thread(allowed), time.monotonic()
                    if refused is not None:
                        await ws.close(code=WS_UNAUTHORIZED if refused.code == "unauthorized" else WS_FORBIDDEN,
                                       reason=refused.message[:120])
                        return
                with base.store.read() as conn:
                    fresh = entries_after(conn, last, world=world)
                    events = [(entry.seq, events_from_entry(entry, decision_at(conn, allow_live)))
                              for entry in fresh]
                for seq, batch in events:
                    last = seq
                    for event in batch:
                        if domain is not None and event.get("execution_domain") not in (None, domain):
                            continue
                        await ws.send_json(event)
                try:  # wait for the next poll, noticing at once when the client goes away
                    message = await asyncio.wait_for(ws.receive(), timeout=0.25)
                    if message.get("type") == "websocket.disconnect":
                        return
                except asyncio.TimeoutError:
                    pass
        except (WebSocketDisconnect, RuntimeError):
            return

    app.state.service = base
    return app


#: Environment variable ``qmtl serve`` passes the body limit to its worker processes in.
MAX_BODY_ENV = "QMTL_SERVE_MAX_BODY"
METRICS_MAX_AGE_ENV = "QMTL_METRICS_MAX_AGE"


def app_from_environment() -> FastAPI:
    """The app as a ``--workers`` process builds it (uvicorn factory): settings from the environment
    ``qmtl serve`` prepared (``QMTL_HOME``, ``QMTL_WORLDS_DIR``, ``QMTL_DATABASE_URL``)."""
    settings = Settings.resolve()
    settings.server = None  # the server itself is local
    return create_app(settings, max_body=int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY)),
                      metrics_max_age=float(os.environ.get(METRICS_MAX_AGE_ENV, 0.0)))
