"""libvirt calls for the backup strategies (mixed into LibvirtHypervisor).

Methods use ``self._call(what, fn)``, which maps libvirt errors to ours.

Checkpoints: created with a backup (``backupBegin``'s checkpoint XML) or
alone, redefined from our own store with ``REDEFINE_VALIDATE`` (libvirt then
checks the bitmaps exist in the qcow2 images), deleted (libvirt merges the
bitmap into the parent's).  Backup jobs: ``backupBegin`` in push or pull
mode; a job is read back from the domain's job stats plus
``backupGetXMLDesc``; the stats of the last completed one are read with
``KEEP_COMPLETED`` so a crash right after reading them loses nothing.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Collection, TypeVar

import libvirt

from .libvirt_calls import LibvirtCalls

from ..errors import OperationFailed
from .backup_types import BackupJob, CheckpointInfo, CompletedBackup, Export, checkpoint_xml, parse_checkpoint
from .backup_types import xml_attr as _attr

T = TypeVar("T")

_COMPLETED = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
_REDEFINE = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE


def parse_backup_xml(xml: str) -> BackupJob:
    root = ET.fromstring(xml)
    server = root.find("server")
    job = BackupJob(mode=root.get("mode", "push"), incremental=root.findtext("incremental"),
                    socket=server.get("socket") if server is not None else None)
    for d in root.findall("./disks/disk"):
        if d.get("backup") != "yes":
            continue
        node = d.find("target") if job.mode == "push" else d.find("scratch")
        job.disks[d.get("name", "")] = (node.get("file") or node.get("dev") or "") if node is not None else ""
        job.exports[d.get("name", "")] = (d.get("exportname") or d.get("name", "") or "", d.get("exportbitmap"))
    return job


def backup_xml(mode: str, all_disks: list[str], disks: dict[str, str], incremental: str | None,
               socket: str | None, full: Collection[str] = ()) -> str:
    """``full``: disks without a bitmap (raw, block, network), taken whole even in an incremental
    (libvirt's per-disk ``backupmode='full'``)."""
    parts = []
    for t in all_disks:
        if t not in disks:
            parts.append(f"<disk name='{_attr(t)}' backup='no'/>")
            continue
        whole = " backupmode='full'" if incremental and t in full else ""
        node = "target" if mode == "push" else "scratch"
        parts.append(f"<disk name='{_attr(t)}' backup='yes'{whole} type='file'><driver type='qcow2'/>"
                     f"<{node} file='{_attr(disks[t])}'/></disk>")
    inc = f"<incremental>{_attr(incremental)}</incremental>" if incremental else ""
    server = f"<server transport='unix' socket='{_attr(socket or '')}'/>" if mode == "pull" else ""
    return f"<domainbackup mode='{mode}'>{inc}{server}<disks>{''.join(parts)}</disks></domainbackup>"


class LibvirtBackupOps(LibvirtCalls):
    def _targets(self, dom: libvirt.virDomain) -> list[str]:
        root = ET.fromstring(dom.XMLDesc(0))
        return [t.get("dev", "") for d in root.findall("./devices/disk") if d.get("device", "disk") == "disk"
                for t in [d.find("target")] if t is not None]

    # -- read-only ---------------------------------------------------------------------
    def list_checkpoints(self, name: str) -> list[CheckpointInfo]:
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
        return self._call(f"checkpoints of {name}", lambda c: [
            parse_checkpoint(cp.getXMLDesc(flags)) for cp in self._dom(c, name).listAllCheckpoints(
                libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)])

    def lookup_checkpoint(self, name: str, checkpoint: str) -> CheckpointInfo | None:
        def lookup(c: libvirt.virConnect) -> CheckpointInfo | None:
            try:
                cp = self._dom(c, name).checkpointLookupByName(checkpoint, 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    return None
                raise
            return parse_checkpoint(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        return self._call(f"checkpoint {checkpoint} of {name}", lookup)

    def get_backup_job(self, name: str) -> BackupJob | None:
        """The backup job running on ``name`` (None: no job, or a job of another kind)."""
        def job(c: libvirt.virConnect) -> BackupJob | None:
            dom = self._dom(c, name)
            stats = dom.jobStats(0)
            if stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE or \
                    stats.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
                return None
            try:
                out = parse_backup_xml(dom.backupGetXMLDesc(0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
                    return None  # ended between the two calls
                raise
            out.processed = int(stats.get("disk_processed", 0))
            out.total = int(stats.get("disk_total", 0))
            return out
        return self._call(f"backup job of {name}", job)

    def get_completed_backup(self, name: str) -> CompletedBackup | None:
        """How the domain's last job ended, when it was a backup (None otherwise or unknown)."""
        def completed(c: libvirt.virConnect) -> CompletedBackup | None:
            stats = self._dom(c, name).jobStats(_COMPLETED)
            if stats.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
                return None
            ok = (stats.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED and bool(stats.get("success"))
                  and not stats.get("errmsg"))
            return CompletedBackup(success=ok, processed=int(stats.get("disk_processed", 0)),
                                   total=int(stats.get("disk_total", 0)), error=stats.get("errmsg"))
        return self._call(f"completed job of {name}", completed)

    def get_disk_capacity(self, name: str, target: str) -> int:
        """The disk's size as the guest sees it (bytes)."""
        return int(self._call(f"block info of {name}/{target}",
                              lambda c: self._dom(c, name).blockInfo(target, 0)[0]))

    def get_inactive_xml(self, name: str) -> str:
        xml: str = self._call(f"inactive XML of {name}",
                              lambda c: self._dom(c, name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        return xml

    def lookup_domain_description(self, name: str) -> str | None:
        """The ``<description>`` of a defined domain ('' when it has none); None when no such domain."""
        def describe(c: libvirt.virConnect) -> str | None:
            try:
                dom = c.lookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).findtext("description") or ""
        return self._call(f"lookup of domain {name}", describe)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_create(self, name: str, checkpoint: str, disks: list[str]) -> CheckpointInfo:
        def create(c: libvirt.virConnect) -> CheckpointInfo:
            dom = self._dom(c, name)
            cp = dom.checkpointCreateXML(checkpoint_xml(checkpoint, self._targets(dom), disks), 0)
            return parse_checkpoint(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        return self._call(f"checkpoint {checkpoint} of {name}", create)

    def checkpoint_redefine(self, name: str, xml: str) -> None:
        """Redefine a checkpoint from its XML; libvirt validates its bitmaps on a running domain (it refuses
        to validate on a shut-off one, whose bitmaps the caller checks in the images with qemu-img)."""
        def redefine(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            flags = _REDEFINE if dom.isActive() else libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
            dom.checkpointCreateXML(xml, flags)
        self._call(f"redefine of checkpoint {parse_checkpoint(xml).name} of {name}", redefine)

    def checkpoint_delete(self, name: str, checkpoint: str, *, children: bool = False,
                          metadata_only: bool = False) -> None:
        flags = (libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN if children else 0) | \
            (libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0)
        self._call(f"delete of checkpoint {checkpoint} of {name}",
                   lambda c: self._dom(c, name).checkpointLookupByName(checkpoint, 0).delete(flags))

    # -- backup jobs ---------------------------------------------------------------------------
    def backup_begin(self, name: str, *, mode: str, disks: dict[str, str], checkpoint: str,
                     incremental: str | None = None, socket: str | None = None, full: Collection[str] = ()) -> None:
        """Start a backup of ``disks`` (target -> push target file | pull scratch file) and create
        ``checkpoint`` in the same call; the ``full`` disks get no bitmap (checkpoint='no') and are taken
        whole even in an incremental (backupmode='full')."""
        def begin(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            targets = self._targets(dom)
            dom.backupBegin(backup_xml(mode, targets, disks, incremental, socket, full),
                            checkpoint_xml(checkpoint, targets, [t for t in disks if t not in full]), 0)
        self._call(f"backup of {name}", begin)

    def backup_abort(self, name: str) -> None:
        """End the domain's backup job (the normal end of a pull backup); returns before it is gone."""
        self._call(f"end of the backup job of {name}", lambda c: self._dom(c, name).abortJob())

    def open_backup_export(self, name: str, job: BackupJob, disk: str) -> Export:
        from ..nbdio import NbdExport
        if not job.socket:
            raise ValueError("a push backup has no export")
        export, bitmap = job.exports.get(disk, (disk, None))
        return NbdExport(job.socket, export, bitmap)

    # -- domains made by a restore -------------------------------------------------------------
    def define_restored_domain(self, xml: str) -> None:
        self._call("define of a restored domain", lambda c: c.defineXML(xml))

    def undefine_restored_domain(self, name: str, *, nvram: bool = False) -> None:
        """Undefine a stopped domain (libvirt would turn a running one transient: refused here)."""
        def undefine(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            if dom.isActive():
                raise OperationFailed(f"undefine of {name}: Requested operation is not valid: domain is running")
            # libvirt refuses to undefine a domain with NVRAM unless told what to do with the file;
            # the TPM state folder is named by the domain's UUID, a restored domain's own
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                              | (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if nvram else libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
                              | libvirt.VIR_DOMAIN_UNDEFINE_TPM)
        self._call(f"undefine of {name}", undefine)
