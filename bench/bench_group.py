"""The freeze window of a consistency group: first member frozen to last member thawed.

Four tiny real guests (tests/realenv.py ``GuestDomain``, each with its agent and its writer).  Each round
submits ``group-backup --quiesce require`` over the first 2, then over all 4, and reads the window the
group's manifest records: the freeze window (first freeze to last thaw: how long the slowest member was
held), the point spread (first point's start to last point's end) and the whole workflow's wall time.
Printed: each round, then the median of the rounds per group size.  Everything runs through the real
stack: a ``domcapture worker`` on a private Redis prefix and queue, the CLI submitting.

Usage (root; qemu:///system, Redis, the built guest):
  PYTHONPATH=$PWD .venv/bin/python bench/bench_group.py [--rounds 5] [--workdir /var/tmp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.realenv import ENDED, GuestDomain, WorkerCluster  # noqa: E402


def one_group(cluster: WorkerCluster, guests: list[GuestDomain], target: Path) -> dict[str, float]:
    t0 = time.monotonic()
    out = cluster.cli("submit", "group-backup", "--group", f"bench{len(guests)}", "--domains",
                      ",".join(g.name for g in guests), "--target", str(target), "--quiesce", "require", "--json")
    wf = json.loads(out.stdout)["id"]
    doc = cluster.wait(wf, lambda d: d["status"] in ENDED, 600, interval=0.1)
    if doc["status"] != "succeeded":
        raise SystemExit(f"bench: group {wf} ended {doc['status']}: {doc.get('error')}")
    window = json.loads(Path(doc["result"]["manifest"]).read_text())["window"]
    return {"freeze_window_s": round(window["last_thaw"] - window["first_freeze"], 3),
            "point_spread_s": round(window["last_point"] - window["first_point"], 3),
            "wall_s": round(time.monotonic() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--redis-url", default=os.environ.get("DOMCAPTURE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="dc-bench-group-", dir=args.workdir))
    prefix = f"dcbg-{uuid.uuid4().hex[:8]}"
    cluster = WorkerCluster(args.redis_url, args.uri, prefix, base / "logs", lease_ttl=10.0)
    guests: list[GuestDomain] = []
    figures: dict[int, list[dict[str, float]]] = {2: [], 4: []}
    try:
        guests = [GuestDomain.create(args.uri, base / f"guest{i}") for i in range(4)]
        for g in guests:
            g.wait_agent()
        cluster.start_worker()
        for i in range(args.rounds):
            for size in (2, 4):
                target = base / f"bk-{size}-{i}"
                target.mkdir()
                r = one_group(cluster, guests[:size], target)
                figures[size].append(r)
                print(f"round {i + 1}, {size} members: freeze window {r['freeze_window_s']} s, point spread "
                      f"{r['point_spread_s']} s, workflow {r['wall_s']} s", flush=True)
                subprocess.run(["rm", "-rf", str(target)], check=False)
        summary = {size: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for size, rs in figures.items()}
        for size, s in summary.items():
            print(f"{size} members: freeze window median {s['freeze_window_s']:.3f} s, point spread "
                  f"{s['point_spread_s']:.3f} s, workflow {s['wall_s']:.2f} s (median of {args.rounds})")
        if args.json:
            Path(args.json).write_text(json.dumps({"rounds": figures, "median": summary}, indent=1))
    finally:
        cluster.stop()
        for g in guests:
            g.destroy()
        subprocess.run(["rm", "-rf", str(base)], check=False)
        import redis
        r = redis.Redis.from_url(args.redis_url)
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
