"""Pieces the save strategies share: waiting out libvirt's own save/restore jobs,
saving to a file only the record names, restoring only an image that is ours.

virDomainSave, virDomainManagedSave, virDomainRestore and a start that
restores a managed image run as jobs inside libvirtd.  A worker killed while
one runs does not stop it: libvirtd finishes (or fails) it, with the domain
paused meanwhile.  So every probe and revert here first waits until the
domain has no such job, and only then asks what state it is in.
"""

from __future__ import annotations

import time
from typing import Any

from ..definition import Option
from ..errors import DeadlineExceeded, StepFailed
from ..hypervisor.base import Hypervisor
from ..steps import StepContext

DEFAULT_JOB_TIMEOUT = 600.0
POLL = 0.2

OPT_KEEP_STOPPED = Option("keep_stopped", "leave the domain shut off after the capture (default: restore it "
                          "from the memory image so it keeps running)", flag=True)
OPT_FROM = Option("from", "the id of the capture workflow to go back to")


def wait_no_job(ctx: StepContext, timeout: float = DEFAULT_JOB_TIMEOUT) -> None:
    """Wait until libvirtd runs no job on the domain (a save or restore a dead worker started)."""
    deadline = time.time() + timeout
    while True:
        job = ctx.hv.get_active_job(ctx.domain)
        if job is None:
            return
        if time.time() > deadline:
            raise DeadlineExceeded(f"domain {ctx.domain} still has a {job} job after {timeout:.0f} s")
        ctx.guard()
        ctx.sleep(POLL)


def image_is_ours(hv: Hypervisor, path: str, uuid: str) -> bool:
    """A complete save image of this very domain at ``path``."""
    info = hv.read_save_image(path)
    return info is not None and info.get("uuid") == uuid


def saved_to(ctx: StepContext, path: str) -> bool:
    """The domain is shut off and ``path`` holds its complete save image: the save happened."""
    wait_no_job(ctx)
    return ctx.hv.domain_state(ctx.domain) == "shutoff" and image_is_ours(ctx.hv, path, ctx.data["uuid"])


def save_to(ctx: StepContext, path: str, event: str) -> float:
    """virDomainSave to ``path`` (named in the record beforehand); returns the seconds it took."""
    state = ctx.hv.domain_state(ctx.domain)
    if state != "running":
        raise StepFailed(f"domain {ctx.domain} is {state}, not running: it was not stopped by this workflow")
    ctx.fx.files.remove_owned(path)  # left by an attempt that failed: libvirt would overwrite it anyway
    started = time.time()
    ctx.data.setdefault("timing", {})[f"{event}_started_at"] = started
    ctx.save(f"{event}-intent", path=path)
    ctx.hv.save(ctx.domain, path)
    return round(time.time() - started, 3)


def restore_from(ctx: StepContext, path: str, event: str) -> float | None:
    """virDomainRestore from ``path`` if the domain is shut off; the seconds it took, None if it ran already."""
    wait_no_job(ctx)
    if ctx.hv.domain_state(ctx.domain) != "shutoff":
        return None
    if not image_is_ours(ctx.hv, path, ctx.data["uuid"]):
        raise StepFailed(f"domain {ctx.domain} is shut off and {path} is not a complete save image of it")
    started = time.time()
    ctx.save(f"{event}-intent", path=path)
    ctx.hv.restore(path)
    seconds = round(time.time() - started, 3)
    state = ctx.hv.domain_state(ctx.domain)
    if state != "running":
        raise StepFailed(f"domain {ctx.domain} is {state} after its restore from {path}")
    return seconds


def file_info(art: dict[str, Any]) -> dict[str, Any]:
    return {"path": art["path"], "size": art["size"], "checksum": art["checksum"]}

