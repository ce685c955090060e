"""Prometheus metrics read from the Redis store at scrape time.

Workers are separate processes (and may be SIGKILLed), so nothing is counted
in memory: a custom collector reads the workflow records, their histories
and the RQ queues whenever ``/metrics`` is scraped.  Counters derive from
the histories that the store keeps (a deleted record takes its counts with
it).  What one record contributes is cached by its revision, so a scrape
re-reads only the histories of workflows that changed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.registry import Collector
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from workflows import naming
from workflows.errors import DomcaptureError
from workflows.record import RUNNING, STATUSES, SUCCEEDED, Record
from workflows.store import Store

from .notify import redis_call

log = logging.getLogger("domcapture.metrics")

FREEZE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
DOWNTIME_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def host_of(uri: str) -> str:
    """The libvirt host a URI points at; ``localhost`` for a local URI like ``qemu:///system``."""
    return urlsplit(uri).hostname or "localhost"


@dataclass
class RecordStats:
    """What one record (at one revision) adds to the metrics."""

    state_durations: list[tuple[str, float]] = field(default_factory=list)
    recovery_actions: Counter[str] = field(default_factory=Counter)
    lease_losses: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    freeze_windows: list[float] = field(default_factory=list)


def record_stats(rec: Record, history: list[dict[str, Any]]) -> RecordStats:
    st = RecordStats()
    started: dict[str, float] = {}
    for ev in history:
        name, step = ev.get("event"), ev.get("step")
        if name == "step-started" and step:
            started[step] = ev["ts"]
        elif name == "step-done" and step in started:
            st.state_durations.append((step, ev["ts"] - started.pop(step)))
        elif name == "recovered":
            st.recovery_actions[str(ev.get("decision") or "unknown")] += 1
            st.lease_losses += 1
        elif name == "reenqueued":
            st.recovery_actions["re-enqueue"] += 1
        elif name == "thawed" and str(ev.get("by") or "").startswith("recovery"):
            st.recovery_actions["thaw"] += 1
        elif name in ("step-retry", "revert-retry"):
            st.retries[name.split("-")[0]] += 1
        if name == "thawed" and isinstance(ev.get("frozen_seconds"), (int, float)):
            st.freeze_windows.append(float(ev["frozen_seconds"]))
    # the thaw step of a strategy keeps its window in the record (no event of its own)
    last = rec.data.get("last_thaw") or {}
    seconds = last.get("frozen_seconds")
    if isinstance(seconds, (int, float)) and float(seconds) not in st.freeze_windows:
        st.freeze_windows.append(float(seconds))
    return st


def _histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...],
               samples: dict[tuple[str, ...], list[float]]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, values in sorted(samples.items()):
        cumulative = [(str(b), float(sum(1 for v in values if v <= b))) for b in buckets]
        cumulative.append(("+Inf", float(len(values))))
        fam.add_metric(list(key), cumulative, sum_value=sum(values))
    return fam


