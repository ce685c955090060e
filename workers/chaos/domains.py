"""The domains a chaos run works on, seen the way an operator sees them: through virsh and qemu-img.

- ``DiskDomain``: a throwaway no-OS QEMU domain whose qcow2 disks hold known
  patterns (nothing writes to them but our captures), with a copy of each disk
  taken before it started: a full backup must equal it.
- ``GuestDomain``: a throwaway tiny Linux guest (kernel and initramfs from
  ``guest/build-guest.sh``) with the guest agent and a writer that appends
  numbered, fsynced lines to ``/counter.log`` on its data disk.
- ``TaggedDomain``: an operator's own domain, tagged for chaos runs with a
  metadata element in our namespace (``tag_command``); only ``domcapture
  verify`` judges its captures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

URI = "qemu:///system"  # the libvirtd the run restarts: the local system one
TAG_NS = "https://domcapture.org/xmlns/chaos/1"
TAG_KEY = "domcapture-chaos"
NAME_PREFIX = "dcchaos-"  # every throwaway domain's name starts with it
COUNTER_LINE = re.compile(r"^(\d+) (\d+\.\d+)$")


def tag_command(domain: str) -> str:
    """The command that tags a domain for ``domcapture chaos --tagged``."""
    return f"virsh metadata {domain} {TAG_NS} --key {TAG_KEY} --set '<chaos/>'"


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


def virsh(*args: str, check: bool = True, timeout: float = 60) -> str:
    return run("virsh", "-c", URI, *args, check=check, timeout=timeout).stdout


def kvm_type() -> str:
    """KVM only with real hardware virtualization; a software-nested /dev/kvm (kvm_pvm) boots slower than TCG."""
    cpu = Path("/proc/cpuinfo").read_text()
    if os.access("/dev/kvm", os.W_OK) and re.search(r"\b(vmx|svm)\b", cpu) and not Path("/sys/module/kvm_pvm").exists():
        return "kvm"
    return "qemu"


class Domain:
    """What the run reads of any domain, through virsh."""

    kind = "domain"
    name: str
    owned = True  # a throwaway domain the run created (and removes)

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return virsh(*args, check=check, timeout=timeout)

    def state(self) -> str:
        return self.virsh("domstate", self.name, check=False).strip() or "unknown"

    def blklist(self) -> dict[str, str]:
        """``virsh domblklist``: target -> source (disks only)."""
        out = {}
        for line in self.virsh("domblklist", self.name, "--details").splitlines()[2:]:
            parts = line.split(None, 3)
            if len(parts) == 4 and parts[1] == "disk" and parts[3] != "-":
                out[parts[2]] = parts[3].strip()
        return out

    @property
    def disks(self) -> dict[str, Path]:
        raise NotImplementedError

    def folders(self) -> set[Path]:
        """Where overlays of ours next to the disks would be left."""
        return {p.parent for p in self.disks.values()}

    def destroy(self) -> None:
        raise NotImplementedError


@dataclass
class DiskDomain(Domain):
    """A running no-OS QEMU domain with qcow2 disks of known content, and a reference copy of each."""

    name: str
    workdir: Path
    image_disks: dict[str, Path] = field(default_factory=dict)
    references: dict[str, Path] = field(default_factory=dict)
    kind = "disk"

    @property
    def disks(self) -> dict[str, Path]:
        return self.image_disks

    @classmethod
    def create(cls, workdir: Path, *, sizes_mib: dict[str, int], random_mib: int = 0, fill_mib: int = 4) -> DiskDomain:
        workdir.mkdir(parents=True, exist_ok=True)
        dom = cls(f"{NAME_PREFIX}{uuid.uuid4().hex[:8]}", workdir)
        mib = 1024 * 1024
        for i, (target, size) in enumerate(sizes_mib.items()):
            img, raw = workdir / f"{dom.name}-{target}.qcow2", workdir / f"{dom.name}-{target}.src.raw"
            pattern = 0x11 + 0x11 * i
            with open(raw, "wb") as f:
                f.truncate(size * mib)
                f.write(bytes([pattern]) * fill_mib * mib)
                if random_mib:
                    f.write(os.urandom(random_mib * mib))
                f.seek(size // 2 * mib)
                f.write(bytes([pattern + 1]) * mib)
            run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img))
            raw.unlink()
            dom.image_disks[target] = img
            ref = workdir / f"reference-{target}.qcow2"
            shutil.copyfile(img, ref)
            dom.references[target] = ref
        disks_xml = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                            f"<source file={quoteattr(str(img))}/><target dev='{t}' bus='virtio'/></disk>"
                            for t, img in dom.image_disks.items())
        xml = (f"<domain type='{kvm_type()}'><name>{dom.name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
               "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
               f"<devices>{disks_xml}<controller type='usb' model='none'/><memballoon model='none'/>"
               "</devices></domain>")
        path = workdir / f"{dom.name}.xml"
        path.write_text(xml)
        virsh("define", str(path))
        virsh("start", dom.name)
        return dom

    def destroy(self) -> None:
        self.virsh("destroy", self.name, check=False)
        self.virsh("undefine", self.name, "--checkpoints-metadata", "--snapshots-metadata", "--managed-save",
                   check=False)


@dataclass
class GuestDomain(Domain):
    """The tiny real Linux guest of guest/: the agent, and a writer on its data disk (vdb)."""

    name: str
    workdir: Path
    kind = "guest"

    @property
    def disks(self) -> dict[str, Path]:
        return {"vda": self.workdir / f"{self.name}-vda.qcow2", "vdb": self.workdir / f"{self.name}-vdb.qcow2"}

    @classmethod
    def create(cls, workdir: Path, guest_dir: Path, *, data_mib: int = 64, interval: float = 0.05,
               agent_timeout: float = 120) -> GuestDomain:
        """What guest/make-guest.sh does: two ext4 disks, the domain defined and started, its agent answering."""
        workdir.mkdir(parents=True, exist_ok=True)
        dom = cls(f"{NAME_PREFIX}g{uuid.uuid4().hex[:7]}", workdir)
        for target, mib, label in (("vda", 32, "dcsys"), ("vdb", data_mib, "dcdata")):
            raw = workdir / f".{dom.name}-{label}.raw"
            with open(raw, "wb") as f:
                f.truncate(mib * 1024 * 1024)
            run("mkfs.ext4", "-q", "-F", "-L", label, str(raw))
            run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", str(raw),
                str(dom.disks[target]))
            raw.unlink()
        cmdline = ("console=ttyS0 quiet cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace "
                   f"pci=noacpi dc.interval={interval}")
        disks = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                        f"<source file={quoteattr(str(p))}/><target dev='{t}' bus='virtio'/></disk>"
                        for t, p in dom.disks.items())
        xml = (f"<domain type='{kvm_type()}'><name>{dom.name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
               f"<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{escape(str(guest_dir / 'vmlinuz'))}"
               f"</kernel><initrd>{escape(str(guest_dir / 'initrd.gz'))}</initrd><cmdline>{cmdline}</cmdline></os>"
               "<features><acpi/></features><clock offset='utc'/><on_poweroff>destroy</on_poweroff>"
               "<on_reboot>restart</on_reboot><on_crash>destroy</on_crash>"
               f"<devices>{disks}<controller type='usb' model='none'/>"
               f"<serial type='pty'><log file={quoteattr(str(workdir / (dom.name + '-console.log')))} "
               "append='off'/><target port='0'/></serial><console type='pty'><target type='serial' port='0'/>"
               "</console><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
               f"<channel type='file'><source path={quoteattr(str(workdir / (dom.name + '-writer.log')))} "
               "append='on'/><target type='virtio' name='org.domcapture.writer.0'/></channel>"
               "<memballoon model='none'/></devices></domain>")
        path = workdir / f"{dom.name}.xml"
        path.write_text(xml)
        virsh("define", str(path))
        virsh("start", dom.name)
        deadline = time.time() + agent_timeout
        while not dom.agent_answers():
            if time.time() > deadline:
                raise RuntimeError(f"the guest agent of {dom.name} did not answer in {agent_timeout:.0f} s")
            time.sleep(0.2)
        return dom

    def agent(self, cmd: str, timeout: int = 10) -> Any:
        out = self.virsh("qemu-agent-command", self.name, json.dumps({"execute": cmd}), "--timeout", str(timeout))
        return json.loads(out)["return"]

    def agent_answers(self) -> bool:
        return run("virsh", "-c", URI, "qemu-agent-command", self.name, '{"execute":"guest-ping"}', "--timeout",
                   "2", check=False).returncode == 0

    def frozen(self) -> bool:
        return bool(self.agent("guest-fsfreeze-status") == "frozen")

    def destroy(self) -> None:
        self.virsh("destroy", self.name, check=False)
        self.virsh("undefine", self.name, "--checkpoints-metadata", "--snapshots-metadata", "--managed-save",
                   check=False)
        for p in self.workdir.glob(f"{self.name}*"):
            p.unlink(missing_ok=True)


@dataclass
class TaggedDomain(Domain):
    """An operator's domain tagged for chaos runs: its captures are judged by ``domcapture verify`` alone."""

    name: str
    original: dict[str, str] = field(default_factory=dict)  # target -> source when the run started
    kind = "tagged"
    owned = False

    @property
    def disks(self) -> dict[str, Path]:
        return {t: Path(p) for t, p in self.original.items()}

    def destroy(self) -> None:
        """Never: the domain is the operator's."""


