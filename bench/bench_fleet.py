"""Fleet scale figures on the in-memory hypervisor and a real Redis.

For 1,000 and then 10,000 domains over 100 hosts (the 1,000 run is the
baseline the 10,000 run is compared with), one night of schedules: four
policies, each a quarter of the domains, at 00:00, 01:00, 02:00 and 03:00.
One scheduler submits every slot as its clock reaches it, and reports:

- schedule lag p50/p99: from the slot time to that domain's submission;
- Redis memory per workflow (``MEMORY USAGE`` of its record and history) and
  per history event, for workflows the engine ran to the end on the fake;
  and every key of the deployment (records, slots, index) per queued workflow;
- the Redis round trip (PING p50) of the same run: the lag is counted in them;
- ``list`` latency (``Store.listing``, what ``domcapture list`` reads) with N
  finished records, N = the domain count, plus ``--list-records`` more
  (copies of a finished record) to extrapolate to 1,000,000.

Usage: .venv/bin/python bench/bench_fleet.py [--redis-url URL] [--sizes 1000,10000] [--list-records N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from typing import Any

import redis

from workflows import strategies
from workflows.engine import Engine
from workflows.hypervisor.base import Hypervisor
from workflows.hypervisor.fake import FakeHypervisor
from workflows.policy import Policy, PolicyStore
from workflows.scheduler import Scheduler
from workflows.service import Captures
from workflows.store import Store

HOSTS = 100
NIGHT = 1_767_225_600.0  # 2026-01-01 00:00 UTC
RUN_SAMPLE = 20  # workflows the engine runs to the end, for the memory figures


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def prefix_bytes(client: redis.Redis[bytes], prefix: str) -> int:
    """MEMORY USAGE summed over every key of the deployment (the server is shared: not used_memory)."""
    total = 0
    keys = list(client.scan_iter(f"{prefix}:*", count=10_000))
    for i in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for k in keys[i:i + 1000]:
            pipe.memory_usage(k)
        total += sum(int(x or 0) for x in pipe.execute())
    return total


def one_size(url: str, n: int, extra_list: int, work: str) -> dict[str, Any]:
    client: redis.Redis[bytes] = redis.Redis.from_url(url)
    prefix = f"bench-fleet-{uuid.uuid4().hex[:6]}"
    store = Store(client, prefix)
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.write(os.urandom(64 * 1024))
    target = tempfile.mkdtemp(dir=work)
    fakes = {f"fake:///h{h:03d}": FakeHypervisor(f"fake:///h{h:03d}") for h in range(HOSTS)}
    uris = sorted(fakes)
    for i in range(n):
        fakes[uris[i % HOSTS]].add_domain(f"d{i % 4}-{i:05d}", {"vda": disk}, agent=True)

    def factory(uri: str) -> Hypervisor:
        return fakes[uri]

    queue: list[str] = []
    captures = Captures(store, factory, lambda rec: queue.append(rec.id))
    policies = PolicyStore(client, prefix)
    for k in range(4):
        policies.apply(Policy(name=f"night-{k}", strategy="direct-backup", hosts={f"h{h:03d}": u for h, u in
                                                                                  enumerate(uris)},
                              cron=f"0 {k} * * *", timezone="UTC", domains=[f"d{k}-*"], target=target,
                              options={"quiesce": "try"}))
    sim = {"base": NIGHT - 60, "t0": time.perf_counter()}
    sched = Scheduler(captures, policies, clock=lambda: sim["base"] + time.perf_counter() - sim["t0"])
    pings = []
    for _ in range(200):
        t = time.perf_counter()
        client.ping()
        pings.append(time.perf_counter() - t)
    sched.tick()  # first sight: the schedules start now
    lags: list[float] = []
    t_night = time.perf_counter()
    for k in range(4):
        sim["base"], sim["t0"] = NIGHT + k * 3600, time.perf_counter()
        lags += [o.at - o.slot.at for o in sched.tick() if o.what.startswith("submitted")]
    night_s = time.perf_counter() - t_night
    assert len(lags) == n, f"{len(lags)} submitted of {n}"
    mem_queued = prefix_bytes(client, prefix) / n

    engine = Engine(store, strategies.DEFINITIONS, factory, "bench", lease_ttl=30)
    sample = queue[:RUN_SAMPLE]
    for wf_id in sample:
        engine.run(wf_id)
    rec_bytes, hist_bytes, events = [], [], []
    for wf_id in sample:
        rec_bytes.append(int(client.memory_usage(f"{prefix}:wf:{wf_id}") or 0))
        hist_bytes.append(int(client.memory_usage(f"{prefix}:wf:{wf_id}:history") or 0))
        events.append(int(client.llen(f"{prefix}:wf:{wf_id}:history")))
    finished = store.load(sample[0])
    assert finished.status == "succeeded", finished.status

    # every other submitted workflow, finished: a copy of a finished record under its own id
    def add_finished(ids: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        history = client.lrange(f"{prefix}:wf:{sample[0]}:history", 0, -1)
        for j, wf_id in enumerate(ids):
            doc = finished.to_dict()
            doc["id"] = wf_id
            pipe.hset(f"{prefix}:wf:{wf_id}", mapping={"rev": 1, "data": json.dumps(doc)})
            pipe.rpush(f"{prefix}:wf:{wf_id}:history", *history)
            pipe.zadd(f"{prefix}:index", {wf_id: finished.created_at})
            pipe.srem(f"{prefix}:active", wf_id)
            if j % 2000 == 1999:
                pipe.execute()
        pipe.execute()
    add_finished(queue[RUN_SAMPLE:])

    def time_list() -> tuple[int, float]:
        t = time.perf_counter()
        count = sum(1 for _ in store.listing())
        return count, time.perf_counter() - t
    listed, list_s = time_list()
    out: dict[str, Any] = {
        "domains": n, "hosts": HOSTS, "night_submit_s": night_s, "redis_rtt_p50_s": statistics.median(pings),
        "lag_p50_s": statistics.median(lags), "lag_p99_s": pct(lags, 99), "lag_max_s": max(lags),
        "record_bytes": statistics.mean(rec_bytes), "history_bytes": statistics.mean(hist_bytes),
        "events_per_workflow": statistics.mean(events),
        "bytes_per_event": sum(hist_bytes) / sum(events),
        "used_memory_per_queued_workflow": mem_queued,
        "list_records": listed, "list_s": list_s, "list_us_per_record": list_s / listed * 1e6,
        "list_1m_extrapolated_s": list_s / listed * 1_000_000,
    }
    if extra_list:
        add_finished([f"x{j:07d}{uuid.uuid4().hex[:9]}" for j in range(extra_list)])
        listed, list_s = time_list()
        out.update({"list_records_big": listed, "list_s_big": list_s,
                    "list_1m_extrapolated_s": list_s / listed * 1_000_000})
    for key in client.scan_iter(f"{prefix}:*", count=10_000):
        client.unlink(key)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--list-records", type=int, default=0, help="extra finished records for the list figure")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as work:
        for i, n in enumerate(sizes):
            r = one_size(args.redis_url, n, args.list_records if i == len(sizes) - 1 else 0, work)
            results.append(r)
            print(f"{n:>6} domains: Redis round trip p50 {r['redis_rtt_p50_s'] * 1000:.2f} ms (baseline of this run)")
            print(f"{n:>6} domains/{HOSTS} hosts: night submitted in {r['night_submit_s']:.1f}s; lag p50 "
                  f"{r['lag_p50_s'] * 1000:.0f} ms p99 {r['lag_p99_s'] * 1000:.0f} ms; record "
                  f"{r['record_bytes']:.0f} B + history {r['history_bytes']:.0f} B ({r['events_per_workflow']:.1f} "
                  f"events, {r['bytes_per_event']:.0f} B/event); all keys per queued workflow "
                  f"{r['used_memory_per_queued_workflow']:.0f} B; list {r['list_records']} in {r['list_s']:.2f}s "
                  f"({r['list_us_per_record']:.0f} us/record)")
            if "list_records_big" in r:
                print(f"        list {r['list_records_big']} in {r['list_s_big']:.1f}s -> 1,000,000 extrapolated "
                      f"{r['list_1m_extrapolated_s']:.0f}s")
    base = results[0]
    for r in results[1:]:
        grow = r["domains"] / base["domains"]
        print(f"growth {base['domains']} -> {r['domains']} domains (x{grow:.0f}): night time "
              f"x{r['night_submit_s'] / base['night_submit_s']:.1f}, "
              f"lag p50 x{r['lag_p50_s'] / base['lag_p50_s']:.1f}, "
              f"p99 x{r['lag_p99_s'] / base['lag_p99_s']:.1f}, memory/workflow "
              f"x{(r['record_bytes'] + r['history_bytes']) / (base['record_bytes'] + base['history_bytes']):.2f}, "
              f"list time x{r['list_s'] / base['list_s']:.1f} (per record "
              f"x{r['list_us_per_record'] / base['list_us_per_record']:.2f}), Redis round trip "
              f"x{r['redis_rtt_p50_s'] / base['redis_rtt_p50_s']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
