"""Control bus: payload shapes, etag dedupe, once-per-combination upserts, filters, history, namespaces."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest

from qmtl_core.canonical import content_hash
from qmtl_core.controlbus import (
    ControlBus,
    ControlEvent,
    activation_updated,
    decision_updated,
    input_queue,
    mirror_queue_update,
    queue_name,
    queue_namespace,
    queue_update,
    risk_snapshot_updated,
    shadow_mirror_queue,
    tagquery_upsert,
)
from qmtl_core.domains import DecisionEnvelope, UnknownDomainError
from qmtl_core.errors import BadInputError

AS_OF = datetime(2026, 1, 15, 12, 0, tzinfo=timezone.utc)


def qu(domain: str = "shadow", queues: list[str] | None = None, world: str = "shadow-world",
       tags: list[str] | None = None) -> ControlEvent:
    return queue_update(tags=tags or ["shadow-tag"], interval=60, queues=queues or ["q-shadow"],
                        match_mode="any", world_id=world, execution_domain=domain)


def test_queue_update_payload_is_exactly_the_documented_shape() -> None:
    ev = qu()
    assert dict(ev.payload) == {
        "tags": ["shadow-tag"], "interval": 60, "queues": [{"queue": "q-shadow", "global": False}],
        "match_mode": "any", "world_id": "shadow-world", "execution_domain": "shadow", "version": 1}
    assert ev.type == "queue_update"
    assert (ev.world_id, ev.execution_domain) == ("shadow-world", "shadow")
    assert ev.etag == content_hash({"type": "queue_update", "payload": dict(ev.payload)})
    assert ev.to_json()["data"] == dict(ev.payload)


def test_event_inputs_are_validated() -> None:
    with pytest.raises(UnknownDomainError):
        qu(domain="prod")
    with pytest.raises(BadInputError):
        queue_update(tags=[], interval=60, queues=[], world_id="w", execution_domain="live")
    with pytest.raises(BadInputError):
        queue_update(tags=["t"], interval=0, queues=[], world_id="w", execution_domain="live")
    with pytest.raises(BadInputError):
        queue_update(tags=["t"], interval=60, queues=[], match_mode="some", world_id="w",
                     execution_domain="live")
    with pytest.raises(BadInputError):
        queue_update(tags=["t"], interval=60, queues=[42], world_id="w",  # type: ignore[list-item]
                     execution_domain="live")


def test_identical_repeat_is_dropped_changed_update_is_not() -> None:
    bus = ControlBus()
    assert bus.publish(qu()) is not None
    assert bus.publish(qu()) is None  # same subject, same etag
    changed = bus.publish(qu(queues=["q-shadow", "q-shadow-2"]))
    assert changed is not None and changed.seq == 2
    # going back to the first content is a change relative to the last one, so it is published
    assert bus.publish(qu()) is not None
    assert bus.dropped == 1
    # tag order does not make a different update
    a = qu(tags=["b", "a"])
    assert a.payload["tags"] == ["a", "b"] and a.etag == qu(tags=["a", "b"]).etag


def test_tagquery_upsert_once_per_tags_interval_domain() -> None:
    bus = ControlBus()
    first = bus.publish_queue_update(tags=["shadow-tag"], interval=60, queues=["q1"],
                                     world_id="shadow-world", execution_domain="shadow")
    assert [e.type for e in first] == ["tagquery.upsert", "queue_update"]
    # the queue set changes: a new queue_update, but no second upsert for the same combination
    again = bus.publish_queue_update(tags=["shadow-tag"], interval=60, queues=["q1", "q2"],
                                     world_id="shadow-world", execution_domain="shadow")
    assert [e.type for e in again] == ["queue_update"]
    # the same tags and interval in the live domain are another namespace: their own upsert
    live = bus.publish_queue_update(tags=["shadow-tag"], interval=60, queues=["q1"],
                                    world_id="shadow-world", execution_domain="live")
    assert [e.type for e in live] == ["tagquery.upsert", "queue_update"]
    other_interval = bus.publish_queue_update(tags=["shadow-tag"], interval=300, queues=["q1"],
                                              world_id="shadow-world", execution_domain="shadow")
    assert [e.type for e in other_interval] == ["tagquery.upsert", "queue_update"]
    upserts = bus.events(types=["tagquery.upsert"])
    keys = [(tuple(e.payload["tags"]), e.payload["interval"], e.payload["execution_domain"]) for e in upserts]
    assert len(keys) == len(set(keys)) == 3
    assert all(e.payload["world_id"] == "shadow-world" for e in upserts)
    assert tagquery_upsert(tags=["x"], interval=60, world_id="w", execution_domain="paper").payload[
        "execution_domain"] == "dryrun"


def test_subscribe_filters_and_unsubscribes() -> None:
    bus = ControlBus()
    got_all: list[ControlEvent] = []
    got_shadow: list[ControlEvent] = []
    got_w2: list[ControlEvent] = []
    bus.subscribe(got_all.append)
    unsub = bus.subscribe(got_shadow.append, world_id="shadow-world", execution_domain="shadow")
    bus.subscribe(got_w2.append, world_id="w2", types=["activation_updated"])
    bus.publish(qu())
    bus.publish(qu(domain="live"))
    bus.publish(qu(world="w2"))
    bus.publish(activation_updated(world_id="w2", strategy_id="s", stage="paper", active=True, weight=0.5))
    assert len(got_all) == 4
    assert [(e.world_id, e.execution_domain) for e in got_shadow] == [("shadow-world", "shadow")]
    assert [e.type for e in got_w2] == ["activation_updated"]
    assert got_w2[0].execution_domain == "dryrun"
    unsub()
    unsub.close()  # twice is fine
    bus.publish(qu(queues=["changed"]))
    assert len(got_shadow) == 1 and len(got_all) == 5
    with pytest.raises(BadInputError):
        bus.subscribe(got_all.append, types=["nope"])


def test_a_failing_subscriber_does_not_starve_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = ControlBus()
    seen: list[int] = []

    def broken(_e: ControlEvent) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(e.seq))
    with caplog.at_level(logging.ERROR, logger="qmtl_core.controlbus"):
        assert bus.publish(qu()) is not None
    assert seen == [1]
    assert "subscriber failed" in caplog.text


def test_subscriber_may_publish_from_its_callback() -> None:
    bus = ControlBus()

    def mirror(e: ControlEvent) -> None:
        if e.execution_domain == "live" and e.type == "queue_update":
            bus.publish(mirror_queue_update(e))

    bus.subscribe(mirror)
    bus.publish(qu(domain="live", queues=[queue_name("shadow-world", "live", "prices.1m")]))
    shadow = bus.events(execution_domain="shadow")
    assert [e.payload["queues"][0]["queue"] for e in shadow] == ["shadow-world.shadow.mirror.prices.1m"]


def test_history_is_bounded_and_replayable() -> None:
    bus = ControlBus(history=3)
    for i in range(5):
        bus.publish(qu(queues=[f"q{i}"]))
    assert bus.last_seq == 5 and bus.oldest_seq == 3
    assert [e.seq for e in bus.events()] == [3, 4, 5]
    assert [e.seq for e in bus.events(since_seq=4)] == [5]
    assert bus.has_gap(0) and bus.has_gap(1) and not bus.has_gap(2) and not bus.has_gap(5)
    assert bus.events(world_id="nobody") == []
    with pytest.raises(BadInputError):
        ControlBus(history=0)


def test_other_event_types_carry_world_and_domain() -> None:
    env = DecisionEnvelope(world_id="w", strategy_id="s", effective_mode="paper", reason="ok",
                           as_of=AS_OF, ttl_sec=600, etag="x", policy_version=2)
    d = decision_updated(env)
    assert (d.world_id, d.execution_domain, d.payload["effective_mode"]) == ("w", "dryrun", "paper")
    r = risk_snapshot_updated(world_id="w", snapshot_hash="h", as_of=AS_OF, ttl_sec=900)
    assert r.world_id == "w" and r.payload["as_of"] == AS_OF.isoformat()
    a1 = activation_updated(world_id="w", strategy_id="s", stage="live", active=True, weight=0.2)
    a2 = activation_updated(world_id="w", strategy_id="s", stage="live", active=True, weight=0.3)
    assert a1.subject == a2.subject and a1.etag != a2.etag
    bus = ControlBus()
    assert bus.publish(a1) is not None and bus.publish(a2) is not None and bus.publish(a2) is None


# --- namespaces -----------------------------------------------------------------------------------
def test_namespaces_are_per_world_and_domain() -> None:
    assert queue_namespace("w", "live") == "w.live"
    assert queue_name("w", "dryrun", "prices") == "w.dryrun.prices"
    assert queue_name("w", "live", "prices") != queue_name("w2", "live", "prices")
    with pytest.raises(BadInputError):
        queue_name("w", "live", " ")


@pytest.mark.parametrize("topic", ["prices.1m", "btc-usd", "orders"])
def test_shadow_reads_the_mirror_never_the_live_namespace(topic: str) -> None:
    live_q = input_queue("w", "live", topic)
    shadow_q = input_queue("w", "shadow", topic)
    assert live_q == f"w.live.{topic}"
    assert shadow_q == shadow_mirror_queue("w", topic) == f"w.shadow.mirror.{topic}"
    assert not shadow_q.startswith(queue_namespace("w", "live") + ".")
    assert shadow_q.startswith(queue_namespace("w", "shadow") + ".")
    assert input_queue("w", "paper", topic) == f"w.dryrun.{topic}"


def test_mirror_queue_update_moves_every_queue_into_the_shadow_namespace() -> None:
    live = queue_update(tags=["px"], interval=60, world_id="w", execution_domain="live",
                        queues=[{"queue": "w.live.prices", "global": True}, "external-feed"])
    shadow = mirror_queue_update(live)
    assert shadow.execution_domain == "shadow" and shadow.world_id == "w"
    assert shadow.payload["queues"] == [
        {"queue": "w.shadow.mirror.prices", "global": True},
        {"queue": "w.shadow.mirror.external-feed", "global": False}]
    assert all(not q["queue"].startswith("w.live.") for q in shadow.payload["queues"])
    assert shadow.subject != live.subject
    with pytest.raises(BadInputError):
        mirror_queue_update(shadow)