def is_tagged(name: str) -> bool:
    out = run("virsh", "-c", URI, "metadata", name, TAG_NS, check=False)
    return out.returncode == 0 and "<chaos" in out.stdout


def tagged_domains() -> list[TaggedDomain]:
    """Every domain of the host that carries our chaos tag, with the disks it runs on now."""
    names = [n for n in virsh("list", "--all", "--name").split() if n]
    found = []
    for n in names:
        if is_tagged(n):
            dom = TaggedDomain(n)
            dom.original = dom.blklist()
            found.append(dom)
    return found


def images_identical(a: Path | str, b: Path | str) -> bool:
    return run("qemu-img", "compare", "-U", str(a), str(b), check=False).returncode == 0


def counter_in_image(image: Path | str, scratch: Path, *, replay_journal: bool = True) -> tuple[list[int], str]:
    """The writer's numbers read out of a guest's data-disk image, and e2fsck's verdict (``rc=N`` first)."""
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / (Path(image).name + ".raw")
    run("qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw))
    fsck = run("e2fsck", "-fn", str(raw), check=False)
    verdict = f"rc={fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
    if replay_journal:
        run("e2fsck", "-fy", str(raw), check=False)
    text = run("debugfs", "-R", "cat /counter.log", str(raw)).stdout
    numbers = [int(m.group(1)) for m in map(COUNTER_LINE.match, text.splitlines()) if m]
    raw.unlink()
    return numbers, verdict


def is_gapless_prefix(numbers: list[int]) -> bool:
    return numbers == list(range(1, len(numbers) + 1))
