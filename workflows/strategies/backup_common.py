"""Pieces the direct-backup, checkpoint and restore strategies share."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .. import store as store_mod
from ..checkpoints import CheckpointStore
from ..errors import DeadlineExceeded, DomainNotRunning, OperationFailed, StepFailed, UnsupportedDisk
from ..filecopy import fsync_dir
from ..hypervisor.base import Disk, Hypervisor
from ..steps import StepContext
from . import common

POLL = 0.2
JOB_END_TIMEOUT = 60.0


def checkpoint_store() -> CheckpointStore:
    return CheckpointStore(store_mod.current())


def require_active(hv: Hypervisor, domain: str) -> None:
    """Backups and checkpoints need QEMU running the domain; paused is fine (the guest is held still)."""
    state = hv.domain_state(domain)
    if state not in ("running", "paused"):
        raise DomainNotRunning(f"domain {domain} is {state}; this strategy needs it running (or paused)")


def bitmap_disks(hv: Hypervisor, domain: str) -> list[Disk]:
    """The disks a checkpoint or direct backup covers: every disk, each a qcow2 file (bitmaps live there)."""
    disks = common.capture_disks(hv, domain)
    for d in disks:
        if d.format != "qcow2":
            raise UnsupportedDisk(f"disk {d.target} of {domain} is {d.format}; checkpoints and direct backups "
                                  "need qcow2 images (bitmaps live in them)")
    return disks


def end_our_job(ctx: StepContext, timeout: float = JOB_END_TIMEOUT) -> bool:
    """End the backup job this workflow started, if it still runs; wait until libvirt dropped it.

    Returns True when a job was ended.  A job that is not ours is never touched.
    """
    job = ctx.hv.get_backup_job(ctx.domain)
    if job is None or not job.mentions(ctx.rec.id):
        return False
    ctx.save("backup-end-intent", mode=job.mode)
    try:
        ctx.hv.backup_abort(ctx.domain)
    except OperationFailed:
        pass  # it ended meanwhile (or an abort is already under way): the wait below decides
    deadline = time.time() + timeout
    while True:
        job = ctx.hv.get_backup_job(ctx.domain)
        if job is None or not job.mentions(ctx.rec.id):
            return True
        if time.time() > deadline:
            raise DeadlineExceeded(f"the backup job on {ctx.domain} did not end {timeout:.0f}s after it was "
                                   "aborted", retryable=True)
        ctx.sleep(POLL)


def write_json_durably(ctx: StepContext, path: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` through a partial file, fsynced, renamed, directory fsynced."""
    tmp = path + ".partial"
    ctx.guard()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def read_manifest(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_ours(ctx: StepContext, paths: list[str]) -> None:
    """Delete files this workflow made (each inside a folder or under a name carrying its id)."""
    for path in paths:
        if not path or not os.path.lexists(path):
            continue
        if ctx.rec.id not in path:
            raise StepFailed(f"refusing to delete {path}: it does not belong to workflow {ctx.rec.id}")
        ctx.guard()
        os.unlink(path)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
