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
import shlex
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
from typing import Callable, cast

from .realenv import (DiskDomain, GuestDomain, WorkerCluster, build_guest_image, counter_in_image,
                      images_identical, is_gapless_prefix, run)

FAULTS = ("worker-kill", "boundary-kill", "worker-stop", "redis-kill", "libvirtd-restart", "target-full")
# The guest's own life: its QEMU SIGKILLed (an OOM kill), an ACPI power-off, a reboot from inside,
# a pause (as on an I/O error).  The runner brings the domain back afterwards, as an operator would.
GUEST_FAULTS = ("guest-kill", "guest-poweroff", "guest-reboot", "guest-pause")
ALL_FAULTS = FAULTS + GUEST_FAULTS
BOUNDARIES = ["saved:snapshot-intent:*", "executed:snapshotting", "saved:copy-intent:*", "save:progress:copying",
              "executed:copying", "saved:commit-intent:*", "executed:committing", "saved:pivot-intent:*",
              "executed:pivoting", "executed:freezing", "saved:step-started:*", "reverted:*",
              "saved:rollback-started:*", "executed:finalizing"]
LEASE_TTL = 2.0
STRATEGIES = ("snapshot-backup", "direct-backup", "snapshot", "checkpoint", "managed-save", "save", "restore")


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


# how long a verify that finds Redis or libvirtd unreachable (exit 4) is retried: a libvirtd restart under
# load took about 20 s here (one CI run's verify gave up after 10 s)
SERVICE_BACK_WITHIN = 60.0


LIBVIRTD_STOP_WITHIN = 30.0  # then SIGKILL, as a service manager's restart does after its stop timeout


def restart_libvirtd() -> None:
    """SIGTERM libvirtd, wait until it is gone, start it again and wait until it answers.

    A libvirtd that is busy can take longer than 5 s to stop.  Starting the
    new one while the old one still holds its pid file fails, and libvirtd
    then stayed down until the next fault: in one CI run for 38 s, so a
    verify gave up on it.  A restart here really restarts.
    """
    run("pkill", "-TERM", "-x", "libvirtd", check=False)
    deadline = time.time() + LIBVIRTD_STOP_WITHIN
    while run("pgrep", "-x", "libvirtd", check=False).returncode == 0:
        if time.time() > deadline:
            run("pkill", "-KILL", "-x", "libvirtd", check=False)
        time.sleep(0.05)
    for _ in range(3):
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
    dom: DiskDomain | GuestDomain
    target: Target
    busy: str | None = None
    history: list[str] = field(default_factory=list)
    # what must run next to bring the domain back (delete a snapshot, restore a managed save, ...)
    followups: collections.deque = field(default_factory=collections.deque)
    last_backup: str | None = None  # a succeeded direct-backup, for restores


@dataclass
class Plan:
    """One workflow to submit: its strategy, arguments, and what to queue once it succeeded."""

    strategy: str
    args: list[str]
    label: str
    then: "Callable[[str], list[Plan]] | None" = None  # workflow id -> follow-ups
    reference: bool = False  # a full disk image to compare with the disk domain's reference


