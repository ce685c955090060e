"""Pieces the snapshot strategies share: options, input checks, ownership, a safe delete.

The snapshots these strategies make are the user's: they keep libvirt's
metadata.  Each one carries its workflow id in its description, so a probe
can tell "already created by this workflow" from "someone else's snapshot of
the same name", and a rollback never deletes a snapshot it did not create.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from .. import naming
from ..definition import Option
from ..errors import DeadlineExceeded, InputError, OperationFailed, StepFailed
from ..hypervisor.base import Hypervisor
from ..hypervisor.snapshot_info import SnapshotInfo
from ..steps import StepContext
from . import overlays as ovl

KINDS = ("internal", "external")
DEFAULT_IDLE_TIMEOUT = 600.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
# libvirt 9.7 is the first to revert to external snapshots
EXTERNAL_REVERT_SINCE = 9_007_000

OPT_KIND = Option("kind", "snapshot: internal (default; inside the qcow2 images) | external (overlay files)",
                  choices=KINDS)
OPT_MEMORY = Option("memory", "snapshot --kind external: also save the memory of the running domain "
                              "(internal snapshots of a running domain always include it)", flag=True)
OPT_NAME = Option("name", "snapshot name (snapshot: default domcapture-<workflow id>; "
                          "snapshot-revert / snapshot-delete: required)")


def marker(wf_id: str) -> str:
    return f"domcapture workflow {wf_id}"


def is_ours(info: SnapshotInfo, wf_id: str) -> bool:
    return marker(wf_id) in (info.description or "")


# -- input checks (no side effects) --------------------------------------------------
def check_name(value: Any, required: bool) -> str | None:
    if value in (None, ""):
        if required:
            raise InputError("--name is required: the snapshot to act on")
        return None
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InputError(f"--name {value!r} is not a valid snapshot name (letters, digits and . _ : + -, "
                         "at most 128, starting with a letter or digit)")
    return value


def domain_state(hv: Hypervisor, domain: str) -> str:
    state = hv.domain_state(domain)
    if state not in ("running", "shutoff"):
        raise InputError(f"domain {domain} is {state}; snapshots are taken of a running or shut-off domain")
    return state


def existing(hv: Hypervisor, domain: str, name: str) -> SnapshotInfo:
    info = hv.lookup_snapshot(domain, name)
    if info is None:
        have = hv.list_snapshot_names(domain)
        raise InputError(f"domain {domain} has no snapshot named {name!r} "
                         f"(it has: {', '.join(have) if have else 'none'})")
    return info


# -- waiting for libvirtd ------------------------------------------------------------
def wait_idle(ctx: StepContext, timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
    """Wait while a job holds the domain: a create/revert/delete issued by a worker
    that died goes on inside libvirtd, and its outcome is only known once it ends."""
    deadline = time.time() + timeout
    waited = False
    while ctx.hv.is_domain_busy(ctx.domain):
        waited = True
        ctx.guard()
        if time.time() > deadline:
            raise DeadlineExceeded(f"domain {ctx.domain} still busy with a libvirt job after {timeout:.0f} s")
        ctx.sleep(ovl.POLL)
    if waited:
        ctx.data.setdefault("waited_for_libvirt", 0)
        ctx.data["waited_for_libvirt"] += 1


def check_not_below(ctx: StepContext) -> None:
    """Refuse to go on when one of the record's overlays is a backing file of an image in use."""
    below = {b: d.target for d in ctx.hv.disks(ctx.domain) for b in d.backing}
    for art in ctx.rec.artifacts_of("overlay"):
        if art["path"] in below:
            raise StepFailed(f"{art['path']} is a backing file of disk {below[art['path']]} of {ctx.domain}; "
                             "it cannot be removed")


# -- deleting a snapshot safely -----------------------------------------------------------
def delete_snapshot(ctx: StepContext, snap: str, owner: str | None = None) -> str:
    """Delete ``snap`` and leave the domain on the images below it; idempotent.

    The record's ``overlay`` artifacts name the snapshot's overlays and
    ``data["disks"]`` the images below them.  libvirt's own delete is used
    first (libvirt 9.0 merges an external snapshot's overlays into the images
    below and removes them); where it refuses (an internal parent, for one)
    and the domain runs, the same is done by hand: active blockcommit +
    pivot of each overlay, then the metadata is removed with
    DELETE_METADATA_ONLY and the overlay files deleted.  With ``owner``, a
    snapshot that does not carry that workflow's marker is left alone.

    Returns how it went: ``libvirt``, ``commit``, ``metadata`` or ``absent``.
    """
    wait_idle(ctx)
    info = ctx.hv.lookup_snapshot(ctx.domain, snap)
    how = "absent"
    if info is not None and owner and not is_ours(info, owner):
        ctx.data["left_alone"] = f"snapshot {snap} exists but was not created by workflow {owner}"
        info = None
    if info is not None:
        if not info.external or ovl.on_overlay(ctx):
            ctx.save("delete-intent", snapshot=snap)
            try:
                ctx.hv.delete_snapshot(ctx.domain, snap)
                how = "libvirt"
            except OperationFailed as exc:
                if not info.external:
                    raise
                if info.children:
                    raise StepFailed(f"libvirt refused to delete {snap} ({exc}) and it has {info.children} "
                                     "child snapshot(s): delete those first") from exc
                ctx.data["libvirt_delete_refused"] = str(exc)
                ctx.save("delete-by-commit", reason=str(exc))
                how = "commit"
        else:
            how = "metadata"  # the disks left the overlays already: only the metadata is left
    if ovl.on_overlay(ctx):
        if ctx.hv.domain_state(ctx.domain) != "running":
            raise StepFailed(f"domain {ctx.domain} is shut off on the overlays of {snap} and libvirt refused to "
                             "delete it; start the domain, then run the command again")
        originals = ovl.originals(ctx)
        for d in ctx.hv.disks(ctx.domain):
            if d.target in ovl.on_overlay(ctx) and d.backing != [originals[d.target]]:
                raise StepFailed(f"disk {d.target} has the chain {' <- '.join(d.backing)} below {d.source}; "
                                 f"only a single overlay over {originals[d.target]} is committed by hand")
        ovl.get_off_overlays(ctx)
    else:
        check_not_below(ctx)
        ovl.remove_overlays(ctx)
    if info is not None and how in ("commit", "metadata"):
        ctx.save("metadata-delete-intent", snapshot=snap)
        ctx.hv.delete_snapshot(ctx.domain, snap, metadata_only=True)
    for art in ctx.rec.artifacts_of("memory-file"):
        if art.get("remove") and os.path.basename(art["path"]).startswith(f"{naming.PREFIX}-"):
            ctx.fx.files.remove_owned(art["path"])
            art["status"] = "deleted"
    return how
