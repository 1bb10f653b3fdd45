"""The risk signal hub: storage-only risk snapshots per world, their dedupe, and their freshness.

The hub computes nothing: producers post snapshots (weights, covariance, realized returns per
strategy, stress, constraints) and decisions read them. A snapshot is identified by
``(world_id, version)`` and a content hash over its canonical JSON: the same key and hash again
is a no-op, the same key with other content is a conflict (exit 4) — a version never changes
meaning once stored.

Freshness (one function, used by every gate that needs the snapshot) answers fresh, stale or
missing with a reason code:

- ``risk_snapshot_missing``: the world has no snapshot;
- ``risk_snapshot_expired``: more than ``ttl_sec`` since the hub received it (nobody refreshed it);
- ``risk_snapshot_lagging``: its ``as_of`` is older than the world's ``risk.snapshot_max_age``
  (the producer posted old data);
- ``risk_snapshot_incomplete``: it carries no realized returns for the strategy in question (a
  weight alone is not evidence of anything observed).

What the hub refuses at ``put`` (DESIGN §11), so that one bad document can neither wedge nor poison
a world: an ``as_of`` further in the future than the tolerance (it would rank above every correct
snapshot posted after it); a realized return below -1 or not finite; a ``*_ref`` it cannot resolve
to a file under its configured directory with the pinned sha256 (a resolved ref is stored inline,
so the stored snapshot is whole). Decisions read the newest snapshot **of their stage** posted by a
trusted producer (class ``hub``); a snapshot from anyone else is stored as ``unverified``, shown,
and never decided on.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import PydanticCustomError

from qmtl_core.canonical import content_hash
from qmtl_core.errors import BadInputError, FailClosedError
from qmtl_core.evidence_class import EvidenceClass
from qmtl_core.grammar import GrammarError, loads_json, parse_number, parse_timestamp
from qmtl_core.metric_names import is_known_metric
from qmtl_core.timeutil import DEFAULT_FUTURE_TOLERANCE, human_duration, refuse_future

MAX_TTL_SEC = 86_400
DEFAULT_TTL_SEC = 900
WEIGHT_TOLERANCE = 1e-6

MISSING = "risk_snapshot_missing"
EXPIRED = "risk_snapshot_expired"
LAGGING = "risk_snapshot_lagging"
INCOMPLETE = "risk_snapshot_incomplete"


class SnapshotError(BadInputError):
    """A risk snapshot document is not valid."""

    code = "invalid_risk_snapshot"


class StoredSnapshotInvalid(FailClosedError):
    """A snapshot in the store no longer validates (stored before the hub refused what it holds):
    decisions that need it fail closed, naming it."""

    code = "risk_snapshot_invalid"


def _aware(value: Any, what: str) -> datetime:
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.isoformat()
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an ISO-8601 time with a time zone")
    try:
        return parse_timestamp(value)  # the shared grammar: a zone, inside the calendar in UTC
    except GrammarError as exc:
        raise ValueError(f"{what} {exc.message} ({exc.hint})") from None


def _number(value: Any, what: str) -> Any:
    """A number sent as text is read by the shared grammar (``"1_0"`` is not 10)."""
    if not isinstance(value, str):
        return value  # the field's own type check (finite float) applies
    try:
        return parse_number(value, missing_ok=False)
    except GrammarError as exc:
        raise ValueError(f"{what}: {exc.message}") from None


def _numbers(value: Any, what: str) -> Any:
    if not isinstance(value, Mapping):
        return value
    return {k: _number(v, f"{what}.{k}") for k, v in value.items()}


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value} (must be a finite number)")
    return value


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@pydantic_dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class ReturnPoint:
    """One realized return of a strategy (``ts`` in UTC; checked by ``_points``)."""

    # A slotted dataclass validated natively (one object per point instead of a model's three):
    # a world's snapshot can hold many thousand points, and ``_points`` has checked them already.
    ts: AwareDatetime
    r: float = Field(allow_inf_nan=False)


def _points(value: Any) -> Any:
    """Realized returns checked and normalised in one Python pass: each ``ts`` read as before
    (``_aware``: ISO-8601 with a zone, in UTC), each ``r`` finite, no other keys. A problem is
    raised with the point's location (``realized_returns.<strategy>.<i>.<field>``)."""
    if not isinstance(value, Mapping):
        return value  # the field's own type check says what is wrong
    out: dict[Any, Any] = {}
    for name, points in value.items():
        if not isinstance(points, list):
            out[name] = points
            continue
        checked = []
        for i, point in enumerate(points):
            if not isinstance(point, Mapping):
                checked.append(point)
                continue
            where = f"realized_returns.{name}.{i}"
            extra = sorted(set(point) - {"ts", "r"})
            if extra:
                raise _located(f"{where}.{extra[0]}", "Extra inputs are not permitted")
            try:
                r = _number(point.get("r"), "r")
            except ValueError as exc:
                raise _located(f"{where}.r", str(exc)) from None
            if isinstance(r, (int, float)) and not isinstance(r, bool):
                try:
                    _finite(float(r), "r")
                except ValueError as exc:
                    raise _located(f"{where}.r", str(exc)) from None
                if r < -1:
                    raise _located(f"{where}.r", f"r is {r}: a simple return below -1 would lose more "
                                   "than everything (send returns as fractions, e.g. -0.02 for -2%)")
            try:
                ts = _aware(point.get("ts"), "ts")
            except ValueError as exc:
                raise _located(f"{where}.ts", str(exc)) from None
            checked.append({"ts": ts, "r": r} if "r" in point else {"ts": ts})
        out[name] = checked
    return out