def _plans(rng: random.Random, s: "Subject") -> list[Plan]:
    """The capture menu for a subject: every strategy of the guide, with its way back."""
    quiet = s.kind == "disk"
    q = ["--quiesce", "off" if quiet else "require"]
    tgt = ["--target", str(s.target.path)]
    plans = [
        Plan("snapshot-backup", tgt + q + ["--bandwidth", rng.choice(["8M", "16M", "32M"])], "snapshot-backup",
             reference=True),
        Plan("direct-backup", tgt + q + ["--mode", rng.choice(["push", "pull"])], "direct-backup full",
             reference=True),
        Plan("direct-backup", tgt + q + ["--mode", rng.choice(["push", "pull"]), "--incremental"],
             "direct-backup incremental"),
        Plan("snapshot", ["--kind", "internal"], "snapshot internal",
             then=lambda wf: [Plan("snapshot-delete", ["--name", f"domcapture-{wf}"], "snapshot-delete")]),
        Plan("snapshot", ["--kind", "external", "--target", str(s.target.path)] + q, "snapshot external",
             then=lambda wf: [Plan("snapshot-delete", ["--name", f"domcapture-{wf}"], "snapshot-delete")]),
        Plan("checkpoint", ["--action", "create"], "checkpoint create",
             then=lambda wf: [Plan("checkpoint", ["--action", "delete", "--checkpoint", f"domcapture-{wf}"],
                                   "checkpoint delete")]),
        Plan("managed-save", [], "managed-save",
             then=lambda wf: [Plan("managed-save-restore", [], "managed-save-restore")]),
        Plan("save", tgt, "save",
             then=lambda wf: [Plan("save-restore", ["--from", wf], "save-restore")]),
    ]
    if s.last_backup:
        plans.append(Plan("restore", ["--from", s.last_backup, "--target", str(s.target.path)], "restore"))
    return plans


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
        self.operator: dict[str, dict] = {}  # needs_attention id -> {"command", "reason", "outcome"}
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

    def next_plan(self, s: Subject) -> Plan:
        if s.followups:
            return s.followups[0]
        return self.rng.choice([p for p in _plans(self.rng, s) if p.strategy in self.args.strategies])

    def submit(self, s: Subject, plan: Plan | None = None) -> None:
        # leave the tmpfs target room for its fault: clean earlier captures there
        if s.target.small and not s.followups:
            for p in s.target.path.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        plan = plan or self.next_plan(s)
        out = self.cli("submit", plan.strategy, "--domain", s.dom.name, *plan.args, "--json")
        if out.returncode != 0:
            self.note(f"submit {plan.label} for {s.dom.name} refused ({out.returncode}): {out.stderr.strip()}")
            if s.followups and out.returncode == 2:
                s.followups.popleft()  # nothing left to undo (e.g. the capture's object is gone)
            return
        wf = json.loads(out.stdout)["id"]
        ref = dict(cast(DiskDomain, s.dom).references) if s.kind == "disk" and plan.reference else None
        self.workflows[wf] = {"strategy": plan.strategy, "label": plan.label, "subject": s, "reference": ref,
                              "plan": plan}
        s.busy = wf
        s.history.append(wf)
        self.note(f"submitted {wf} {plan.label} {s.dom.name} {' '.join(plan.args)}")

    def ended(self, s: Subject, wf: str, doc: dict) -> None:
        """A subject's workflow ended: check what it captured now, queue what undoes it."""
        meta = self.workflows[wf]
        plan: Plan = meta["plan"]
        self.note(f"{wf} {meta['label']} ended {doc['status']}")
        if s.followups and s.followups[0] is plan:
            if doc["status"] == "succeeded":
                s.followups.popleft()
            elif doc["status"] == "needs_attention":
                s.followups.popleft()  # an operator's job now: the invariants will say what is left
        if doc["status"] != "succeeded":
            return
        self.verified[wf] = self.verify_capture(wf, doc)
        if plan.strategy == "direct-backup":
            s.last_backup = wf
        if plan.then:
            s.followups.extend(plan.then(wf))

    def status(self, wf: str) -> dict | None:
        out = self.cli("show", wf, "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def workload(self, until: float) -> None:
        while time.time() < until:
            for s in self.subjects:
                if s.busy:
                    doc = self.status(s.busy)
                    if doc and doc["status"] in ("succeeded", "rolled_back", "partially_rolled_back",
                                                 "needs_attention", "failed"):
                        self.ended(s, s.busy, doc)
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
        elif kind in GUEST_FAULTS:
            s = self.rng.choice(self.subjects)
            self.guest_fault(kind, s)
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

    def guest_fault(self, kind: str, s: "Subject") -> None:
        """A guest fault on ``s``, then the domain brought back (started, resumed) a moment later."""
        name = s.dom.name
        if s.dom.state() not in ("running", "paused"):
            return
        if kind == "guest-kill":
            with open(f"/run/libvirt/qemu/{name}.pid") as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        elif kind == "guest-poweroff":
            s.dom.virsh("destroy", name, "--graceful", check=False) if s.kind == "disk" else \
                s.dom.virsh("shutdown", name, "--mode", "agent", check=False)
        elif kind == "guest-reboot" and s.kind == "guest":
            s.dom.virsh("reboot", name, "--mode", "agent", check=False)
        elif kind == "guest-pause":
            s.dom.virsh("suspend", name, check=False)
        time.sleep(2.0)
        state = s.dom.state()
        if state == "paused":
            s.dom.virsh("resume", name, check=False)
        elif state == "shut off" and not self.shut_off_by_us(s):
            for _ in range(50):  # a managed save or a capture may hold it a moment
                if s.dom.virsh("start", name, check=False) or s.dom.state() == "running":
                    break
                time.sleep(0.2)

    def shut_off_by_us(self, s: "Subject") -> bool:
        """Whether a managed save of ours holds the domain shut off: starting it would consume the saved
        state (libvirt restores from the image), which no operator bringing back a crashed guest would do."""
        return "Managed save:   yes" in s.dom.virsh("dominfo", s.dom.name, check=False)

    def fault_loop(self) -> None:
        while not self.stop_faults.wait(self.rng.uniform(*self.args.fault_interval)):
            kind = self.rng.choice(self.args.faults)
            try:
                self.inject(kind)
            except Exception as exc:  # the runner must outlive its own faults
                self.note(f"fault {kind} raised {exc!r}")

    # -- the end ---------------------------------------------------------------------
    def drain(self, timeout: float) -> None:
        """Without faults: let every workflow end, then run the follow-ups that bring domains back."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.supervise()
            for s in self.subjects:
                if s.busy:
                    doc = self.status(s.busy)
                    if doc and doc["status"] in ("succeeded", "rolled_back", "partially_rolled_back",
                                                 "needs_attention", "failed"):
                        self.ended(s, s.busy, doc)
                        s.busy = None
                if not s.busy and s.followups:
                    self.submit(s, s.followups[0])
            if not any(s.busy or s.followups for s in self.subjects):
                return
            time.sleep(0.5)

    def operator_acts(self, timeout: float) -> None:
        """The faults over, an operator runs the command each ``needs_attention`` workflow suggests (once),
        as it is written there; ``check`` then says whether that ended it."""
        for wf in self.workflows:
            doc = self.status(wf)
            if not doc or doc["status"] != "needs_attention":
                continue
            command = (doc.get("attention") or {}).get("command") or ""
            argv = shlex.split(command)
            self.operator[wf] = {"command": command, "reason": (doc.get("attention") or {}).get("reason")}
            if argv[:1] != ["domcapture"]:
                self.operator[wf]["outcome"] = "no domcapture command suggested"
                continue
            out = self.cli(*argv[1:])
            self.note(f"operator: {command} -> {out.returncode} {(out.stdout + out.stderr).strip()[-200:]}")
            deadline = time.time() + timeout
            while time.time() < deadline:
                self.supervise()
                doc = self.status(wf)
                if doc and doc["status"] not in ("running", "queued"):
                    break
                time.sleep(0.5)
            self.operator[wf]["outcome"] = doc["status"] if doc else "LOST"

    def check(self) -> list[tuple[str, int, list[str]]]:
        """Every invariant, with the number of subjects checked and what violated it."""
        rows = []
        docs = {wf: self.status(wf) for wf in self.workflows}

        bad = [f"{wf}: {d['status'] if d else 'LOST'}/{d['state'] if d else ''}" for wf, d in docs.items()
               if not d or d["status"] not in ("succeeded", "rolled_back", "partially_rolled_back", "needs_attention")
               or (d["status"] == "needs_attention" and not (d.get("attention") or {}).get("reason"))]
        rows.append(("every workflow terminal (none lost, none running)", len(docs), bad))

        bad = [f"{wf}: `{o['command']}` (for: {o['reason']}) left it {o.get('outcome')}"
               for wf, o in self.operator.items()
               if o.get("outcome") not in ("rolled_back", "partially_rolled_back", "succeeded")]
        rows.append(("the command a needs_attention workflow suggests ends it", len(self.operator), bad))

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

        bad = []
        for s in self.subjects:
            if s.kind != "guest":
                continue
            try:
                if cast(GuestDomain, s.dom).frozen():
                    bad.append(s.dom.name)
            except subprocess.CalledProcessError as exc:  # no agent answer: the state cannot be told
                bad.append(f"{s.dom.name}: the guest agent did not answer ({s.dom.state()}): "
                           f"{(exc.stderr or '').strip()[:120]}")
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
            if d and d["status"] == "succeeded":
                checked += 1
                bad += self.verified.get(wf, [f"{wf}: succeeded but never verified"])
        rows.append(("every succeeded capture verifies (backups against their reference)", checked, bad))

        bad = []
        for s in self.subjects:
            snaps = s.dom.virsh("snapshot-list", s.dom.name, "--name", check=False).split()
            bad += [f"{s.dom.name}: snapshot {n} left" for n in snaps if n.startswith("domcapture-")]
            if "Managed save:   yes" in s.dom.virsh("dominfo", s.dom.name, check=False):
                bad.append(f"{s.dom.name}: managed save image left")
            if s.dom.state() != "running":
                bad.append(f"{s.dom.name}: {s.dom.state()} at the end")
        rows.append(("every domain running, no snapshot or managed save of ours left", len(self.subjects), bad))

        bad = []
        for s in self.subjects:
            listed = self.cli("checkpoints", "--domain", s.dom.name, "--json")
            if listed.returncode != 0:
                bad.append(f"{s.dom.name}: checkpoints: {listed.stderr.strip()}")
                continue
            for cp in json.loads(listed.stdout)["checkpoints"]:
                if cp["state"] == "committed" and not cp["in_libvirt"] and not cp["broken"]:
                    bad.append(f"{s.dom.name}: {cp['name']} committed in our store, missing in libvirt")
                elif cp["state"] in ("not-ours", "pending") and cp["in_libvirt"]:
                    bad.append(f"{s.dom.name}: {cp['name']} in libvirt but {cp['state']} in our store")
        rows.append(("checkpoints in libvirt match our store", len(self.subjects), bad))

        bad = []
        for wf, d in docs.items():
            if not d:
                continue
            # an effect step that completed twice without its probe seeing the first; a state the
            # table sends the workflow back to (refreeze, recommit) may legitimately run once more
            steps_done = [e for e in d["history"] if e["event"] == "step-done"]
            done = collections.Counter(e.get("step") for e in steps_done
                                       if not e.get("already_done") and e.get("trigger") == "advance")
            allowed = collections.Counter(e["state"] for e in steps_done if e.get("trigger") != "advance")
            twice = [step for step, n in done.items() if n > 1 + allowed[step]]
            if twice:
                bad.append(f"{wf}: {', '.join(twice)} completed more than once")
        rows.append(("no effect applied twice in one workflow", len(docs), bad))

        bad = []
        for wf, d in docs.items():
            if not d:
                continue
            stands = [e for e in d["history"] if e["event"] == "effect-stands"]
            data = d.get("data") or {}
            if d["status"] == "rolled_back":
                why = []
                if stands:
                    why.append("an effect-stands event")
                if d["strategy"] == "snapshot-revert" and "revert_started_at" in data:
                    why.append("its revert was issued")
                if d["strategy"] == "save-restore" and data.get("committed"):
                    why.append("its rewind was committed")
                if why:
                    bad.append(f"{wf}: rolled_back although {', '.join(why)}")
            if d["status"] == "partially_rolled_back" and not (d.get("result") or {}).get("effects_standing"):
                bad.append(f"{wf}: partially_rolled_back without the effects that stand")
        rows.append(("rolled_back only where nothing of the workflow remains", len(docs), bad))
        return rows

    def verify_capture(self, wf: str, d: dict) -> list[str]:
        """Right after it succeeded: ``domcapture verify``, and full disk images against their reference."""
        deadline = time.time() + SERVICE_BACK_WITHIN
        while True:  # Redis or libvirtd may be down for a while (a fault): exit 4, try again
            v = self.cli("verify", wf)
            if v.returncode != 4 or time.time() > deadline:
                break
            time.sleep(0.5)
        if v.returncode != 0:
            return [f"{wf}: verify failed ({v.returncode}): {(v.stdout + v.stderr).strip()[-200:]}"]
        bad: list[str]
        meta, bad = self.workflows[wf], []
        plan: Plan = meta["plan"]
        if not plan.reference:
            return bad
        files = d["result"]["files"]
        if meta["reference"]:
            for t, ref in meta["reference"].items():
                if not images_identical(files[t]["path"], ref):
                    bad.append(f"{wf}: {plan.label} of {t} differs from the disk at capture time")
        elif "vdb" in files:
            quiesced = bool(d["result"].get("quiesced"))
            numbers, verdict = counter_in_image(files["vdb"]["path"], self.workdir / "scratch",
                                                replay_journal=not quiesced)
            if not numbers or not is_gapless_prefix(numbers):
                bad.append(f"{wf}: the guest's log in the {plan.label} is not a gapless prefix")
            if quiesced and not verdict.startswith("rc=0"):
                bad.append(f"{wf}: quiesced {plan.label} needs fsck: {verdict[:120]}")
        return bad

    # -- the table ---------------------------------------------------------------------
    def report(self, rows: list[tuple[str, int, list[str]]]) -> int:
        docs = {wf: self.status(wf) for wf in self.workflows}
        per: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for wf, meta in self.workflows.items():
            d = docs[wf]
            per[meta["strategy"]][d["status"] if d else "LOST"] += 1
        print(f"\nchaos run: seed {self.args.seed}, {self.args.duration:.0f} s, {self.args.workers} workers, "
              f"{len(self.subjects)} domains; logs in {self.workdir}")
        print("\nworkflows per strategy")
        print(f"  {'strategy':<18} {'total':>5} {'succeeded':>9} {'rolled_back':>11} {'needs_att':>9} {'other':>5}")
        for strat, c in sorted(per.items()):
            other = sum(v for k, v in c.items()
                        if k not in ("succeeded", "rolled_back", "partially_rolled_back", "needs_attention"))
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
            self.operator_acts(self.args.drain_timeout)
            rows = self.check()
            violations = self.report(rows)
            if violations:  # keep the logs and Redis' AOF of a failed run, to read what happened
                self.args.keep = True
                print(f"violations found: the work folder {self.workdir} is kept")
            return violations
        finally:
            self.teardown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--duration", type=float, default=600, help="seconds of workload with faults")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--disk-domains", type=int, default=3)
    ap.add_argument("--guests", type=int, default=1)
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help=f"comma-separated subset of {','.join(ALL_FAULTS)} (default: the first six)")
    ap.add_argument("--fault-interval", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"))
    ap.add_argument("--drain-timeout", type=float, default=240)
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma-separated subset of the strategies to run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, backups)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    args.strategies = [x for x in args.strategies.split(",") if x]
    unknown = set(args.faults) - set(ALL_FAULTS)
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
