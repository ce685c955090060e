"""Prometheus metrics read from the Redis store at scrape time.

Workers are separate processes (and may be SIGKILLed), so nothing is counted
in memory.  The record scripts keep counters in Redis in the same atomic step
as each write (``workflows/indexes.py``: ``P:stats``, ``P:lastok``); a scrape
reads those two hashes, the running workflows (``P:ix:status:running``), the
RQ queues, the notifier's counts and the policy errors: its cost does not grow
with the number of finished workflows.  As before, ``domcapture_workflows`` and
``domcapture_bytes_copied`` (the sum of each workflow's latest copy phase) drop
what an expired record added when ``trim_index`` runs; the other counters keep it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.registry import Collector
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from workflows import naming
from workflows.errors import DomcaptureError
from workflows.indexes import DOWNTIME_BUCKETS, FREEZE_BUCKETS
from workflows.record import RUNNING, STATUSES, Record
from workflows.store import Store

from .notify import redis_call

log = logging.getLogger("domcapture.metrics")

__all__ = ["StoreCollector", "host_of", "FREEZE_BUCKETS", "DOWNTIME_BUCKETS"]


def host_of(uri: str) -> str:
    """The libvirt host a URI points at; ``localhost`` for a local URI like ``qemu:///system``."""
    return urlsplit(uri).hostname or "localhost"


def _histogram(name: str, doc: str, kind: str, buckets: tuple[float, ...],
               stats: dict[str, float]) -> HistogramMetricFamily:
    """A histogram per strategy from the counters ``<kind>|<strategy>|<bucket>`` (cumulative), ``|+Inf``, ``|sum``."""
    fam = HistogramMetricFamily(name, doc, labels=["strategy"])
    per: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in stats.items():
        head, _, rest = key.partition("|")
        if head == kind:
            strategy, _, bucket = rest.rpartition("|")
            per[strategy][bucket] = value
    for strategy, values in sorted(per.items()):
        by_bound = {float(b): v for b, v in values.items() if b not in ("+Inf", "sum")}
        cumulative = [(str(b), by_bound.get(b, 0.0)) for b in buckets]
        cumulative.append(("+Inf", values.get("+Inf", 0.0)))
        fam.add_metric([strategy], cumulative, sum_value=values.get("sum", 0.0))
    return fam


def _split(stats: dict[str, float], kind: str, parts: int) -> Iterator[tuple[list[str], float]]:
    for key, value in sorted(stats.items()):
        fields = key.split("|")
        if fields[0] == kind and len(fields) == parts + 1:
            yield fields[1:], value


class StoreCollector(Collector):
    def __init__(self, store: Store, queue_name: str) -> None:
        self.store = store
        self.queue_name = queue_name

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
        ix = self.store.indexes
        stats = ix.stats()
        running = [e for e in ix.iter_all(status=RUNNING) if isinstance(e, Record)]

        rate = GaugeMetricFamily("domcapture_copy_rate_bytes_per_second",
                                 "current copy rate of a running workflow", labels=["workflow", "strategy", "domain"])
        progress = GaugeMetricFamily("domcapture_workflow_progress_ratio",
                                     "copy progress of a running workflow (0..1)",
                                     labels=["workflow", "strategy", "domain", "state"])
        blocked = GaugeMetricFamily("domcapture_foreign_job_wait_seconds",
                                    "how long a running workflow has waited on another tool's block job on a disk",
                                    labels=["workflow", "strategy", "domain", "disk", "job"])
        for rec in running:
            for disk, w in (rec.data.get("waiting_on") or {}).items():
                blocked.add_metric([rec.id, rec.strategy, rec.domain, disk, str(w.get("job"))],
                                   max(0.0, time.time() - float(w.get("since") or 0)))
            p = rec.progress or {}
            if p.get("state") == rec.state:
                labels = [rec.id, rec.strategy, rec.domain]
                rate.add_metric(labels, float(p.get("rate_bytes_per_s") or 0))
                progress.add_metric(labels + [rec.state], float(p.get("percent") or 0) / 100.0)

        out: list[Metric] = []
        wf = GaugeMetricFamily("domcapture_workflows", "workflows in the store, by strategy, status and libvirt host",
                               labels=["strategy", "status", "host"])
        by_status = {tuple(k): v for k, v in _split(stats, "wf", 3)}
        pairs = sorted({(k[0], k[2]) for k, v in by_status.items() if v > 0 and k[1] in STATUSES})
        for strategy, host in pairs:
            for status in STATUSES:  # every status, zeros included, so alerts see a 0 and not a gap
                wf.add_metric([strategy, status, host], max(0.0, by_status.get((strategy, status, host), 0.0)))
        out.append(wf)

        summ = SummaryMetricFamily("domcapture_state_duration_seconds",
                                   "time from a step's start to its completion, by strategy and state",
                                   labels=["strategy", "state"])
        for (strategy, state), n in _split(stats, "dur", 2):
            summ.add_metric([strategy, state], count_value=int(n),
                            sum_value=stats.get(f"dursum|{strategy}|{state}", 0.0))
        out.append(summ)

        c = CounterMetricFamily("domcapture_bytes_copied", "bytes copied by workflows (their latest copy phase)",
                                labels=["strategy"])
        for (strategy,), n in _split(stats, "bytes", 1):
            c.add_metric([strategy], n)
        out += [c, rate, progress, blocked]

        out.append(_histogram("domcapture_guest_freeze_seconds",
                              "guest filesystem freeze windows (fsfreeze to thaw)", "freeze", FREEZE_BUCKETS, stats))
        out.append(_histogram("domcapture_guest_downtime_seconds",
                              "guest downtime recorded by succeeded captures (result downtime_s)", "down",
                              DOWNTIME_BUCKETS, stats))

        c = CounterMetricFamily("domcapture_recovery_actions", "actions of the recovery process, by decision",
                                labels=["decision"])
        for (decision,), n in _split(stats, "recovery", 1):
            c.add_metric([decision], n)
        out.append(c)
        c = CounterMetricFamily("domcapture_lease_losses",
                                "workers whose lease expired and whose workflow recovery took over",
                                labels=["strategy"])
        for (strategy,), n in _split(stats, "lease", 1):
            c.add_metric([strategy], n)
        out.append(c)
        c = CounterMetricFamily("domcapture_retries", "step retries (kind step) and revert retries (kind revert)",
                                labels=["strategy", "kind"])
        for (strategy, kind), n in _split(stats, "retry", 2):
            c.add_metric([strategy, kind], n)
        out.append(c)

        g = GaugeMetricFamily("domcapture_last_success_timestamp_seconds",
                              "when the domain's last succeeded workflow of this strategy ended (unix time)",
                              labels=["domain", "uri", "strategy"])
        for key, ts in sorted(ix.last_ok().items()):
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

