"""Chaos runner: many workflows, several workers, the recovery process, and faults.

    .venv/bin/python -m tests.chaos --seed 7 --duration 600 [--workers 3] [--disk-domains 3] [--guests 2]

It starts its own redis-server (AOF, appendfsync always) on a free port, a
set of throwaway domains (no-OS QEMU domains with disks of known content, and
tiny real guests with an agent and a writer), worker processes and the
recovery process.  It keeps every domain busy with capture workflows, and on
a seeded schedule injects:

- ``worker-kill``      SIGKILL of a random worker (a supervisor restarts it);
- ``boundary-kill``    a worker that SIGKILLs itself at a random state boundary;
- ``worker-stop``      SIGSTOP of a worker until its lease has expired, then SIGCONT;
- ``redis-kill``       SIGKILL of redis-server, restarted a second later;
- ``libvirtd-restart`` SIGTERM of libvirtd and a restart, mid block job or copy;
- ``target-full``      the small target filesystem (tmpfs) of a running copy fills up.

At the end it stops injecting, lets every workflow end, checks the invariants
and prints them as a table.  The exit code is the number of violations (0:
none).  A failing run is reproduced by its seed: the schedule and every
random choice come from it (process timing still varies).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .realenv import (DiskDomain, GuestDomain, WorkerCluster, build_guest_image, counter_in_image,
                      images_identical, is_gapless_prefix, run)

FAULTS = ("worker-kill", "boundary-kill", "worker-stop", "redis-kill", "libvirtd-restart", "target-full")
BOUNDARIES = ["saved:snapshot-intent:*", "executed:snapshotting", "saved:copy-intent:*", "save:progress:copying",
              "executed:copying", "saved:commit-intent:*", "executed:committing", "saved:pivot-intent:*",
              "executed:pivoting", "executed:freezing", "saved:step-started:*", "reverted:*",
              "saved:rollback-started:*", "executed:finalizing"]
LEASE_TTL = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of our own, so killing it hurts no one else."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.dir / "redis.log", "a"), stderr=subprocess.STDOUT)
        for _ in range(100):
            if run("redis-cli", "-p", str(self.port), "ping", check=False).stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def restart_libvirtd() -> None:
    run("pkill", "-TERM", "-x", "libvirtd", check=False)
    for _ in range(100):
        if run("pgrep", "-x", "libvirtd", check=False).returncode != 0:
            break
        time.sleep(0.05)
    subprocess.run(["/usr/sbin/libvirtd", "-d"], check=False)
    for _ in range(100):
        if run("virsh", "-c", "qemu:///system", "version", check=False).returncode == 0:
            return
        time.sleep(0.1)


@dataclass
class Target:
    """Where a domain's captures go; a small tmpfs for the target-full fault."""

    path: Path
    small: bool = False

    def mount(self, size_mib: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", f"size={size_mib}M", "tmpfs", str(self.path))
        self.small = True

    def unmount(self) -> None:
        if self.small:
            run("umount", "-l", str(self.path), check=False)


@dataclass
class Subject:
    kind: str  # disk | guest
    dom: object
    target: Target
    busy: str | None = None
    history: list[str] = field(default_factory=list)


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{args.seed}-", dir="/var/tmp"))
        self.redis = Redis(self.workdir / "redis")
        self.cluster: WorkerCluster | None = None
        self.subjects: list[Subject] = []
        self.faults: collections.Counter = collections.Counter()
        self.workflows: dict[str, dict] = {}  # id -> {"strategy", "subject", "reference"}
        self.verified: dict[str, list[str]] = {}  # backups checked before their target was cleared
        self.stop_faults = threading.Event()
        self.lock = threading.Lock()
        self.log = open(self.workdir / "chaos.log", "w")

    def note(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        self.log.write(line + "\n")
        self.log.flush()
        if self.args.verbose:
            print(line, flush=True)

    # -- set-up ------------------------------------------------------------------
    def setup(self) -> None:
        self.redis.start()
        self.cluster = WorkerCluster(self.redis.url, "qemu:///system", "chaos", self.workdir / "logs",
                                     lease_ttl=LEASE_TTL)
        for i in range(self.args.disk_domains):
            dom = DiskDomain.create("qemu:///system", self.workdir / f"disk{i}", sizes_mib={"vda": 48, "vdb": 16},
                                    random_mib=8)
            target = Target(self.workdir / f"disk{i}-backups")
            if i == 0 and "target-full" in self.args.faults:
                target.mount(64)  # room for one backup (about 33 MiB): the fault fills the rest
            else:
                target.path.mkdir()
            self.subjects.append(Subject("disk", dom, target))
        if self.args.guests:
            build_guest_image()
        for i in range(self.args.guests):
            g = GuestDomain.create("qemu:///system", self.workdir / f"guest{i}")
            target = Target(self.workdir / f"guest{i}-backups")
            target.path.mkdir()
            self.subjects.append(Subject("guest", g, target))
        for _ in range(self.args.workers):
            self.cluster.start_worker()
        self.cluster.start_recovery()
        self.note(f"set up in {self.workdir}: {len(self.subjects)} domains, {self.args.workers} workers, "
                  f"redis on {self.redis.port}")

    def teardown(self) -> None:
        if self.cluster:
            self.cluster.stop()
        for s in self.subjects:
            s.dom.destroy()
            s.target.unmount()
        self.redis.stop()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- workload --------------------------------------------------------------------
    def cli(self, *args: str) -> subprocess.CompletedProcess:
        assert self.cluster
        return subprocess.run([sys.executable, "-m", "workers.cli", *args], env=self.cluster.env,
                              capture_output=True, text=True, timeout=120)

    def submit(self, s: Subject) -> None:
        # leave the tmpfs target room for its fault: clean earlier backups there
        if s.target.small:
            for p in s.target.path.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        quiesce = "require" if s.kind == "guest" else self.rng.choice(["off", "try"])
        bandwidth = self.rng.choice(["8M", "16M", "32M"])
        args = ["submit", "snapshot-backup", "--domain", s.dom.name, "--target", str(s.target.path),
                "--quiesce", quiesce, "--bandwidth", bandwidth, "--json"]
        out = self.cli(*args)
        if out.returncode != 0:
            self.note(f"submit for {s.dom.name} refused ({out.returncode}): {out.stderr.strip()}")
            return
        wf = json.loads(out.stdout)["id"]
        ref = dict(s.dom.references) if s.kind == "disk" else None
        self.workflows[wf] = {"strategy": "snapshot-backup", "subject": s, "reference": ref, "quiesce": quiesce}
        s.busy = wf
        s.history.append(wf)
        self.note(f"submitted {wf} snapshot-backup {s.dom.name} quiesce={quiesce} bandwidth={bandwidth}")

    def status(self, wf: str) -> dict | None:
        out = self.cli("show", wf, "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def workload(self, until: float) -> None:
        while time.time() < until:
            for s in self.subjects:
                if s.busy:
                    doc = self.status(s.busy)
                    if doc and doc["status"] in ("succeeded", "rolled_back", "needs_attention", "failed"):
                        self.note(f"{s.busy} ended {doc['status']}")
                        if doc["status"] == "succeeded" and s.target.small:
                            # checked now: the next submit clears the small target
                            self.verified[s.busy] = self.verify_backup(s.busy, doc)
                        s.busy = None
                if not s.busy:
                    self.submit(s)
            self.supervise()
            time.sleep(0.5)

    def supervise(self) -> None:
        """Restart workers that died (like a service manager would)."""
        assert self.cluster
        with self.lock:
            alive = [p for p in self.cluster.workers if p.poll() is None]
            for _ in range(self.args.workers - len(alive)):
                self.cluster.start_worker()
            self.cluster.workers = [p for p in self.cluster.workers if p.poll() is None]
            if self.cluster.recovery is None or self.cluster.recovery.poll() is not None:
                self.cluster.start_recovery()

    # -- faults ----------------------------------------------------------------------
    def inject(self, kind: str) -> None:
        assert self.cluster
        with self.lock:
            live = [p for p in self.cluster.workers if p.poll() is None]
        if kind == "worker-kill" and live:
            victim = self.rng.choice(live)
            WorkerCluster.kill(victim)
        elif kind == "boundary-kill":
            pattern = self.rng.choice(BOUNDARIES)
            with self.lock:
                self.cluster.start_worker(fault=f"kill-at:{pattern}")
            self.note(f"  boundary worker armed at {pattern}")
        elif kind == "worker-stop" and live:
            victim = self.rng.choice(live)
            os.killpg(victim.pid, signal.SIGSTOP)
            time.sleep(LEASE_TTL + 1.5)
            os.killpg(victim.pid, signal.SIGCONT)
        elif kind == "redis-kill":
            self.redis.kill()
            time.sleep(1.0)
            self.redis.start()
        elif kind == "libvirtd-restart":
            restart_libvirtd()
        elif kind == "target-full":
            small = [s for s in self.subjects if s.target.small]
            if not small:
                return
            filler = small[0].target.path / "filler"
            try:
                with open(filler, "wb") as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
            except OSError:
                pass
            time.sleep(2.0)
            filler.unlink(missing_ok=True)
        else:
            return
        self.faults[kind] += 1
        self.note(f"fault {kind}")

    def fault_loop(self) -> None:
        while not self.stop_faults.wait(self.rng.uniform(*self.args.fault_interval)):
            kind = self.rng.choice(self.args.faults)
            try:
                self.inject(kind)
            except Exception as exc:  # the runner must outlive its own faults
                self.note(f"fault {kind} raised {exc!r}")

    # -- the end ---------------------------------------------------------------------
    def drain(self, timeout: float) -> None:
        deadline = time.time() + timeout
        pending = set(self.workflows)
        while pending and time.time() < deadline:
            self.supervise()
            for wf in list(pending):
                doc = self.status(wf)
                if doc and doc["status"] in ("succeeded", "rolled_back", "needs_attention", "failed"):
                    pending.discard(wf)
            time.sleep(0.5)

    def check(self) -> list[tuple[str, int, list[str]]]:
        """Every invariant, with the number of subjects checked and what violated it."""
        rows = []
        docs = {wf: self.status(wf) for wf in self.workflows}

        bad = [f"{wf}: {d['status'] if d else 'LOST'}/{d['state'] if d else ''}" for wf, d in docs.items()
               if not d or d["status"] not in ("succeeded", "rolled_back", "needs_attention")
               or (d["status"] == "needs_attention" and not (d.get("attention") or {}).get("reason"))]
        rows.append(("every workflow terminal (none lost, none running)", len(docs), bad))

        bad = []
        for s in self.subjects:
            blk = s.dom.blklist()
            on_ours = [f"{s.dom.name}/{t}: {p}" for t, p in blk.items() if "domcapture-" in os.path.basename(p)]
            left = [p.name for p in s.dom.workdir.iterdir() if "overlay" in p.name]
            bad += on_ours + [f"{s.dom.name}: leftover {x}" for x in left]
            if s.dom.blklist() != {t: str(p) for t, p in s.dom.disks.items()}:
                bad.append(f"{s.dom.name}: not on its original disks {blk}")
            for t, p in s.dom.disks.items():
                info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(p)).stdout)
                if info.get("backing-filename"):
                    bad.append(f"{s.dom.name}/{t} has a backing file: a snapshot applied twice?")
        rows.append(("no domain on an overlay of ours, no overlay file, no backing chain", len(self.subjects), bad))

        bad = [s.dom.name for s in self.subjects if s.kind == "guest" and s.dom.frozen()]
        rows.append(("no guest filesystem frozen", sum(s.kind == "guest" for s in self.subjects), bad))

        bad = []
        for s in self.subjects:
            for t in s.dom.disks:
                out = s.dom.virsh("blockjob", s.dom.name, t, "--info", check=False)
                if out.strip() and "No current block job" not in out:
                    bad.append(f"{s.dom.name}/{t}: {out.strip()}")
            job = s.dom.virsh("domjobinfo", s.dom.name, check=False)
            if "Job type:" in job and "None" not in job.split("Job type:")[1].splitlines()[0]:
                bad.append(f"{s.dom.name}: domain job {job.strip().splitlines()[0]}")
        rows.append(("no block job or backup job left", len(self.subjects), bad))

        bad = []
        checked = 0
        for wf, d in docs.items():
            if not d or d["status"] != "succeeded":
                continue
            checked += 1
            found = self.verified.get(wf)
            bad += found if found is not None else self.verify_backup(wf, d)
        rows.append(("every succeeded backup verifies against its reference", checked, bad))

        bad = []
        for wf, d in docs.items():
            if not d:
                continue
            snaps = [e for e in d["history"] if e["event"] == "step-done" and e.get("step") == "snapshotting"
                     and not e.get("already_done")]
            if len(snaps) > 1:
                bad.append(f"{wf}: snapshot taken {len(snaps)} times")
        rows.append(("no effect applied twice in one workflow", len(docs), bad))
        return rows

    def verify_backup(self, wf: str, d: dict) -> list[str]:
        """A succeeded backup: its checksums, and its content against the reference."""
        for _ in range(20):  # Redis may be down for a moment: exit 4, try again
            v = self.cli("verify", wf)
            if v.returncode != 4:
                break
            time.sleep(0.5)
        if v.returncode != 0:
            return [f"{wf}: verify failed ({v.returncode}): {(v.stdout + v.stderr).strip()[-200:]}"]
        meta, bad = self.workflows[wf], []
        files = d["result"]["files"]
        if meta["reference"]:
            for t, ref in meta["reference"].items():
                if not images_identical(files[t]["path"], ref):
                    bad.append(f"{wf}: backup of {t} differs from the disk at capture time")
        else:
            numbers, verdict = counter_in_image(files["vdb"]["path"], self.workdir / "scratch",
                                                replay_journal=not d["result"]["quiesced"])
            if not numbers or not is_gapless_prefix(numbers):
                bad.append(f"{wf}: the guest's log in the backup is not a gapless prefix")
            if d["result"]["quiesced"] and not verdict.startswith("rc=0"):
                bad.append(f"{wf}: quiesced backup needs fsck: {verdict[:120]}")
        return bad

    # -- the table ---------------------------------------------------------------------
    def report(self, rows) -> int:
        docs = {wf: self.status(wf) for wf in self.workflows}
        per = collections.defaultdict(collections.Counter)
        for wf, meta in self.workflows.items():
            d = docs[wf]
            per[meta["strategy"]][d["status"] if d else "LOST"] += 1
        print(f"\nchaos run: seed {self.args.seed}, {self.args.duration:.0f} s, {self.args.workers} workers, "
              f"{len(self.subjects)} domains; logs in {self.workdir}")
        print("\nworkflows per strategy")
        print(f"  {'strategy':<18} {'total':>5} {'succeeded':>9} {'rolled_back':>11} {'needs_att':>9} {'other':>5}")
        for strat, c in sorted(per.items()):
            other = sum(v for k, v in c.items() if k not in ("succeeded", "rolled_back", "needs_attention"))
            print(f"  {strat:<18} {sum(c.values()):>5} {c['succeeded']:>9} {c['rolled_back']:>11} "
                  f"{c['needs_attention']:>9} {other:>5}")
        print("\nfaults injected")
        for kind in self.args.faults:
            print(f"  {kind:<18} {self.faults[kind]:>5}")
        print("\ninvariants")
        total = 0
        for name, checked, bad in rows:
            total += len(bad)
            print(f"  {'OK  ' if not bad else 'FAIL'} {name:<70} checked {checked:>4}  violations {len(bad)}")
            for b in bad[:10]:
                print(f"       - {b}")
        print(f"\n{len(self.workflows)} workflows, {sum(self.faults.values())} faults, {total} violations "
              f"(seed {self.args.seed})")
        return total

    def run(self) -> int:
        self.setup()
        try:
            injector = threading.Thread(target=self.fault_loop, daemon=True)
            injector.start()
            self.workload(time.time() + self.args.duration)
            self.stop_faults.set()
            injector.join(timeout=30)
            self.note("faults stopped; draining")
            self.drain(self.args.drain_timeout)
            rows = self.check()
            return self.report(rows)
        finally:
            self.teardown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--duration", type=float, default=600, help="seconds of workload with faults")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--disk-domains", type=int, default=3)
    ap.add_argument("--guests", type=int, default=1)
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    ap.add_argument("--fault-interval", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"))
    ap.add_argument("--drain-timeout", type=float, default=180)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, backups)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("chaos: must run as root (it restarts libvirtd and mounts a tmpfs)", file=sys.stderr)
        return 2
    return min(Chaos(parse_args(argv)).run(), 125)


if __name__ == "__main__":
    sys.exit(main())
