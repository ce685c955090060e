"""libvirt calls for the snapshot strategies (mixed into LibvirtHypervisor).

Methods use ``self._call(what, fn)``, which maps libvirt errors to ours.

Snapshot create, revert and delete run as jobs inside libvirtd: when the
caller dies in the middle, libvirtd finishes (or fails) them on its own.
While an internal snapshot is being created, libvirt already lists it, so a
resumed step first waits for the domain to be idle (``is_domain_busy``)
before it believes what ``lookup_snapshot`` says.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt

from .libvirt_calls import LibvirtCalls

from .snapshot_info import SnapshotInfo


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;").replace(">", "&gt;")


def snapshot_xml(snap: str, description: str, targets: list[str], *, memory: bool,
                 overlays: dict[str, str] | None, memory_file: str | None) -> str:
    """The <domainsnapshot> document: internal when ``overlays`` is None, else external."""
    parts = [f"<name>{_attr(snap)}</name>", f"<description>{_attr(description)}</description>"]
    if overlays is None:
        parts.append("<memory snapshot='internal'/>" if memory else "<memory snapshot='no'/>")
        disks = [f"<disk name='{t}' snapshot='internal'/>" for t in targets]
    else:
        parts.append(f"<memory snapshot='external' file='{_attr(memory_file)}'/>" if memory_file
                     else "<memory snapshot='no'/>")
        disks = [f"<disk name='{t}' snapshot='external' type='file'><driver type='qcow2'/>"
                 f"<source file='{_attr(overlays[t])}'/></disk>" if t in overlays
                 else f"<disk name='{t}' snapshot='no'/>" for t in targets]
    parts.append(f"<disks>{''.join(disks)}</disks>")
    return f"<domainsnapshot>{''.join(parts)}</domainsnapshot>"


def parse_snapshot(xml: str, current: bool, children: int) -> SnapshotInfo:
    root = ET.fromstring(xml)
    mem = root.find("memory")
    disks: dict[str, str] = {}
    for d in root.findall("./disks/disk"):
        mode = d.get("snapshot", "no")
        if mode == "external":
            src = d.find("source")
            disks[d.get("name", "")] = (src.get("file") or src.get("dev") or "") if src is not None else ""
        else:
            disks[d.get("name", "")] = mode
    base = {}
    for d in root.findall("./domain/devices/disk"):
        target, src = d.find("target"), d.find("source")
        if target is not None and src is not None and d.get("device", "disk") == "disk":
            base[target.get("dev", "")] = src.get("file") or src.get("dev") or ""
    return SnapshotInfo(name=root.findtext("name") or "", description=root.findtext("description") or "",
                        state=root.findtext("state") or "", memory=mem.get("snapshot", "no") if mem is not None
                        else "no", memory_file=mem.get("file") if mem is not None else None, disks=disks,
                        base=base, current=current, parent=root.findtext("./parent/name"), children=children)


class LibvirtSnapshotOps(LibvirtCalls):
    # -- read-only ---------------------------------------------------------------
    def is_domain_busy(self, name: str) -> bool:
        """Whether a job (a snapshot being created, reverted or deleted...) holds the domain.

        virDomainGetJobStats waits for a synchronous job to end before it
        answers; an asynchronous job without statistics (an external
        snapshot delete) makes it fail with an internal error instead.
        """
        def busy(c: libvirt.virConnect) -> bool:
            dom = self._dom(c, name)
            try:
                stats = dom.jobStats()
            except libvirt.libvirtError as exc:
                code = exc.get_error_code()
                if code == libvirt.VIR_ERR_OPERATION_INVALID:  # inactive, after any job on it ended
                    return False
                if code in (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_OPERATION_TIMEOUT):
                    return True
                raise
            return stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) in (libvirt.VIR_DOMAIN_JOB_BOUNDED,
                                                                       libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
        return self._call(f"job of {name}", busy)

    def lookup_snapshot(self, name: str, snap: str) -> SnapshotInfo | None:
        def lookup(c: libvirt.virConnect) -> SnapshotInfo | None:
            try:
                s = self._dom(c, name).snapshotLookupByName(snap, 0)
                return parse_snapshot(s.getXMLDesc(0), bool(s.isCurrent(0)), s.numChildren(0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                    return None
                raise
        return self._call(f"snapshot {snap} of {name}", lookup)

    def list_snapshot_names(self, name: str) -> list[str]:
        return sorted(self._call(f"snapshots of {name}",
                                 lambda c: [s.getName() for s in self._dom(c, name).listAllSnapshots(0)]))

    def get_current_snapshot(self, name: str) -> str | None:
        def current(c: libvirt.virConnect) -> str | None:
            dom = self._dom(c, name)
            return dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None
        return self._call(f"current snapshot of {name}", current)

    def get_library_version(self) -> int:
        """libvirt's version as major * 1,000,000 + minor * 1,000 + release."""
        return int(self._call("libvirt version", lambda c: c.getLibVersion()))

    # -- effects (fenced) ------------------------------------------------------------
    def create_snapshot(self, name: str, snap: str, *, description: str, memory: bool,
                        overlays: dict[str, str] | None = None, memory_file: str | None = None) -> None:
        """virDomainSnapshotCreateXML, keeping libvirt's metadata (these are the user's snapshots).

        Internal when ``overlays`` is None (with the memory of a running
        domain when ``memory``); else external: each disk in ``overlays``
        gets that overlay, the others are left out, and the memory goes to
        ``memory_file`` when given (disk-only otherwise).  Always atomic.
        """
        def create(c: libvirt.virConnect) -> None:
            dom = self._dom(c, name)
            targets = [t.get("dev", "") for d in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk")
                       if d.get("device", "disk") == "disk" for t in [d.find("target")] if t is not None]
            xml = snapshot_xml(snap, description, targets, memory=memory, overlays=overlays, memory_file=memory_file)
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            if overlays is not None and not memory_file:
                flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            dom.snapshotCreateXML(xml, flags)
        self._call(f"snapshot {snap} of {name}", create)

    def revert_to_snapshot(self, name: str, snap: str) -> None:
        self._call(f"revert of {name} to snapshot {snap}",
                   lambda c: self._dom(c, name).revertToSnapshot(self._dom(c, name).snapshotLookupByName(snap, 0), 0))

    def delete_snapshot(self, name: str, snap: str, *, metadata_only: bool = False) -> None:
        """virDomainSnapshotDelete.  For an external snapshot libvirt 9.0 merges the overlay
        into the image below it and removes the overlay file (not the memory file)."""
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY if metadata_only else 0
        self._call(f"delete of snapshot {snap} of {name}",
                   lambda c: self._dom(c, name).snapshotLookupByName(snap, 0).delete(flags))
