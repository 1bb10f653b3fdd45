"""Prometheus metrics: what a fleet of worlds looks like to a dashboard and an alert rule.

Two kinds of families, one module:

- **Store families** (``StoreCollector``) are read from the store at each scrape, so ``qmtl serve``'s
  ``/metrics`` and ``campaign-loop --metrics-file`` print the same numbers for the same store:
  risk snapshot age per world, pending approvals and the oldest one's age, strategies per stage
  (live ones per world), executed campaign actions by kind and outcome, promotion blocks by reason
  (from the ledger), order-gate blocks by reason (from each strategy's recorded feeds), and the last
  time each world's campaign moved (a run recorded, a stage changed), for "campaign stalled".
- **Process families** count what this process did: loop iterations and their exit class, the
  actions each iteration reported (blocked ones by reason), and HTTP latency in ``qmtl serve``. A
  cron ``--once`` loop carries its counters over from the file it replaces, so they only grow.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` units, ``qmtl_`` prefix).
``write_textfile`` writes atomically (a temporary file, then rename), as node_exporter's textfile
collector requires.

Scrape cost: the store families are a handful of grouped queries whose result size is the number
of worlds (times stages, reasons, action kinds), and the order-gate counts are read out of each
strategy's meta in SQL (never the fed bars beside them), and only for strategies updated since the
collector's last read (a strategy's ``updated_at`` moves with every feed). Each scrape still touches
every strategy row and the ledger's block and progress entries, so ``qmtl serve`` keeps the collected families for
``max_age`` seconds (``--metrics-max-age``, default 5): however many Prometheus servers scrape, the
store is read at most once per ``max_age``, and concurrent scrapes share one collection. Ages and
timestamps are then up to ``max_age`` old, well under any alert's ``for:``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from qmtl_core.store import Store, schema
from qmtl_core.store.engine import json_loads
from qmtl_core.timeutil import parse_instant

__all__ = ["PROGRESS_KINDS", "LoopMetrics", "StoreCollector", "HttpMetrics", "exposition", "new_registry",
           "write_textfile"]

# ``*_created`` series would date a counter carried over from the replaced textfile to this run, and
# Prometheus does not need them: one process-wide switch, set where the metrics are defined.
disable_created_metrics()

#: Ledger kinds that mean a world's campaign moved forward (or back): the "stalled" clock restarts.
PROGRESS_KINDS = ("run.recorded", "strategy.promoted", "promotion.applied", "strategy.demoted",
                  "world.rollback")
#: HTTP latency buckets (seconds): most routes answer in milliseconds; reports and cohorts take seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _seconds(value: Any) -> float:
    return parse_instant(str(value)).timestamp()


class StoreCollector(Collector):
    """Families read from the store at each collection (pure reads; nothing is written)."""

    def __init__(self, store: Store, clock: Callable[[], datetime], *, max_age: float = 0.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self.max_age = max_age
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._last: tuple[float, list[Metric]] | None = None
        #: (world, strategy) -> (its updated_at when read, order-gate blocks by reason)
        self._gate_cache: dict[tuple[str, str], tuple[str, dict[str, int]]] = {}

    def collect(self) -> Iterator[Metric]:
        """The store families, read again only when the last collection is ``max_age`` old."""
        with self._lock:  # concurrent scrapes wait for one collection instead of each reading the store
            now = self._monotonic()
            if self._last is None or now - self._last[0] >= self.max_age:
                self._last = (now, list(self._read()))
            families = self._last[1]
        yield from families

    def _read(self) -> Iterator[Metric]:
        now = self.clock().timestamp()
        with self.store.read() as conn:
            yield from self._snapshots(conn, now)
            yield from self._approvals(conn, now)
            yield from self._strategies(conn)
            yield from self._actions(conn)
            yield from self._blocks(conn)
            yield from self._progress(conn)

    def _snapshots(self, conn: sa.Connection, now: float) -> Iterator[Metric]:
        t = schema.risk_snapshots
        age = GaugeMetricFamily("qmtl_risk_snapshot_age_seconds",
                                "Seconds since the as_of of the world's newest risk snapshot.", labels=["world"])
        for world, as_of in conn.execute(sa.select(t.c.world_id, sa.func.max(t.c.as_of)).group_by(t.c.world_id)):
            age.add_metric([world], max(0.0, now - _seconds(as_of)))
        yield age

    def _approvals(self, conn: sa.Connection, now: float) -> Iterator[Metric]:
        t = schema.promotion_requests
        count = GaugeMetricFamily("qmtl_pending_approvals", "Promotion requests waiting for approvals.",
                                  labels=["world"])
        oldest = GaugeMetricFamily("qmtl_pending_approval_oldest_age_seconds",
                                   "Age of the world's oldest pending promotion request.", labels=["world"])
        rows = conn.execute(sa.select(t.c.world_id, sa.func.count(), sa.func.min(t.c.created_at))
                            .where(t.c.status == "pending").group_by(t.c.world_id))
        for world, n, first in rows:
            count.add_metric([world], n)
            oldest.add_metric([world], max(0.0, now - _seconds(first)))
        yield count
        yield oldest

    def _strategies(self, conn: sa.Connection) -> Iterator[Metric]:
        t = schema.strategies
        by_stage = GaugeMetricFamily("qmtl_strategies", "Strategies per world and stage.", labels=["world", "stage"])
        live = GaugeMetricFamily("qmtl_live_strategies", "Strategies live in the world.", labels=["world"])
        live_by_world: dict[str, int] = {}
        for world, stage, n in conn.execute(sa.select(t.c.world_id, t.c.stage, sa.func.count())
                                            .group_by(t.c.world_id, t.c.stage)):
            by_stage.add_metric([world, stage], n)
            live_by_world.setdefault(world, 0)
            if stage == "live":
                live_by_world[world] = n
        for world, n in sorted(live_by_world.items()):
            live.add_metric([world], n)
        yield by_stage
        yield live
        gate = CounterMetricFamily("qmtl_order_gate_blocks", "Orders the order gate kept from the broker, by "
                                   "reason (recorded with each feed of new bars).", labels=["world", "reason"])
        blocked: dict[tuple[str, str], int] = defaultdict(int)
        for (world, _), counts in self._gate_counts(conn).items():
            for reason, n in counts.items():
                blocked[(world, reason)] += n
        for (world, reason), n in sorted(blocked.items()):
            gate.add_metric([world, reason], n)
        yield gate

    def _gate_counts(self, conn: sa.Connection) -> dict[tuple[str, str], dict[str, int]]:
        """Order-gate blocks per strategy, read again only for strategies updated since the last
        collection. A feed's meta holds every bar fed so far beside the counts, and SQLite parses
        the whole document to extract them: re-reading every strategy's at each scrape made the
        scrape grow with the fleet's history. Only the small counts ever leave the database."""
        t = schema.strategies
        seen = {(w, sid): str(at) for w, sid, at in conn.execute(
            sa.select(t.c.world_id, t.c.strategy_id, t.c.updated_at).where(t.c.meta.is_not(None)))}
        known = self._gate_cache
        stale = [key for key, at in seen.items() if known.get(key, (None, {}))[0] != at]
        feeds = ("feed", "shadow_feed")  # paper/live and shadow keep their own fed series
        counts = [sa.cast(t.c.meta[(key, "orders_blocked")], sa.Text) for key in feeds]
        for k in range(0, len(stale), 500):
            chunk = stale[k:k + 500]
            for world, sid, *docs in conn.execute(
                    sa.select(t.c.world_id, t.c.strategy_id, *counts)
                    .where(sa.tuple_(t.c.world_id, t.c.strategy_id).in_(chunk))):
                merged: dict[str, int] = defaultdict(int)
                for doc in docs:
                    for reason, n in (json_loads(doc) or {}).items() if doc else ():
                        merged[reason] += int(n)
                known[(world, sid)] = (seen[(world, sid)], dict(merged))
        for key in set(known) - set(seen):
            del known[key]
        return {key: counts for key, (_, counts) in known.items()}

    def _actions(self, conn: sa.Connection) -> Iterator[Metric]:
        t = schema.campaign_actions
        done = CounterMetricFamily("qmtl_campaign_actions", "Campaign actions executed, by kind and outcome.",
                                   labels=["world", "action", "outcome"])
        for world, action, status, n in conn.execute(
                sa.select(t.c.world_id, t.c.action, t.c.status, sa.func.count())
                .group_by(t.c.world_id, t.c.action, t.c.status)):
            done.add_metric([world, action, status], n)
        yield done

    def _blocks(self, conn: sa.Connection) -> Iterator[Metric]:
        t = schema.ledger
        blocks = CounterMetricFamily("qmtl_promotion_blocks", "Promotions blocked by the live gate, by reason "
                                     "(one blocked promotion counts once for each of its reasons).",
                                     labels=["world", "reason"])
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for world, reason, n in conn.execute(sa.select(t.c.world_id, t.c.reason, sa.func.count())
                                             .where(t.c.kind == "promotion.blocked").group_by(t.c.world_id, t.c.reason)):
            for code in (reason or "unknown").split(", "):
                counts[(world or "", code)] += n
        for (world, code), n in sorted(counts.items()):
            blocks.add_metric([world, code], n)
        yield blocks

    def _progress(self, conn: sa.Connection) -> Iterator[Metric]:
        t = schema.ledger
        moved = GaugeMetricFamily("qmtl_campaign_last_progress_timestamp_seconds",
                                  "When the world's campaign last moved (a run recorded, a stage changed).",
                                  labels=["world"])
        for world, ts in conn.execute(sa.select(t.c.world_id, sa.func.max(t.c.ts))
                                      .where(t.c.kind.in_(PROGRESS_KINDS), t.c.world_id.is_not(None))
                                      .group_by(t.c.world_id)):
            moved.add_metric([world], _seconds(ts))
        yield moved