class StoreCollector(Collector):
    def __init__(self, store: Store, queue_name: str) -> None:
        self.store = store
        self.queue_name = queue_name
        self._cache: dict[str, tuple[int, RecordStats]] = {}

    def _stats(self, rec: Record) -> RecordStats:
        hit = self._cache.get(rec.id)
        if hit is not None and hit[0] == rec.rev:
            return hit[1]
        stats = record_stats(rec, self.store.history(rec.id))
        self._cache[rec.id] = (rec.rev, stats)
        return stats

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only; describing would read Redis at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("domcapture_store_up", "1 if the Redis store answered this scrape")
        try:
            families = self._collect()
        except DomcaptureError as exc:
            log.error("metrics: store unreadable: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _collect(self) -> list[Metric]:
        records = list(self.store.records())
        seen = {r.id for r in records}
        for gone in set(self._cache) - seen:
            del self._cache[gone]

        by_status: Counter[tuple[str, str, str]] = Counter()
        durations: dict[tuple[str, str], list[float]] = defaultdict(list)
        copied: Counter[str] = Counter()
        recovery: Counter[str] = Counter()
        lease_losses: Counter[str] = Counter()
        retries: Counter[tuple[str, str]] = Counter()
        freeze: dict[tuple[str, ...], list[float]] = defaultdict(list)
        downtime: dict[tuple[str, ...], list[float]] = defaultdict(list)
        last_ok: dict[tuple[str, str, str], float] = {}
        rate = GaugeMetricFamily("domcapture_copy_rate_bytes_per_second",
                                 "current copy rate of a running workflow", labels=["workflow", "strategy", "domain"])
        progress = GaugeMetricFamily("domcapture_workflow_progress_ratio",
                                     "copy progress of a running workflow (0..1)",
                                     labels=["workflow", "strategy", "domain", "state"])
        blocked = GaugeMetricFamily("domcapture_foreign_job_wait_seconds",
                                    "how long a running workflow has waited on another tool's block job on a disk",
                                    labels=["workflow", "strategy", "domain", "disk", "job"])
        for rec in records:
            by_status[(rec.strategy, rec.status, host_of(rec.uri))] += 1
            if rec.status == RUNNING:
                for disk, w in (rec.data.get("waiting_on") or {}).items():
                    blocked.add_metric([rec.id, rec.strategy, rec.domain, disk, str(w.get("job"))],
                                       max(0.0, time.time() - float(w.get("since") or 0)))
            stats = self._stats(rec)
            for state, seconds in stats.state_durations:
                durations[(rec.strategy, state)].append(seconds)
            p = rec.progress or {}
            copied[rec.strategy] += int(p.get("bytes_done") or 0)
            if rec.status == RUNNING and p.get("state") == rec.state:
                labels = [rec.id, rec.strategy, rec.domain]
                rate.add_metric(labels, float(p.get("rate_bytes_per_s") or 0))
                progress.add_metric(labels + [rec.state], float(p.get("percent") or 0) / 100.0)
            recovery.update(stats.recovery_actions)
            lease_losses[rec.strategy] += stats.lease_losses
            for kind, n in stats.retries.items():
                retries[(rec.strategy, kind)] += n
            freeze[(rec.strategy,)].extend(stats.freeze_windows)
            if rec.status == SUCCEEDED:
                down = (rec.result or {}).get("downtime_s")
                if isinstance(down, (int, float)):
                    downtime[(rec.strategy,)].append(float(down))
                key = (rec.domain, rec.uri, rec.strategy)
                last_ok[key] = max(last_ok.get(key, 0.0), rec.updated_at)

        out: list[Metric] = []
        wf = GaugeMetricFamily("domcapture_workflows", "workflows in the store, by strategy, status and libvirt host",
                               labels=["strategy", "status", "host"])
        strategies_seen = {k[0] for k in by_status}
        hosts_seen = {k[2] for k in by_status} or {"localhost"}
        for strategy in sorted(strategies_seen):
            for host in sorted(hosts_seen):
                if not any(k[0] == strategy and k[2] == host for k in by_status):
                    continue
                for status in STATUSES:  # every status, zeros included, so alerts see a 0 and not a gap
                    wf.add_metric([strategy, status, host], float(by_status.get((strategy, status, host), 0)))
        out.append(wf)

        summ = SummaryMetricFamily("domcapture_state_duration_seconds",
                                   "time from a step's start to its completion, by strategy and state",
                                   labels=["strategy", "state"])
        for (strategy, state), values in sorted(durations.items()):
            summ.add_metric([strategy, state], count_value=len(values), sum_value=sum(values))
        out.append(summ)

        c = CounterMetricFamily("domcapture_bytes_copied", "bytes copied by workflows (their latest copy phase)",
                                labels=["strategy"])
        for strategy, n in sorted(copied.items()):
            c.add_metric([strategy], float(n))
        out += [c, rate, progress, blocked]

        out.append(_histogram("domcapture_guest_freeze_seconds",
                              "guest filesystem freeze windows (fsfreeze to thaw)", ["strategy"],
                              FREEZE_BUCKETS, freeze))
        out.append(_histogram("domcapture_guest_downtime_seconds",
                              "guest downtime recorded by succeeded captures (result downtime_s)", ["strategy"],
                              DOWNTIME_BUCKETS, downtime))

        c = CounterMetricFamily("domcapture_recovery_actions", "actions of the recovery process, by decision",
                                labels=["decision"])
        for decision, n in sorted(recovery.items()):
            c.add_metric([decision], float(n))
        out.append(c)
        c = CounterMetricFamily("domcapture_lease_losses",
                                "workers whose lease expired and whose workflow recovery took over",
                                labels=["strategy"])
        for strategy, n in sorted(lease_losses.items()):
            c.add_metric([strategy], float(n))
        out.append(c)
        c = CounterMetricFamily("domcapture_retries", "step retries (kind step) and revert retries (kind revert)",
                                labels=["strategy", "kind"])
        for (strategy, kind), n in sorted(retries.items()):
            c.add_metric([strategy, kind], float(n))
        out.append(c)

        g = GaugeMetricFamily("domcapture_last_success_timestamp_seconds",
                              "when the domain's last succeeded workflow of this strategy ended (unix time)",
                              labels=["domain", "uri", "strategy"])
        for key, ts in sorted(last_ok.items()):
            g.add_metric(list(key), ts)
        out.append(g)
        out += self._queues()
        out.append(self._notifications())
        out.append(self._policy_errors())
        return out

    def _policy_errors(self) -> Metric:
        g = GaugeMetricFamily("domcapture_policy_errors",
                              "1 for each policy the scheduler cannot evaluate and skips until it is fixed",
                              labels=["policy"])
        raw = redis_call(self.store, self.store.r.hgetall, f"{self.store.prefix}:policy-errors")
        for name in sorted(raw):
            g.add_metric([name.decode()], 1.0)
        return g

    def _notifications(self) -> Metric:
        c = CounterMetricFamily("domcapture_notification_attempts",
                                "notifier delivery attempts, by status and outcome (delivered, failed, gave-up)",
                                labels=["status", "outcome"])
        raw = redis_call(self.store, self.store.r.hgetall, f"{self.store.prefix}:notify:counts")
        for key, n in sorted(raw.items()):
            status, _, outcome = key.decode().partition("|")
            c.add_metric([status, outcome], float(n))
        return c

    def _queues(self) -> list[Metric]:
        depth = GaugeMetricFamily("domcapture_queue_depth", "jobs waiting in an RQ queue", labels=["queue"])
        workers = GaugeMetricFamily("domcapture_workers", "RQ workers registered on a queue", labels=["queue"])
        names = {self.queue_name}
        # RQ's own key names: under the deployment's prefix (RQ was loaded with it)
        for key in redis_call(self.store, self.store.r.smembers, Queue.redis_queues_keys):
            name = (key.decode() if isinstance(key, bytes) else str(key)).removeprefix(
                Queue.redis_queue_namespace_prefix)
            if naming.host_of_queue(self.queue_name, name):  # per-host queues: <queue>.<host>
                names.add(name)
        for name in sorted(names):
            q = Queue(name, connection=self.store.r, serializer=JSONSerializer)
            depth.add_metric([name], float(q.count))
            workers.add_metric([name], float(Worker.count(queue=q)))
        return [depth, workers]

