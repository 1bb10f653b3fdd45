"""Submitting a strategy to a world, and feeding a submitted strategy new bars.

One code path behind ``qmtl submit``, ``qmtl run`` and ``Runner.submit(strategy, world=...)``
(once :func:`connect_runner` / ``Runner.use_world_service`` plugged a ``WorldService`` or a client
in). Everything the world knows is read and written through a *client*: ``LocalClient`` (the
facade in-process) or ``HttpClient`` (a ``qmtl serve``), both answering in the same JSON documents.
The strategy file is imported, backtested and fed here, in the caller's process; a server only
ever receives documents (the strategy's row, evaluation runs), never code:

- :func:`submit_strategy`: stable strategy id → compute context from the world's decision →
  backtest with the policy's costs → the backtest evaluation run (idempotent: same code and data
  give the same run and no new revision) → status ``active | rejected | pending`` and the
  campaign's next step.
- :func:`feed_strategy`: the world decides the domain. In ``dryrun`` (paper) the bars fed so far
  plus the new ones are replayed through the backtest engine (fills at the next bar's open with the
  policy's costs; the replay is deterministic, so earlier returns never change) and the paper run
  gets a new revision covering every paper return. In ``live`` the orders of the bar that just
  closed go through the one order gate to the configured execution service. ``backtest`` (and
  anything downgraded to it) has nothing to feed.
- :func:`load_strategy_file` / :func:`pick_strategy`: importing a user's file, with every error
  in the user's code reported as one ``file:line`` line (exit 2).

The bars fed so far live in the strategy's row (``meta["feed"]``), written after the run is
recorded and compare-and-set against what was read, so a crash in between heals on the next run
and two concurrent runs cannot both append (also across hosts: the check runs in the store).

Control-bus announcements (``queue_update`` and ``tagquery.upsert`` for the strategy's input
queues in its world/domain namespace) go through the client like everything else: the facade
records them in the ledger, so ``/events`` subscribers of any ``qmtl serve`` sharing the store
receive them with the DESIGN §8 payload, and publishes them on its in-process bus. In ``shadow``
(``feed_strategy(..., execution_domain="shadow")``) the replay runs on the shadow mirror with every
order blocked by the gate, and the strategy's shadow run is recorded like paper's, on its own
series of fed bars (``meta["shadow_feed"]``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import re
import sys
import traceback
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from qmtl_core.canonical import sha256_hex
from qmtl_core.domains import ComputeContext, DecisionEnvelope
from qmtl_core.errors import (BadInputError, BlockedError, DataFileError, FailClosedError, QmtlError,
                              StrategyNotFound, UsageError)
from qmtl_core.evidence_class import EvidenceClass
from qmtl_core.gateway import ComputeContextService, StrategySubmit
from qmtl_core.grammar import GrammarError, loads_json, parse_number
from qmtl_core.policy import format_duration
from qmtl_core.spacing import GAP_FLOOR, GAP_INTERVALS, Gap, find_gaps, gap_limit
from qmtl_core.sdk import (BAR_FIELDS, BacktestResult, Bars, Order, Runner, Strategy, SubmitResult,
                           TradeExecutionService, load_bars, run_backtest, strategy_id, strategy_source)
from qmtl_core.timeutil import DEFAULT_FUTURE_TOLERANCE, iso, parse_instant, refuse_future, utcnow

if TYPE_CHECKING:
    from qmtl_core.campaign import Action
    from qmtl_core.runs import RunRevision
    from qmtl_core.service import WorldService
    from qmtl_core.service._client import HttpClient, LocalClient

    Client = LocalClient | HttpClient

__all__ = [
    "DEFAULT_BARS",
    "ClientWorldClient",
    "FeedResult",
    "Submission",
    "action_from_doc",
    "as_client",
    "connect_runner",
    "default_data",
    "defined_strategies",
    "envelope_from_doc",
    "feed_strategy",
    "load_strategy_file",
    "parse_params",
    "pick_strategy",
    "resolve_context",
    "run_from_doc",
    "strategy_row",
    "submit_strategy",
]

#: The bundled daily price set a submission is backtested on when no ``--data`` is given.
DEFAULT_BARS = "GOOG.csv"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: Execution domain -> the stage whose run a feed appends to.
FEED_STAGE = {"dryrun": "paper", "shadow": "shadow", "live": "live"}
#: Where a strategy's row keeps the bars fed so far, per stage: shadow mirrors live inputs on its
#: own series, so feeding it never consumes (or is refused by) the bars paper was fed.
FEED_META = {"paper": "feed", "live": "feed", "shadow": "shadow_feed"}


# --- loading a strategy file ------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    # Stable per file: inspect.getsource finds the source through sys.modules[cls.__module__].
    return "qmtl_strategy_" + sha256_hex(str(path))[:16]


def _user_error(exc: BaseException, files: set[str], shown: Mapping[str, str]) -> BadInputError | None:
    """``exc`` as one ``file:line: Type: message`` line when it was raised in the user's code."""
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        name = os.path.realpath(frame.f_code.co_filename)
        if name in files:
            where = (shown.get(name, frame.f_code.co_filename), lineno)
    if where is None:
        return None
    text = str(exc).strip().splitlines()
    return BadInputError(f"{where[0]}:{where[1]}: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": "),
                         hint="fix the strategy code", code="strategy_error",
                         details={"file": where[0], "line": where[1], "exception": type(exc).__name__})


