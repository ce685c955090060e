"""Pieces the direct-backup, checkpoint and restore strategies share."""

from __future__ import annotations

import json
import time
from typing import Any

from .. import backupfolder
from ..errors import DeadlineExceeded, DomainNotRunning, OperationFailed, UnsupportedDisk
from ..hypervisor.backup_types import BackupJob
from ..hypervisor.base import Disk, Hypervisor
from ..steps import StepContext
from . import common

POLL = 0.2
JOB_END_TIMEOUT = 60.0


def require_active(hv: Hypervisor, domain: str) -> None:
    """Backups and checkpoints need QEMU running the domain; paused is fine (the guest is held still)."""
    state = hv.domain_state(domain)
    if state not in ("running", "paused"):
        raise DomainNotRunning(f"domain {domain} is {state}; this strategy needs it running (or paused)")


def bitmap_disks(hv: Hypervisor, domain: str) -> list[Disk]:
    """The disks a checkpoint or direct backup covers: every disk, each a qcow2 file (bitmaps live there)."""
    return check_bitmap_disks(common.capture_disks(hv, domain), domain)


def check_bitmap_disks(disks: list[Disk], domain: str) -> list[Disk]:
    """Refuses a disk that cannot hold a bitmap (only qcow2 images can)."""
    for d in disks:
        if d.format != "qcow2":
            what = "a raw block device" if d.type == "block" else f"a {d.format} image"
            raise UnsupportedDisk(f"disk {d.target} of {domain} is {what}, which cannot hold a persistent bitmap; "
                                  "checkpoints and direct backups need qcow2 images (use snapshot-backup, or "
                                  "leave the disk out with --exclude)")
    return disks


def whole_disks(disks: list[Disk]) -> list[str]:
    """The disks a direct backup takes in full every time: those that cannot hold a bitmap (raw files, block
    devices, network disks: anything but a qcow2 image)."""
    return [d.target for d in disks if d.format != "qcow2"]


def check_offline_whole(disks: list[Disk], domain: str) -> None:
    """A shut-off domain's bitmaps are made with qemu-img in its local images: a disk that cannot hold one,
    or that is not a local image, is refused."""
    for d in disks:
        if d.format != "qcow2" or d.type == "network":
            what = ("a network disk" if d.type == "network" else "a raw block device" if d.type == "block"
                    else f"a {d.format} image")
            raise UnsupportedDisk(f"disk {d.target} of {domain} is {what}; a shut-off domain's direct backup needs "
                                  "qcow2 images (start the domain, use snapshot-backup, or --exclude the disk)")


def our_job_paths(ctx: StepContext) -> set[str]:
    """What this workflow planned for its backup job before asking libvirt: push targets, pull scratch files,
    the NBD socket (each named with the workflow id, recorded before the job began)."""
    out: set[str] = set()
    for kind in ("backup-file", "scratch-file", "nbd-socket"):
        for art in ctx.rec.artifacts_of(kind):
            out.update(p for p in (art.get("path"), art.get("partial")) if p)
    return out


def job_is_ours(ctx: StepContext, job: BackupJob) -> bool:
    """A backup job is ours only when it writes or serves what our record planned.  libvirt runs one backup
    job per domain, so while any other job runs, ours does not."""
    mine = our_job_paths(ctx)
    return any(p in mine for p in [*job.disks.values(), job.socket or ""] if p)


def describe_job(job: BackupJob) -> str:
    """One line naming a backup job by what it touches (for a job that is not ours)."""
    if job.mode == "pull":
        where = f"serving {', '.join(sorted(job.disks)) or 'no disk'} over NBD at {job.socket or '?'}"
    else:
        where = "writing " + ", ".join(f"{t} to {p}" for t, p in sorted(job.disks.items()))
    return f"{job.mode} mode, {where}"


def foreign_job(ctx: StepContext) -> BackupJob | None:
    """The domain's backup job when it is not ours (another tool's, e.g. an admin's ``virsh backup-begin``)."""
    job = ctx.hv.get_backup_job(ctx.domain)
    return job if job is not None and not job_is_ours(ctx, job) else None


def foreign_job_reason(domain: str, job: BackupJob) -> str:
    return (f"domain {domain} already has a backup job that is not ours ({describe_job(job)}; started by "
            "another tool)")


def refuse_foreign_job(ctx: StepContext) -> None:
    """Another tool's backup job runs: libvirt allows one per domain, and domcapture never aborts one that is
    not its own.  Retryable: the engine's retry delays wait for it to end, then the workflow rolls back."""
    job = foreign_job(ctx)
    if job is not None:
        raise OperationFailed(f"{foreign_job_reason(ctx.domain, job)}: waiting for it to end (domcapture never "
                              "aborts it)", retryable=True)


def end_our_job(ctx: StepContext, timeout: float = JOB_END_TIMEOUT) -> bool:
    """End the backup job this workflow started, if it still runs; wait until libvirt dropped it.

    Returns True when a job was ended.  A job that is not ours is never touched, nor waited on.
    """
    job = ctx.hv.get_backup_job(ctx.domain)
    if job is None or not job_is_ours(ctx, job):
        return False
    ctx.save("backup-end-intent", mode=job.mode)
    try:
        ctx.hv.backup_abort(ctx.domain)
    except OperationFailed:
        pass  # it ended meanwhile (or an abort is already under way): the wait below decides
    deadline = time.time() + timeout
    wait = 0.005  # a pull job is usually gone within milliseconds: look again soon, then back off to POLL
    while True:
        job = ctx.hv.get_backup_job(ctx.domain)
        if job is None or not job_is_ours(ctx, job):
            return True
        if time.time() > deadline:
            raise DeadlineExceeded(f"the backup job on {ctx.domain} did not end {timeout:.0f}s after it was "
                                   "aborted", retryable=True)
        ctx.sleep(wait)
        wait = min(POLL, wait * 2)


def read_manifest(path: str | None) -> dict[str, Any] | None:
    data = backupfolder.read_small(path)  # no link followed, no FIFO waited on
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def remove_ours(ctx: StepContext, paths: list[str]) -> None:
    """Delete files this workflow planned (each exactly as its record names it)."""
    for path in paths:
        if path:
            ctx.fx.files.remove_owned(path)
