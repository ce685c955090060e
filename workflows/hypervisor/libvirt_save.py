"""libvirt calls for the save strategies (mixed into LibvirtHypervisor).

Methods use ``self._call(what, fn)``, which maps libvirt errors to ours.

virDomainSave / virDomainManagedSave run as a job inside libvirtd: when the
caller dies in the middle, libvirtd finishes (or fails) the save on its own,
with the domain paused meanwhile.  ``get_active_job`` lets a resumed step
wait for that job instead of starting a second one.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from .libvirt_calls import LibvirtCalls

_JOB_OPERATIONS = {
    libvirt.VIR_DOMAIN_JOB_OPERATION_START: "start",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE: "save",
    libvirt.VIR_DOMAIN_JOB_OPERATION_RESTORE: "restore",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN: "migration-in",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: "migration-out",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP: "dump",
}
_PAUSED_FOR_JOB = {libvirt.VIR_DOMAIN_PAUSED_SAVE: "save", libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "migration-out",
                   libvirt.VIR_DOMAIN_PAUSED_DUMP: "dump", libvirt.VIR_DOMAIN_PAUSED_STARTING_UP: "start",
                   libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT: "snapshot"}


class LibvirtSaveOps(LibvirtCalls):
    # -- read-only ---------------------------------------------------------------
    def is_persistent(self, name: str) -> bool:
        return bool(self._call(f"persistence of {name}", lambda c: self._dom(c, name).isPersistent()))

    def has_managed_save_image(self, name: str) -> bool:
        return bool(self._call(f"managed save image of {name}",
                               lambda c: self._dom(c, name).hasManagedSaveImage(0)))

    def get_uuid(self, name: str) -> str:
        uuid: str = self._call(f"UUID of {name}", lambda c: self._dom(c, name).UUIDString())
        return uuid

    def get_memory_bytes(self, name: str) -> int:
        return 1024 * int(self._call(f"memory of {name}", lambda c: self._dom(c, name).maxMemory()))

    def get_active_job(self, name: str) -> str | None:
        """The operation of the domain's running job (``save``, ``restore``...), or None.

        A job that libvirt reports completed while the domain is still paused
        for it (the save file being finalised) counts as running.
        """
        def job(c: libvirt.virConnect) -> str | None:
            dom = self._dom(c, name)
            state, reason = dom.state()
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                return None
            try:
                stats = dom.jobStats()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:  # not running (any more)
                    return None
                raise
            kind = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
            if kind in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED):
                return _JOB_OPERATIONS.get(stats.get("operation", 0), "other")
            if state == libvirt.VIR_DOMAIN_PAUSED and reason in _PAUSED_FOR_JOB:
                return _PAUSED_FOR_JOB[reason]
            return None
        return self._call(f"job of {name}", job)

    def read_save_image(self, path: str) -> dict[str, Any] | None:
        """What a save image holds: ``{"name", "uuid", "disks": {target: source}}``.

        None when the file is missing, not a save image, or incomplete (libvirt
        writes a "partial" magic until the save finished).
        """
        def read(c: libvirt.virConnect) -> str | None:
            try:
                xml: str = c.saveImageGetXMLDesc(path, 0)
                return xml
            except libvirt.libvirtError as exc:
                if exc.get_error_domain() == libvirt.VIR_FROM_RPC:
                    raise
                return None
        xml = self._call(f"save image {path}", read)
        return save_image_summary(xml) if xml else None

    # -- effects (fenced) ------------------------------------------------------------
    def managed_save(self, name: str) -> None:
        self._call(f"managed save of {name}", lambda c: self._dom(c, name).managedSave(0))

    def start(self, name: str) -> None:
        """virDomainCreate: restores the managed save image when there is one, else boots."""
        self._call(f"start of {name}", lambda c: self._dom(c, name).create())

    def save(self, name: str, path: str) -> None:
        self._call(f"save of {name} to {path}", lambda c: self._dom(c, name).save(path))

    def restore(self, path: str) -> None:
        self._call(f"restore from {path}", lambda c: c.restore(path))

    def destroy(self, name: str) -> None:
        self._call(f"destroy of {name}", lambda c: self._dom(c, name).destroy())

    def resume(self, name: str) -> None:
        self._call(f"resume of {name}", lambda c: self._dom(c, name).resume())


def save_image_summary(xml: str) -> dict[str, Any]:
    root = ET.fromstring(xml)
    disks: dict[str, str | None] = {}
    for d in root.findall("./devices/disk"):
        target, src = d.find("target"), d.find("source")
        if target is not None and d.get("device", "disk") == "disk":
            disks[target.get("dev", "")] = (src.get("file") or src.get("dev")) if src is not None else None
    return {"name": root.findtext("name"), "uuid": (root.findtext("uuid") or "").strip(), "disks": disks}
