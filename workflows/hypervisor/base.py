"""What the workflows need from a hypervisor, as plain types.

Two implementations: ``LibvirtHypervisor`` (the only module that imports
``libvirt``) and ``FakeHypervisor`` (in memory, for exhaustive crash tests).
The contract tests in ``tests/test_hypervisor_contract.py`` run the same
cases against both so the fake cannot drift from libvirt.
"""

from __future__ import annotations

import grp
import pwd
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Protocol, cast

from .backup_types import BackupJob, CheckpointInfo, CompletedBackup, Export
from .snapshot_info import SnapshotInfo


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
    mirror_source: str | None = None  # where a mirroring job writes (an active commit: its base)
    readonly: bool = False  # <readonly/>
    shareable: bool = False  # <shareable/>
    url: str | None = None  # a network disk's address as qemu-img opens it (nbd://host:port/name...)


@dataclass
class Firmware:
    """What a domain keeps beside its disks: the UEFI variable store, the TPM emulator's state."""

    nvram: str | None = None  # <os><nvram>PATH</nvram>: the domain's own copy of the variables
    nvram_template: str | None = None  # the file libvirt copies a missing NVRAM from
    loader: str | None = None  # <os><loader>: the firmware code (read-only, shared)
    tpm_state: str | None = None  # swtpm's state folder, when a <tpm> has an emulator backend


TPM_STATE_ROOT = "/var/lib/libvirt/swtpm"
QEMU_CONF = "/etc/libvirt/qemu.conf"


def swtpm_owner(conf: str = QEMU_CONF) -> tuple[int, int]:
    """The (uid, gid) libvirt runs swtpm as: ``swtpm_user``/``swtpm_group`` of qemu.conf, else libvirt's
    default ``tss``; the owner of the state folders libvirt makes for a new domain's TPM."""
    names = {"swtpm_user": "tss", "swtpm_group": "tss"}
    try:
        with open(conf) as f:
            for line in f:
                m = re.match(r'\s*(swtpm_user|swtpm_group)\s*=\s*"([^"]*)"', line)
                if m:
                    names[m.group(1)] = m.group(2)
    except FileNotFoundError:
        pass

    def resolve(value: str, lookup: Callable[[str], int]) -> int:
        value = value.removeprefix("+")
        return int(value) if value.isdigit() else lookup(value)
    return (resolve(names["swtpm_user"], lambda n: pwd.getpwnam(n).pw_uid),
            resolve(names["swtpm_group"], lambda n: grp.getgrnam(n).gr_gid))


def parse_firmware(xml: str) -> Firmware:
    """The firmware files a domain's XML names (both adapters parse it here, so they cannot disagree)."""
    root = ET.fromstring(xml)
    nvram = root.find("./os/nvram")
    loader = root.find("./os/loader")
    tpm_state = None
    for tpm in root.findall("./devices/tpm"):
        backend = tpm.find("backend")
        if backend is not None and backend.get("type") == "emulator":
            uuid = root.findtext("uuid")
            tpm_state = f"{TPM_STATE_ROOT}/{uuid}" if uuid else None
    return Firmware(nvram=(nvram.text or "").strip() or None if nvram is not None else None,
                    nvram_template=nvram.get("template") if nvram is not None else None,
                    loader=(loader.text or "").strip() or None if loader is not None else None,
                    tpm_state=tpm_state)


@dataclass
class BlockJob:
    target: str
    type: str  # commit | active-commit | copy | pull | unknown
    cur: int
    end: int


# Every method a workflow may call is declared here, by name, in exactly one
# of these sets (a test checks both implementations against them).  The fenced
# wrapper checks the lease (and, going forward, the cancel flag) right before
# each MUTATING call; READ_ONLY calls pass; anything else cannot be called.
READ_ONLY = frozenset({
    "canonical_uri", "domain_state", "disks", "domain_xml", "firmware", "block_job", "fs_frozen", "close",
    "chain_users",
    # snapshots
    "is_domain_busy", "lookup_snapshot", "list_snapshot_names", "get_current_snapshot", "get_library_version",
    # save
    "is_persistent", "has_managed_save_image", "get_uuid", "get_memory_bytes", "get_active_job",
    "read_save_image",
    # checkpoints and backups
    "list_checkpoints", "lookup_checkpoint", "get_backup_job", "get_completed_backup", "get_disk_capacity",
    "get_inactive_xml", "lookup_domain_description", "open_backup_export", "list_domains",
    # the hold mark
    "hold_mark",
})
MUTATING = frozenset({
    "fs_freeze", "fs_thaw", "guest_exec", "snapshot_disk_only", "block_commit_active", "block_commit_intermediate",
    "block_pivot", "block_job_abort",
    "create_snapshot", "revert_to_snapshot", "delete_snapshot",
    "managed_save", "start", "save", "restore", "destroy", "resume",
    "checkpoint_create", "checkpoint_redefine", "checkpoint_delete", "backup_begin", "backup_abort",
    "define_restored_domain", "undefine_restored_domain",
    "commit_offline", "commit_image", "define_disk_sources", "block_pull",
    # the hold mark
    "set_hold_mark",
})
#: safety calls that run even after an abort was requested (a cancelled capture must still thaw)
CANCEL_EXEMPT = frozenset({"fs_thaw", "block_job_abort", "backup_abort", "set_hold_mark"})


