"""The chaos run: many workflows, several workers, the recovery process, and faults (docs/chaos.md).

It starts its own redis-server, worker processes and the recovery process,
keeps every domain busy with capture workflows of every strategy and, on a
schedule drawn from the seed, injects faults.  Then it stops injecting, lets
every workflow end, runs the command each ``needs_attention`` workflow
suggests, and checks the invariants.  The same seed replays the same fault
schedule and choices; process timing still varies.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

from .domains import (DiskDomain, Domain, GuestDomain, TaggedDomain, counter_in_image, images_identical,
                      is_gapless_prefix, run)
from .services import (Cluster, Redis, SentinelSet, Tmpfs, continue_libvirtd, restart_libvirtd,
                       stall_libvirtd)

FAULTS = ("worker-kill", "boundary-kill", "worker-stop", "redis-kill", "libvirtd-restart", "target-full")
# The guest's own life: its QEMU SIGKILLed (an OOM kill), a power-off, a reboot from inside, a pause
# (as on an I/O error).  The runner brings the domain back afterwards, as an operator would.
GUEST_FAULTS = ("guest-kill", "guest-poweroff", "guest-reboot", "guest-pause")
STALL_FAULTS = ("redis-stall", "libvirtd-stall", "overlay-dir-full")
# with --redis sentinel: the primary's machine dies (SIGKILL, data folder removed), a replica is promoted
HA_FAULTS = ("redis-failover",)
SINGLE_REDIS_FAULTS = ("redis-kill", "redis-stall")  # the run's one redis-server: not with --redis sentinel
ALL_FAULTS = FAULTS + GUEST_FAULTS + STALL_FAULTS + HA_FAULTS
FAILOVER_BACK_AFTER = 3.0  # seconds after the promotion until the dead node comes back as a replica
# faults that touch more than the run's own processes and the tagged domains: the host's libvirtd
HOST_FAULTS = ("libvirtd-restart", "libvirtd-stall")
BOUNDARIES = ["saved:snapshot-intent:*", "executed:snapshotting", "saved:copy-intent:*", "save:progress:copying",
              "executed:copying", "saved:commit-intent:*", "executed:committing", "saved:pivot-intent:*",
              "executed:pivoting", "executed:freezing", "saved:step-started:*", "reverted:*",
              "saved:rollback-started:*", "executed:finalizing"]
LEASE_TTL = 2.0
STRATEGIES = ("snapshot-backup", "direct-backup", "snapshot", "checkpoint", "managed-save", "save", "restore")
ENDED = ("succeeded", "rolled_back", "partially_rolled_back", "needs_attention", "failed")
# how long a verify that finds Redis or libvirtd unreachable (exit 4) is retried: a libvirtd restart under
# load took about 20 s here
SERVICE_BACK_WITHIN = 60.0
DOWN_LIMIT = 60.0  # a guest a fault brought down must run again within this (an invariant)
VERIFY_NOTHING_KEPT = 5  # `domcapture verify`: the workflow kept nothing to verify (workers/cli.py)
MARKER = ".domcapture-chaos"  # in a work folder the run made: it may use it again


@dataclass
class Options:
    seed: int
    duration: float = 600
    workers: int = 3
    disk_domains: int = 3
    guests: int = 1
    tagged: bool = False
    faults: list[str] = field(default_factory=lambda: list(FAULTS))
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    fault_interval: tuple[float, float] = (1.0, 4.0)
    drain_timeout: float = 240
    workdir: Path | None = None
    guest_dir: Path = Path("/var/lib/domcapture/guest")
    keep: bool = False
    verbose: bool = False
    redis: str = "single"  # or "sentinel": three redis-servers and three sentinels


@dataclass
class Subject:
    dom: Domain
    target: Path
    small_target: Tmpfs | None = None
    overlay_dir: Tmpfs | None = None
    busy: str | None = None
    # what must run next to bring the domain back (delete a snapshot, restore a managed save, ...)
    followups: collections.deque[Plan] = field(default_factory=collections.deque)
    last_backup: str | None = None  # a succeeded direct-backup, for restores

    @property
    def kind(self) -> str:
        return self.dom.kind


@dataclass
class Plan:
    """One workflow to submit: its strategy, arguments, and what to queue once it succeeded."""

    strategy: str
    args: list[str]
    label: str
    then: Callable[[str], list[Plan]] | None = None  # workflow id -> follow-ups
    reference: bool = False  # a full image: compared with the domain's reference (disk) or writer log (guest)


def plans(rng: random.Random, s: Subject) -> list[Plan]:
    """The capture menu for a subject: every strategy of the guide, with its way back."""
    q = ["--quiesce", "require" if s.kind == "guest" else ("off" if s.kind == "disk" else "try")]
    tgt = ["--target", str(s.target)]
    ovl = ["--overlay-dir", str(s.overlay_dir.path)] if s.overlay_dir else []
    menu = [
        Plan("snapshot-backup", tgt + q + ovl + ["--bandwidth", rng.choice(["8M", "16M", "32M"])], "snapshot-backup",
             reference=True),
        Plan("direct-backup", tgt + q + ["--mode", rng.choice(["push", "pull"])], "direct-backup full",
             reference=True),
        Plan("direct-backup", tgt + q + ["--mode", rng.choice(["push", "pull"]), "--incremental"],
             "direct-backup incremental"),
        Plan("snapshot", ["--kind", "internal"], "snapshot internal",
             then=lambda wf: [Plan("snapshot-delete", ["--name", f"domcapture-{wf}"], "snapshot-delete")]),
        Plan("snapshot", ["--kind", "external", "--target", str(s.target)] + q, "snapshot external",
             then=lambda wf: [Plan("snapshot-delete", ["--name", f"domcapture-{wf}"], "snapshot-delete")]),
        Plan("checkpoint", ["--action", "create"], "checkpoint create",
             then=lambda wf: [Plan("checkpoint", ["--action", "delete", "--checkpoint", f"domcapture-{wf}"],
                                   "checkpoint delete")]),
        Plan("managed-save", [], "managed-save",
             then=lambda wf: [Plan("managed-save-restore", [], "managed-save-restore")]),
        Plan("save", tgt, "save", then=lambda wf: [Plan("save-restore", ["--from", wf], "save-restore")]),
    ]
    if s.last_backup:
        menu.append(Plan("restore", ["--from", s.last_backup, "--target", str(s.target)], "restore"))
    return menu


Row = tuple[str, int, list[str]]  # invariant, subjects checked, violations


class Chaos:
    def __init__(self, opts: Options, tagged: list[TaggedDomain] | None = None) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        if opts.workdir is None:
            opts.workdir = Path(f"/var/tmp/chaos-{opts.seed}-{os.getpid()}")
        self.workdir = opts.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / MARKER).write_text(f"domcapture chaos, seed {opts.seed}\n")
        self.tagged = tagged or []
        self.redis: Redis | SentinelSet = (SentinelSet(self.workdir / "redis-ha") if opts.redis == "sentinel"
                                           else Redis(self.workdir / "redis"))
        self.cluster: Cluster | None = None
        self.subjects: list[Subject] = []
        self.faults: list[dict[str, Any]] = []  # {"kind", "at", "end", "detail"}
        self.workflows: dict[str, dict[str, Any]] = {}  # id -> {"strategy", "label", "subject", ...}
        self.operator: dict[str, dict[str, Any]] = {}  # needs_attention id -> {"command", "reason", "outcome"}
        self.verified: dict[str, list[str]] = {}  # violations found right after a capture succeeded
        self.verify_outcome: dict[str, str] = {}  # id -> verified | nothing-kept | failed
        self.downtimes: list[dict[str, Any]] = []  # a guest fault's domain: down at, up at (None: never)
        self.bring_backs: list[threading.Thread] = []
        self.stop_faults = threading.Event()
        self.lock = threading.Lock()
        self.started_at = self.ended_at = 0.0
        self.docs: dict[str, dict[str, Any] | None] = {}
        self.rows: list[Row] = []
        self.log = open(self.workdir / "chaos.log", "w")

    @property
    def fault_counts(self) -> collections.Counter[str]:
        return collections.Counter(f["kind"] for f in self.faults)

    def note(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        self.log.write(line + "\n")
        self.log.flush()
        if self.opts.verbose:
            print(line, flush=True)

    # -- set-up ------------------------------------------------------------------
    def setup(self) -> None:
        self.redis.start()
        self.cluster = Cluster(self.redis.url, self.workdir / "logs", LEASE_TTL)
        if self.opts.tagged:
            for i, t in enumerate(self.tagged):
                target = self.workdir / f"tagged{i}-backups"
                target.mkdir()
                self.subjects.append(Subject(t, target))
        else:
            for i in range(self.opts.disk_domains):
                dom = DiskDomain.create(self.workdir / f"disk{i}", sizes_mib={"vda": 48, "vdb": 16}, random_mib=8)
                self.subjects.append(Subject(dom, self.workdir / f"disk{i}-backups"))
            for i in range(self.opts.guests):
                g = GuestDomain.create(self.workdir / f"guest{i}", self.opts.guest_dir)
                self.subjects.append(Subject(g, self.workdir / f"guest{i}-backups"))
        if self.subjects and "target-full" in self.opts.faults:
            # room for about one backup of a throwaway disk domain: the fault fills the rest
            self.subjects[0].small_target = Tmpfs(self.subjects[0].target, 64 if not self.opts.tagged else 2048)
        if self.subjects and "overlay-dir-full" in self.opts.faults:
            self.subjects[-1].overlay_dir = Tmpfs(self.workdir / "overlays", 16)
        for s in self.subjects:
            s.target.mkdir(parents=True, exist_ok=True)
        for _ in range(self.opts.workers):
            self.cluster.start_worker()
        self.cluster.start_recovery()
        self.note(f"set up in {self.workdir}: {len(self.subjects)} domains, {self.opts.workers} workers, "
                  f"redis {self.redis.url}")

    def teardown(self) -> None:
        continue_libvirtd()  # never leave the host's libvirtd stopped
        self.redis.signal(signal.SIGCONT)
        if self.cluster:
            self.cluster.stop()
        for s in self.subjects:
            s.dom.destroy()  # a tagged domain is left alone
            for fs in (s.small_target, s.overlay_dir):
                if fs:
                    fs.unmount()
        self.redis.stop()
        if not self.opts.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- workload --------------------------------------------------------------------
    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.cluster
        return self.cluster.cli(*args)

    def next_plan(self, s: Subject) -> Plan:
        if s.followups:
            return s.followups[0]
        return self.rng.choice([p for p in plans(self.rng, s) if p.strategy in self.opts.strategies])

    def submit(self, s: Subject, plan: Plan | None = None) -> None:
        # leave the tmpfs target room for its fault: clean earlier captures there
        if s.small_target and not s.followups:
            for p in s.target.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        plan = plan or self.next_plan(s)
        out = self.cli("submit", plan.strategy, "--domain", s.dom.name, *plan.args, "--json")
        if out.returncode != 0:
            self.note(f"submit {plan.label} for {s.dom.name} refused ({out.returncode}): {out.stderr.strip()}")
            if s.followups and out.returncode == 2:
                s.followups.popleft()  # nothing left to undo (e.g. the capture's object is gone)
            return
        wf = json.loads(out.stdout)["id"]
        ref = dict(s.dom.references) if isinstance(s.dom, DiskDomain) and plan.reference else None
        self.workflows[wf] = {"strategy": plan.strategy, "label": plan.label, "subject": s, "reference": ref,
                              "plan": plan, "submitted_at": time.time()}
        s.busy = wf
        self.note(f"submitted {wf} {plan.label} {s.dom.name} {' '.join(plan.args)}")

    def ended(self, s: Subject, wf: str, doc: dict[str, Any]) -> None:
        """A subject's workflow ended: check what it captured now, queue what undoes it."""
        meta = self.workflows[wf]
        plan: Plan = meta["plan"]
        meta["ended_seen_at"] = time.time()
        self.note(f"{wf} {meta['label']} ended {doc['status']}")
        if s.followups and s.followups[0] is plan and doc["status"] in ("succeeded", "needs_attention"):
            s.followups.popleft()  # needs_attention: an operator's job now; the invariants say what is left
        if doc["status"] != "succeeded":
            return
        self.verified[wf] = self.verify_capture(wf, doc)
        if plan.strategy == "direct-backup":
            s.last_backup = wf
        if plan.then:
            s.followups.extend(plan.then(wf))

    def status(self, wf: str) -> dict[str, Any] | None:
        out = self.cli("show", wf, "--json")
        return cast(dict[str, Any], json.loads(out.stdout)) if out.returncode == 0 else None

    def poll(self, s: Subject) -> None:
        if s.busy:
            doc = self.status(s.busy)
            if doc and doc["status"] in ENDED:
                self.ended(s, s.busy, doc)
                s.busy = None

    def workload(self, until: float) -> None:
        while time.time() < until:
            for s in self.subjects:
                self.poll(s)
                if not s.busy:
                    self.submit(s)
            self.supervise()
            time.sleep(0.5)

    def supervise(self) -> None:
        """Restart workers that died (as a service manager would)."""
        assert self.cluster
        with self.lock:
            alive = [p for p in self.cluster.workers if p.poll() is None]
            for _ in range(self.opts.workers - len(alive)):
                self.cluster.start_worker()
            self.cluster.workers = [p for p in self.cluster.workers if p.poll() is None]
            if self.cluster.recovery is None or self.cluster.recovery.poll() is not None:
                self.cluster.start_recovery()

    # -- faults ----------------------------------------------------------------------
    def inject(self, kind: str) -> None:
        assert self.cluster
        with self.lock:
            live = [p for p in self.cluster.workers if p.poll() is None]
        at, detail = time.time(), ""
        if kind == "worker-kill" and live:
            victim = self.rng.choice(live)
            Cluster.kill(victim)
            detail = f"worker pid {victim.pid}"
        elif kind == "boundary-kill":
            pattern = self.rng.choice(BOUNDARIES)
            with self.lock:
                self.cluster.start_worker(fault=f"kill-at:{pattern}")
            detail = f"a worker armed at {pattern}"
        elif kind == "worker-stop" and live:
            victim = self.rng.choice(live)
            os.killpg(victim.pid, signal.SIGSTOP)
            time.sleep(LEASE_TTL + 1.5)
            os.killpg(victim.pid, signal.SIGCONT)
            detail = f"worker pid {victim.pid} stopped {LEASE_TTL + 1.5:.1f} s"
        elif kind == "redis-failover" and isinstance(self.redis, SentinelSet):
            detail = self.failover(self.redis)
        elif kind == "redis-kill" and isinstance(self.redis, Redis):
            self.redis.kill()
            time.sleep(1.0)
            self.redis.start()
        elif kind == "redis-stall" and isinstance(self.redis, Redis):
            if self.redis.signal(signal.SIGSTOP):
                try:
                    time.sleep(LEASE_TTL + 1.5)  # longer than a lease: every lease expires meanwhile
                finally:
                    self.redis.signal(signal.SIGCONT)
            detail = f"redis-server stopped {LEASE_TTL + 1.5:.1f} s"
        elif kind == "libvirtd-restart":
            restart_libvirtd()
        elif kind == "libvirtd-stall":
            stall_libvirtd(3.0)
            detail = "libvirtd stopped 3 s"
        elif kind in GUEST_FAULTS:
            s = self.rng.choice(self.subjects)
            if not self.guest_fault(kind, s):
                return
            detail = s.dom.name
        elif kind in ("target-full", "overlay-dir-full"):
            fs = next((x for s in self.subjects for x in ([s.small_target] if kind == "target-full"
                                                          else [s.overlay_dir]) if x), None)
            if fs is None:
                return
            fs.fill(2.0)
            detail = str(fs.path)
        else:
            return
        self.faults.append({"kind": kind, "at": at, "end": time.time(), "detail": detail})
        self.note(f"fault {kind} {detail}")

    def failover(self, sset: SentinelSet) -> str:
        """A dead machine: the primary SIGKILLed and its data gone; the sentinels promote a replica; the node
        comes back, empty, as a replica a few seconds later, and the set settles before the next fault."""
        dead = sset.kill_primary()
        promoted = sset.wait_promoted(dead)
        time.sleep(FAILOVER_BACK_AFTER)
        sset.restart(dead)
        t0 = time.monotonic()
        sset.wait_for(sset.settled, "the set to settle", timeout=60)
        return (f"node{dead} killed; node{sset.primary()} promoted in {promoted:.2f} s; node{dead} back as a "
                f"replica, in sync {time.monotonic() - t0:.1f} s later")

    def guest_fault(self, kind: str, s: Subject) -> bool:
        """A guest fault on ``s``; a thread then brings the domain back once it has really stopped."""
        name = s.dom.name
        if s.dom.state() not in ("running", "paused") or (kind == "guest-reboot" and s.kind == "disk"):
            return False
        if kind == "guest-kill":
            with open(f"/run/libvirt/qemu/{name}.pid") as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        elif kind == "guest-poweroff":
            if s.kind == "disk":  # no OS to ask: QEMU ends as on a power button with nothing to answer it
                s.dom.virsh("destroy", name, "--graceful", check=False)
            else:
                s.dom.virsh("shutdown", name, "--mode", "agent", check=False)
        elif kind == "guest-reboot":
            s.dom.virsh("reboot", name, "--mode", "agent", check=False)
        elif kind == "guest-pause":
            s.dom.virsh("suspend", name, check=False)
        if kind != "guest-reboot":
            t = threading.Thread(target=self.bring_back, args=(s, kind, time.time()), daemon=True)
            t.start()
            self.bring_backs.append(t)
        return True

    def held_by_us(self, s: Subject) -> str | None:
        """What of ours holds the domain stopped (starting it would undo or break it), if anything."""
        if "Managed save:   yes" in s.dom.virsh("dominfo", s.dom.name, check=False):
            return "a managed save image"
        busy = self.workflows.get(s.busy or "", {}).get("strategy")
        if busy in ("save", "managed-save", "save-restore", "managed-save-restore"):
            return f"a {busy} workflow"
        if s.followups and s.followups[0].strategy in ("save-restore", "managed-save-restore"):
            return f"a {s.followups[0].strategy} to come"
        return None

    def bring_back(self, s: Subject, kind: str, at: float) -> None:
        """As an operator would: wait until the domain has really stopped (a power-off takes the guest a
        while), then start it; resume a paused one.  A domain a save of ours holds is left to it."""
        down: dict[str, Any] = {"domain": s.dom.name, "fault": kind, "down_at": at, "up_at": None, "held_by": None}
        self.downtimes.append(down)
        time.sleep(2.0 if kind == "guest-pause" else 0.2)
        while time.time() < at + DOWN_LIMIT:
            state = s.dom.state()
            if state == "paused":
                s.dom.virsh("resume", s.dom.name, check=False)
            elif state == "shut off":
                held = self.held_by_us(s)
                if held:
                    down["held_by"] = held
                    self.note(f"bring-back: {s.dom.name} is held by {held}; left to it")
                    return
                s.dom.virsh("start", s.dom.name, check=False)
            elif state == "running" and (kind != "guest-poweroff" or down.get("seen_off")):
                down["up_at"] = time.time()
                self.note(f"bring-back: {s.dom.name} runs again {down['up_at'] - at:.1f} s after {kind}")
                return
            if state in ("shut off", "crashed"):
                down["seen_off"] = True
            time.sleep(0.2)
        self.note(f"bring-back: {s.dom.name} still {s.dom.state()} {DOWN_LIMIT:.0f} s after {kind}")

    def fault_loop(self) -> None:
        while not self.stop_faults.wait(self.rng.uniform(*self.opts.fault_interval)):
            kind = self.rng.choice(self.opts.faults)
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
                self.poll(s)
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

    def check(self) -> list[Row]:
        """Every invariant, with the number of subjects checked and what violated it."""
        rows: list[Row] = []
        docs: dict[str, dict[str, Any] | None] = {wf: self.status(wf) for wf in self.workflows}
        self.docs = docs

        bad = [f"{wf}: {d['status'] if d else 'LOST'}/{d['state'] if d else ''}" for wf, d in docs.items()
               if not d or d["status"] not in ("succeeded", "rolled_back", "partially_rolled_back", "needs_attention")
               or (d["status"] == "needs_attention" and not (d.get("attention") or {}).get("reason"))]
        rows.append(("every workflow terminal (none lost, none running)", len(docs), bad))

        bad = [f"{wf}: `{o['command']}` (for: {o['reason']}) left it {o.get('outcome')}"
               for wf, o in self.operator.items()
               if o.get("outcome") not in ("rolled_back", "partially_rolled_back", "succeeded")]
        rows.append(("the command a needs_attention workflow suggests ends it", len(self.operator), bad))

        bad = []
        for d in self.downtimes:
            if d["held_by"]:
                continue
            if d["up_at"] is None:
                bad.append(f"{d['domain']}: not running again {DOWN_LIMIT:.0f} s after {d['fault']}")
            elif d["up_at"] - d["down_at"] > DOWN_LIMIT:
                bad.append(f"{d['domain']}: down {d['up_at'] - d['down_at']:.0f} s after {d['fault']}")
        rows.append((f"a domain a guest fault stopped runs again within {DOWN_LIMIT:.0f} s", len(self.downtimes), bad))

        bad = []
        for s in self.subjects:
            blk = s.dom.blklist()
            bad += [f"{s.dom.name}/{t}: {p}" for t, p in blk.items() if "domcapture-" in os.path.basename(p)]
            for folder in s.dom.folders():
                bad += [f"{s.dom.name}: leftover {p}" for p in folder.glob("domcapture-*overlay*")]
            if blk != {t: str(p) for t, p in s.dom.disks.items()}:
                bad.append(f"{s.dom.name}: not on its original disks {blk}")
            if s.dom.owned:  # a tagged domain's own disks may have backing files of the operator's
                for t, p in s.dom.disks.items():
                    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(p)).stdout)
                    if info.get("backing-filename"):
                        bad.append(f"{s.dom.name}/{t} has a backing file: a snapshot applied twice?")
        rows.append(("no domain on an overlay of ours, no overlay file, no backing chain", len(self.subjects), bad))

        bad = []
        guests = [s for s in self.subjects if isinstance(s.dom, GuestDomain)]
        for s in guests:
            try:
                if cast(GuestDomain, s.dom).frozen():
                    bad.append(s.dom.name)
            except subprocess.CalledProcessError as exc:  # no agent answer: the state cannot be told
                bad.append(f"{s.dom.name}: the guest agent did not answer ({s.dom.state()}): "
                           f"{(exc.stderr or '').strip()[:120]}")
        rows.append(("no guest filesystem frozen", len(guests), bad))

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
        for wf, doc in docs.items():
            if doc and doc["status"] == "succeeded":
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
                elif cp["state"] in ("not-ours", "pending") and cp["in_libvirt"] and cp["name"].startswith(
                        "domcapture-"):
                    bad.append(f"{s.dom.name}: {cp['name']} in libvirt but {cp['state']} in our store")
        rows.append(("checkpoints in libvirt match our store", len(self.subjects), bad))

        bad = []
        for wf, doc in docs.items():
            if not doc:
                continue
            d = doc
            # an effect step that completed twice without its probe seeing the first; a state the
            # table sends the workflow back to (refreeze, recommit) may legitimately run once more
            steps_done = [e for e in d["history"] if e["event"] == "step-done"]
            done = collections.Counter(e.get("step") for e in steps_done
                                       if not e.get("already_done") and e.get("trigger") == "advance")
            allowed = collections.Counter(e["state"] for e in steps_done if e.get("trigger") != "advance")
            twice = [str(step) for step, n in done.items() if n > 1 + allowed[step]]
            if twice:
                bad.append(f"{wf}: {', '.join(twice)} completed more than once")
        rows.append(("no effect applied twice in one workflow", len(docs), bad))

        bad = []
        for wf, doc in docs.items():
            if not doc:
                continue
            d = doc
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

    def verify_capture(self, wf: str, d: dict[str, Any]) -> list[str]:
        """Right after it succeeded: ``domcapture verify``, and full images against their reference."""
        deadline = time.time() + SERVICE_BACK_WITHIN
        while True:  # Redis or libvirtd may be down for a while (a fault): exit 4, try again
            v = self.cli("verify", wf)
            if v.returncode != 4 or time.time() > deadline:
                break
            time.sleep(0.5)
        if v.returncode == VERIFY_NOTHING_KEPT:
            self.verify_outcome[wf] = "nothing-kept"
            return []
        if v.returncode != 0:
            self.verify_outcome[wf] = "failed"
            return [f"{wf}: verify failed ({v.returncode}): {(v.stdout + v.stderr).strip()[-200:]}"]
        self.verify_outcome[wf] = "verified"
        meta, bad = self.workflows[wf], cast(list[str], [])
        plan: Plan = meta["plan"]
        s: Subject = meta["subject"]
        if not plan.reference:
            return bad
        files = d["result"]["files"]
        if meta["reference"]:
            for t, ref in meta["reference"].items():
                if not images_identical(files[t]["path"], ref):
                    bad.append(f"{wf}: {plan.label} of {t} differs from the disk at capture time")
        elif isinstance(s.dom, GuestDomain) and "vdb" in files:
            quiesced = bool(d["result"].get("quiesced"))
            numbers, verdict = counter_in_image(files["vdb"]["path"], self.workdir / "scratch",
                                                replay_journal=not quiesced)
            if not numbers or not is_gapless_prefix(numbers):
                bad.append(f"{wf}: the guest's log in the {plan.label} is not a gapless prefix")
            if quiesced and not verdict.startswith("rc=0"):
                bad.append(f"{wf}: quiesced {plan.label} needs fsck: {verdict[:120]}")
        if bad:
            self.verify_outcome[wf] = "failed"
        return bad

    def run(self) -> int:
        """The whole run; returns the number of violations."""
        self.started_at = time.time()
        try:
            self.setup()
            injector = threading.Thread(target=self.fault_loop, daemon=True)
            injector.start()
            self.workload(time.time() + self.opts.duration)
            self.stop_faults.set()
            injector.join(timeout=30)
            for t in self.bring_backs:
                t.join(timeout=DOWN_LIMIT + 5)
            self.note("faults stopped; draining")
            self.drain(self.opts.drain_timeout)
            self.operator_acts(self.opts.drain_timeout)
            self.rows = self.check()
            self.ended_at = time.time()
            violations = sum(len(bad) for _, _, bad in self.rows)
            if violations:  # keep the logs and Redis' AOF of a failed run, to read what happened
                self.opts.keep = True
            return violations
        finally:
            self.ended_at = self.ended_at or time.time()
            self.teardown()