@contextlib.contextmanager
def user_code(files: set[str], shown: Mapping[str, str] | None = None) -> Iterator[None]:
    """Report an exception raised in the user's files as bad input (exit 2) naming file:line.

    qmtl's own errors pass unchanged; an exception with no frame in the user's files is a bug in
    qmtl and propagates as it is.
    """
    try:
        yield
    except QmtlError:
        raise
    except Exception as exc:
        err = _user_error(exc, files, shown or {})
        if err is None:
            raise
        raise err from None


def _files_of(cls: type) -> set[str]:
    try:
        import inspect

        return {os.path.realpath(inspect.getfile(cls))}
    except (OSError, TypeError):
        return set()


def load_strategy_file(path: str | Path) -> ModuleType:
    """Import a strategy file under a stable module name (registered in ``sys.modules``).

    A missing file, a syntax error or an exception while importing it (a missing package ...)
    raises :class:`BadInputError` whose one line names the file and line.
    """
    shown = Path(path)
    if not shown.is_file():
        raise BadInputError(f"{shown}: no such strategy file", hint="pass the path of a .py file",
                            code="strategy_file_missing")
    resolved = shown.resolve()
    name = _module_name(resolved)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise BadInputError(f"{shown}: not a Python file qmtl can import", code="strategy_file_invalid")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # so the file can import modules that sit next to it
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        where = str(shown) if exc.filename in (str(resolved), None) else exc.filename
        raise BadInputError(f"{where}:{exc.lineno}: {type(exc).__name__}: {exc.msg}",
                            hint="fix the strategy code", code="strategy_error",
                            details={"file": where, "line": exc.lineno}) from None
    except QmtlError:
        sys.modules.pop(name, None)
        raise
    except Exception as exc:
        sys.modules.pop(name, None)
        err = _user_error(exc, {str(resolved)}, {str(resolved): str(shown)})
        if err is None:  # pragma: no cover - importing always runs the file's own frame
            raise
        raise err from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)
    return module


def defined_strategies(module: ModuleType) -> list[type[Strategy]]:
    """Strategy subclasses ``module`` defines itself (not ones it imports), in definition order.

    Bases that do not implement ``setup()`` are not strategies one can run, so they are left out.
    """
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Strategy) and obj is not Strategy
            and obj.__module__ == module.__name__ and obj.setup is not Strategy.setup]


def pick_strategy(module: ModuleType, path: str | Path, name: str | None = None) -> type[Strategy]:
    """The one strategy class to run: ``name``, or the only one the file defines (exit 2 otherwise)."""
    found = defined_strategies(module)
    names = [c.__qualname__ for c in found]
    if name is not None:
        for cls in found:
            if name in (cls.__name__, cls.__qualname__):
                return cls
        raise UsageError(f"{path} defines no strategy named {name!r}",
                         hint=f"it defines: {', '.join(names) or 'none'}", code="strategy_not_defined",
                         details={"strategies": names})
    if not found:
        raise UsageError(f"{path} defines no Strategy subclass",
                         hint="define a class that subclasses qmtl_core.sdk.Strategy and implements "
                              "setup(); imported classes do not count", code="no_strategy",
                         details={"strategies": []})
    if len(found) > 1:
        raise UsageError(f"{path} defines {len(found)} strategies: {', '.join(names)}",
                         hint="pick one with --strategy NAME", code="several_strategies",
                         details={"strategies": names})
    return found[0]


