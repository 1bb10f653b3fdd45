"""Control-bus events and an in-process bus with bounded history (DESIGN §8).

Every event has a *subject* (what it is about: a queue set in a world's domain, a strategy's
activation ...) and an *etag* that is the content hash of its type and payload. The bus drops an
event only when the last event published for the same subject had the same etag, so an
identical repeat is dropped and a changed update never is.

Queue namespaces are per world and domain (``{world}.{domain}``). A shadow strategy consumes the
live inputs through a mirror namespace (``{world}.shadow.mirror.<live topic>``) and never the
live namespace itself, so nothing it does (acks, consumer offsets) can touch live consumers.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

from qmtl_core.canonical import content_hash
from qmtl_core.domains import DecisionEnvelope, normalize_domain, queue_namespace
from qmtl_core.errors import BadInputError

__all__ = [
    "EVENT_TYPES",
    "ControlEvent",
    "ControlBus",
    "Subscription",
    "queue_update",
    "tagquery_upsert",
    "activation_updated",
    "risk_snapshot_updated",
    "decision_updated",
    "queue_namespace",
    "queue_name",
    "input_queue",
    "shadow_mirror_queue",
    "mirror_queue_update",
]

log = logging.getLogger(__name__)

EVENT_TYPES: Final[tuple[str, ...]] = (
    "queue_update", "tagquery.upsert", "activation_updated", "risk_snapshot_updated",
    "decision_updated",
)
MATCH_MODES: Final[tuple[str, ...]] = ("any", "all")
PAYLOAD_VERSION: Final[int] = 1


# --- namespaces -----------------------------------------------------------------------------------
def queue_name(world_id: str, domain: str, topic: str) -> str:
    """A queue in a world's domain namespace: ``"{world}.{domain}.{topic}"``."""
    if not topic or topic.strip() != topic:
        raise BadInputError(f"queue topic {topic!r} must be non-empty without surrounding spaces")
    return f"{queue_namespace(world_id, domain)}.{topic}"


def shadow_mirror_queue(world_id: str, live_topic: str) -> str:
    """The shadow mirror of a live input topic: ``"{world}.shadow.mirror.{live_topic}"``."""
    return queue_name(world_id, "shadow", f"mirror.{live_topic}")


def input_queue(world_id: str, domain: str, topic: str) -> str:
    """The queue a strategy in ``domain`` reads input ``topic`` from.

    Shadow runs on live inputs but reads them from the mirror namespace, never from
    ``{world}.live.…``; every other domain reads its own namespace.
    """
    dom = normalize_domain(domain)
    if dom == "shadow":
        return shadow_mirror_queue(world_id, topic)
    return queue_name(world_id, dom, topic)


# --- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlEvent:
    """One typed control-bus event; ``seq`` is assigned by the bus when published."""

    type: str
    subject: tuple[str, ...]
    payload: Mapping[str, Any]
    etag: str
    world_id: str | None = None
    execution_domain: str | None = None
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """The wire form streamed over HTTP/WebSocket."""
        return {"type": self.type, "seq": self.seq, "etag": self.etag, "data": dict(self.payload)}


def _event(type_: str, subject: Iterable[str], payload: dict[str, Any]) -> ControlEvent:
    if type_ not in EVENT_TYPES:
        raise BadInputError(f"unknown control-bus event type {type_!r}")
    world = payload.get("world_id")
    domain = payload.get("execution_domain")
    return ControlEvent(type=type_, subject=(type_, *subject), payload=payload,
                        etag=content_hash({"type": type_, "payload": payload}),
                        world_id=world if isinstance(world, str) else None,
                        execution_domain=domain if isinstance(domain, str) else None)


def _tags(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str) or not tags or not all(isinstance(t, str) and t for t in tags):
        raise BadInputError(f"tags must be a non-empty list of strings, got {tags!r}")
    # Order does not change which queues match, so it must not change the subject or etag.
    return sorted(set(tags))


def _interval(interval: int) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
        raise BadInputError(f"interval must be a positive number of seconds, got {interval!r}")
    return interval


