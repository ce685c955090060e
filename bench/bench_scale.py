"""What the operator's views cost with 10,000 to 1,000,000 workflows in the store.

``seed``: writes COUNT real-shaped workflows through the store's own API (``Store.create``,
``Store.save``, the compaction of a finished record): the record of a
``direct-backup`` the engine ran to the end on the in-memory hypervisor, cloned under new
ids over 1,000 domains on 100 hosts; about 1 % of the domains hold a workflow that is not
final (running, queued, failed, needs_attention: one per domain at most, as the domain lock
wants), the others are succeeded (95 %) or rolled back.  A seeded history holds two events
(submitted, the final write); the engine's template run, with its whole history, is measured
and printed as the bytes of one real finished workflow.

``measure``: times, on the same store, from this process (the library call) and through the
real surfaces (``domcapture list`` as a command, ``domcapture web`` over HTTP):
``list`` first page, ``list --status running``, ``backups --domain D``, the console's first
page and domains page, a ``/metrics`` scrape, and Redis bytes per finished workflow
(``MEMORY USAGE`` of its keys, and the server's ``used_memory`` over the workflow count,
indexes included).

Usage:
  .venv/bin/python bench/bench_scale.py seed --count N --redis-url URL [--prefix P] [--procs 2]
  .venv/bin/python bench/bench_scale.py measure --redis-url URL [--prefix P] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import redis
from redis.commands.core import Script

from workflows import strategies
from workflows.backups import catalog
from workflows.engine import Engine
from workflows.indexes import cap_history, pack
from workflows.hypervisor.base import Hypervisor
from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import (FAILED, NEEDS_ATTENTION, QUEUED, ROLLED_BACK, RUNNING, SUCCEEDED, Record, new_id)
from workflows.service import Captures
from workflows.store import Store

DOMAINS, HOSTS = 1000, 100
DOMCAPTURE = os.path.join(os.path.dirname(sys.executable), "domcapture")


def uri_of(h: int) -> str:
    return f"qemu+ssh://host{h:03d}.example/system"


def template() -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """A direct-backup the engine ran to the end on the in-memory hypervisor: its record, its history,
    and its bytes in Redis once finished (compacted: ``MEMORY USAGE`` of its keys)."""
    client = redis.Redis.from_url(os.environ.get("BENCH_TEMPLATE_REDIS", "redis://127.0.0.1:6379/0"))
    prefix = f"bench-scale-tpl-{new_id()[:6]}"
    store = Store(client, prefix)
    with tempfile.TemporaryDirectory() as work:
        disk = os.path.join(work, "disk.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(64 * 1024))
        fake = FakeHypervisor("fake:///h")
        fake.add_domain("tpl", {"vda": disk, "vdb": disk}, agent=True)

        def factory(uri: str) -> Hypervisor:
            return fake
        captures = Captures(store, factory, lambda rec: None)
        rec = captures.submit("direct-backup", "tpl", "fake:///h", {"target": work, "quiesce": "try"})
        Engine(store, strategies.DEFINITIONS, factory, "bench", lease_ttl=30).run(rec.id)
        done = store.load(rec.id)
        assert done.status == SUCCEEDED, done.status
        doc, hist = done.to_dict(), store.history(rec.id)
        nbytes = sum(int(client.memory_usage(k) or 0) for k in client.scan_iter(f"{prefix}:wf:{rec.id}*"))
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    return doc, hist, nbytes


class SeedStore(Store):
    """The store's own create and save, their scripts queued on a pipeline (sent ``BATCH`` records at a
    time) instead of one round trip each: a seeded record goes through the same Lua as a real one.
    Only for seeding, where every write is known to succeed (new ids; a domain's busy workflow last)."""

    pipe: Any = None

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        if self.pipe is not None:
            if isinstance(fn, Script):
                fn(keys=kw["keys"], args=kw["args"], client=self.pipe)
                return [b"ok", b"1"]
            if getattr(fn, "__func__", None) is Store._script:
                args[0](keys=kw["keys"], args=kw["args"], client=self.pipe)
                return [b"ok", b"1"]
        return super()._call(fn, *args, **kw)

    def _compact(self, rec: Record) -> None:
        self.finished.append(rec)  # after the batch is written (the compaction checks what it reads)

    finished: list[Record] = []

    def flush(self) -> None:
        self.pipe.execute()
        ix, done = self.indexes, self.finished
        self.finished = []
        read = self.r.pipeline(transaction=False)
        for rec in done:
            read.lrange(self._k(rec.id, ":history"), 0, -1)
        write = self.r.pipeline(transaction=False)
        for rec, events in zip(done, read.execute(), strict=True):
            kept = cap_history(list(events))
            ix._compact(keys=[self._k(rec.id), self._k(rec.id, ":history")],
                        args=[str(rec.rev), len(events), pack(rec.to_dict()), pack([json.loads(e) for e in kept])],
                        client=write)
        write.execute()


BATCH = 500


def _seed_part(args: tuple[str, str, int, int, int, dict[str, Any], list[dict[str, Any]]]) -> int:
    url, prefix, start, stop, total, doc, hist = args
    store = SeedStore(redis.Redis.from_url(url), prefix)
    store.finished = []
    store.pipe = store.r.pipeline(transaction=False)
    rng = random.Random(start)
    base = time.time() - total * 30.0
    busy_every = 97  # ~1 % of domains hold a workflow that is not final
    for i in range(start, stop):
        d = i % DOMAINS
        last_of_domain = i >= total - DOMAINS
        rec = Record.from_dict({**doc, "id": f"{i:08x}{rng.getrandbits(32):08x}", "domain": f"vm-{d:04d}",
                                "uri": uri_of(d % HOSTS), "status": QUEUED, "state": "preflight",
                                "created_at": base + i * 30.0, "rev": 0, "epoch": 0, "worker": None})
        store.create(rec)
        if last_of_domain and d % busy_every == 0:
            status = (RUNNING, QUEUED, FAILED, NEEDS_ATTENTION)[(d // busy_every) % 4]
        else:
            status = ROLLED_BACK if rng.random() < 0.05 else SUCCEEDED
        if status != QUEUED:
            body = {**doc, "id": rec.id, "domain": rec.domain, "uri": rec.uri, "created_at": rec.created_at,
                    "status": status, "rev": 1}
            if status != SUCCEEDED:
                body.update(state="copying", result={})
            final = Record.from_dict(body)
            final.rev = 1
            store.save(final, "step-done", epoch=0, step="finishing")
        if (i - start) % BATCH == BATCH - 1:
            store.flush()
    store.flush()
    return stop - start


def cmd_seed(args: argparse.Namespace) -> None:
    doc, hist, nbytes = template()
    t0 = time.perf_counter()
    n, procs = args.count, args.procs
    head = max(0, n - DOMAINS)  # the last workflow of each domain (the ones that may stay busy): written last
    bounds = [(head * k // procs, head * (k + 1) // procs) for k in range(procs)]
    parts = [(args.redis_url, args.prefix, a, b, n, doc, hist) for a, b in bounds]
    done = 0
    with multiprocessing.Pool(procs) as pool:
        for chunk in pool.imap_unordered(_seed_part, [(u, p, a + s, min(a + s + 20000, b), t, d, h)
                                                      for (u, p, a, b, t, d, h) in parts
                                                      for s in range(0, b - a, 20000)]):
            done += chunk
            if done % 100_000 < 20000:
                print(f"  seeded {done}/{n} ({time.perf_counter() - t0:.0f}s)", flush=True)
    done += _seed_part((args.redis_url, args.prefix, head, n, n, doc, hist))
    print(f"seeded {n} workflows in {time.perf_counter() - t0:.1f}s (each a copy of an engine-run direct-backup "
          f"record; the engine's own run: {len(hist)} events, {nbytes} bytes in Redis once finished and compacted)")


def timed(fn: Any, repeat: int = 5) -> tuple[float, Any]:
    """The median of ``repeat`` runs (seconds) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def http(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as r:
        return bytes(r.read())


def cmd_measure(args: argparse.Namespace) -> None:
    client = redis.Redis.from_url(args.redis_url)
    store = Store(client, args.prefix)
    count = int(client.zcard(f"{args.prefix}:index"))
    res: dict[str, Any] = {"workflows": count}
    ix = store.indexes
    res["list_first_page_s"], pg = timed(lambda: ix.page(limit=100))
    assert len(pg.entries) == min(100, count)
    res["list_running_s"], pg = timed(lambda: ix.page(status=RUNNING, limit=100))
    res["running"] = len(pg.entries)
    dom, uri = "vm-0007", uri_of(7)
    res["backups_domain_s"], found = timed(lambda: catalog(store, uri, dom))
    res["backups_of_domain"] = len(found)
    env = {**os.environ, "DOMCAPTURE_REDIS_URL": args.redis_url, "DOMCAPTURE_PREFIX": args.prefix}
    res["list_cli_wall_s"], out = timed(lambda: subprocess.run([DOMCAPTURE, "list"], env=env, capture_output=True,
                                                               text=True, check=True), 3)
    res["cli_startup_wall_s"], _ = timed(lambda: subprocess.run([DOMCAPTURE, "list", "--help"], env=env,
                                                                capture_output=True, check=True), 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = subprocess.Popen([DOMCAPTURE, "web", "--no-auth", "--bind", f"127.0.0.1:{port}"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                http(f"http://127.0.0.1:{port}/login")
                break
            except OSError:
                time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        t = time.perf_counter()
        http(f"{base}/metrics")
        res["metrics_first_scrape_s"] = time.perf_counter() - t
        res["metrics_scrape_s"], body = timed(lambda: http(f"{base}/metrics"))
        res["metrics_bytes"] = len(body)
        res["console_first_page_s"], body = timed(lambda: http(f"{base}/"))
        assert b"older workflows" in body or count <= 100
        res["console_domains_page_s"], _ = timed(lambda: http(f"{base}/domains"))
    finally:
        web.terminate()
        web.wait()
    sample = [m.decode() for m in client.zrange(f"{args.prefix}:ix:status:{SUCCEEDED}", 0, 199)]
    per = []
    for wf_id in sample:
        per.append(sum(int(client.memory_usage(k) or 0) for k in
                       (f"{args.prefix}:wf:{wf_id}", f"{args.prefix}:wf:{wf_id}:history",
                        f"{args.prefix}:wf:{wf_id}:epoch")))
    res["finished_record_bytes"] = statistics.mean(per)
    info = client.info("memory")
    res["used_memory_per_workflow"] = int(info["used_memory"]) / max(count, 1)
    print(json.dumps(res, sort_keys=True))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--redis-url", required=True)
    s.add_argument("--prefix", default="dc")
    s.add_argument("--procs", type=int, default=2)
    s.set_defaults(func=cmd_seed)
    s = sub.add_parser("measure")
    s.add_argument("--redis-url", required=True)
    s.add_argument("--prefix", default="dc")
    s.add_argument("--out")
    s.set_defaults(func=cmd_measure)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
