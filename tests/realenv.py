"""Real-service helpers for tests: disposable QEMU domains, worker processes, inspection.

Inspection goes through virsh and qemu-img, the way an operator would look:
the domain XML, ``domblklist``, ``blockjob --info``, the bytes of the images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

from workflows.record import FINAL_STATUSES, STOPPED_STATUSES, Record
from workflows.store import Store

#: the statuses a workflow stops in (partially_rolled_back included: waiting past it only times out)
ENDED = FINAL_STATUSES + STOPPED_STATUSES

def edit_record(store: Store, wf: str, holder: str, change: Callable[[Record], None], timeout: float = 30) -> None:
    """Change a record as a test's own writer: take its lease (a worker that saved a final status
    releases it just after), apply ``change``, save under the lease's epoch, release."""
    deadline = time.monotonic() + timeout
    while (lease := store.acquire_lease(wf, holder, 30)) is None:
        assert time.monotonic() < deadline, f"the lease of {wf} is still held"
        time.sleep(0.05)
    rec = store.load(wf)
    change(rec)
    store.save(rec, holder, epoch=lease.epoch)
    lease.release()


VENV_BIN = Path(sys.executable).parent
DOMCAPTURE = str(VENV_BIN / "domcapture")


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


def libvirt_reachable(uri: str) -> bool:
    return shutil.which("virsh") is not None and run("virsh", "-c", uri, "version", check=False).returncode == 0


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.W_OK)


class VirshDomain:
    """What tests read of any domain, the way an operator would: through virsh."""

    uri: str
    name: str

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return run("virsh", "-c", self.uri, *args, check=check, timeout=timeout).stdout

    def state(self) -> str:
        return self.virsh("domstate", self.name).strip()

    def blklist(self) -> dict[str, str]:
        """``virsh domblklist``: target -> source."""
        out = {}
        for line in self.virsh("domblklist", self.name).splitlines()[2:]:
            parts = line.split(None, 1)
            if len(parts) == 2:
                out[parts[0]] = parts[1].strip()
        return out

    def on_original_disks(self) -> bool:
        return self.blklist() == {t: str(p) for t, p in self.disks.items()}  # type: ignore[attr-defined]


