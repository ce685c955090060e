"""An in-memory hypervisor for fast, exhaustive tests.

It keeps domains in memory but its disks and overlays are real files, so the
steps' file I/O (copies, checksums, cleanup) runs for real.  An overlay file
holds the writes made while the disk was on it; a pivot applies them to the
backing file, as an active commit would.  Behaviour that matters to the
workflows (errors, job lifecycle, "not ready", atomic snapshots) follows
libvirt's; ``tests/test_hypervisor_contract.py`` checks the two agree.

``hook`` (optional) is called as ``hook("before", method)`` and
``hook("after", method)`` around every mutating call: crash tests raise from
it to stop the process at exactly that point.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, TypeVar

from ..errors import AgentUnavailable, DomainNotFound, NotReady, OperationFailed
from . import hold
from .base import BlockJob, Disk, Firmware, parse_firmware
from .fake_backup import FakeBackupOps
from .fake_save import FakeSaveOps
from .fake_snapshot import FakeSnapshotOps

T = TypeVar("T")

READY_AFTER_POLLS = 2


@dataclass
class _FakeDisk:
    target: str
    base: str
    overlay: str | None = None
    job_polls: int | None = None  # None: no job; else polls seen since commit began
    fmt: str = "qcow2"
    type: str = "file"
    device: str = "disk"
    readonly: bool = False
    shareable: bool = False
    job_type: str = "active-commit"  # or pull


@dataclass
class _FakeDomain:
    name: str
    disks: dict[str, _FakeDisk]
    state: str = "running"
    agent: bool = False
    frozen: bool = False
    metadata: str = ""  # the domain XML's <metadata> element, as written
    log: list[str] = field(default_factory=list)
    nvram: str | None = None


class FakeHypervisor(FakeSaveOps, FakeSnapshotOps, FakeBackupOps):
    def __init__(self, uri: str = "fake:///default", hook: Callable[[str, str], None] | None = None) -> None:
        self.uri = uri
        self.domains: dict[str, _FakeDomain] = {}
        self.hook = hook
        self.hold_xml: dict[str, str] = {}  # domain -> our <hold> element as written (apart from ``metadata``)

    # -- test set-up (not part of the Hypervisor protocol) ----------------------
    def add_domain(self, name: str, disks: dict[str, str], *, agent: bool = False, state: str = "running",
                   disk_type: str = "file", nvram: str | None = None, metadata: str = "") -> None:
        self.domains[name] = _FakeDomain(
            name, {t: _FakeDisk(t, p, type=disk_type) for t, p in disks.items()}, state=state, agent=agent,
            nvram=nvram, metadata=metadata)

    def add_disk(self, name: str, target: str, path: str, *, device: str = "disk", readonly: bool = False,
                 shareable: bool = False, fmt: str = "qcow2") -> None:
        """Attach one more disk (a cdrom, a read-only or shareable disk...) to a fake domain."""
        self._dom(name).disks[target] = _FakeDisk(target, path, fmt=fmt, device=device, readonly=readonly,
                                                  shareable=shareable)

    def guest_write(self, name: str, target: str, offset: int, data: bytes) -> None:
        disk = self._dom(name).disks[target]
        if disk.overlay:
            with open(disk.overlay) as f:
                ov = json.load(f)
            ov["writes"].append([offset, data.hex()])
            _write_json(disk.overlay, ov)
        else:
            _pwrite(disk.base, offset, data)

    # -- helpers ------------------------------------------------------------------
    def _dom(self, name: str) -> _FakeDomain:
        try:
            return self.domains[name]
        except KeyError:
            raise DomainNotFound(f"domain {name}: Domain not found: no domain with matching name '{name}'") from None

    def _running(self, name: str) -> _FakeDomain:
        dom = self._dom(name)
        if dom.state != "running":
            raise OperationFailed(f"domain {name}: domain is not running")
        return dom

    def _effect(self, method: str, fn: Callable[[], T]) -> T:
        if self.hook:
            self.hook("before", method)
        out = fn()
        if self.hook:
            self.hook("after", method)
        return out

    # -- protocol -------------------------------------------------------------------
    def canonical_uri(self) -> str:
        return self.uri

    def close(self) -> None:
        pass

    def list_domains(self) -> list[str]:
        return sorted(self.domains)

    def domain_state(self, name: str) -> str:
        return self._dom(name).state

    def domain_xml(self, name: str) -> str:
        dom = self._dom(name)
        disks = "".join(f"<disk type='{d.type}' device='{d.device}'><source file='{d.overlay or d.base}'/>"
                        f"<target dev='{d.target}'/>{'<readonly/>' if d.readonly else ''}"
                        f"{'<shareable/>' if d.shareable else ''}</disk>" for d in dom.disks.values())
        nvram = f"<os><nvram>{dom.nvram}</nvram></os>" if dom.nvram else ""
        return f"<domain type='fake'><name>{name}</name>{dom.metadata}{nvram}<devices>{disks}</devices></domain>"

    def firmware(self, name: str) -> Firmware:
        return parse_firmware(self.domain_xml(name))

    def disks(self, name: str) -> list[Disk]:
        out = []
        for d in self._dom(name).disks.values():
            ready = d.job_polls is not None and d.job_polls >= READY_AFTER_POLLS
            mirroring = d.job_polls is not None and d.job_type != "pull"
            out.append(Disk(target=d.target, source=d.overlay or d.base, format=d.fmt, type=d.type,
                            backing=[d.base] if d.overlay else [],
                            mirror_job=d.job_type if mirroring else None, mirror_ready=ready, device=d.device,
                            mirror_source=d.base if mirroring else None, readonly=d.readonly,
                            shareable=d.shareable))
        return out

    def block_job(self, name: str, target: str) -> BlockJob | None:
        d = self._dom(name).disks[target]
        if d.job_polls is None:
            return None
        d.job_polls += 1
        if d.job_type == "pull":
            return self._pull_poll(d)
        end = os.path.getsize(d.overlay) if d.overlay else 0
        cur = end if d.job_polls >= READY_AFTER_POLLS else end // 2
        return BlockJob(target=target, type="active-commit", cur=cur, end=end)

    def fs_freeze(self, name: str) -> int:
        dom = self._running(name)
        if not dom.agent:
            raise AgentUnavailable(f"fsfreeze of {name}: Guest agent is not responding: "
                                   "QEMU guest agent is not connected")

        def freeze() -> int:
            dom.frozen = True
            return len(dom.disks)
        return self._effect("fs_freeze", freeze)

    def fs_thaw(self, name: str) -> int:
        dom = self._running(name)
        if not dom.agent:
            raise AgentUnavailable(f"fsthaw of {name}: QEMU guest agent is not connected")

        def thaw() -> int:
            n = len(dom.disks) if dom.frozen else 0
            dom.frozen = False
            return n
        return self._effect("fs_thaw", thaw)

    def guest_exec(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        dom = self._running(name)
        if not dom.agent:
            raise AgentUnavailable(f"guest-exec in {name}: QEMU guest agent is not connected")

        def run() -> dict[str, Any]:
            dom.log.append("exec " + " ".join(argv))
            return {"exitcode": 0, "timed_out": False, "out": "", "err": ""}
        out: dict[str, Any] = self._effect("guest_exec", run)
        return out

    def fs_frozen(self, name: str) -> bool:
        dom = self._running(name)
        if not dom.agent:
            raise AgentUnavailable(f"fsfreeze status of {name}: QEMU guest agent is not connected")
        return dom.frozen

    def snapshot_disk_only(self, name: str, overlays: dict[str, str], quiesce: bool = False) -> None:
        dom = self._running(name)
        if quiesce and not dom.agent:
            raise AgentUnavailable(f"snapshot of {name}: QEMU guest agent is not connected")
        for target, path in overlays.items():
            if target not in dom.disks:
                raise OperationFailed(f"snapshot of {name}: no disk named '{target}'")
            if os.path.exists(path):
                raise OperationFailed(f"snapshot of {name}: external snapshot file for disk {target} "
                                      f"already exists and is not a block device: {path}")

        def create() -> None:
            # atomic: every overlay file first, then every disk switches
            for target, path in overlays.items():
                _write_json(path, {"backing": dom.disks[target].overlay or dom.disks[target].base,
                                   "writes": []})
            for target, path in overlays.items():
                dom.disks[target].overlay = path
        self._effect("snapshot_disk_only", create)

    def chain_users(self, paths: Collection[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {p: [] for p in paths}
        for dom in self.domains.values():
            how = "running" if dom.state in ("running", "paused") else "defined"
            for d in dom.disks.values():
                for p in paths:
                    if p in (d.overlay, d.base):
                        out[p].append(f"{dom.name} ({d.target}, {how})")
        return out

    def block_commit_intermediate(self, name: str, target: str, top: str, base: str) -> None:
        d = self._running(name).disks[target]
        # one overlay at most here: a layer below the active one does not exist in this fake
        raise OperationFailed(f"blockcommit of {top} into {base} on {name}/{target}: {top} not in the chain "
                              f"of {target} below its active layer {d.overlay or d.base}")

    def block_commit_active(self, name: str, target: str, top: str | None = None, base: str | None = None) -> None:
        d = self._running(name).disks[target]
        if top is not None and (top != d.overlay or base != d.base):
            raise OperationFailed(f"active blockcommit of {name}/{target}: {top} is not the active layer over "
                                  f"{base}")
        if d.overlay is None:
            raise OperationFailed(f"active blockcommit of {name}/{target}: top '{d.base}' in chain for "
                                  f"'{target}' has no backing file")
        if d.job_polls is not None:
            raise OperationFailed(f"active blockcommit of {name}/{target}: disk '{target}' already in "
                                  "active block job")

        def start() -> None:
            d.job_polls, d.job_type = 0, "active-commit"
        self._effect("block_commit_active", start)

    def block_pull(self, name: str, target: str) -> None:
        d = self._running(name).disks[target]
        if d.job_polls is not None:
            raise OperationFailed(f"block pull of {name}/{target}: disk '{target}' already in active block job")

        def start() -> None:
            if d.overlay is not None:  # a disk without backing: nothing to pull, no job (as QEMU)
                d.job_polls, d.job_type = 0, "pull"
        self._effect("block_pull", start)

    def _pull_poll(self, d: _FakeDisk) -> BlockJob | None:
        """A pull ends by itself: the overlay then holds the whole disk (base, then its writes), alone."""
        assert d.overlay is not None
        end = os.path.getsize(d.base)
        if d.job_polls is not None and d.job_polls < READY_AFTER_POLLS:
            return BlockJob(target=d.target, type="pull", cur=end // 2, end=end)
        with open(d.overlay) as f:
            writes = json.load(f)["writes"]
        with open(d.base, "rb") as f:
            data = f.read()
        with open(d.overlay, "wb") as f:
            f.write(data)
        for offset, hexdata in writes:
            _pwrite(d.overlay, offset, bytes.fromhex(hexdata))
        d.base, d.overlay, d.job_polls, d.job_type = d.overlay, None, None, "active-commit"
        return None

    def block_pivot(self, name: str, target: str) -> None:
        d = self._running(name).disks[target]
        if d.job_polls is None:
            raise OperationFailed(f"pivot of {name}/{target}: disk {target} does not have an active block job")
        if d.job_polls < READY_AFTER_POLLS:
            raise NotReady(f"pivot of {name}/{target}: block copy still active: disk '{target}' not ready "
                           "for pivot yet")

        def pivot() -> None:
            assert d.overlay is not None
            with open(d.overlay) as f:
                for offset, hexdata in json.load(f)["writes"]:
                    _pwrite(d.base, offset, bytes.fromhex(hexdata))
            d.overlay = None
            d.job_polls = None
        self._effect("block_pivot", pivot)

    def commit_offline(self, name: str, overlay: str, base: str) -> None:
        dom = self._dom(name)
        if dom.state != "shutoff":
            raise OperationFailed(f"offline commit of {overlay}: domain {name} is {dom.state}")

        def commit() -> None:
            with open(overlay) as f:
                for offset, hexdata in json.load(f)["writes"]:
                    _pwrite(base, offset, bytes.fromhex(hexdata))
        self._effect("commit_offline", commit)

    def commit_image(self, overlay: str, base: str) -> None:
        def commit() -> None:
            with open(overlay) as f:
                for offset, hexdata in json.load(f)["writes"]:
                    _pwrite(base, offset, bytes.fromhex(hexdata))
        self._effect("commit_image", commit)

    def define_disk_sources(self, name: str, sources: dict[str, dict[str, str]], running_ok: bool = False) -> None:
        dom = self._dom(name)
        if dom.state != "shutoff" and not running_ok:
            raise OperationFailed(f"redefinition of {name}'s disks: the domain is running")

        def define() -> None:
            for target, want in sources.items():
                d = dom.disks[target]
                d.base, d.overlay, d.job_polls = want["path"], None, None
        self._effect("define_disk_sources", define)

    def block_job_abort(self, name: str, target: str) -> None:
        d = self._running(name).disks[target]
        if d.job_polls is None:
            raise OperationFailed(f"abort of block job {name}/{target}: disk {target} does not have an "
                                  "active block job")

        def abort() -> None:
            d.job_polls, d.job_type = None, "active-commit"
        self._effect("block_job_abort", abort)

    # -- the hold mark (workflows/hypervisor/hold.py) -----------------------------------
    def set_hold_mark(self, name: str, mark: dict[str, Any] | None) -> None:
        self._dom(name)
        xml = hold.mark_xml(mark) if mark is not None else None

        def write() -> None:
            if xml is None:
                self.hold_xml.pop(name, None)
            else:
                self.hold_xml[name] = xml
        self._effect("set_hold_mark", write)

    def hold_mark(self, name: str) -> dict[str, Any] | None:
        self._dom(name)
        return hold.parse_mark(self.hold_xml.get(name))

    def plant_hold_xml(self, name: str, xml: str) -> None:
        """Test set-up: any text as the domain's hold element, as another tool could write it."""
        self.hold_xml[name] = xml


def _write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _pwrite(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