class LoopMetrics:
    """What campaign-loop iterations did in this process (``observe`` one world's outcome document)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter("qmtl_loop_runs", "Campaign-loop runs of one world, by exit class.",
                            ["world", "exit_class"], registry=registry)
        self.last_run = Gauge("qmtl_loop_last_run_timestamp_seconds", "When the loop last ran the world.",
                              ["world"], registry=registry)
        self.last_exit = Gauge("qmtl_loop_last_exit_code", "The exit class of the world's last loop run "
                               "(0 done, 10 blocked, 11 waiting, 12 fail-closed, 75 busy, 1 error).",
                               ["world"], registry=registry)
        self.actions = Counter("qmtl_loop_actions", "Actions the loop reported, by kind and outcome.",
                               ["world", "action", "outcome"], registry=registry)
        self.blocked = Gauge("qmtl_campaign_blocked_strategies", "Strategies whose campaign is blocked now, "
                             "by reason (as of the world's last loop run).", ["world", "reason"], registry=registry)

    def carry_over(self, previous: Mapping[str, Mapping[tuple[tuple[str, str], ...], float]]) -> None:
        """Start the counters from a previous run's values (a cron loop replacing its textfile)."""
        for family, counter in (("qmtl_loop_runs", self.runs), ("qmtl_loop_actions", self.actions)):
            for labels, value in previous.get(family, {}).items():
                counter.labels(**dict(labels)).inc(value)

    def observe(self, outcome: Mapping[str, Any], at: datetime) -> None:
        """Count one world's outcome document (``WorldOutcome.to_dict()``)."""
        world = str(outcome["world"])
        code = 75 if outcome["status"] == "busy" else int(outcome["exit_code"])
        self.runs.labels(world=world, exit_class=str(code)).inc()
        self.last_run.labels(world=world).set(at.timestamp())
        self.last_exit.labels(world=world).set(code)
        if outcome["status"] == "busy":
            return  # another loop holds the world: its actions are that loop's to report
        for sample in list(self.blocked.collect()[0].samples):
            if sample.labels["world"] == world:
                self.blocked.remove(world, sample.labels["reason"])
        reasons: dict[str, int] = defaultdict(int)
        for action in outcome.get("actions") or []:
            self.actions.labels(world=world, action=action["action"], outcome=action.get("outcome") or "").inc()
            if action["action"] == "blocked":
                reasons[action["reason"]] += 1
        for reason, n in reasons.items():
            self.blocked.labels(world=world, reason=reason).set(n)


class HttpMetrics:
    """Request latency for ``qmtl serve``, labelled by route template (never the raw path: ids would
    make one series per strategy)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram("qmtl_http_request_duration_seconds", "HTTP request latency by route.",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.latency.labels(method=method, route=route, status=str(status)).observe(seconds)


def new_registry(store: Store, clock: Callable[[], datetime], *, max_age: float = 0.0) -> CollectorRegistry:
    """A registry holding the store families, read at most once per ``max_age`` seconds."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, clock, max_age=max_age))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (version 0.0.4)."""
    return generate_latest(registry)


def read_counters(path: Path, families: Sequence[str]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The ``_total`` samples of ``families`` in an exposition file (empty when there is none or it is
    not an exposition: a counter then restarts, which Prometheus' ``rate`` handles)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in families:
                out[family.name] = {tuple(sorted(s.labels.items())): s.value for s in family.samples
                                    if s.name == f"{family.name}_total"}
    except ValueError:
        return {}
    return out


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Write the exposition to ``path`` atomically (same directory, then ``os.replace``), so
    node_exporter never reads half a file."""
    data = exposition(registry)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # node_exporter usually runs as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
