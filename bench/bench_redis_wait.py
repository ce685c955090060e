"""What an intent's durability costs: a record save with and without ``WAIT 1`` (docs/redis-ha.md).

It starts its own Sentinel set on loopback (three redis-servers with AOF and ``appendfsync always``,
three sentinels; ``workers.chaos.services.SentinelSet``), connects through the sentinels as every
process does, and times ``Store.save`` of one record: progress saves (no WAIT) and intent saves
(``durable=True``: the script and ``WAIT 1 <timeout>`` in one round trip).  It also times how long
a client command takes across a failover (primary SIGKILLed, data folder removed).

Usage: .venv/bin/python bench/bench_redis_wait.py [--saves N] [--failovers N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from workers.chaos.services import SentinelSet
from workflows.record import Record, new_id
from workflows.store import Store


def timed_saves(store: Store, n: int) -> tuple[list[float], list[float]]:
    """``n`` progress saves (no WAIT) and ``n`` intent saves (WAIT 1), interleaved so that both meet
    the same disk and the same load; milliseconds each."""
    recs = []
    for _ in range(2):
        rec = Record(id=new_id(), strategy="snapshot-backup", definition_version=1, domain=f"bench-{new_id()}",
                     uri="qemu:///system", params={"target": "/tmp"}, state="preflight")
        store.create(rec)
        lease = store.acquire_lease(rec.id, "bench", 600)
        assert lease is not None
        recs.append((rec, lease))
    out: tuple[list[float], list[float]] = ([], [])
    try:
        for i in range(n):
            for durable, (rec, lease) in ((False, recs[0]), (True, recs[1])):
                rec.data["intent"] = {"n": i, "overlay": f"/var/lib/x/{rec.id}-{i}.qcow2"}
                t0 = time.perf_counter()
                store.save(rec, "copy-intent" if durable else None, epoch=lease.epoch, durable=durable)
                out[durable].append((time.perf_counter() - t0) * 1000)
    finally:
        for _, lease in recs:
            lease.release()
    return out


def summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3), "mean_ms": round(statistics.mean(ms), 3)}


def failover_gaps(sset: SentinelSet, store: Store, n: int) -> list[dict[str, float]]:
    """Kill the primary ``n`` times; how long a client's write blocks, and when the sentinels promoted."""
    rows = []
    for i in range(n):
        dead = sset.kill_primary()
        t0 = time.monotonic()
        store.r.set("bench:after-failover", i)  # retried by the client until the new primary answers
        blocked = time.monotonic() - t0
        promoted = sset.wait_promoted(dead)
        sset.restart(dead)
        sset.wait_for(sset.settled, "the set to settle")
        rows.append({"write_blocked_s": round(blocked, 2), "promoted_within_s": round(blocked + promoted, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saves", type=int, default=2000)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-redis-wait-") as tmp:
        sset = SentinelSet(Path(tmp))
        sset.start()
        try:
            store = Store.from_url(sset.url, "bench", replica_acks=1, ack_timeout=1.0)
            timed_saves(store, 50)  # warm-up: scripts loaded, connections open
            plain_ms, durable_ms = timed_saves(store, args.saves)
            plain, durable = summary(plain_ms), summary(durable_ms)
            gaps = failover_gaps(sset, store, args.failovers)
        finally:
            sset.stop()
    doc: dict[str, Any] = {"save_without_wait": plain, "save_with_wait_1": durable,
                           "extra_ms_median": round(durable["median_ms"] - plain["median_ms"], 3),
                           "failovers": gaps, "setup": "loopback, 3 redis-server 7.0 (AOF, appendfsync always), "
                                                        "3 sentinels, down-after-milliseconds 1000"}
    print(json.dumps(doc, indent=2))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