class DomainReads(Protocol):
    """Looking only: what validation, probes and verification use."""

    uri: str

    def canonical_uri(self) -> str: ...
    def list_domains(self) -> list[str]: ...  # every defined domain's name
    def domain_state(self, name: str) -> str: ...  # running | paused | shutoff | other
    def disks(self, name: str) -> list[Disk]: ...
    def domain_xml(self, name: str) -> str: ...
    def firmware(self, name: str) -> Firmware: ...
    def block_job(self, name: str, target: str) -> BlockJob | None: ...
    def chain_users(self, paths: Collection[str]) -> dict[str, list[str]]:
        """path -> the domains (with disk, running or defined) whose chain holds it, over every domain."""
        ...
    def fs_frozen(self, name: str) -> bool: ...
    def close(self) -> None: ...


class QuiesceOps(Protocol):
    def fs_freeze(self, name: str) -> int: ...
    def fs_thaw(self, name: str) -> int: ...
    def guest_exec(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        """Run ``argv`` in the guest through the agent; {"exitcode", "out", "err", "timed_out"}.
        A command still running at ``timeout`` is killed in the guest."""
        ...


class BlockOps(Protocol):
    """The guide's first sequence: temporary external snapshot, active commit, pivot."""

    def snapshot_disk_only(self, name: str, overlays: dict[str, str], quiesce: bool = False) -> None: ...
    def block_commit_active(self, name: str, target: str, top: str | None = None,
                            base: str | None = None) -> None: ...
    def block_commit_intermediate(self, name: str, target: str, top: str, base: str) -> None:
        """Commit ``top`` (a layer below the active one) into ``base``; the layer above ``top`` is then
        backed by ``base``.  The job ends by itself (no pivot)."""
    def block_pivot(self, name: str, target: str) -> None: ...
    def block_job_abort(self, name: str, target: str) -> None: ...
    def block_pull(self, name: str, target: str) -> None:
        """virDomainBlockPull: stream the whole backing chain into the disk's active image while the
        domain runs; when the job ends the image stands alone (no backing) and no job remains."""
    def commit_offline(self, name: str, overlay: str, base: str) -> None:
        """``qemu-img commit`` of ``overlay`` into ``base`` while the domain is shut off."""
    def commit_image(self, overlay: str, base: str) -> None:
        """``qemu-img commit`` of ``overlay`` into ``base`` whatever any domain's state: for images no
        running domain holds (a disk unplugged, a domain gone).  qemu-img takes the images' locks, so it
        refuses an image a QEMU still has open."""
    def define_disk_sources(self, name: str, sources: dict[str, dict[str, str]], running_ok: bool = False) -> None:
        """Point the persistent definition's disks (target -> {"path", "format", "type": file | block})
        at these images, with no backing chain; only for a shut-off domain, unless ``running_ok``: then
        only the definition the next start uses changes (for a disk the running domain no longer has)."""


class SnapshotOps(Protocol):
    def is_domain_busy(self, name: str) -> bool: ...
    def lookup_snapshot(self, name: str, snap: str) -> SnapshotInfo | None: ...
    def list_snapshot_names(self, name: str) -> list[str]: ...
    def get_current_snapshot(self, name: str) -> str | None: ...
    def get_library_version(self) -> int: ...
    def create_snapshot(self, name: str, snap: str, *, description: str, memory: bool,
                        overlays: dict[str, str] | None = None, memory_file: str | None = None) -> None: ...
    def revert_to_snapshot(self, name: str, snap: str) -> None: ...
    def delete_snapshot(self, name: str, snap: str, *, metadata_only: bool = False) -> None: ...


class SaveOps(Protocol):
    def is_persistent(self, name: str) -> bool: ...
    def has_managed_save_image(self, name: str) -> bool: ...
    def get_uuid(self, name: str) -> str: ...
    def get_memory_bytes(self, name: str) -> int: ...
    def get_active_job(self, name: str) -> str | None: ...
    def read_save_image(self, path: str) -> dict[str, Any] | None: ...
    def managed_save(self, name: str) -> None: ...
    def start(self, name: str) -> None: ...
    def save(self, name: str, path: str) -> None: ...
    def restore(self, path: str) -> None: ...
    def destroy(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...


class BackupOps(Protocol):
    def list_checkpoints(self, name: str) -> list[CheckpointInfo]: ...
    def lookup_checkpoint(self, name: str, checkpoint: str) -> CheckpointInfo | None: ...
    def get_backup_job(self, name: str) -> BackupJob | None: ...
    def get_completed_backup(self, name: str) -> CompletedBackup | None: ...
    def get_disk_capacity(self, name: str, target: str) -> int: ...
    def get_inactive_xml(self, name: str) -> str: ...
    def lookup_domain_description(self, name: str) -> str | None: ...
    def open_backup_export(self, name: str, job: BackupJob, disk: str) -> Export: ...
    def checkpoint_create(self, name: str, checkpoint: str, disks: list[str]) -> CheckpointInfo: ...
    def checkpoint_redefine(self, name: str, xml: str) -> None: ...
    def checkpoint_delete(self, name: str, checkpoint: str, *, children: bool = False,
                          metadata_only: bool = False) -> None: ...
    def backup_begin(self, name: str, *, mode: str, disks: dict[str, str], checkpoint: str,
                     incremental: str | None = None, socket: str | None = None,
                     full: Collection[str] = ()) -> None:
        """``full``: disks that cannot hold a bitmap (raw, block, network): no bitmap in ``checkpoint``,
        and taken whole even in an incremental."""
    def backup_abort(self, name: str) -> None: ...
    def define_restored_domain(self, xml: str) -> None: ...
    def undefine_restored_domain(self, name: str, *, nvram: bool = False) -> None:
        """Undefine a stopped domain this project defined, with its snapshot/checkpoint metadata and its
        TPM state (a restored domain's is its own: a new UUID).  ``nvram``: delete its NVRAM file too
        (only when that file is a copy the caller planned); otherwise the NVRAM file is kept."""


class HoldOps(Protocol):
    """The hold mark (``hold.py``): our element in the domain's ``<metadata>``, naming the workflow that
    holds it, for admins and other tools to see (libvirt has no lock)."""

    def set_hold_mark(self, name: str, mark: dict[str, Any] | None) -> None:
        """Write the mark (live, and in the definition when persistent); None removes it."""
    def hold_mark(self, name: str) -> dict[str, Any] | None:
        """The mark, None when there is none, or {"unreadable": why} (never followed)."""
        ...


class Hypervisor(DomainReads, QuiesceOps, BlockOps, SnapshotOps, SaveOps, BackupOps, HoldOps, Protocol):
    """Everything a workflow may ask of a hypervisor (libvirt, or the in-memory fake)."""


class UndeclaredCall(AttributeError):
    """A hypervisor method that is in neither READ_ONLY nor MUTATING: not callable through the port."""


class Fenced:
    """Wraps a hypervisor so that every mutating call first runs ``guard(name)``.

    ``guard`` raises when the caller no longer holds the workflow's lease (or
    the workflow was cancelled): a worker woken after SIGSTOP changes nothing.
    """

    def __init__(self, inner: Hypervisor, guard: Callable[[str], None]) -> None:
        self._inner = inner
        self._guard = guard

    @property
    def uri(self) -> str:
        return self._inner.uri

    def __getattr__(self, name: str) -> Any:
        if name in READ_ONLY:
            return getattr(self._inner, name)
        if name not in MUTATING:
            raise UndeclaredCall(f"hypervisor method {name!r} is not declared in READ_ONLY or MUTATING")
        attr = getattr(self._inner, name)

        def fenced(*args: Any, **kwargs: Any) -> Any:
            self._guard(name)
            return attr(*args, **kwargs)
        return fenced


class ReadOnlyView(Fenced):
    """What validation and verification get: any mutating call is refused before it reaches libvirt."""

    def __init__(self, inner: Hypervisor) -> None:
        def refuse(name: str) -> None:
            raise UndeclaredCall(f"hypervisor method {name!r} changes state; refused while only looking")
        super().__init__(inner, refuse)


def fenced(inner: Hypervisor, guard: Callable[[str], None]) -> Hypervisor:
    return cast(Hypervisor, Fenced(inner, guard))


def read_only(inner: Hypervisor) -> Hypervisor:
    return cast(Hypervisor, ReadOnlyView(inner))
