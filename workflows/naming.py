"""Deterministic artifact names: every path is derived from the workflow id.

Every artifact carries ``PREFIX`` and the workflow id in its name; a revert
deletes only the exact paths its record planned (``workflows.effects``).
"""

from __future__ import annotations

import os

PREFIX = "domcapture"


def overlay_path(disk_source: str, wf_id: str, target: str) -> str:
    return os.path.join(os.path.dirname(disk_source), f"{PREFIX}-{wf_id}-{target}.overlay.qcow2")


def overlay_in(folder: str, wf_id: str, target: str) -> str:
    """An overlay in the overlay folder (block devices' overlays, or every overlay with ``--overlay-dir``)."""
    return os.path.join(folder, f"{PREFIX}-{wf_id}-{target}.overlay.qcow2")


def backup_dir(target_dir: str, domain: str, wf_id: str) -> str:
    return os.path.join(target_dir, f"{PREFIX}-{domain}-{wf_id}")


def backup_file(target_dir: str, domain: str, wf_id: str, target: str, fmt: str) -> str:
    ext = "qcow2" if fmt == "qcow2" else "img"
    return os.path.join(backup_dir(target_dir, domain, wf_id), f"{target}.{ext}")


def partial_of(path: str) -> str:
    return path + ".partial"


def manifest_path(target_dir: str, domain: str, wf_id: str) -> str:
    return os.path.join(backup_dir(target_dir, domain, wf_id), "manifest.json")


# -- save / save-restore ------------------------------------------------------------
def memory_image_path(target_dir: str, domain: str, wf_id: str) -> str:
    """The memory image a ``save`` capture writes (libvirt writes it: no partial name)."""
    return os.path.join(backup_dir(target_dir, domain, wf_id), "memory.save")


def staged_disk_path(disk_source: str, wf_id: str, target: str) -> str:
    """A captured disk image copied beside the live disk, waiting to replace it."""
    return os.path.join(os.path.dirname(disk_source), f"{PREFIX}-{wf_id}-{target}.staged")


def set_aside_path(disk_source: str, wf_id: str, target: str) -> str:
    """Where a live disk image is moved while a rewind replaces it (kept until the rewind commits)."""
    return os.path.join(os.path.dirname(disk_source), f"{PREFIX}-{wf_id}-{target}.set-aside")


def safety_image_path(disk_source: str, wf_id: str) -> str:
    """The memory image of the domain's state before a rewind (its way back until the rewind commits)."""
    return os.path.join(os.path.dirname(disk_source), f"{PREFIX}-{wf_id}-before-rewind.save")


# -- snapshot (the user's snapshots, kept with libvirt metadata) ---------------------
def snapshot_name(wf_id: str) -> str:
    """The snapshot a ``snapshot`` workflow creates when no ``--name`` is given."""
    return f"{PREFIX}-{wf_id}"


def snapshot_overlay_path(folder: str, wf_id: str, target: str) -> str:
    """The overlay an external snapshot puts a disk on (the disk's new active image)."""
    return os.path.join(folder, f"{PREFIX}-{wf_id}-{target}.snapshot.qcow2")


def snapshot_memory_path(folder: str, wf_id: str) -> str:
    """The memory state of an external snapshot with ``--memory``."""
    return os.path.join(folder, f"{PREFIX}-{wf_id}.memory")


# -- direct backups, checkpoints, restores ----------------------------------------------------
RUN_DIR = os.environ.get("DOMCAPTURE_RUN_DIR", "/run/domcapture")


def checkpoint_name(wf_id: str) -> str:
    """The libvirt checkpoint a workflow creates (with its backup, or alone)."""
    return f"{PREFIX}-{wf_id}"


def scratch_file(target_dir: str, domain: str, wf_id: str, target: str) -> str:
    """A pull backup's scratch file (libvirt keeps the blocks the guest overwrites there)."""
    return os.path.join(backup_dir(target_dir, domain, wf_id), f"{target}.scratch")


def nbd_socket(wf_id: str) -> str:
    """The unix socket a pull backup's NBD server listens on (short: sockets are limited to 107 bytes)."""
    return os.path.join(RUN_DIR, f"{PREFIX}-{wf_id}.sock")


def domain_xml_path(target_dir: str, domain: str, wf_id: str) -> str:
    return os.path.join(backup_dir(target_dir, domain, wf_id), "domain.xml")


def restore_dir(target_dir: str, domain: str, wf_id: str) -> str:
    return os.path.join(target_dir, f"{PREFIX}-restore-{domain}-{wf_id}")


def restore_file(target_dir: str, domain: str, wf_id: str, target: str) -> str:
    return os.path.join(restore_dir(target_dir, domain, wf_id), f"{target}.qcow2")


# -- mounted backups ------------------------------------------------------------------------
def mount_dir(wf_id: str) -> str:
    """The folder of a mounted backup's pieces (the storage daemon's pidfile, its export, the overlay)."""
    return os.path.join(RUN_DIR, f"{PREFIX}-mount-{wf_id}")


def mount_export(wf_id: str, target: str) -> str:
    """The file the storage daemon's FUSE export shows the disk as (raw), and the loop device's backing."""
    return os.path.join(mount_dir(wf_id), f"{target}.raw")


def mount_overlay(wf_id: str, target: str) -> str:
    """The overlay that takes the file system's journal replay: the backup's files are only read."""
    return os.path.join(mount_dir(wf_id), f"{target}.overlay.qcow2")


def mount_pidfile(wf_id: str) -> str:
    return os.path.join(mount_dir(wf_id), "storage-daemon.pid")


def instant_overlay(target_dir: str, domain: str, wf_id: str, target: str) -> str:
    """An instant restore's disk: first an overlay over the backup chain, in the end the whole disk."""
    return os.path.join(restore_dir(target_dir, domain, wf_id), f"{target}.qcow2")


def host_queue(queue: str, host: str) -> str:
    """The RQ queue of one libvirt host's workers (``worker --host``): ``<queue>.<host>``."""
    return f"{queue}.{host}"


def host_of_queue(queue: str, name: str) -> str | None:
    """The host a per-host queue ``name`` of ``queue`` serves, or None when it is not one."""
    head = host_queue(queue, "")
    if not name.startswith(head) or name == head:
        return None
    return name[len(head):]
