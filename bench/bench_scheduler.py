"""One nightly slot of 10,000 and 100,000 domains: how late the scheduler submits them.

The domains sit on 100 in-memory hosts (``FakeHypervisor``); one policy takes
them all at 02:00.  The bench starts its own ``redis-server`` on a loopback
port with its own directory (nothing else shares it), then for each size runs
the slot with one scheduler and with two side by side (forked processes
sharing the slot's batches), and reports:

- lag p50/p99/max: from the slot time to each domain's submission (the
  clock starts at the slot time when the schedulers start);
- the slot's wall time, and that every (domain, slot) was submitted exactly
  once (one record per domain, its slot key naming it).

Without ``--rq`` the jobs are not enqueued (the enqueue callable drops them):
the scheduler and the store alone.  With ``--rq`` each batch's jobs go into an
RQ queue on the same server, one pipeline per batch (``Queue.enqueue_many``,
as ``Runtime.enqueue_new`` does).

Usage: nice -n 19 .venv/bin/python bench/bench_scheduler.py [--sizes 10000,100000] [--schedulers 1,2]
       [--batch 500] [--port 6395] [--rq] [--out bench/results/scheduler.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable

import redis
import rq
from rq.serializers import JSONSerializer

from workflows.hypervisor.base import Hypervisor
from workflows.hypervisor.fake import FakeHypervisor
from workflows.policy import Policy, PolicyStore
from workflows.record import Record
from workflows.scheduler import Scheduler
from workflows.service import Captures
from workflows.store import Store

HOSTS = 100
NIGHT = 1_767_232_800.0  # 2026-01-01 02:00 UTC


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def start_redis(port: int, folder: str) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server") or "redis-server"
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder, "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not start")


def rq_enqueue(client: redis.Redis[bytes]) -> Callable[[list[Record]], None]:
    queue = rq.Queue("bench", connection=client, serializer=JSONSerializer)

    def enqueue_new(recs: list[Record]) -> None:
        pipe = client.pipeline()
        queue.enqueue_many([queue.prepare_data("workers.jobs.run_workflow", (rec.id,), job_id=f"{rec.id}-1",
                                               timeout=86400, result_ttl=3600, failure_ttl=7 * 86400,
                                               description=f"{rec.strategy} {rec.domain} ({rec.id})")
                            for rec in recs], pipeline=pipe)
        pipe.execute()
    return enqueue_new


def one_run(port: int, n: int, schedulers: int, batch: int, work: str, with_rq: bool) -> dict[str, Any]:
    client: redis.Redis[bytes] = redis.Redis(port=port)
    client.flushdb()
    prefix = "bench-sched"
    disk = os.path.join(work, "disk.img")
    target = os.path.join(work, "bk")
    os.makedirs(target, exist_ok=True)
    fakes = {f"fake:///h{h:03d}": FakeHypervisor(f"fake:///h{h:03d}") for h in range(HOSTS)}
    uris = sorted(fakes)
    for i in range(n):
        fakes[uris[i % HOSTS]].add_domain(f"d{i:06d}", {"vda": disk}, agent=True)
    policies = PolicyStore(client, prefix)
    policies.apply(Policy(name="night", strategy="direct-backup", hosts={f"h{h:03d}": u for h, u in enumerate(uris)},
                          cron="0 2 * * *", timezone="UTC", domains=["d*"], target=target,
                          options={"quiesce": "try"}))
    client.hset(f"{prefix}:sched:night", "cursor", NIGHT - 86400)  # the policy was seen the night before
    start = time.time() + 0.5  # the slot time, for every scheduler process
    results: multiprocessing.Queue[list[tuple[str, float]]] = multiprocessing.get_context("fork").Queue()

    def run(owner: str) -> None:
        store = Store(redis.Redis(port=port), prefix)

        def factory(uri: str) -> Hypervisor:
            return fakes[uri]
        captures = Captures(store, factory, lambda rec: None, enqueue_new=rq_enqueue(store.r) if with_rq else None)
        sched = Scheduler(captures, PolicyStore(store.r, prefix),
                          clock=lambda: NIGHT + time.time() - start, owner=owner, batch=batch)
        time.sleep(max(0.0, start - time.time()))
        out: list[tuple[str, float]] = []
        while True:  # until the slot's cursor moved (a batch held by the other one is waited for)
            out += [(o.what, o.at - o.slot.at) for o in sched.tick() if o.slot.kind == "capture"]
            if float(store.r.hget(f"{prefix}:sched:night", "cursor") or 0) >= NIGHT:
                break
            time.sleep(0.5)
        results.put(out)

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=run, args=(f"s{k}",)) for k in range(schedulers)]
    for p in procs:
        p.start()
    outs = [results.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.time() - start
    lags = [lag for out in outs for what, lag in out if what.startswith("submitted:")]
    taken = sum(1 for out in outs for what, _ in out if what == "taken")
    # exactly once: every domain's slot key names one record, and that record is of that domain and slot
    store = Store(client, prefix)
    members = store.slots("night")
    ids = [v for _, _, v in members]
    pipe = client.pipeline(transaction=False)
    for wf_id in ids:
        pipe.hget(f"{prefix}:wf:{wf_id}", "data")
    docs = [json.loads(raw) for raw in pipe.execute()]
    assert len(members) == n and len(set(ids)) == n, (len(members), len(set(ids)))
    assert sorted(f"{d['data']['host']}|{d['domain']}" for d in docs) == \
        sorted(m.rsplit("|", 2)[0] for m, _, _ in members)
    assert client.zcard(f"{prefix}:index") == n and len(lags) == n, (client.zcard(f"{prefix}:index"), len(lags))
    if with_rq:
        assert client.llen("rq:queue:bench") == n
    return {"domains": n, "hosts": HOSTS, "schedulers": schedulers, "batch": batch, "rq": with_rq,
            "slot_wall_s": wall,
            "lag_p50_s": statistics.median(lags), "lag_p99_s": pct(lags, 99), "lag_max_s": max(lags),
            "submitted": len(lags), "taken_by_the_other": taken}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--schedulers", default="1,2")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--port", type=int, default=6395)
    ap.add_argument("--rq", action="store_true", help="enqueue each batch's jobs into an RQ queue")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        with open(os.path.join(work, "disk.img"), "wb") as f:
            f.write(os.urandom(64 * 1024))
        os.makedirs(os.path.join(work, "redis"))
        server = start_redis(args.port, os.path.join(work, "redis"))
        try:
            for n in (int(x) for x in args.sizes.split(",")):
                for k in (int(x) for x in args.schedulers.split(",")):
                    r = one_run(args.port, n, k, args.batch, work, args.rq)
                    results.append(r)
                    rq_note = ", RQ" if args.rq else ""
                    print(f"{n:>7} domains, {k} scheduler(s), batch {args.batch}{rq_note}: slot submitted in "
                          f"{r['slot_wall_s']:.1f} s; lag p50 {r['lag_p50_s']:.2f} s p99 {r['lag_p99_s']:.2f} s "
                          f"max {r['lag_max_s']:.2f} s; each (domain, slot) once", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