@dataclass
class DiskDomain(VirshDomain):
    """A running QEMU domain with no guest OS and qcow2 disks holding known patterns.

    Without a guest OS nothing writes to the disks unless a test does, through
    QEMU's monitor (``write``): so the content at snapshot time is known exactly.
    """

    uri: str
    name: str
    workdir: Path
    disks: dict[str, Path] = field(default_factory=dict)  # target -> image
    references: dict[str, Path] = field(default_factory=dict)  # target -> copy taken before start

    @classmethod
    def create(cls, uri: str, workdir: Path, *, sizes_mib: dict[str, int] | None = None,
               fill_mib: int = 4, random_mib: int = 0, fmt: str = "qcow2") -> "DiskDomain":
        """Disks named ``sdX`` go on a virtio-scsi controller: those can be plugged and unplugged live
        with no guest OS to answer (a virtio disk on this machine type cannot)."""
        workdir.mkdir(parents=True, exist_ok=True)
        name = f"dctest-{uuid.uuid4().hex[:8]}"
        dom = cls(uri, name, workdir)
        sizes_mib = sizes_mib or {"vda": 64, "vdb": 32}
        for i, (target, size) in enumerate(sizes_mib.items()):
            img = workdir / f"{name}-{target}.{fmt}"
            raw = workdir / f"{name}-{target}.src.raw"
            pattern = 0x11 + 0x11 * i
            mib = 1024 * 1024
            with open(raw, "wb") as f:
                f.truncate(size * mib)
                f.write(bytes([pattern]) * fill_mib * mib)
                if random_mib:
                    f.write(os.urandom(random_mib * mib))
                f.seek(size // 2 * mib)
                f.write(bytes([pattern + 1]) * mib)
            run("qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(img))
            raw.unlink()
            dom.disks[target] = img
            ref = workdir / f"reference-{target}.{fmt}"
            shutil.copyfile(img, ref)
            dom.references[target] = ref
        disks_xml = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{img}'/><target dev='{t}' bus='{'scsi' if t.startswith('sd') else 'virtio'}'/></disk>"
            for t, img in dom.disks.items())
        scsi = "<controller type='scsi' model='virtio-scsi'/>" if any(t.startswith("sd") for t in dom.disks) else ""
        vtype = "kvm" if kvm_usable() else "qemu"
        xml = (f"<domain type='{vtype}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
               "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
               f"<devices>{disks_xml}{scsi}<controller type='usb' model='none'/><memballoon model='none'/>"
               "</devices></domain>")
        xml_path = workdir / f"{name}.xml"
        xml_path.write_text(xml)
        dom.virsh("define", str(xml_path))
        dom.virsh("start", name)
        return dom

    # -- inspection ------------------------------------------------------------------
    def xml(self) -> ET.Element:
        return ET.fromstring(self.virsh("dumpxml", self.name))

    def block_jobs(self) -> dict[str, str]:
        jobs = {}
        for target in self.disks:
            out = self.virsh("blockjob", self.name, target, "--info", check=False)
            if out.strip() and "No current block job" not in out:
                jobs[target] = out.strip()
        return jobs

    # libvirt writes <target> and <alias> in every disk of a running domain
    def mirrors(self) -> list[str | None]:
        return [cast(ET.Element, d.find("target")).get("dev") for d in self.xml().findall("./devices/disk")
                if d.find("mirror") is not None]

    def alias(self, target: str) -> str | None:
        for d in self.xml().findall("./devices/disk"):
            if cast(ET.Element, d.find("target")).get("dev") == target:
                return cast(ET.Element, d.find("alias")).get("name")
        raise KeyError(target)

    def guest_write(self, target: str, pattern: int, offset_mib: int, length_mib: int) -> None:
        """Write through QEMU as the guest would: lands on whatever layer is active."""
        qdev = f"/machine/peripheral/{self.alias(target)}" + ("" if target.startswith("sd") else "/virtio-backend")
        cmd = f'qemu-io -d {qdev} "write -P {pattern} {offset_mib}M {length_mib}M"'
        out = self.virsh("qemu-monitor-command", self.name, "--hmp", cmd).strip()
        assert "error" not in out.lower(), out
        # flush, as a guest's fsync would: the image file then holds the write
        out = self.virsh("qemu-monitor-command", self.name, "--hmp", f'qemu-io -d {qdev} "flush"').strip()
        assert "error" not in out.lower(), out

    def leftover_overlays(self) -> list[str]:
        return sorted(p.name for p in self.workdir.iterdir() if "overlay" in p.name)

    def destroy(self) -> None:
        self.virsh("destroy", self.name, check=False)
        # plain undefine refuses a domain that has checkpoint or snapshot metadata
        self.virsh("undefine", self.name, "--checkpoints-metadata", "--snapshots-metadata", "--managed-save",
                   check=False)


def images_identical(a: Path | str, b: Path | str) -> bool:
    return run("qemu-img", "compare", "-U", str(a), str(b), check=False).returncode == 0


def image_has_pattern(img: Path | str, pattern: int, offset_mib: int, length_mib: int, fmt: str = "qcow2") -> bool:
    out = run("qemu-io", "-r", "-U", "-f", fmt, "-c", f"read -P {pattern} {offset_mib}M {length_mib}M", str(img),
              check=False)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr


class WorkerCluster:
    """``domcapture worker`` and ``domcapture recovery`` processes on a private prefix and queue."""

    def __init__(self, redis_url: str, uri: str, prefix: str, logdir: Path, lease_ttl: float = 2.0) -> None:
        self.env = {**os.environ, "DOMCAPTURE_REDIS_URL": redis_url, "LIBVIRT_DEFAULT_URI": uri,
                    "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q",
                    "DOMCAPTURE_LEASE_TTL": str(lease_ttl), "DOMCAPTURE_RECOVERY_INTERVAL": "0.5"}
        self.env.pop("DOMCAPTURE_FAULT", None)
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.workers: list[subprocess.Popen] = []
        self.recovery: subprocess.Popen | None = None
        self.logs: dict[int, Path] = {}  # pid -> the process's log file
        self._n = 0

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self._n += 1
        path = self.logdir / f"{self._n:02d}-{args[0]}.log"
        log = open(path, "w")
        p = subprocess.Popen([DOMCAPTURE, "--log-level", "INFO", *args], env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.logs[p.pid] = path
        return p

    def log_of(self, p: subprocess.Popen) -> str:
        """What a worker or recovery process has logged so far."""
        return self.logs[p.pid].read_text(errors="replace")

    def start_worker(self, fault: str | None = None, *, host: str | None = None,
                     uri: str | None = None) -> subprocess.Popen:
        """A worker; with ``host``, one that serves only that host's queue (on ``uri``)."""
        env = dict(self.env)
        if fault:
            env["DOMCAPTURE_FAULT"] = fault
        if uri:
            env["LIBVIRT_DEFAULT_URI"] = uri
        p = self._spawn(["worker", *(["--host", host] if host else [])], env)
        self.workers.append(p)
        return p

    def start_recovery(self) -> subprocess.Popen:
        self.recovery = self._spawn(["recovery"], self.env)
        return self.recovery

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([DOMCAPTURE, *args], env=self.env, capture_output=True, text=True, timeout=300)
        if check and out.returncode != 0:
            raise AssertionError(f"domcapture {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out

    def show(self, wf_id: str) -> dict:
        return json.loads(self.cli("show", wf_id, "--json").stdout)

    def wait(self, wf_id: str, predicate, timeout: float = 120, interval: float = 0.05) -> dict:
        deadline = time.time() + timeout
        while True:
            doc = self.show(wf_id)
            if predicate(doc):
                return doc
            if time.time() > deadline:
                raise AssertionError(f"timed out; workflow is {doc['status']}/{doc['state']}")
            time.sleep(interval)

    def wait_final(self, wf_id: str, timeout: float = 120) -> dict:
        return self.wait(wf_id, lambda d: d["status"] in ENDED, timeout, interval=0.2)

    @staticmethod
    def kill(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if p.poll() is None:
            os.killpg(p.pid, sig)
        if sig == signal.SIGKILL:
            p.wait(timeout=10)

    def stop(self) -> None:
        for p in self.workers + ([self.recovery] if self.recovery else []):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


REPO = Path(__file__).resolve().parent.parent
GUEST_SCRIPTS = REPO / "guest"
GUEST_CACHE = Path(os.environ.get("DOMCAPTURE_GUEST_DIR", "/var/lib/domcapture/guest"))
COUNTER_LINE = __import__("re").compile(r"^(\d+) (\d+\.\d+)$")


def build_guest_image() -> Path:
    """Build (or reuse) the tiny guest's kernel + initramfs; see guest/README.md."""
    run(str(GUEST_SCRIPTS / "build-guest.sh"), str(GUEST_CACHE), timeout=900)
    return GUEST_CACHE


@dataclass
class GuestDomain(VirshDomain):
    """The tiny real Linux guest (guest/): qemu-guest-agent, and a writer that
    appends numbered, fsynced lines to /mnt/vdb/counter.log on its data disk."""

    uri: str
    name: str
    workdir: Path

    @classmethod
    def create(cls, uri: str, workdir: Path, *, data_mib: int = 64, start: bool = True) -> "GuestDomain":
        workdir.mkdir(parents=True, exist_ok=True)
        name = f"dctest-g{uuid.uuid4().hex[:7]}"
        env = {**os.environ, "LIBVIRT_DEFAULT_URI": uri}
        args = [str(GUEST_SCRIPTS / "make-guest.sh"), name, str(workdir), "--guest-dir", str(GUEST_CACHE),
                "--data-mib", str(data_mib)] + (["--start"] if start else [])
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise AssertionError(f"make-guest.sh failed: {out.stdout}{out.stderr}")
        return cls(uri, name, workdir)

    @property
    def disks(self) -> dict[str, Path]:
        return {"vda": self.workdir / f"{self.name}-vda.qcow2", "vdb": self.workdir / f"{self.name}-vdb.qcow2"}

    @property
    def writer_log(self) -> Path:
        return self.workdir / f"{self.name}-writer.log"

    def agent(self, cmd: str, timeout: int = 10, **arguments: Any) -> Any:
        """The agent's answer: a JSON value whose shape depends on the command."""
        msg: dict[str, Any] = {"execute": cmd}
        if arguments:
            msg["arguments"] = arguments
        out = self.virsh("qemu-agent-command", self.name, json.dumps(msg), "--timeout", str(timeout))
        return json.loads(out)["return"]

    def wait_agent(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if run("virsh", "-c", self.uri, "qemu-agent-command", self.name, '{"execute":"guest-ping"}',
                   "--timeout", "2", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(f"guest agent of {self.name} did not answer in {timeout}s")

    def frozen(self) -> bool:
        return self.agent("guest-fsfreeze-status") == "frozen"

    def sh(self, script: str, timeout: float = 30) -> str:
        """Run a shell command in the guest (guest-exec) and return its stdout."""
        import base64
        pid = self.agent("guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True})["pid"]
        deadline = time.time() + timeout
        while True:
            status = self.agent("guest-exec-status", pid=pid)
            if status["exited"]:
                break
            if time.time() > deadline:
                raise AssertionError(f"guest command did not finish in {timeout} s: {script}")
            time.sleep(0.1)
        assert status.get("exitcode") == 0, f"{script!r} -> {status}"
        return base64.b64decode(status.get("out-data", "")).decode()

    def last_counter(self) -> int:
        line = self.sh("tail -n 1 /mnt/vdb/counter.log").strip()
        m = COUNTER_LINE.match(line)
        assert m, f"bad counter line {line!r}"
        return int(m.group(1))

    def mirrored_lines(self) -> int:
        """Lines the writer has mirrored to the host (a cheap 'is it still writing' probe)."""
        return len(self.writer_log.read_text().splitlines()) if self.writer_log.exists() else 0

    def shutdown(self, timeout: float = 60) -> None:
        self.virsh("shutdown", self.name, "--mode", "agent")
        deadline = time.time() + timeout
        while self.state() != "shut off":
            if time.time() > deadline:
                raise AssertionError(f"{self.name} did not power off")
            time.sleep(0.3)

    def destroy(self) -> None:
        run(str(GUEST_SCRIPTS / "destroy-guest.sh"), self.name, str(self.workdir), check=False)


def counter_in_image(image: Path | str, scratch: Path, *, replay_journal: bool = True) -> tuple[list[int], str]:
    """The writer's numbers read out of a data-disk image, and e2fsck's verdict.

    The image is converted to raw in ``scratch``; ``e2fsck -fn`` runs first (its
    output is returned), then the journal is replayed on the copy when asked
    (a crash-consistent image needs it before its files can be read).
    """
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / (Path(image).name + ".raw")
    run("qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw))
    fsck = run("e2fsck", "-fn", str(raw), check=False)
    verdict = f"rc={fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
    if replay_journal:
        run("e2fsck", "-fy", str(raw), check=False)
    text = run("debugfs", "-R", "cat /counter.log", str(raw)).stdout
    numbers = []
    for line in text.splitlines():
        m = COUNTER_LINE.match(line)
        if m:
            numbers.append(int(m.group(1)))
    raw.unlink()
    return numbers, verdict


def is_gapless_prefix(numbers: list[int]) -> bool:
    return numbers == list(range(1, len(numbers) + 1))