def parse_params(items: Sequence[str], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each typed by its default (``defaults``, the strategy's).

    A bool takes ``true``/``false``; an int a plain integer; a float a number of the shared
    grammar; a str any text; a list or dict a JSON value of that kind; a default of ``None`` a
    JSON value, else text. Anything else, and a key the strategy does not declare, is a
    ``UsageError`` naming the parameter: ``allow_short=maybe`` must not become a truthy string
    (and a new strategy id). Without ``defaults`` values are JSON when they parse, else text.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--param {item!r} is not KEY=VALUE", hint="e.g. --param fast=5")
        if key in out:
            raise UsageError(f"--param {key} is given twice", hint="give each parameter once")
        if defaults is None:
            out[key] = _untyped_param(raw)
            continue
        if key not in defaults:
            close = difflib.get_close_matches(key, sorted(defaults), n=1)
            raise UsageError(f"--param {key}: the strategy has no parameter {key!r}",
                             hint=f"did you mean {close[0]!r}?" if close else
                             f"known: {', '.join(sorted(defaults)) or '(none)'}", code="unknown_param")
        out[key] = _typed_param(key, raw, defaults[key])
    return out


def _untyped_param(raw: str) -> Any:
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return loads_json(text)
    except GrammarError:
        return raw


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _typed_param(key: str, raw: str, default: Any) -> Any:
    text = raw.strip()

    def bad(kind: str, example: str) -> UsageError:
        return UsageError(f"--param {key}={raw}: {key} takes {kind} (its default is {default!r})",
                          hint=f"e.g. --param {key}={example}", code="bad_param")

    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise bad("true or false", "false")
        return text.lower() == "true"
    if isinstance(default, int):
        if _INTEGER.fullmatch(text) is None or len(text) > 20:
            raise bad("an integer", str(default))
        return int(text)
    if isinstance(default, float):
        try:
            return parse_number(text, missing_ok=False)
        except GrammarError:
            raise bad("a finite number", repr(default)) from None
    if isinstance(default, str):
        return raw
    if default is None:
        return _untyped_param(raw)
    kind = list if isinstance(default, (list, tuple)) else dict if isinstance(default, Mapping) else None
    if kind is None:
        raise UsageError(f"--param {key}: a {type(default).__name__} parameter cannot be set from the "
                         "command line", hint="change its default in the strategy file", code="bad_param")
    try:
        value = loads_json(text)
    except GrammarError:
        value = None
    if not isinstance(value, kind):
        raise bad(f"a JSON {'list' if kind is list else 'object'}", json.dumps(default)[:40])
    return value


def instantiate(cls: type[Strategy], params: Mapping[str, Any], *, shown: str | None = None) -> Strategy:
    """``cls(**params)`` with its DAG built; errors in the user's code name file:line."""
    files = _files_of(cls)
    with user_code(files, {f: shown for f in files} if shown else None):
        strategy = cls(**params)
        strategy.build()
    return strategy


# --- the world, through a client -----------------------------------------------------------------------
def as_client(target: "WorldService | Client") -> "Client":
    """A ``LocalClient`` over a ``WorldService``; a client (``LocalClient``/``HttpClient``) as it is."""
    from qmtl_core.service import WorldService
    from qmtl_core.service._client import LocalClient

    return LocalClient(target) if isinstance(target, WorldService) else target


def _clock(client: "Client") -> Any:
    """The facade's clock in-process (tests move it); the wall clock on a remote client."""
    from qmtl_core.timeutil import utcnow

    service = getattr(client, "service", None)
    return getattr(service, "clock", utcnow)


def _costs(client: "Client", world: str) -> tuple[float, float, timedelta]:
    """The world's ``(fee_bps, slippage_bps)`` from its policy document, and how far ahead of the
    clock a bar may be dated (``risk.future_tolerance``)."""
    from qmtl_core.policy._durations import parse_duration

    policy = client.world(world)["policy"]
    costs = policy.get("costs") or {}
    tolerance = (policy.get("risk") or {}).get("future_tolerance")
    return (float(costs.get("fee_bps", 0.0)), float(costs.get("slippage_bps", 0.0)),
            parse_duration(tolerance) if tolerance is not None else DEFAULT_FUTURE_TOLERANCE)


def _refuse_future_bars(bars: Bars, tolerance: timedelta, source: str) -> None:
    """Bars are observations: none may be dated after now (``timeutil.refuse_future``). Checked
    before anything is run or written, so a refused file leaves no trace; the service checks the
    returns made from them again, whoever sends them."""
    refuse_future((_to_datetime(t) for t in bars.timestamp), now=utcnow(), tolerance=tolerance,
                  where=lambda i: f"{source}: row {i + 1} (bar)", error=DataFileError)


def strategy_row(client: "Client", world: str, sid: str) -> dict[str, Any] | None:
    """The world's row for a strategy, ``None`` when the world has never seen it."""
    try:
        return dict(client.strategy(world, sid))
    except StrategyNotFound as exc:
        if exc.code == StrategyNotFound.code:
            return None
        raise


def envelope_from_doc(doc: Mapping[str, Any]) -> DecisionEnvelope:
    """Inverse of ``envelope_to_dict``."""
    as_of = doc.get("as_of")
    return DecisionEnvelope(world_id=str(doc["world_id"]), strategy_id=str(doc["strategy_id"]),
                            effective_mode=str(doc["effective_mode"]), reason=str(doc["reason"]),
                            as_of=parse_instant(str(as_of), what="decision as_of") if as_of else None,
                            ttl_sec=int(doc["ttl_sec"]), etag=str(doc["etag"]),
                            policy_version=int(doc["policy_version"]), allow_live=bool(doc.get("allow_live")))


def run_from_doc(doc: Mapping[str, Any]) -> "RunRevision":
    """A run revision from its document (``created`` as the document says; true when absent)."""
    from qmtl_core.runs import RunRevision

    return RunRevision(doc["world"], doc["strategy_id"], doc["stage"], doc["run_id"], int(doc["revision"]),
                       doc["status"], doc.get("policy_version"), dict(doc.get("metrics") or {}),
                       dict(doc.get("metric_sources") or {}), list(doc.get("rules") or []), doc.get("window"),
                       doc.get("reason"), doc["content_hash"], doc["recorded_at"], doc["recorded_by"],
                       bool(doc.get("created", True)),
                       str(doc.get("evidence_class") or EvidenceClass.UNVERIFIED), dict(doc.get("metric_classes") or {}))


def action_from_doc(doc: Mapping[str, Any] | None) -> "Action | None":
    """A campaign action from its document."""
    if doc is None:
        return None
    from qmtl_core.campaign import Action

    body = doc.get("suggested_body")
    return Action(action=doc["action"], world=doc["world"], strategy_id=doc["strategy_id"], stage=doc["stage"],
                  reason=doc["reason"], detail=doc["detail"], requires=tuple(doc.get("requires") or ()),
                  idempotency_key=doc["idempotency_key"], suggested_run_id=doc.get("suggested_run_id"),
                  suggested_body=dict(body) if body is not None else None)


class ClientWorldClient:
    """The gateway's ``WorldClient`` over a document client (``LocalClient`` or ``HttpClient``).

    A strategy the world has never seen has no decision (``None``), which the context service
    resolves to ``backtest`` / ``decision_unavailable``.
    """

    def __init__(self, client: "Client") -> None:
        self.client = client
        #: the envelopes handed out, by (world, strategy id)
        self.envelopes: dict[tuple[str, str], DecisionEnvelope] = {}

    def get_decision(self, world_id: str, strategy_id: str) -> DecisionEnvelope | None:
        """The world's current decision for the strategy, ``None`` when it does not know it."""
        if strategy_row(self.client, world_id, strategy_id) is None:
            return None
        docs = self.client.decisions(world_id, strategy_id=strategy_id)["decisions"]
        if not docs:
            return None
        envelope = envelope_from_doc(docs[0])
        self.envelopes[(world_id, strategy_id)] = envelope
        return envelope


def resolve_context(client: "Client", strategy: Strategy, world: str, sid: str,
                    requested: str | None = None) -> tuple[ComputeContext, DecisionEnvelope | None]:
    """The strategy's compute context from the world's decision (an explicit ``shadow`` is kept)."""
    ids = sorted(n.node_id for n in strategy.build())
    submit = StrategySubmit(
        dag_json=strategy.dag_json(),
        meta={"execution_domain": requested} if requested else {},
        world_id=world, node_ids_crc32=zlib.crc32(",".join(ids).encode()), strategy_id=sid)
    decisions = ClientWorldClient(client)
    ctx = ComputeContextService(world_client=decisions, clock=_clock(client)).build_sync(submit)
    return ctx, decisions.envelopes.get((world, sid))


def _envelope_doc(envelope: DecisionEnvelope | None) -> dict[str, Any] | None:
    if envelope is None:
        return None
    from qmtl_core.governance._decision import envelope_to_dict

    return envelope_to_dict(envelope)


def _context_doc(ctx: ComputeContext) -> dict[str, Any]:
    return {"world_id": ctx.world_id, "execution_domain": ctx.execution_domain,
            "downgrade_reason": ctx.downgrade_reason, "requested_domain": ctx.requested_domain,
            "allow_live": ctx.allow_live, "decision_etag": ctx.decision_etag,
            "policy_version": ctx.policy_version}


# --- helpers on bars and results ------------------------------------------------------------------------
def _to_datetime(ts: np.datetime64) -> datetime:
    return _EPOCH + timedelta(microseconds=int(ts.astype("datetime64[us]").astype(np.int64)))


def realized_returns(result: BacktestResult) -> list[tuple[datetime, float]]:
    """Per-bar returns with aware timestamps (bars with no measurable equity are left out)."""
    micros = result.timestamps.astype("datetime64[us]").astype(np.int64).tolist()
    return [(_EPOCH + timedelta(microseconds=us), float(r))
            for us, r in zip(micros, result.returns.tolist()) if np.isfinite(r)]


def _trades_since(result: BacktestResult, start: datetime | None) -> int:
    trades = (*result.trades, *result.open_trades)
    return len(trades) if start is None else sum(1 for t in trades if t.entry_time >= start)


def default_data(worlds_dir: Path | None) -> Path:
    """``<worlds dir>/data/GOOG.csv``, else the copy bundled with qmtl's source tree.

    Always a file on this machine: with a remote client the bars are read and backtested here, so
    ``worlds_dir`` is the *local* worlds directory (``--worlds-dir`` / ``QMTL_WORLDS_DIR``), not the
    server's.
    """
    bundled = Path(__file__).resolve().parent.parent / "worlds" / "data" / DEFAULT_BARS
    local = worlds_dir / "data" / DEFAULT_BARS if worlds_dir is not None else None
    for candidate in (local, bundled):
        if candidate is not None and candidate.is_file():
            return candidate
    raise DataFileError(f"no default bars: {local or bundled} does not exist",
                        hint="pass --data FILE (CSV/Parquet with timestamp,open,high,low,close,volume)")


def _worlds_dir(client: "Client", worlds_dir: Path | None) -> Path | None:
    if worlds_dir is not None:
        return worlds_dir
    service = getattr(client, "service", None)  # a LocalClient: its settings' worlds directory
    return service.settings.worlds_dir if service is not None else None


def _bars_doc(bars: Bars) -> dict[str, list[Any]]:
    stamps = [iso(_to_datetime(t)) for t in bars.timestamp]
    return {"timestamp": stamps, **{f: getattr(bars, f).tolist() for f in BAR_FIELDS}}


def _bars_from_doc(doc: Mapping[str, Sequence[Any]]) -> Bars:
    return Bars.from_columns({"timestamp": [parse_instant(t) for t in doc["timestamp"]],
                              **{f: doc[f] for f in BAR_FIELDS}}, source="stored feed", validate=False)


def _concat(a: Bars | None, b: Bars) -> Bars:
    if a is None or not len(a):
        return b
    return Bars(np.concatenate([a.timestamp, b.timestamp]),
                *(np.concatenate([getattr(a, f), getattr(b, f)]) for f in BAR_FIELDS))


def _ns(bars: Bars) -> np.ndarray:
    return bars.timestamp.astype("datetime64[ns]").astype(np.int64)


def _ts_text(ns: int) -> str:
    return iso(_EPOCH + timedelta(microseconds=ns // 1000))[:19] + "Z"


def _new_bars(old: Bars | None, new: Bars, floor: datetime | None, source: str) -> tuple[Bars, int]:
    """The bars of ``new`` after the last one fed, and how many were already fed (dropped).

    A bar at or before the last fed timestamp must be identical to the one fed then; anything
    else there (an older bar never fed, or a changed one) is refused: a run only appends.
    """
    new_ns = _ns(new)
    if old is not None and len(old):
        old_ns = _ns(old)
        last = int(old_ns[-1])
        index = {int(t): i for i, t in enumerate(old_ns.tolist())}
        overlap = np.flatnonzero(new_ns <= last)
        for i in overlap.tolist():
            j = index.get(int(new_ns[i]))
            when = _ts_text(int(new_ns[i]))
            if j is None:
                raise DataFileError(
                    f"{source}: bar {when} is older than the last bar already fed ({_ts_text(last)}) "
                    "and was never fed; qmtl run only appends new bars",
                    hint=f"pass only bars after {_ts_text(last)}", code="bars_too_old",
                    details={"bar": when, "last_fed": _ts_text(last)})
            if any(getattr(new, f)[i] != getattr(old, f)[j] for f in BAR_FIELDS):
                raise DataFileError(
                    f"{source}: bar {when} differs from the bar fed for that time; fed bars cannot change",
                    hint=f"pass only bars after {_ts_text(last)}", code="bar_changed",
                    details={"bar": when})
        keep = np.flatnonzero(new_ns > last)
        return new.slice(int(keep[0]), len(new)) if len(keep) else new.slice(0, 0), int(len(overlap))
    if floor is not None:
        floor_ns = int(np.datetime64(floor.astimezone(timezone.utc).replace(tzinfo=None), "ns").astype(np.int64))
        if len(new_ns) and int(new_ns[0]) <= floor_ns:
            raise DataFileError(
                f"{source}: bar {_ts_text(int(new_ns[0]))} is not after the data the strategy was "
                f"backtested on (up to {_ts_text(floor_ns)}); paper bars must be new data",
                hint=f"pass only bars after {_ts_text(floor_ns)}", code="bars_too_old",
                details={"bar": _ts_text(int(new_ns[0])), "backtest_end": _ts_text(floor_ns)})
    return new, 0


def stream_interval(strategy: Strategy) -> timedelta:
    """The shortest interval of the strategy's input streams (the nodes it is fed on)."""
    return timedelta(seconds=min((n.interval for n in strategy.build() if not n.inputs), default=86_400))


def _check_gaps(old: Bars | None, fresh: Bars, step: timedelta, source: str, allow_gap: bool) -> list[Gap]:
    """The gaps (``spacing.find_gaps``) between the last bar fed and the new ones, and among the
    new ones. Refused (``bars_gap``, exit 2) unless ``allow_gap``: the return across a gap is one
    return over the whole hole, and bars inside it can never be fed afterwards (a run only appends)."""
    stamps = [_to_datetime(t) for t in fresh.timestamp]
    if old is not None and len(old):
        stamps.insert(0, _to_datetime(old.timestamp[-1]))
    gaps = find_gaps(stamps, step)
    if gaps and not allow_gap:
        gap = gaps[0]
        before, after = iso(gap.before)[:19] + "Z", iso(gap.after)[:19] + "Z"
        raise DataFileError(
            f"{source}: bar {after} comes {format_duration(gap.length)} after the bar before it ({before}); "
            f"more than {format_duration(gap_limit(step))} ({GAP_INTERVALS} x the stream interval "
            f"{format_duration(step)}, at least {format_duration(GAP_FLOOR)}) is a gap in the data",
            hint=f"feed the missing bars between {before} and {after} first, or pass --allow-gap to book "
                 "one return across the gap (the bars inside it can then never be fed)",
            code="bars_gap", details={"gaps": [g.to_dict() for g in gaps]})
    return gaps


def _next_action(client: "Client", world: str, sid: str) -> "Action | None":
    views = client.campaign(world, strategy_id=sid)["strategies"]
    return action_from_doc(views[0].get("next_action")) if views else None


def _action_doc(action: "Action | None") -> dict[str, Any] | None:
    if action is None:
        return None
    return {"action": action.action, "reason": action.reason, "detail": action.detail,
            "stage": action.stage, "exit_class": action.exit_class}


# --- submit ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Submission:
    """What a submission did: the id, where the world put the strategy, the backtest run."""

    world: str
    strategy_id: str
    name: str
    params: dict[str, Any]
    source_file: str | None
    code_hash: str
    context: ComputeContext
    decision: DecisionEnvelope | None
    stage: str
    status: str
    run: "RunRevision"
    backtest: BacktestResult
    data: str
    queues: tuple[str, ...]
    next_action: "Action | None"
    registered: bool
    dag: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        """False when a blocking gate failed (or the world retired the strategy)."""
        return self.status != "rejected"

    @property
    def exit_code(self) -> int:
        """0 accepted, 10 rejected, 12 when the backtest measured nothing (fail closed)."""
        if self.status == "rejected":
            return 10
        if self.run.status == "insufficient_data":
            return 12
        return 0

    def result(self) -> SubmitResult:
        """The SDK's ``SubmitResult`` for ``Runner.submit``."""
        return SubmitResult(strategy_id=self.strategy_id, world_id=self.world, context=self.context,
                            dag=self.dag, submission=self)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what ``qmtl submit --json`` prints)."""
        bt = self.backtest
        stamps = bt.timestamps
        return {
            "world": self.world, "strategy_id": self.strategy_id, "strategy": self.name,
            "file": self.source_file, "params": self.params, "code_hash": self.code_hash,
            "status": self.status, "accepted": self.accepted, "stage": self.stage,
            "execution_domain": self.context.execution_domain,
            "downgrade_reason": self.context.downgrade_reason,
            "context": _context_doc(self.context), "decision": _envelope_doc(self.decision),
            "queues": list(self.queues),
            "orders": {"published": 0, "note": "a submission only backtests: fills are simulated "
                                               "and no order reaches an execution service"},
            "backtest": {"data": self.data, "bars": len(stamps),
                         "start": iso(_to_datetime(stamps[0])) if len(stamps) else None,
                         "end": iso(_to_datetime(stamps[-1])) if len(stamps) else None,
                         "n_trades": bt.n_trades, "closed_trades": len(bt.trades),
                         "total_return": bt.total_return, "fee_bps": bt.fee_bps,
                         "slippage_bps": bt.slippage_bps, "unfilled_orders": bt.unfilled_orders,
                         "liquidated_at": bt.extra.get("liquidated_at")},
            "run": {**self.run.to_dict(), "created": self.run.created},
            "registered": self.registered,
            "next_action": _action_doc(self.next_action),
        }


def _queue_updates(strategy: Strategy, world: str, domain: str) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """The strategy's input queues in its world/domain namespace, and the updates announcing them
    (recorded with the submission, so every ``/events`` subscriber sees the ``queue_update`` and
    ``tagquery.upsert``, and published on the in-process bus)."""
    from qmtl_core.controlbus import input_queue, queue_update

    out, updates = [], []
    for node in strategy.build():
        if node.inputs:
            continue
        try:
            queue = input_queue(world, domain, node.name)
            update = {"tags": [node.name], "interval": node.interval,
                      "queues": [{"queue": queue, "global": False}], "match_mode": "any",
                      "execution_domain": domain}
            queue_update(**update, world_id=world)  # checked here: a bad name is skipped, not sent
        except BadInputError:  # a name that cannot be a queue: nothing to announce
            continue
        out.append(queue)
        updates.append(update)
    return tuple(out), updates


@dataclass(frozen=True)
class _Prepared:
    """What submit and run both start from."""

    fee_bps: float
    slippage_bps: float
    future_tolerance: timedelta
    files: set[str]
    shown: dict[str, str] | None
    sid: str


def _prepare(client: "Client", strategy: Strategy, world: str, source_file: str | None) -> _Prepared:
    """The world's costs and future tolerance, the strategy's source files (so an error in user code
    names the file the user gave) and its stable id."""
    fee_bps, slippage_bps, tolerance = _costs(client, world)
    files = _files_of(type(strategy))
    shown = {f: source_file for f in files} if source_file else None
    with user_code(files, shown):
        sid = strategy_id(strategy)
    return _Prepared(fee_bps, slippage_bps, tolerance, files, shown, sid)


def submit_strategy(client: "Client | WorldService", strategy: Strategy, world: str, *,
                    data: str | Path | None = None, execution_domain: str | None = None,
                    source_file: str | None = None, worlds_dir: Path | None = None) -> Submission:
    """Submit ``strategy`` to ``world``: id, context, backtest, backtest run, status, next step.

    ``client`` is a ``LocalClient`` or an ``HttpClient`` (a ``WorldService`` is wrapped in a
    ``LocalClient``); the backtest runs here either way. Without ``data`` the bars are
    ``<worlds_dir>/data/GOOG.csv`` (default: a local client's worlds directory), else the copy
    bundled with qmtl. Idempotent: unchanged code, parameters and data give the same strategy id,
    the same run id and no new revision (nothing is written, not even a ledger entry).
    """
    client = as_client(client)
    prep = _prepare(client, strategy, world, source_file)
    fee_bps, slippage_bps, files, shown, sid = prep.fee_bps, prep.slippage_bps, prep.files, prep.shown, prep.sid
    cls = type(strategy)
    ctx, envelope = resolve_context(client, strategy, world, sid, execution_domain)
    strategy.apply_compute_context(ctx)
    path = Path(data) if data is not None else default_data(_worlds_dir(client, worlds_dir))
    bars = load_bars(path)
    _refuse_future_bars(bars, prep.future_tolerance, str(path))
    if len(bars) < 2:
        raise DataFileError(f"{path}: {len(bars)} bar(s); a backtest needs at least two",
                            hint="pass a longer price history with --data")
    with user_code(files, shown):
        result = run_backtest(strategy, bars, fee_bps=fee_bps, slippage_bps=slippage_bps, world_id=world)
    params = dict(strategy.__dict__.get("params", {}))
    code_hash = sha256_hex(strategy_source(cls))
    queues, updates = _queue_updates(strategy, world, ctx.execution_domain)
    # One write: the strategy's row, its backtest run and its queues, all or nothing, so a submit
    # that fails anywhere leaves no strategy behind (one the loop would report stalled forever).
    done = client.record_submission(
        world, strategy_id=sid, stage="backtest", metrics={"n_trades": result.n_trades},
        returns=realized_returns(result), evidence_class=EvidenceClass.REPLAY, queues=updates,
        registration={"name": cls.__qualname__, "code_hash": code_hash,
                      "meta": {"submission": {"class": cls.__qualname__, "file": source_file,
                                              "params": params, "data": str(path)}}})
    run = run_from_doc(done["run"])
    stage = str(done["strategy"]["stage"])
    if run.status == "fail" or stage == "retired":
        status = "rejected"
    elif stage in ("paper", "live"):
        status = "active"
    else:
        status = "pending"
    return Submission(world=world, strategy_id=sid, name=cls.__qualname__, params=params,
                      source_file=source_file, code_hash=code_hash, context=ctx, decision=envelope,
                      stage=stage, status=status, run=run, backtest=result, data=str(path),
                      queues=queues, next_action=_next_action(client, world, sid),
                      registered=bool(done["changed"]), dag=strategy.dag())


def connect_runner(target: "WorldService | Client", *, data: str | Path | None = None) -> None:
    """Make ``Runner.submit(strategy, world=...)`` record submissions exactly like ``qmtl submit``,
    in a ``WorldService`` (in-process) or through a client (``HttpClient``: a ``qmtl serve``; the
    backtest still runs in this process). The returned ``SubmitResult.submission`` holds the
    :class:`Submission`."""
    client = as_client(target)

    def handler(strategy: Strategy, world: str, execution_domain: str | None) -> SubmitResult:
        return submit_strategy(client, strategy, world, data=data,
                               execution_domain=execution_domain).result()

    Runner.set_submit_handler(handler)


# --- run: feeding new bars ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedResult:
    """What feeding new bars did: domain, the bars taken, the run revision, the orders."""

    world: str
    strategy_id: str
    name: str
    context: ComputeContext
    decision: DecisionEnvelope | None
    stage: str
    data: str
    new_bars: int
    duplicate_bars: int
    first_new: str | None
    last_new: str | None
    total_bars: int
    run: "RunRevision | None"
    n_trades: int | None
    orders: tuple[Order, ...]
    order_stats: dict[str, Any]
    next_action: "Action | None"
    note: str | None = None
    gaps: tuple[Gap, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 done (or nothing new), 10 when the stage's run now fails a blocking gate."""
        if self.run is not None and self.run.status == "fail":
            return 10
        return 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what ``qmtl run --json`` prints)."""
        return {
            "world": self.world, "strategy_id": self.strategy_id, "strategy": self.name,
            "stage": self.stage, "execution_domain": self.context.execution_domain,
            "downgrade_reason": self.context.downgrade_reason, "context": _context_doc(self.context),
            "decision": _envelope_doc(self.decision), "data": self.data,
            "bars": {"new": self.new_bars, "duplicates": self.duplicate_bars, "first_new": self.first_new,
                     "last_new": self.last_new, "total_fed": self.total_bars,
                     "gaps": [g.to_dict() for g in self.gaps]},
            "run": {**self.run.to_dict(), "created": self.run.created} if self.run is not None else None,
            "n_trades": self.n_trades,
            "orders": {**self.order_stats, "emitted": list(self.orders)},
            "note": self.note, "next_action": _action_doc(self.next_action),
        }


def _stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    blocked = {k: v - before["blocked"].get(k, 0) for k, v in after["blocked"].items()
               if v - before["blocked"].get(k, 0)}
    return {"published": after["published"] - before["published"],
            "failed": after["failed"] - before["failed"], "blocked": blocked}


def _nothing_to_feed(world: str, name: str, sid: str, ctx: ComputeContext,
                     envelope: DecisionEnvelope | None) -> BlockedError:
    who = f"{name} ({sid[:12]})"
    if envelope is not None and envelope.reason == "backtest_campaign" and ctx.downgrade_reason is None:
        return BlockedError(
            f"world {world} has {who} in backtest: qmtl run has nothing to feed until the campaign "
            "promotes it to paper",
            hint=f"see qmtl world campaign {world}; a passing backtest is promoted by "
                 f"qmtl world campaign-loop --world {world} --once --execute", code="not_in_paper")
    why = ctx.downgrade_reason or (envelope.reason if envelope is not None else "decision_unavailable")
    mode = envelope.effective_mode if envelope is not None else "none"
    return BlockedError(f"world {world} decides {ctx.execution_domain} for {who} (effective mode {mode}, "
                        f"reason {why}): qmtl run has nothing to feed",
                        hint=f"see qmtl world decision {world} and qmtl world campaign {world}", code=why)


def feed_strategy(client: "Client | WorldService", strategy: Strategy, world: str, data: str | Path, *,
                  source_file: str | None = None,
                  execution_service: TradeExecutionService | None = None,
                  execution_domain: str | None = None, allow_gap: bool = False) -> FeedResult:
    """Feed the bars in ``data`` to a submitted strategy in the domain its world decides.

    ``dryrun`` (paper): replay every bar fed so far plus the new ones through the backtest engine
    with the policy's costs and record the paper run's next revision over all paper returns.
    ``live``: the same replay, then the orders of the bar that just closed go through the one order
    gate to ``execution_service`` (else the one set on ``Runner``; none: fail closed, exit 12; one
    new bar per run). ``execution_domain="shadow"`` (``qmtl run --domain shadow``): the same
    replay on the shadow mirror of the live inputs, every order blocked by the gate and counted,
    recording the next revision of the strategy's shadow run (its own series of fed bars, from
    after the backtest data, like paper). Anything else: nothing to feed (``BlockedError``, exit 10). Bars already fed
    are dropped; older ones are refused. ``client`` as for :func:`submit_strategy`: the replay and
    the order gate run here, the server (if any) only stores the run and the fed bars.
    """
    client = as_client(client)
    if execution_domain not in (None, "shadow"):
        raise BadInputError(f"--domain {execution_domain}: only shadow can be asked for; the world decides "
                            "paper or live", hint="drop --domain, or use --domain shadow", code="bad_domain")
    if execution_service is not None:
        with Runner.trading(execution_service):
            return feed_strategy(client, strategy, world, data, source_file=source_file,
                                 execution_domain=execution_domain, allow_gap=allow_gap)
    prep = _prepare(client, strategy, world, source_file)
    fee_bps, slippage_bps, files, shown, sid = prep.fee_bps, prep.slippage_bps, prep.files, prep.shown, prep.sid
    cls = type(strategy)
    name = cls.__qualname__
    info = strategy_row(client, world, sid)
    if info is None:
        raise StrategyNotFound(f"strategy {name} ({sid[:12]}) is not in world {world}",
                               hint=f"submit it first (qmtl submit FILE --world {world}), with the same "
                                    "--strategy/--param as here", code="strategy_not_submitted")
    ctx, envelope = resolve_context(client, strategy, world, sid, execution_domain)
    stage = FEED_STAGE.get(ctx.execution_domain)
    if stage == "shadow" and info.get("stage") == "retired":
        raise BlockedError(f"{name} ({sid[:12]}) is retired in world {world}: nothing to shadow",
                           hint="submit it again to bring it back", code="retired")
    if stage is None:
        raise _nothing_to_feed(world, name, sid, ctx, envelope)
    if stage == "live" and not Runner.has_trade_execution_service():
        raise FailClosedError(f"world {world} has {name} ({sid[:12]}) live, but no broker is configured",
                              hint="pass --broker-webhook URL (or set QMTL_BROKER_WEBHOOK)",
                              code="no_execution_service")
    meta = dict(info.get("meta") or {})
    feed_key = FEED_META[stage]
    feed = meta.get(feed_key)
    old = _bars_from_doc(feed["bars"]) if feed else None
    floor = None
    if old is None:
        # Paper must be new data: after everything the strategy was backtested on in this world.
        backtests = client.runs(world, strategy_id=sid, stage="backtest")["runs"]
        ends = [parse_instant(r["window"]["end"]) for r in backtests if r.get("window") and r["window"].get("end")]
        floor = max(ends) if ends else None
    incoming = load_bars(data)
    _refuse_future_bars(incoming, prep.future_tolerance, str(data))
    fresh, duplicates = _new_bars(old, incoming, floor, str(data))
    before = Runner.order_stats.as_dict()
    if not len(fresh):
        previous = client.runs(world, strategy_id=sid, stage=stage)["runs"]
        latest = run_from_doc({**previous[0], "created": False}) if previous else None
        return FeedResult(world, sid, name, ctx, envelope, stage, str(data), 0, duplicates, None, None,
                          len(old) if old is not None else 0, latest, None,
                          (), _stats_delta(before, before), _next_action(client, world, sid),
                          note=f"nothing new: every bar in {data} was already fed")
    gaps = _check_gaps(old, fresh, stream_interval(strategy), str(data), allow_gap)
    if stage == "live" and len(fresh) > 1:
        raise BadInputError(f"{data}: {len(fresh)} new bars; live runs take one new bar at a time (the "
                            "bar that just closed), so no order is sent for a bar already past",
                            hint="feed each bar as it closes", code="live_one_bar")
    bars = _concat(old, fresh)
    strategy.apply_compute_context(ctx)
    with user_code(files, shown):
        result = run_backtest(strategy, bars, fee_bps=fee_bps, slippage_bps=slippage_bps,
                              world_id=world, context=ctx)
    # The orders of the bar that just closed go through the one gate: sent only in live with
    # submission enabled, allow_live and a service; in dryrun the gate blocks and counts them and
    # the next run's replay fills them at the next bar's open.
    stamp = _to_datetime(bars.timestamp[-1])
    orders: list[Order] = []
    for node, signal in result.extra.get("last_signals", ()):
        orders.extend(Runner.publish(node, signal, stamp))
    stats = _stats_delta(before, Runner.order_stats.as_dict())
    runs_doc = dict(feed.get("runs") or {}) if feed else {}
    first_new = _to_datetime(fresh.timestamp[0])
    stage_doc = runs_doc.get(stage) or {"run_id": _run_id(stage, first_new), "start": iso(first_new)}
    # Cumulative order-gate blocks by reason: Prometheus' qmtl_order_gate_blocks_total reads them here.
    gate_blocks = dict((feed or {}).get("orders_blocked") or {})
    for reason, n in stats["blocked"].items():
        gate_blocks[reason] = int(gate_blocks.get(reason, 0)) + int(n)
    fed = {"meta": {feed_key: {"bars": _bars_doc(bars), "runs": {**runs_doc, stage: stage_doc},
                               "orders_blocked": gate_blocks}},
           "expect_meta": {feed_key: feed}, "kind": "strategy.fed",
           "reason": f"{len(fresh)} new bar(s) {iso(first_new)[:10]}..{iso(_to_datetime(fresh.timestamp[-1]))[:10]} "
                     f"in {ctx.execution_domain}" + _blocked_note(stats["blocked"]) + "".join(
                         f"; --allow-gap: {format_duration(g.length)} gap {iso(g.before)[:10]}..{iso(g.after)[:10]} "
                         "booked as one return" for g in gaps)}
    run = None
    n_trades = None
    if stage in ("paper", "shadow"):
        start = parse_instant(stage_doc["start"])
        series = [(t, r) for t, r in realized_returns(result) if t >= start]
        n_trades = _trades_since(result, start)
        # The run and the bars it was measured on are one write: neither is kept without the other.
        run = run_from_doc(client.record_submission(
            world, strategy_id=sid, stage=stage, run_id=stage_doc["run_id"], metrics={"n_trades": n_trades},
            returns=series, evidence_class=EvidenceClass.REPLAY, registration=fed)["run"])
    else:
        client.register_strategy(world, strategy_id=sid, **fed)
    note = None
    if stage == "live":
        note = ("live returns are not recorded from this simulation: realized live returns come from "
                "the broker through the risk hub (qmtl risk put)")
    return FeedResult(world, sid, name, ctx, envelope, stage, str(data), len(fresh), duplicates,
                      iso(first_new), iso(_to_datetime(fresh.timestamp[-1])), len(bars), run, n_trades,
                      tuple(orders), stats, _next_action(client, world, sid), note=note, gaps=tuple(gaps))


def _blocked_note(blocked: Mapping[str, int]) -> str:
    """``; orders blocked by the order gate: domain_shadow 1`` for the ledger entry of a feed (none: '')."""
    if not blocked:
        return ""
    return "; orders blocked by the order gate: " + ", ".join(f"{r} {n}" for r, n in sorted(blocked.items()))


def _run_id(stage: str, start: datetime) -> str:
    """``paper-from-20120604``: named after where the fed data starts, stable as bars are appended."""
    at = start.astimezone(timezone.utc)
    if (at.hour, at.minute, at.second, at.microsecond) == (0, 0, 0, 0):
        return f"{stage}-from-{at:%Y%m%d}"
    return f"{stage}-from-{at:%Y%m%dT%H%M%S}Z"
