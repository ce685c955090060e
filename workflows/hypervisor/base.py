"""What the workflows need from a hypervisor, as plain types.

Two implementations: ``LibvirtHypervisor`` (the only module that imports
``libvirt``) and ``FakeHypervisor`` (in memory, for exhaustive crash tests).
The contract tests in ``tests/test_hypervisor_contract.py`` run the same
cases against both so the fake cannot drift from libvirt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Disk:
    target: str  # vda
    source: str | None  # path of the active layer
    format: str | None  # qcow2 | raw
    type: str = "file"  # file | block | network | volume
    device: str = "disk"  # disk | cdrom | floppy | lun
    backing: list[str] = field(default_factory=list)  # backing chain, top first
    mirror_job: str | None = None  # e.g. active-commit
    mirror_ready: bool = False


@dataclass
class BlockJob:
    target: str
    type: str  # commit | active-commit | copy | pull | unknown
    cur: int
    end: int


# Methods that only look: every other public method may change something, so a
# fenced wrapper checks the lease before it (a new method is fenced by default).
READ_ONLY = frozenset({"canonical_uri", "domain_state", "disks", "domain_xml", "block_job", "fs_frozen", "close"})
READ_ONLY_PREFIXES = ("get_", "list_", "has_", "is_", "read_", "lookup_")


def is_read_only(name: str) -> bool:
    return name in READ_ONLY or name.startswith(READ_ONLY_PREFIXES)


class Hypervisor(Protocol):
    uri: str

    def canonical_uri(self) -> str: ...
    def domain_state(self, name: str) -> str: ...  # running | paused | shutoff | other
    def disks(self, name: str) -> list[Disk]: ...
    def domain_xml(self, name: str) -> str: ...
    def fs_freeze(self, name: str) -> int: ...
    def fs_thaw(self, name: str) -> int: ...
    def fs_frozen(self, name: str) -> bool: ...
    def snapshot_disk_only(self, name: str, overlays: dict[str, str], quiesce: bool = False) -> None: ...
    def block_commit_active(self, name: str, target: str) -> None: ...
    def block_job(self, name: str, target: str) -> BlockJob | None: ...
    def block_pivot(self, name: str, target: str) -> None: ...
    def block_job_abort(self, name: str, target: str) -> None: ...
    def close(self) -> None: ...


class Fenced:
    """Wraps a hypervisor so that every mutating call first runs ``guard``.

    ``guard`` raises when the caller no longer holds the workflow's lease (or
    the workflow was cancelled): a worker woken after SIGSTOP changes nothing.
    """

    def __init__(self, inner: Hypervisor, guard) -> None:
        self._inner = inner
        self._guard = guard

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if callable(attr) and not name.startswith("_") and not is_read_only(name):
            def fenced(*args, **kwargs):
                self._guard()
                return attr(*args, **kwargs)
            return fenced
        return attr
