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

VENV_BIN = Path(sys.executable).parent
DOMCAPTURE = str(VENV_BIN / "domcapture")


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


def libvirt_reachable(uri: str) -> bool:
    return shutil.which("virsh") is not None and run("virsh", "-c", uri, "version", check=False).returncode == 0


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.W_OK)


@dataclass
class DiskDomain:
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
        workdir.mkdir(parents=True, exist_ok=True)
        name = f"dctest-{uuid.uuid4().hex[:8]}"
        dom = cls(uri, name, workdir)
        sizes_mib = sizes_mib or {"vda": 64, "vdb": 32}
        for i, (target, size) in enumerate(sizes_mib.items()):
            img = workdir / f"{name}-{target}.{fmt}"
            raw = workdir / f"{name}-{target}.raw"
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
            f"<source file='{img}'/><target dev='{t}' bus='virtio'/></disk>" for t, img in dom.disks.items())
        vtype = "kvm" if kvm_usable() else "qemu"
        xml = (f"<domain type='{vtype}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
               "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
               f"<devices>{disks_xml}<controller type='usb' model='none'/><memballoon model='none'/>"
               "</devices></domain>")
        xml_path = workdir / f"{name}.xml"
        xml_path.write_text(xml)
        dom.virsh("define", str(xml_path))
        dom.virsh("start", name)
        return dom

    # -- inspection ------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True) -> str:
        return run("virsh", "-c", self.uri, *args, check=check).stdout

    def xml(self) -> ET.Element:
        return ET.fromstring(self.virsh("dumpxml", self.name))

    def blklist(self) -> dict[str, str]:
        """``virsh domblklist``: target -> source."""
        out = {}
        for line in self.virsh("domblklist", self.name).splitlines()[2:]:
            parts = line.split(None, 1)
            if len(parts) == 2:
                out[parts[0]] = parts[1].strip()
        return out

    def block_jobs(self) -> dict[str, str]:
        jobs = {}
        for target in self.disks:
            out = self.virsh("blockjob", self.name, target, "--info", check=False)
            if out.strip() and "No current block job" not in out:
                jobs[target] = out.strip()
        return jobs

    def mirrors(self) -> list[str]:
        return [d.find("target").get("dev") for d in self.xml().findall("./devices/disk")
                if d.find("mirror") is not None]

    def state(self) -> str:
        return self.virsh("domstate", self.name).strip()

    def alias(self, target: str) -> str:
        for d in self.xml().findall("./devices/disk"):
            if d.find("target").get("dev") == target:
                return d.find("alias").get("name")
        raise KeyError(target)

    def guest_write(self, target: str, pattern: int, offset_mib: int, length_mib: int) -> None:
        """Write through QEMU as the guest would: lands on whatever layer is active."""
        qdev = f"/machine/peripheral/{self.alias(target)}/virtio-backend"
        cmd = f'qemu-io -d {qdev} "write -P {pattern} {offset_mib}M {length_mib}M"'
        out = self.virsh("qemu-monitor-command", self.name, "--hmp", cmd).strip()
        assert "error" not in out.lower(), out
        # flush, as a guest's fsync would: the image file then holds the write
        out = self.virsh("qemu-monitor-command", self.name, "--hmp", f'qemu-io -d {qdev} "flush"').strip()
        assert "error" not in out.lower(), out

    def on_original_disks(self) -> bool:
        return self.blklist() == {t: str(p) for t, p in self.disks.items()}

    def leftover_overlays(self) -> list[str]:
        return sorted(p.name for p in self.workdir.iterdir() if "overlay" in p.name)

    def destroy(self) -> None:
        self.virsh("destroy", self.name, check=False)
        self.virsh("undefine", self.name, check=False)


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
        self._n = 0

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self._n += 1
        log = open(self.logdir / f"{self._n:02d}-{args[0]}.log", "w")
        return subprocess.Popen([DOMCAPTURE, "--log-level", "INFO", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, fault: str | None = None) -> subprocess.Popen:
        env = dict(self.env)
        if fault:
            env["DOMCAPTURE_FAULT"] = fault
        p = self._spawn(["worker"], env)
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
        return self.wait(wf_id, lambda d: d["status"] in ("succeeded", "rolled_back", "needs_attention",
                                                           "failed"), timeout, interval=0.2)

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
