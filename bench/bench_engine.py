"""Benchmarks, each against a baseline measured in the same run.

- record write: a fenced compare-and-set save with its history event, versus
  a plain Redis SET of the same JSON (the least any persistence would cost);
- backup copy: ``copy_resumable`` (checksum, fsync cursor, sparse holes)
  versus ``shutil.copyfile`` of the same file.

Usage: .venv/bin/python bench/bench_engine.py [--redis-url URL] [--saves N] [--mib N]
Prints one line per benchmark with both timings and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid

import redis

from workflows.filecopy import copy_resumable
from workflows.record import Record, new_id
from workflows.store import Store


def bench_saves(url: str, n: int) -> tuple[float, float]:
    client = redis.Redis.from_url(url)
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    store = Store(client, prefix)
    rec = Record(id=new_id(), strategy="snapshot-backup", definition_version=1, domain="bench",
                 uri="qemu:///system", params={"target": "/tmp"}, state="preflight")
    store.create(rec)
    lease = store.acquire_lease(rec.id, "bench", 60)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            rec.progress = {"bytes_done": i}
            store.save(rec, "step-done", epoch=lease.epoch)
        ours = time.perf_counter() - t0
        payload = json.dumps(rec.to_dict())
        t0 = time.perf_counter()
        for _ in range(n):
            client.set(f"{prefix}:baseline", payload)
        base = time.perf_counter() - t0
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    return ours, base


def bench_copy(mib: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        src = os.path.join(d, "src.img")
        with open(src, "wb") as f:
            for i in range(mib):
                f.write(os.urandom(1024 * 1024) if i % 2 else bytes(1024 * 1024))
        t0 = time.perf_counter()
        shutil.copyfile(src, os.path.join(d, "base.img"))
        os.sync()
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        copy_resumable(src, os.path.join(d, "ours.partial"), os.path.join(d, "ours.img"), offset=0,
                       on_progress=lambda a, b: None, on_durable=lambda p: None, check=lambda: None)
        ours = time.perf_counter() - t0
    return ours, base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default=os.environ.get("DOMCAPTURE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--saves", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    ours, base = bench_saves(args.redis_url, args.saves)
    print(f"record write  ours {ours / args.saves * 1e6:8.1f} us/save   baseline SET {base / args.saves * 1e6:8.1f} us"
          f"   ratio {ours / base:5.2f}x")
    ours, base = bench_copy(args.mib)
    print(f"backup copy   ours {args.mib / ours:8.1f} MiB/s        baseline copyfile {args.mib / base:8.1f} MiB/s"
          f"   ratio {ours / base:5.2f}x time")


if __name__ == "__main__":
    main()
