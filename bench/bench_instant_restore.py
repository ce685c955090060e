"""Seconds from submit to a restored guest answering its agent: instant-restore against a full restore.

One tiny real guest (tests/realenv.py ``GuestDomain``) whose data disk holds
``--data-mib`` of random bytes; one full direct backup of it.  Then, from that
same backup, each round runs:

- ``instant-restore --from ID --define A``: the clock runs from submit until
  A's guest agent answers ``guest-ping`` (the guest runs while its data is
  still streamed in); the time until the workflow ends (images standalone)
  is printed too.
- baseline, ``restore --from ID --define B`` then ``virsh start B``: the clock
  runs from submit until B's agent answers.

Printed: both times per round and their ratio (instant / full: below 1 is
faster).  Everything runs through the real stack: a ``domcapture worker`` on a
private Redis prefix and queue, the CLI submitting.

Usage (root; qemu:///system, Redis, the built guest):
  PYTHONPATH=$PWD .venv/bin/python bench/bench_instant_restore.py [--data-mib 512] [--rounds 1]
      [--workdir /var/tmp] [--json out.json]
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

from tests.realenv import ENDED, GuestDomain, WorkerCluster, run  # noqa: E402


def agent_answers(uri: str, name: str) -> bool:
    return run("virsh", "-c", uri, "qemu-agent-command", name, '{"execute":"guest-ping"}', "--timeout", "1",
               check=False).returncode == 0


def wait_agent(uri: str, name: str, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while not agent_answers(uri, name):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the agent of {name} did not answer in {timeout} s")
        time.sleep(0.1)
    return time.monotonic()


def submit(cluster: WorkerCluster, *args: str) -> str:
    return str(json.loads(cluster.cli("submit", *args, "--json").stdout)["id"])


def wait_final(cluster: WorkerCluster, wf: str, timeout: float = 1800) -> dict:
    doc = cluster.wait(wf, lambda d: d["status"] in ENDED, timeout, interval=0.1)
    if doc["status"] != "succeeded":
        raise SystemExit(f"bench: workflow {wf} ended {doc['status']}: {doc.get('error')}")
    return doc


def drop(uri: str, name: str) -> None:
    run("virsh", "-c", uri, "destroy", name, check=False)
    run("virsh", "-c", uri, "undefine", name, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--redis-url", default=os.environ.get("DOMCAPTURE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="dc-bench-instant-", dir=args.workdir))
    prefix = f"dcbi-{uuid.uuid4().hex[:8]}"
    cluster = WorkerCluster(args.redis_url, args.uri, prefix, base / "logs", lease_ttl=10.0)
    guest = GuestDomain.create(args.uri, base / "guest", data_mib=args.data_mib + 64)
    names: list[str] = []
    rounds = []
    try:
        guest.wait_agent()
        guest.sh(f"dd if=/dev/urandom of=/mnt/vdb/fill bs=1M count={args.data_mib} conv=fsync 2>/dev/null",
                 timeout=600)
        target = base / "backups"
        target.mkdir()
        cluster.start_worker()
        cluster.start_recovery()
        full = wait_final(cluster, submit(cluster, "direct-backup", "--domain", guest.name, "--target",
                                          str(target), "--quiesce", "off"))
        guest.shutdown()  # the restored guests get the host to themselves
        for i in range(args.rounds):
            a, b = f"dcbench-ia{uuid.uuid4().hex[:6]}", f"dcbench-fb{uuid.uuid4().hex[:6]}"
            names += [a, b]
            (base / f"instant-{i}").mkdir()
            (base / f"full-{i}").mkdir()
            t0 = time.monotonic()
            wf = submit(cluster, "instant-restore", "--domain", guest.name, "--from", full["id"], "--define", a,
                        "--target", str(base / f"instant-{i}"))
            t_agent = wait_agent(args.uri, a) - t0
            wait_final(cluster, wf)
            t_done = time.monotonic() - t0
            drop(args.uri, a)
            t0 = time.monotonic()
            wf = submit(cluster, "restore", "--domain", guest.name, "--from", full["id"], "--define", b,
                        "--target", str(base / f"full-{i}"))
            wait_final(cluster, wf)
            run("virsh", "-c", args.uri, "start", b)
            t_full = wait_agent(args.uri, b) - t0
            drop(args.uri, b)
            rounds.append({"instant_agent_s": round(t_agent, 2), "instant_standalone_s": round(t_done, 2),
                           "full_restore_agent_s": round(t_full, 2), "ratio": round(t_agent / t_full, 3)})
            r = rounds[-1]
            print(f"round {i + 1}: instant-restore agent after {r['instant_agent_s']} s (images standalone "
                  f"after {r['instant_standalone_s']} s); restore + start agent after {r['full_restore_agent_s']} s; "
                  f"ratio {r['ratio']}", flush=True)
        ratio = statistics.median(r["ratio"] for r in rounds)
        print(f"data {args.data_mib} MiB: instant-restore reaches a running guest in {ratio:.3f} x the time of "
              f"a full restore (median of {len(rounds)})")
        if args.json:
            Path(args.json).write_text(json.dumps({"data_mib": args.data_mib, "rounds": rounds,
                                                   "median_ratio": ratio}, indent=1))
    finally:
        cluster.stop()
        for name in names:
            drop(args.uri, name)
        guest.destroy()
        subprocess.run(["rm", "-rf", str(base)], check=False)
        import redis
        r = redis.Redis.from_url(args.redis_url)
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
