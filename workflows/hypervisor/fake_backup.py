"""The in-memory fake's side of the backup operations (mixed into FakeHypervisor).

A fake disk is a raw file.  A checkpoint's "bitmap" is a copy of the disk's
bytes when the checkpoint was made, kept apart from the checkpoint's metadata
(as a bitmap lives in the qcow2 image, not in libvirt): the blocks changed
since the checkpoint are those that differ from that copy.  Deleting a
checkpoint's metadata only (``--metadata``, an undefine) keeps the bitmap; a
real delete drops it (libvirt merges it into the parent's, whose copy here
already covers the same changes).

A backup job takes a point-in-time copy of its disks when it begins.  A push
job completes after ``JOB_POLLS`` polls of ``get_backup_job`` and then writes
its qcow2 targets (holding only the changed clusters for an incremental); a
pull job serves ``FakeExport``s until it is ended with ``backup_abort``.
Aborting takes effect at the next poll, as libvirt's asynchronous abort does.
Errors follow libvirt's (see tests/test_direct_backup_contract.py).
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Collection

from ..errors import CheckpointInconsistent, CheckpointNotFound, OperationFailed
from .backup_types import BackupJob, CheckpointInfo, CompletedBackup, checkpoint_xml, parse_checkpoint

BLOCK = 64 * 1024
JOB_POLLS = 2


@dataclass
class _FakeJob:
    mode: str
    disks: dict[str, str]
    checkpoint: str
    incremental: str | None
    socket: str | None
    content: dict[str, bytes]  # point-in-time copy of each disk
    dirty: dict[str, list[tuple[int, int]]]  # changed extents since ``incremental`` (every block for a full)
    full: frozenset[str] = frozenset()  # disks taken whole even in an incremental (no bitmap)
    polls: int = 0
    aborting: bool = False


@dataclass
class _BackupState:
    checkpoints: dict[str, CheckpointInfo] = field(default_factory=dict)
    current: str | None = None
    bitmaps: dict[str, dict[str, bytes]] = field(default_factory=dict)  # disk -> checkpoint -> copy
    job: _FakeJob | None = None
    completed: CompletedBackup | None = None
    description: str = ""


def _blocks_differing(old: bytes, new: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off in range(0, max(len(old), len(new)), BLOCK):
        if old[off:off + BLOCK] != new[off:off + BLOCK]:
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + BLOCK)
            else:
                out.append((off, BLOCK))
    return [(o, min(n, len(new) - o)) for o, n in out if o < len(new)]


def _data_blocks(data: bytes) -> list[tuple[int, int]]:
    return _blocks_differing(bytes(len(data)), data)


class FakeExport:
    def __init__(self, content: bytes, dirty: list[tuple[int, int]] | None) -> None:
        self.content = content
        self.dirty = dirty
        self.size = len(content)

    def extents(self, dirty: bool) -> list[tuple[int, int]]:
        if dirty:
            if self.dirty is None:
                raise OperationFailed("the export does not offer a dirty bitmap")
            return list(self.dirty)
        return _data_blocks(self.content)

    def pread(self, length: int, offset: int) -> bytes:
        return self.content[offset:offset + length]

    def close(self) -> None:
        pass


class FakeBackupOps:
    # -- state and test set-up ---------------------------------------------------------------
    def _bk(self, name: str) -> _BackupState:
        self._dom(name)  # type: ignore[attr-defined]  # raises DomainNotFound
        states: dict[str, _BackupState] = self.__dict__.setdefault("_backup_states", {})
        return states.setdefault(name, _BackupState())

    def _read_disk(self, name: str, target: str) -> bytes:
        with open(self._dom(name).disks[target].base, "rb") as f:  # type: ignore[attr-defined]
            data: bytes = f.read()
            return data

    def forget_checkpoints(self, name: str) -> None:
        """libvirt loses the checkpoint metadata (undefine + define); the bitmaps stay in the images."""
        st = self._bk(name)
        st.checkpoints.clear()
        st.current = None

    def drop_bitmap(self, name: str, target: str, checkpoint: str) -> None:
        """A bitmap vanishes from an image (a QEMU crash)."""
        self._bk(name).bitmaps.get(target, {}).pop(checkpoint, None)

    def bitmaps_of(self, name: str, target: str) -> list[str]:
        return sorted(self._bk(name).bitmaps.get(target, {}))

    # -- read-only -----------------------------------------------------------------------------
    def list_checkpoints(self, name: str) -> list[CheckpointInfo]:
        st = self._bk(name)
        order: list[CheckpointInfo] = []
        seen: set[str] = set()
        while len(order) < len(st.checkpoints):
            for cp in st.checkpoints.values():
                if cp.name not in seen and (cp.parent is None or cp.parent in seen):
                    order.append(cp)
                    seen.add(cp.name)
        return order

    def lookup_checkpoint(self, name: str, checkpoint: str) -> CheckpointInfo | None:
        return self._bk(name).checkpoints.get(checkpoint)

    def get_backup_job(self, name: str) -> BackupJob | None:
        st = self._bk(name)
        job = st.job
        if job is None:
            return None
        job.polls += 1
        total = sum(n for ext in job.dirty.values() for _, n in ext)
        if job.aborting:
            st.job = None
            st.completed = CompletedBackup(False, 0, total, "Operation canceled")
            if job.mode == "pull":
                for path in job.disks.values():
                    if os.path.exists(path):
                        os.unlink(path)
            return None
        if job.mode == "push" and job.polls >= JOB_POLLS:
            self._write_push_targets(job)
            st.job = None
            st.completed = CompletedBackup(True, total, total)
            return None
        done = total * job.polls // JOB_POLLS if job.mode == "push" else 0
        return BackupJob(mode=job.mode, incremental=job.incremental, disks=dict(job.disks), socket=job.socket,
                         exports={t: (t, f"backup-{t}" if job.incremental else None) for t in job.disks},
                         processed=done, total=total if job.mode == "push" else 0)

    def get_completed_backup(self, name: str) -> CompletedBackup | None:
        return self._bk(name).completed

    def get_disk_capacity(self, name: str, target: str) -> int:
        return os.path.getsize(self._dom(name).disks[target].base)  # type: ignore[attr-defined]

    def get_inactive_xml(self, name: str) -> str:
        xml: str = self.domain_xml(name)  # type: ignore[attr-defined]
        desc = self._bk(name).description
        if desc:
            xml = xml.replace("</name>", f"</name><description>{desc}</description>", 1)
        return xml

    def lookup_domain_description(self, name: str) -> str | None:
        if name not in self.domains:  # type: ignore[attr-defined]
            return None
        return self._bk(name).description

    # -- checkpoints ------------------------------------------------------------------------------
    def _new_checkpoint(self, name: str, checkpoint: str, disks: list[str]) -> CheckpointInfo:
        st = self._bk(name)
        created = int(time.time())
        info = parse_checkpoint(checkpoint_xml(checkpoint, list(self._dom(name).disks), disks,  # type: ignore
                                               parent=st.current, created=created))
        st.checkpoints[checkpoint] = info
        st.current = checkpoint
        for t in disks:
            st.bitmaps.setdefault(t, {})[checkpoint] = self._read_disk(name, t)
        return info

    def checkpoint_create(self, name: str, checkpoint: str, disks: list[str]) -> CheckpointInfo:
        st = self._bk(name)
        if checkpoint in st.checkpoints:
            raise OperationFailed(f"checkpoint {checkpoint} of {name}: operation failed: domain moment "
                                  f"{checkpoint} already exists")
        info: CheckpointInfo = self._effect("checkpoint_create",  # type: ignore[attr-defined]
                                            lambda: self._new_checkpoint(name, checkpoint, disks))
        return info

    def checkpoint_redefine(self, name: str, xml: str) -> None:
        st = self._bk(name)
        info = parse_checkpoint(xml)
        what = f"redefine of checkpoint {info.name} of {name}"
        if self._dom(name).state != "running":  # type: ignore[attr-defined]
            raise OperationFailed(f"{what}: Requested operation is not valid: domain is not running")
        if info.parent and info.parent not in st.checkpoints:
            raise OperationFailed(f"{what}: invalid argument: parent {info.parent} for moment {info.name} not found")
        for t in info.disks:
            if info.name not in st.bitmaps.get(t, {}):
                raise CheckpointInconsistent(f"{what}: checkpoint inconsistent: missing or broken bitmap "
                                             f"'{info.name}' for disk '{t}'")

        def redefine() -> None:
            st.checkpoints[info.name] = info
            st.current = info.name
        self._effect("checkpoint_redefine", redefine)  # type: ignore[attr-defined]

    def checkpoint_delete(self, name: str, checkpoint: str, *, children: bool = False,
                          metadata_only: bool = False) -> None:
        st = self._bk(name)
        if checkpoint not in st.checkpoints:
            raise CheckpointNotFound(f"delete of checkpoint {checkpoint} of {name}: Domain checkpoint not found: "
                                     f"no domain checkpoint with matching name '{checkpoint}'")

        def delete_one(cp: CheckpointInfo) -> None:
            kids = [c for c in st.checkpoints.values() if c.parent == cp.name]
            for kid in kids:
                if children:
                    delete_one(kid)
                else:
                    kid.parent = cp.parent
                    kid.xml = checkpoint_xml(kid.name, list(self._dom(name).disks), kid.disks,  # type: ignore
                                             parent=cp.parent, created=kid.created)
            del st.checkpoints[cp.name]
            if not metadata_only:
                for t in cp.disks:
                    st.bitmaps.get(t, {}).pop(cp.name, None)
            if st.current == cp.name:
                st.current = cp.parent

        self._effect("checkpoint_delete", lambda: delete_one(st.checkpoints[checkpoint]))  # type: ignore

    # -- backup jobs ----------------------------------------------------------------------------------
    def backup_begin(self, name: str, *, mode: str, disks: dict[str, str], checkpoint: str,
                     incremental: str | None = None, socket: str | None = None,
                     full: Collection[str] = ()) -> None:
        dom, st = self._running(name), self._bk(name)  # type: ignore[attr-defined]
        whole = frozenset(t for t in full if t in disks)
        what = f"backup of {name}"
        if st.job is not None:
            raise OperationFailed(f"{what}: Timed out during operation: cannot acquire state change lock "
                                  "(held by monitor=remoteDispatchDomainBackupBegin)", retryable=True)
        if incremental is not None:
            if incremental not in st.checkpoints:
                raise CheckpointNotFound(f"{what}: Domain checkpoint not found: Checkpoint '{incremental}' for "
                                         "incremental backup not found")
            for t in disks:
                if t not in whole and incremental not in st.bitmaps.get(t, {}):
                    raise CheckpointInconsistent(f"{what}: checkpoint inconsistent: missing or broken bitmap "
                                                 f"'{incremental}' for disk '{t}'")
        if checkpoint in st.checkpoints:
            raise OperationFailed(f"{what}: operation failed: domain moment {checkpoint} already exists")
        for t, path in disks.items():
            if t not in dom.disks:
                raise OperationFailed(f"{what}: invalid argument: no disk named '{t}'")
            if os.path.exists(path):
                raise OperationFailed(f"{what}: invalid argument: store '{path}' for backup of '{t}' exists")

        def begin() -> None:
            content = {t: self._read_disk(name, t) for t in disks}
            dirty = {t: (_blocks_differing(st.bitmaps[t][incremental], content[t]) if incremental and t not in whole
                         else [(0, len(content[t]))]) for t in disks}
            for t, path in disks.items():
                if mode == "push":
                    from ..nbdio import run_qemu_img
                    run_qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, str(len(content[t])))
                else:
                    open(path, "wb").close()  # the scratch file
            self._new_checkpoint(name, checkpoint, [t for t in disks if t not in whole])
            st.job = _FakeJob(mode, dict(disks), checkpoint, incremental, socket, content, dirty, whole)
        self._effect("backup_begin", begin)  # type: ignore[attr-defined]

    def _write_push_targets(self, job: _FakeJob) -> None:
        from ..nbdio import QcowWriter
        for t, path in job.disks.items():
            w = QcowWriter(path)
            try:
                for off, length in job.dirty[t]:
                    chunk = job.content[t][off:off + length]
                    if job.incremental and t not in job.full and chunk.count(0) == len(chunk):
                        w.zero(length, off)
                    elif chunk.count(0) != len(chunk):
                        w.pwrite(chunk, off)
            finally:
                w.close()

    def backup_abort(self, name: str) -> None:
        st = self._bk(name)
        if st.job is None or st.job.aborting:
            raise OperationFailed(f"end of the backup job of {name}: Requested operation is not valid: no job is "
                                  "active on the domain")

        def abort() -> None:
            assert st.job is not None
            st.job.aborting = True
        self._effect("backup_abort", abort)  # type: ignore[attr-defined]

    def open_backup_export(self, name: str, job: BackupJob, disk: str) -> FakeExport:
        st = self._bk(name)
        if st.job is None or st.job.mode != "pull" or disk not in st.job.disks:
            raise OperationFailed(f"cannot read export {disk!r} at {job.socket}: no such export")
        return FakeExport(st.job.content[disk],
                          st.job.dirty[disk] if st.job.incremental and disk not in st.job.full else None)

    # -- domains made by a restore -----------------------------------------------------------------------
    def define_restored_domain(self, xml: str) -> None:
        root = ET.fromstring(xml)
        name = root.findtext("name") or ""
        disks = {d.find("target").get("dev"): d.find("source").get("file")  # type: ignore[union-attr]
                 for d in root.findall("./devices/disk")}

        nvram = (root.findtext("./os/nvram") or "").strip() or None

        def define() -> None:
            self.add_domain(name, disks, state="shutoff", nvram=nvram)  # type: ignore[attr-defined]
            self._bk(name).description = root.findtext("description") or ""
        self._effect("define_restored_domain", define)  # type: ignore[attr-defined]

    def undefine_restored_domain(self, name: str, *, nvram: bool = False) -> None:
        dom = self._dom(name)  # type: ignore[attr-defined]
        if dom.state != "shutoff":
            raise OperationFailed(f"undefine of {name}: Requested operation is not valid: domain is running")

        def undefine() -> None:
            if nvram and dom.nvram:  # as libvirt's VIR_DOMAIN_UNDEFINE_NVRAM: the file goes with it
                try:
                    os.unlink(dom.nvram)
                except FileNotFoundError:
                    pass
            del self.domains[name]  # type: ignore[attr-defined]
            self.__dict__.get("_backup_states", {}).pop(name, None)
        self._effect("undefine_restored_domain", undefine)  # type: ignore[attr-defined]