def _located(where: str, message: str) -> PydanticCustomError:
    # The field validator's own location is the whole field; ``parse_snapshot`` prefers this one.
    return PydanticCustomError("snapshot_point", "{message}", {"message": message, "where": where})


class Provenance(_Doc):
    """Who produced the snapshot and for which stage its realized returns are."""

    actor: str = Field(min_length=1)
    stage: Literal["backtest", "paper", "live"]


class RiskSnapshot(_Doc):
    """A world's risk snapshot as posted to the hub."""

    world_id: str = Field(min_length=1)
    version: str = Field(min_length=1, max_length=200)
    as_of: datetime
    ttl_sec: int = Field(DEFAULT_TTL_SEC, ge=1, le=MAX_TTL_SEC)
    weights: dict[str, float]
    covariance: dict[str, float] | None = None
    covariance_ref: str | None = None
    realized_returns: dict[str, list[ReturnPoint]] | None = None
    realized_returns_ref: str | None = None
    stress: dict[str, Any] = Field(default_factory=dict)
    constraints: dict[str, Any] = Field(default_factory=dict)
    extra_metrics: dict[str, dict[str, float]] | None = None
    provenance: Provenance

    @field_validator("as_of", mode="before")
    @classmethod
    def _as_of(cls, v: Any) -> datetime:
        return _aware(v, "as_of")

    @field_validator("weights", "covariance", mode="before")
    @classmethod
    def _numbers_by_grammar(cls, v: Any, info: ValidationInfo) -> Any:
        return _numbers(v, str(info.field_name))

    @field_validator("extra_metrics", mode="before")
    @classmethod
    def _extra_numbers_by_grammar(cls, v: Any) -> Any:
        if not isinstance(v, Mapping):
            return v
        return {sid: _numbers(values, f"extra_metrics.{sid}") for sid, values in v.items()}

    @field_validator("realized_returns", mode="before")
    @classmethod
    def _realized_returns(cls, v: Any) -> Any:
        return _points(v)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("weights is empty")
        for name, w in v.items():
            _finite(w, f"weight of {name!r}")
        total = math.fsum(v.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise ValueError(f"weights sum to {total:.9g}, not 1 (tolerance {WEIGHT_TOLERANCE:g})")
        return v

    @field_validator("extra_metrics")
    @classmethod
    def _extra_metrics(cls, v: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]] | None:
        for sid, values in (v or {}).items():
            for name, value in values.items():
                if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                    raise ValueError(f"extra_metrics.{sid}: metric name {name!r} must be lower case letters, "
                                     "digits and _")
                if is_known_metric(name):
                    raise ValueError(f"extra_metrics.{sid}: {name!r} is built in; qmtl measures it itself")
                _finite(value, f"extra_metrics.{sid}.{name}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "RiskSnapshot":
        if self.covariance is not None:
            seen: dict[tuple[str, str], float] = {}
            for key, value in self.covariance.items():
                parts = key.split(",")
                if len(parts) != 2 or not all(p.strip() for p in parts):
                    raise ValueError(f"covariance key {key!r} must be 'a,b'")
                a, b = (p.strip() for p in parts)
                for name in (a, b):
                    if name not in self.weights:
                        raise ValueError(f"covariance key {key!r} names {name!r}, which has no weight")
                _finite(value, f"covariance[{key!r}]")
                if (b, a) in seen and not math.isclose(seen[(b, a)], value, rel_tol=1e-9, abs_tol=1e-15):
                    raise ValueError(f"covariance is not symmetric: {a},{b}={value} but "
                                     f"{b},{a}={seen[(b, a)]}")
                if a == b and value < 0:
                    raise ValueError(f"covariance[{key!r}] is a variance and cannot be negative")
                seen[(a, b)] = value
        if self.covariance is not None and self.covariance_ref is not None:
            raise ValueError("give covariance or covariance_ref, not both")
        if self.realized_returns is not None:
            if self.realized_returns_ref is not None:
                raise ValueError("give realized_returns or realized_returns_ref, not both")
            for name, points in self.realized_returns.items():
                for prev, cur in zip(points, points[1:]):
                    if cur.ts <= prev.ts:
                        raise ValueError(f"realized_returns[{name!r}]: ts {cur.ts.isoformat()} is "
                                         "not after the one before it")
        return self

    def canonical(self) -> dict[str, Any]:
        """The document as stored and hashed (times normalised to UTC ``Z``)."""
        doc = json.loads(self.model_dump_json())
        if doc.get("extra_metrics") is None:
            # Added after snapshots were stored: absent keeps their content hash what it was.
            doc.pop("extra_metrics", None)
        return doc

    @property
    def content_hash(self) -> str:
        """Hash of the canonical document."""
        return content_hash(self.canonical())

    def covered(self) -> frozenset[str]:
        """Strategies the snapshot says something about."""
        return self._covered

    @cached_property
    def _covered(self) -> frozenset[str]:
        # Once per snapshot: a tick asks for every strategy of the world, and the snapshot never changes.
        return frozenset(self.weights) | frozenset(self.realized_returns or {}) | frozenset(self.extra_metrics or {})

    def with_returns(self) -> frozenset[str]:
        """Strategies the snapshot carries realized returns for (what a decision can rest on)."""
        return frozenset(sid for sid, points in (self.realized_returns or {}).items() if points)

    def returns_of(self, strategy_id: str) -> list[tuple[datetime, float]] | None:
        """The strategy's realized returns, or ``None`` when the snapshot has none inline."""
        if self.realized_returns is None or strategy_id not in self.realized_returns:
            return None
        return [(p.ts, p.r) for p in self.realized_returns[strategy_id]]


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def parse_snapshot(document: Any, *, source: str = "snapshot") -> RiskSnapshot:
    """Validate a snapshot document; the first problem becomes one clear ``SnapshotError``."""
    if not isinstance(document, Mapping):
        raise SnapshotError(f"{source}: a risk snapshot must be a JSON object")
    try:
        return RiskSnapshot.model_validate(dict(document))
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        where = (first.get("ctx") or {}).get("where") or _where(tuple(first["loc"]))
        raise SnapshotError(f"{source}: {where + ': ' if where else ''}{message}{more}",
                            details={"errors": [{"loc": list(map(str, e["loc"])), "msg": e["msg"]}
                                                for e in exc.errors()]}) from None


def json_document(text: str, *, source: str) -> Any:
    """JSON text (a file or stdin) as a document; bad JSON names line and column."""
    try:
        return loads_json(text)
    except GrammarError as exc:
        raise SnapshotError(exc.at(source), hint=exc.hint) from None


def load_snapshot_text(text: str, *, source: str) -> RiskSnapshot:
    """Parse a snapshot from JSON text (a file or stdin)."""
    return parse_snapshot(json_document(text, source=source), source=source)


#: ``<file under the hub's refs directory>#sha256=<64 hex digits>``: the content is pinned.
_REF_FIELDS = {"realized_returns_ref": "realized_returns", "covariance_ref": "covariance"}


def _read_ref(ref: str, *, field_name: str, refs_dir: Path, source: str) -> Any:
    import hashlib
    import re

    where = f"{source}: {field_name}"
    match = re.fullmatch(r"([^#]+)#sha256=([0-9a-fA-F]{64})", ref.strip())
    if match is None:
        raise SnapshotError(f"{where}: {ref!r} is not '<file>#sha256=<hex>'",
                            hint=f"put the file under {refs_dir} and pin its content by sha256")
    name, pinned = match.group(1), match.group(2).lower()
    base = refs_dir.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or path == base:
        raise SnapshotError(f"{where}: {name!r} is outside the hub's refs directory",
                            hint=f"refs name files under {refs_dir}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{where}: cannot read {name!r} under the hub's refs directory "
                            f"({exc.strerror or exc})", hint=f"put the file under {refs_dir}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned:
        raise SnapshotError(f"{where}: {name!r} has sha256 {digest[:12]}..., the ref pins {pinned[:12]}...",
                            hint="the file changed since the ref was made: post a ref to the content meant",
                            code="risk_ref_mismatch")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{where}: {name!r} is not JSON ({exc})") from None


def resolve_refs(snapshot: RiskSnapshot, *, refs_dir: Path, source: str = "snapshot") -> tuple[RiskSnapshot, dict[str, str]]:
    """The snapshot with each ``*_ref`` replaced by the pinned file's content, validated like an
    inline document (a bad point is located in the file's data); and the refs resolved. A ref
    that cannot be resolved is refused, never accepted and ignored."""
    document = snapshot.canonical()
    refs = {name: document[name] for name in _REF_FIELDS if document.get(name) is not None}
    if not refs:
        return snapshot, {}
    for name, ref in refs.items():
        document[_REF_FIELDS[name]] = _read_ref(ref, field_name=name, refs_dir=refs_dir, source=source)
        document[name] = None
    return parse_snapshot(document, source=source), refs


def substance_hash(snapshot: RiskSnapshot, strategy_id: str) -> str:
    """Hash of what a promotion of ``strategy_id`` rests on in this snapshot.

    Not the whole snapshot's hash: producers re-post every few minutes with a new ``as_of`` and
    version, and binding approvals to that would void every approval at every refresh. What is
    bound is the substance — the strategy's weight, its covariance entries, its realized returns,
    the stress and constraints — so new risk *content* voids approvals and a routine refresh does not.
    """
    # Built from the model directly (not a dump of the whole snapshot): the cost is this strategy's
    # data, not the snapshot's, which matters when a world has many paper strategies.
    cov = {k: v for k, v in (snapshot.covariance or {}).items()
           if strategy_id in (p.strip() for p in k.split(","))}
    points = (snapshot.realized_returns or {}).get(strategy_id)
    substance = {"weight": snapshot.weights.get(strategy_id), "covariance": cov,
                 "realized_returns": None if points is None else
                 [{"ts": p.ts.isoformat(), "r": p.r} for p in points],
                 "stress": snapshot.stress, "constraints": snapshot.constraints,
                 "stage": snapshot.provenance.stage}
    extra = (snapshot.extra_metrics or {}).get(strategy_id)
    if extra:  # only when present, so evidence bound before extra metrics existed keeps its hash
        substance["extra_metrics"] = extra
    return content_hash(substance)


#: Bump when a summary's content, or ``substance_hash``, changes: a stored summary of another
#: format is not trusted; the summary is made again from the document.
SUMMARY_FORMAT = 1


def summarize(snapshot: RiskSnapshot) -> dict[str, Any]:
    """The summary stored next to a snapshot: per covered strategy, the end and length of its
    realized returns and its ``substance_hash``; and the substance of a strategy not covered."""
    from qmtl_core.timeutil import iso

    returns = snapshot.realized_returns or {}
    entries: dict[str, list[Any]] = {}
    for sid in sorted(snapshot.covered()):
        points = returns.get(sid)
        entries[sid] = [iso(points[-1].ts) if points else None, len(points) if points else 0,
                        substance_hash(snapshot, sid)]
    outsider = "\x00"  # any name the snapshot does not cover: its substance is the same for all of them
    while outsider in entries:
        outsider += "\x00"
    return {"format": SUMMARY_FORMAT, "stage": snapshot.provenance.stage, "strategies": entries,
            "uncovered": substance_hash(snapshot, outsider)}


@dataclass(frozen=True)
class SnapshotSummary:
    """What the campaign tick and the promotion gate read of a stored snapshot, without its
    document: the header, and per strategy its series end and length and its substance hash.

    Reads the same as ``StoredSnapshot`` (``version``, ``as_of``, ``covered()``, ``series()``,
    ``substance_hash()`` ...), so ``freshness`` and the gate take either; it is made once, when the
    snapshot is stored, so a tick over a world of many strategies never parses the document.
    """

    world_id: str
    version: str
    as_of: datetime
    ttl_sec: int
    stage: str
    content_hash: str
    recorded_at: datetime
    recorded_by: str
    entries: Mapping[str, Sequence[Any]]  # strategy -> [series end (ISO) | None, series length, substance hash]
    uncovered: str
    evidence_class: str = EvidenceClass.UNVERIFIED

    @classmethod
    def of(cls, stored: "StoredSnapshot", summary: Mapping[str, Any] | None = None) -> "SnapshotSummary":
        """The summary of ``stored`` (from its stored ``summary`` document when given)."""
        doc = summary if summary is not None else summarize(stored.snapshot)
        snap = stored.snapshot
        return cls(snap.world_id, snap.version, snap.as_of, snap.ttl_sec, doc["stage"], stored.content_hash,
                   stored.recorded_at, stored.recorded_by, doc["strategies"], doc["uncovered"],
                   stored.evidence_class)

    @cached_property
    def _covered(self) -> frozenset[str]:
        return frozenset(self.entries)

    @cached_property
    def _with_returns(self) -> frozenset[str]:
        return frozenset(sid for sid, entry in self.entries.items() if entry[1])

    def covered(self) -> frozenset[str]:
        """Strategies the snapshot says something about."""
        return self._covered

    def with_returns(self) -> frozenset[str]:
        """Strategies the snapshot carries realized returns for."""
        return self._with_returns

    def series(self, strategy_id: str) -> tuple[datetime, int] | None:
        """The end and length of the strategy's realized returns, if the snapshot has any."""
        from qmtl_core.timeutil import parse_instant

        entry = self.entries.get(strategy_id)
        if entry is None or not entry[1]:
            return None
        return parse_instant(entry[0]), int(entry[1])

    def substance_hash(self, strategy_id: str) -> str:
        """``substance_hash`` of the snapshot for this strategy."""
        entry = self.entries.get(strategy_id)
        return self.uncovered if entry is None else str(entry[2])


@dataclass(frozen=True)
class StoredSnapshot:
    """A snapshot as the hub holds it: the document plus when and by whom it was received."""

    snapshot: RiskSnapshot
    content_hash: str
    recorded_at: datetime
    recorded_by: str
    #: ``hub`` when a trusted producer posted it, else ``unverified`` (never decided on).
    evidence_class: str = EvidenceClass.UNVERIFIED

    @property
    def version(self) -> str:
        """The producer's version of the snapshot."""
        return self.snapshot.version

    @property
    def as_of(self) -> datetime:
        """When the snapshot's data is from."""
        return self.snapshot.as_of

    @property
    def ttl_sec(self) -> int:
        """Seconds after receipt the snapshot expires."""
        return self.snapshot.ttl_sec

    @property
    def stage(self) -> str:
        """The stage its realized returns are from (provenance)."""
        return self.snapshot.provenance.stage

    def covered(self) -> frozenset[str]:
        """Strategies the snapshot says something about."""
        return self.snapshot.covered()

    def with_returns(self) -> frozenset[str]:
        """Strategies the snapshot carries realized returns for."""
        return self.snapshot.with_returns()

    def series(self, strategy_id: str) -> tuple[datetime, int] | None:
        """The end and length of the strategy's realized returns, if the snapshot has any."""
        points = (self.snapshot.realized_returns or {}).get(strategy_id)
        return (points[-1].ts, len(points)) if points else None

    def substance_hash(self, strategy_id: str) -> str:
        """``substance_hash`` of the snapshot for this strategy."""
        return substance_hash(self.snapshot, strategy_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {**self.snapshot.canonical(), "content_hash": self.content_hash,
                "recorded_at": self.recorded_at.isoformat().replace("+00:00", "Z"),
                "recorded_by": self.recorded_by, "evidence_class": self.evidence_class}


#: What ``freshness``, the tick and the gate read: a whole stored snapshot or its summary.
SnapshotView = StoredSnapshot | SnapshotSummary


@dataclass(frozen=True)
class Freshness:
    """Whether a snapshot can be decided on: ``fresh``, ``stale`` or ``missing``, with a reason code."""

    status: Literal["fresh", "stale", "missing"]
    reason: str | None
    detail: str
    version: str | None = None

    @property
    def ok(self) -> bool:
        """True only when fresh."""
        return self.status == "fresh"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"status": self.status, "reason": self.reason, "detail": self.detail,
                "version": self.version}


def freshness(stored: SnapshotView | None, *, now: datetime, max_age: timedelta,
              strategy_id: str | None = None) -> Freshness:
    """Is the snapshot fresh enough to decide on (for ``strategy_id``, when given)? Pure."""
    if stored is None:
        return Freshness("missing", MISSING, "the world has no risk snapshot")
    version = stored.version
    expires = stored.recorded_at + timedelta(seconds=stored.ttl_sec)
    if now > expires:
        return Freshness("stale", EXPIRED, f"snapshot {version} expired at "
                         f"{expires.isoformat()} (ttl {stored.ttl_sec}s)", version)
    lag = now - stored.as_of
    if lag > max_age:
        return Freshness("stale", LAGGING, f"snapshot {version} as_of {stored.as_of.isoformat()} "
                         f"lags {human_duration(lag)} (max {human_duration(max_age)})", version)
    if strategy_id is not None and strategy_id not in stored.with_returns():
        return Freshness("stale", INCOMPLETE, incomplete_detail(version, strategy_id), version)
    return Freshness("fresh", None, f"snapshot {version} as_of {stored.as_of.isoformat()}", version)


def incomplete_detail(version: str, strategy_id: str) -> str:
    """Why a snapshot is ``risk_snapshot_incomplete`` for a strategy (one wording everywhere)."""
    return f"snapshot {version} carries no realized returns for strategy {strategy_id}"


# --- store (the hub keeps snapshots; it computes nothing) ------------------------------------------
#: Validated snapshots by content hash, most recently used last: a stored snapshot never changes,
#: so a process that reads it again (the loop's rounds on one world, a server) validates it once.
#: Bounded, because a snapshot can hold many thousand points: a server or a loop over many worlds
#: keeps the ones in use, not every one it has seen.
_VALIDATED: OrderedDict[str, RiskSnapshot] = OrderedDict()
_VALIDATED_MAX = 16
_VALIDATED_LOCK = threading.Lock()


def _load(conn: Any, where: Any, order: Any = None) -> StoredSnapshot | None:
    """The snapshot row ``where`` selects; its document is read and validated only the first time
    this process sees its content hash (a stored snapshot never changes)."""
    import sqlalchemy as sa

    from qmtl_core.store import schema
    from qmtl_core.timeutil import parse_instant

    t = schema.risk_snapshots
    query = sa.select(t.c.id, t.c.content_hash, t.c.recorded_at, t.c.recorded_by, t.c.evidence_class).where(where)
    if order is not None:
        query = query.order_by(*order)
    row = conn.execute(query.limit(1)).first()
    if row is None:
        return None
    with _VALIDATED_LOCK:  # a server reads from several threads
        snapshot = _VALIDATED.get(row.content_hash)
        if snapshot is not None:
            _VALIDATED.move_to_end(row.content_hash)
    if snapshot is None:
        document = conn.execute(sa.select(t.c.world_id, t.c.version, t.c.document).where(t.c.id == row.id)).one()
        try:
            snapshot = RiskSnapshot.model_validate(document.document)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = (first.get("ctx") or {}).get("where") or _where(tuple(first["loc"]))
            raise StoredSnapshotInvalid(
                f"stored risk snapshot {document.world_id} version {document.version} is not valid: {where}: "
                f"{str(first['msg']).removeprefix('Value error, ')}",
                hint="post a corrected snapshot under a new version") from None
        with _VALIDATED_LOCK:
            _VALIDATED[row.content_hash] = snapshot
            while len(_VALIDATED) > _VALIDATED_MAX:
                _VALIDATED.popitem(last=False)
    return StoredSnapshot(snapshot, row.content_hash, parse_instant(row.recorded_at), row.recorded_by,
                          row.evidence_class or EvidenceClass.UNVERIFIED)


def _latest_where(world_id: str, stage: str | None, trusted_only: bool) -> Any:
    """Which rows ``latest_*`` picks from: a world's snapshots of one stage, from a trusted
    producer unless ``trusted_only`` is False (display only, never a decision)."""
    from qmtl_core.store import schema

    t = schema.risk_snapshots
    where = t.c.world_id == world_id
    if stage is not None:
        where = where & (t.c.stage == stage)
    if trusted_only:
        where = where & (t.c.evidence_class == EvidenceClass.HUB.value)
    return where


def latest_summary(conn: Any, world_id: str, *, stage: str) -> SnapshotSummary | None:
    """The summary of the world's latest trusted snapshot of ``stage`` (``latest_snapshot``) without
    reading its document, unless the stored summary is missing or of another format."""
    import sqlalchemy as sa

    from qmtl_core.store import schema
    from qmtl_core.timeutil import parse_instant

    t = schema.risk_snapshots
    row = conn.execute(
        sa.select(t.c.id, t.c.world_id, t.c.version, t.c.as_of, t.c.ttl_sec, t.c.content_hash, t.c.recorded_at,
                  t.c.recorded_by, t.c.summary, t.c.evidence_class)
        .where(_latest_where(world_id, stage, True)).order_by(t.c.as_of.desc(), t.c.id.desc()).limit(1)).first()
    if row is None:
        return None
    doc = row.summary
    if not isinstance(doc, Mapping) or doc.get("format") != SUMMARY_FORMAT:
        stored = _load(conn, t.c.id == row.id)
        assert stored is not None
        return SnapshotSummary.of(stored)
    return SnapshotSummary(row.world_id, row.version, parse_instant(row.as_of), row.ttl_sec, doc["stage"],
                           row.content_hash, parse_instant(row.recorded_at), row.recorded_by,
                           doc["strategies"], doc["uncovered"], row.evidence_class or EvidenceClass.UNVERIFIED)


def latest_snapshot(conn: Any, world_id: str, *, stage: str | None,
                    trusted_only: bool = True) -> StoredSnapshot | None:
    """The world's snapshot of ``stage`` (any stage: ``None``) with the newest ``as_of`` (the latest
    received on a tie), among trusted producers' snapshots unless ``trusted_only`` is False."""
    from qmtl_core.store import schema

    t = schema.risk_snapshots
    return _load(conn, _latest_where(world_id, stage, trusted_only), (t.c.as_of.desc(), t.c.id.desc()))


def get_snapshot(conn: Any, world_id: str, version: str) -> StoredSnapshot | None:
    """One stored version of a world's snapshot."""
    from qmtl_core.store import schema

    t = schema.risk_snapshots
    return _load(conn, (t.c.world_id == world_id) & (t.c.version == version))


def check_as_of(snapshot: RiskSnapshot, *, now: datetime, tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE) -> None:
    """Refuse an ``as_of`` or a realized return dated more than ``tolerance`` after ``now``: ranked by
    ``as_of``, such a snapshot would hide every correct one posted after it until the future arrived,
    and a return from the future was never observed (``timeutil.refuse_future``)."""
    refuse_future((snapshot.as_of,), now=now, tolerance=tolerance, error=SnapshotError,
                  where=lambda _: f"snapshot {snapshot.version}: as_of")
    for name, points in (snapshot.realized_returns or {}).items():
        refuse_future((p.ts for p in points), now=now, tolerance=tolerance, error=SnapshotError,
                      where=lambda i: f"snapshot {snapshot.version}: realized_returns.{name}.{i}.ts")


def put_snapshot(conn: Any, snapshot: RiskSnapshot, *, known_strategies: set[str], actor: str,
                 now: datetime, evidence_class: str = EvidenceClass.UNVERIFIED,
                 future_tolerance: timedelta = DEFAULT_FUTURE_TOLERANCE,
                 refs: Mapping[str, str] | None = None) -> tuple[StoredSnapshot, bool]:
    """Store a snapshot inside a write transaction; ``(stored, created)``.

    Same ``(world, version)`` and hash: nothing written, ``created`` False. Same key, other content:
    ``IdempotencyConflict``. Strategies the world does not know are refused (a typo in a weight
    would otherwise read as "covered"), and so is an ``as_of`` in the future (``check_as_of``).
    ``evidence_class`` is ``hub`` only when the facade found the poster to be a trusted producer;
    ``refs`` names the ``*_ref`` files resolved into the document (for the ledger).
    """
    import sqlalchemy as sa

    from qmtl_core import ledger
    from qmtl_core.errors import IdempotencyConflict
    from qmtl_core.store import schema
    from qmtl_core.timeutil import iso

    unknown = sorted(snapshot.covered() - known_strategies)
    if unknown:
        raise SnapshotError(f"snapshot {snapshot.version}: strategy {unknown[0]!r} is not known in world "
                            f"{snapshot.world_id}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                            hint="submit or evaluate the strategy in this world first, or fix the name")
    check_as_of(snapshot, now=now, tolerance=future_tolerance)
    ledger.lock(conn)
    digest = snapshot.content_hash
    existing = get_snapshot(conn, snapshot.world_id, snapshot.version)
    if existing is not None:
        if existing.content_hash == digest and existing.evidence_class == evidence_class:
            return existing, False
        if existing.content_hash == digest:
            raise IdempotencyConflict(
                f"risk snapshot {snapshot.world_id} version {snapshot.version} already exists as "
                f"{existing.evidence_class} evidence (posted by {existing.recorded_by}); this post is "
                f"{evidence_class}", hint="post it under a new version", code="risk_snapshot_class_conflict")
        raise IdempotencyConflict(
            f"risk snapshot {snapshot.world_id} version {snapshot.version} already exists with other "
            f"content (hash {existing.content_hash[:12]}, this one {digest[:12]})",
            hint="post changed content under a new version")
    document = snapshot.canonical()
    # Summarised as it will be read back (the canonical document: a NaN in stress is null there),
    # so the stored summary answers exactly what the stored document does.
    conn.execute(sa.insert(schema.risk_snapshots).values(
        world_id=snapshot.world_id, version=snapshot.version, as_of=iso(snapshot.as_of),
        ttl_sec=snapshot.ttl_sec, content_hash=digest, document=document,
        summary=summarize(RiskSnapshot.model_validate(document)), recorded_at=iso(now), recorded_by=actor,
        stage=snapshot.provenance.stage, evidence_class=evidence_class))
    ledger.append(conn, actor=actor, kind="risk.snapshot_updated", now=now, world=snapshot.world_id,
                  subject=f"risk snapshot {snapshot.version}",
                  reason=f"{evidence_class} {snapshot.provenance.stage} snapshot posted by {actor} "
                         f"(document says {snapshot.provenance.actor})",
                  payload={"version": snapshot.version, "as_of": iso(snapshot.as_of),
                           "ttl_sec": snapshot.ttl_sec, "content_hash": digest, "stage": snapshot.provenance.stage,
                           "evidence_class": evidence_class, "refs": dict(refs or {}),
                           "strategies": sorted(snapshot.covered())})
    stored = get_snapshot(conn, snapshot.world_id, snapshot.version)
    assert stored is not None
    return stored, True
