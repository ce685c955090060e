"""Plain types of the checkpoint and backup calls, shared by libvirt and the fake.

``Export`` is what a pull-mode backup serves per disk: libvirt's NBD export
(read with libnbd, ``workflows.nbdio``) or the fake's in-memory one.  Only the
two questions an incremental transfer asks are exposed: which extents to
read, and their bytes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Protocol

BLOCK_STATUS_HOLE = 1  # base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO)
BLOCK_STATUS_ZERO = 2
BLOCK_STATUS_DIRTY = 1  # qemu:dirty-bitmap flag


@dataclass
class CheckpointInfo:
    name: str
    parent: str | None
    disks: list[str]  # disks with checkpoint='bitmap'
    xml: str  # the checkpoint's XML without the domain: what REDEFINE takes back
    created: int | None = None


@dataclass
class BackupJob:
    """A backup job running on a domain, from its job stats and ``backupGetXMLDesc``."""

    mode: str  # push | pull
    incremental: str | None
    disks: dict[str, str] = field(default_factory=dict)  # target -> push target file | pull scratch file
    socket: str | None = None
    exports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # target -> (export, bitmap)
    processed: int = 0
    total: int = 0

    def mentions(self, token: str) -> bool:
        """True when one of the job's files or its socket carries ``token`` (a workflow id)."""
        return any(token in p for p in [*self.disks.values(), self.socket or ""])


@dataclass
class CompletedBackup:
    """Stats libvirt keeps about the domain's last completed backup job."""

    success: bool
    processed: int
    total: int
    error: str | None = None


class Export(Protocol):
    size: int

    def extents(self, dirty: bool) -> list[tuple[int, int]]:
        """(offset, length) of what a backup must read: dirty blocks, or every block holding data."""
        ...

    def pread(self, length: int, offset: int) -> bytes: ...
    def close(self) -> None: ...


# -- checkpoint XML (libvirt's format; the fake speaks it too) ------------------------------
def xml_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;").replace(">", "&gt;")


def parse_checkpoint(xml: str) -> CheckpointInfo:
    root = ET.fromstring(xml)
    parent = root.find("./parent/name")
    created = root.findtext("creationTime")
    return CheckpointInfo(name=root.findtext("name") or "", parent=parent.text if parent is not None else None,
                          disks=[d.get("name", "") for d in root.findall("./disks/disk")
                                 if d.get("checkpoint") == "bitmap"],
                          xml=xml, created=int(created) if created else None)


def checkpoint_xml(checkpoint: str, all_disks: list[str], disks: list[str], parent: str | None = None,
                   created: int | None = None) -> str:
    """A checkpoint definition: ``disks`` get a bitmap, the other disks of the domain none."""
    parts = "".join(f"<disk name='{xml_attr(t)}' checkpoint='{'bitmap' if t in disks else 'no'}'"
                    f"{f' bitmap={chr(39)}{xml_attr(checkpoint)}{chr(39)}' if t in disks and created else ''}/>"
                    for t in all_disks)
    par = f"<parent><name>{xml_attr(parent)}</name></parent>" if parent else ""
    when = f"<creationTime>{created}</creationTime>" if created else ""
    return f"<domaincheckpoint><name>{xml_attr(checkpoint)}</name>{par}{when}<disks>{parts}</disks></domaincheckpoint>"