def _queues(queues: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for q in queues:
        if isinstance(q, str):
            out.append({"queue": q, "global": False})
        elif isinstance(q, Mapping) and isinstance(q.get("queue"), str):
            out.append({"queue": q["queue"], "global": bool(q.get("global", False))})
        else:
            raise BadInputError(f"queue entry {q!r} must be a name or {{queue, global}}")
    return out


def _match_mode(mode: str) -> str:
    if mode not in MATCH_MODES:
        raise BadInputError(f"match_mode {mode!r} is not one of {', '.join(MATCH_MODES)}")
    return mode


def queue_update(*, tags: Sequence[str], interval: int, queues: Sequence[str | Mapping[str, Any]],
                 match_mode: str = "any", world_id: str, execution_domain: str) -> ControlEvent:
    """The queues now matching a tag query in a world's domain."""
    dom = normalize_domain(execution_domain)
    queue_namespace(world_id, dom)  # validates the world id
    tag_list, iv = _tags(tags), _interval(interval)
    payload = {"tags": tag_list, "interval": iv, "queues": _queues(queues),
               "match_mode": _match_mode(match_mode), "world_id": world_id,
               "execution_domain": dom, "version": PAYLOAD_VERSION}
    return _event("queue_update", (world_id, dom, ",".join(tag_list), str(iv)), payload)


def tagquery_upsert(*, tags: Sequence[str], interval: int, match_mode: str = "any", world_id: str,
                    execution_domain: str) -> ControlEvent:
    """Registration of a tag query in a world's domain; one per (tags, interval, domain)."""
    dom = normalize_domain(execution_domain)
    queue_namespace(world_id, dom)
    tag_list, iv = _tags(tags), _interval(interval)
    payload = {"tags": tag_list, "interval": iv, "match_mode": _match_mode(match_mode),
               "world_id": world_id, "execution_domain": dom, "version": PAYLOAD_VERSION}
    return _event("tagquery.upsert", (world_id, dom, ",".join(tag_list), str(iv)), payload)


def _stage_domain(stage: str) -> str | None:
    # Activation stages name where a strategy stands; the domain it runs in follows from it.
    return {"backtest": "backtest", "paper": "dryrun", "live": "live"}.get(stage)


def activation_updated(*, world_id: str, strategy_id: str, stage: str, active: bool, weight: float,
                       run_id: str | None = None, etag: str | None = None) -> ControlEvent:
    """A strategy's activation in a world changed (stage, weight, active)."""
    payload = {"world_id": world_id, "strategy_id": strategy_id, "stage": stage,
               "execution_domain": _stage_domain(stage), "active": bool(active),
               "weight": float(weight), "run_id": run_id, "activation_etag": etag,
               "version": PAYLOAD_VERSION}
    return _event("activation_updated", (world_id, strategy_id), payload)


def risk_snapshot_updated(*, world_id: str, snapshot_hash: str, as_of: datetime,
                          ttl_sec: int) -> ControlEvent:
    """A new risk snapshot was stored for a world."""
    payload = {"world_id": world_id, "snapshot_hash": snapshot_hash, "as_of": as_of.isoformat(),
               "ttl_sec": ttl_sec, "version": PAYLOAD_VERSION}
    return _event("risk_snapshot_updated", (world_id,), payload)


def decision_updated(envelope: DecisionEnvelope) -> ControlEvent:
    """The world's decision envelope for a strategy changed."""
    payload = {"world_id": envelope.world_id, "strategy_id": envelope.strategy_id,
               "effective_mode": envelope.effective_mode,
               "execution_domain": envelope.execution_domain, "reason": envelope.reason,
               "as_of": envelope.as_of.isoformat() if envelope.as_of else None,
               "ttl_sec": envelope.ttl_sec, "decision_etag": envelope.etag,
               "policy_version": envelope.policy_version, "allow_live": envelope.allow_live,
               "version": PAYLOAD_VERSION}
    return _event("decision_updated", (envelope.world_id, envelope.strategy_id), payload)


def mirror_queue_update(live_event: ControlEvent) -> ControlEvent:
    """The shadow counterpart of a live ``queue_update``: same tags, queues renamed to the mirror."""
    if live_event.type != "queue_update" or live_event.execution_domain != "live":
        raise BadInputError("only a live queue_update can be mirrored into shadow")
    world = str(live_event.payload["world_id"])
    prefix = queue_namespace(world, "live") + "."
    queues = []
    for q in live_event.payload["queues"]:
        name = q["queue"]
        topic = name[len(prefix):] if name.startswith(prefix) else name
        queues.append({"queue": shadow_mirror_queue(world, topic), "global": q["global"]})
    return queue_update(tags=live_event.payload["tags"], interval=live_event.payload["interval"],
                        queues=queues, match_mode=live_event.payload["match_mode"],
                        world_id=world, execution_domain="shadow")


# --- the bus --------------------------------------------------------------------------------------
Callback = Callable[[ControlEvent], None]


class Subscription:
    """Handle returned by :meth:`ControlBus.subscribe`; call it (or ``close()``) to unsubscribe."""

    def __init__(self, bus: ControlBus, key: int) -> None:
        self._bus = bus
        self._key = key

    def close(self) -> None:
        """Stop receiving events; safe to call twice."""
        self._bus._unsubscribe(self._key)

    __call__ = close


@dataclass(frozen=True)
class _Sub:
    callback: Callback
    world_id: str | None
    execution_domain: str | None
    types: frozenset[str] | None

    def wants(self, event: ControlEvent) -> bool:
        return ((self.world_id is None or event.world_id == self.world_id)
                and (self.execution_domain is None or event.execution_domain == self.execution_domain)
                and (self.types is None or event.type in self.types))


class ControlBus:
    """In-process publish/subscribe with etag dedupe and a bounded, replayable history."""

    def __init__(self, history: int = 10_000) -> None:
        if history <= 0:
            raise BadInputError("history must be positive")
        # RLock: a subscriber may publish from its callback without deadlocking.
        self._lock = threading.RLock()
        self._history: deque[ControlEvent] = deque(maxlen=history)
        self._last_etag: dict[tuple[str, ...], str] = {}
        self._subs: dict[int, _Sub] = {}
        self._next_key = 0
        self._seq = 0
        self.dropped = 0

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest published event (0 when none)."""
        return self._seq

    @property
    def oldest_seq(self) -> int:
        """Sequence number of the oldest event still in the history (0 when empty)."""
        with self._lock:
            return self._history[0].seq if self._history else 0

    def publish(self, event: ControlEvent) -> ControlEvent | None:
        """Publish ``event``; returns it with its ``seq``, or ``None`` if it repeats the last one."""
        with self._lock:
            if self._last_etag.get(event.subject) == event.etag:
                self.dropped += 1
                return None
            self._last_etag[event.subject] = event.etag
            self._seq += 1
            stamped = replace(event, seq=self._seq)
            self._history.append(stamped)
            subs = [s for s in self._subs.values() if s.wants(stamped)]
            for sub in subs:
                try:
                    sub.callback(stamped)
                except Exception:  # noqa: BLE001 - one broken subscriber must not starve the others
                    log.exception("control-bus subscriber failed on %s #%d", stamped.type, stamped.seq)
            return stamped

    def publish_queue_update(self, *, tags: Sequence[str], interval: int,
                             queues: Sequence[str | Mapping[str, Any]], match_mode: str = "any",
                             world_id: str, execution_domain: str) -> list[ControlEvent]:
        """Publish a ``queue_update`` and its ``tagquery.upsert``; returns what was not deduped.

        The upsert's subject is (world, domain, tags, interval) and its payload carries no queue
        list, so it goes out once per combination however often the queue set changes.
        """
        out = []
        for ev in (tagquery_upsert(tags=tags, interval=interval, match_mode=match_mode,
                                   world_id=world_id, execution_domain=execution_domain),
                   queue_update(tags=tags, interval=interval, queues=queues, match_mode=match_mode,
                                world_id=world_id, execution_domain=execution_domain)):
            published = self.publish(ev)
            if published is not None:
                out.append(published)
        return out

    def subscribe(self, callback: Callback, world_id: str | None = None,
                  execution_domain: str | None = None,
                  types: Iterable[str] | None = None) -> Subscription:
        """Call ``callback`` for each future event matching the filters."""
        dom = normalize_domain(execution_domain) if execution_domain is not None else None
        type_set = frozenset(types) if types is not None else None
        if type_set is not None and not type_set <= set(EVENT_TYPES):
            raise BadInputError(f"unknown event types {sorted(type_set - set(EVENT_TYPES))}")
        with self._lock:
            self._next_key += 1
            self._subs[self._next_key] = _Sub(callback, world_id, dom, type_set)
            return Subscription(self, self._next_key)

    def _unsubscribe(self, key: int) -> None:
        with self._lock:
            self._subs.pop(key, None)

    def events(self, since_seq: int = 0, *, world_id: str | None = None,
               execution_domain: str | None = None,
               types: Iterable[str] | None = None) -> list[ControlEvent]:
        """Events with ``seq > since_seq`` still in the history, oldest first, filtered."""
        dom = normalize_domain(execution_domain) if execution_domain is not None else None
        flt = _Sub(lambda _e: None, world_id, dom, frozenset(types) if types is not None else None)
        with self._lock:
            return [e for e in self._history if e.seq > since_seq and flt.wants(e)]

    def has_gap(self, since_seq: int) -> bool:
        """True when events after ``since_seq`` have already left the history (client must resync)."""
        with self._lock:
            return bool(self._history) and self._history[0].seq > since_seq + 1
