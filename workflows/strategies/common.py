"""Pieces several strategies share: input checks, quiesce steps, block-job helpers."""

from __future__ import annotations

import os
import shutil
import stat
import time
from typing import Any

from .. import hooks, naming, quiesce, validate
from ..errors import (DeadlineExceeded, InputError, DomainNotRunning, DomcaptureError, InvalidTarget,
                      OperationFailed, StepFailed, UnsupportedDisk)
from ..definition import Option
from ..hypervisor.base import Disk, Hypervisor
from ..record import Artifact
from ..steps import Step, StepContext

QUIESCE_MODES = ("off", "try", "require")
DEFAULT_FREEZE_DEADLINE = 10.0
DEFAULT_COMMIT_TIMEOUT = 600.0
POLL = 0.2

OPT_TARGET = Option("target", "directory the capture is written to")
OPT_QUIESCE = Option("quiesce", "freeze guest filesystems through the agent: off | try | require (default try)",
                     choices=QUIESCE_MODES)
OPT_ON_ERROR = Option("on_error", "on a permanent error: rollback (default) | stop (leave it for an operator)",
                      choices=("rollback", "stop"))
OPT_FREEZE_DEADLINE = Option("freeze_deadline", "seconds the guest may stay frozen before it is thawed (default 10)")
OPT_COMMIT_TIMEOUT = Option("commit_timeout", "seconds a blockcommit may take to become ready (default 600)")
OPT_BANDWIDTH = Option("bandwidth", "limit the copy rate, e.g. 50M (bytes/s; default unlimited)")


# -- input checks (no side effects) -------------------------------------------------
# The parsers themselves live in ``workflows.validate``, shared with the CLI.
def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    return validate.choice(name, value, choices)


def check_text(name: str, value: Any) -> str:
    """A non-empty string without control characters."""
    return validate.text(name, value)


def parse_on_error(params: dict[str, Any]) -> str:
    """``--on-error``: rollback (default) or stop."""
    return check_choice("on_error", params.get("on_error") or "rollback", OPT_ON_ERROR.choices or ())


def parse_hooks(params: dict[str, Any]) -> dict[str, Any]:
    """``--pre-freeze``, ``--post-thaw`` (one line of sh, no control characters), ``--hooks-on``, ``--hook-timeout``."""
    out: dict[str, Any] = {}
    for name in ("pre_freeze", "post_thaw"):
        if params.get(name) is not None:
            out[name] = validate.text(name, params[name])
    if out and (params.get("quiesce") or "try") == "off":
        raise InputError("--pre-freeze and --post-thaw run around a freeze; they need --quiesce try or require")
    out["hooks_on"] = check_choice("hooks_on", params.get("hooks_on") or "guest", hooks.WHERE)
    out["hook_timeout"] = parse_seconds("hook_timeout", params.get("hook_timeout"), hooks.DEFAULT_TIMEOUT)
    return out


def parse_seconds(name: str, value: Any, default: float) -> float:
    """A positive, finite number of seconds (NaN, inf, 0 and negatives refused); ``default`` when absent."""
    if value is None:
        return default
    return validate.seconds(name, value)


def parse_bandwidth(value: Any) -> int:
    """``--bandwidth`` as bytes per second; accepts 50M, 512K, 1G or a plain number; 0 = unlimited."""
    return validate.bandwidth(value)


def check_target_dir(path: str | None) -> str:
    if path is None:
        raise InvalidTarget("--target is required: the directory the backup is written to")
    # realpath: the folder the workers will write to, symlinks resolved now
    path = os.path.realpath(validate.path("target", path))
    if not os.path.isdir(path):
        raise InvalidTarget(f"target directory {path} does not exist")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidTarget(f"target directory {path} is not writable")
    check_target_safe(path)
    return path


def check_target_safe(path: str) -> None:
    """Refuse a target (or a folder above it) that a user other than root or us can write.

    Such a user could swap the capture folder's name for a symlink between two
    of our calls.  A folder shared the way ``/tmp`` is (sticky bit: nobody
    renames or deletes another user's entries) is accepted when root or we own
    it.  ``path`` is already resolved (``realpath``): no component is a symlink.
    """
    trusted = {0, os.geteuid()}
    folder = path
    while True:
        st = os.stat(folder)
        if st.st_uid not in trusted:
            raise InvalidTarget(f"target directory {path}: {folder} is owned by uid {st.st_uid}, not by root "
                                "or this user; refusing to write backups under it")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise InvalidTarget(f"target directory {path}: {folder} is writable by "
                                f"{'others' if st.st_mode & 0o002 else 'its group'} (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit; refusing to write "
                                "backups under it")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def capture_disks(hv: Hypervisor, domain: str) -> list[Disk]:
    """The domain's disks a capture covers; refuses what cannot be captured."""
    disks = [d for d in hv.disks(domain) if d.device == "disk"]
    if not disks:
        raise UnsupportedDisk(f"domain {domain} has no disks to capture")
    for d in disks:
        if d.type != "file" or not d.source:
            raise UnsupportedDisk(f"disk {d.target} of {domain} is a {d.type} disk; only file disks are supported")
        if d.format not in ("qcow2", "raw"):
            raise UnsupportedDisk(f"disk {d.target} of {domain} has format {d.format}; qcow2 or raw expected")
        if d.backing:
            raise UnsupportedDisk(f"disk {d.target} of {domain} already has a backing chain "
                                  f"({' <- '.join(d.backing)}); commit it first")
        if d.mirror_job:
            raise UnsupportedDisk(f"disk {d.target} of {domain} has a {d.mirror_job} block job running")
        if not os.path.exists(d.source):
            raise UnsupportedDisk(f"disk {d.target} of {domain}: {d.source} is not visible on this host")
    return disks


def source_of(d: Disk) -> str:
    """The path of a disk ``capture_disks`` accepted (it refuses disks without one)."""
    if not d.source:
        raise UnsupportedDisk(f"disk {d.target} has no source")
    return d.source


def require_running(hv: Hypervisor, domain: str) -> None:
    state = hv.domain_state(domain)
    if state != "running":
        raise DomainNotRunning(f"domain {domain} is {state}; this strategy captures a running domain")


def check_space(path: str, needed: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise InvalidTarget(f"{what}: {path} has {free} bytes free, {needed} needed")


# -- quiescing steps ------------------------------------------------------------------
class Freeze(Step):
    """FS freeze through the guest agent, with the thaw deadline written first."""

    description = "freeze guest filesystems (guest agent)"

    def execute(self, ctx: StepContext) -> None:
        mode = ctx.params.get("quiesce", "off")
        if mode == "off":
            ctx.data["quiesced"] = False
            return
        hooks.arm(ctx)
        failed = hooks.pre_freeze(ctx)
        if failed:
            ctx.data["quiesced"] = False
            ctx.data["quiesce_error"] = failed
            if mode == "require":
                raise StepFailed(f"quiesce=require but {failed}")
            ctx.save("quiesce-skipped", reason=failed)
            return
        deadline = float(ctx.params.get("freeze_deadline", DEFAULT_FREEZE_DEADLINE))
        quiesce.mark_freezing(ctx.rec, deadline)
        ctx.data.pop("freeze_broken", None)
        ctx.save("freeze-intent", deadline_s=deadline)
        try:
            count = ctx.hv.fs_freeze(ctx.domain)
        except DomcaptureError as exc:
            # Thaw even though the freeze failed: the agent may have frozen and
            # failed to answer in time.
            quiesce.thaw(ctx.hv, ctx.rec, by="freeze-failure")
            ctx.data["quiesced"] = False
            ctx.data["quiesce_error"] = str(exc)
            if mode == "require":
                raise StepFailed(f"quiesce=require but the guest could not be frozen: {exc}") from exc
            ctx.save("quiesce-skipped", reason=str(exc))
            return
        ctx.data["quiesced"] = True
        ctx.data["frozen_filesystems"] = count

    def revert(self, ctx: StepContext) -> None:
        if quiesce.frozen_info(ctx.rec):
            quiesce.thaw(ctx.hv, ctx.rec, by="rollback")
        hooks.post_thaw(ctx)


class Thaw(Step):
    description = "thaw guest filesystems, then the post-thaw hook"

    def probe(self, ctx: StepContext) -> bool:
        return not quiesce.frozen_info(ctx.rec) and not hooks.post_thaw_owed(ctx)

    def execute(self, ctx: StepContext) -> None:
        if quiesce.frozen_info(ctx.rec):
            outcome = quiesce.thaw(ctx.hv, ctx.rec, by=ctx.rec.worker or "worker")
            ctx.data["downtime_s"] = outcome.get("frozen_seconds")
        hooks.post_thaw(ctx)

    def revert(self, ctx: StepContext) -> None:
        if quiesce.frozen_info(ctx.rec):
            quiesce.thaw(ctx.hv, ctx.rec, by="rollback")
        hooks.post_thaw(ctx)


def needs_refreeze(ctx: StepContext) -> bool:
    """A quiesced capture whose freeze was lost (recovery thawed) must freeze again."""
    return bool(ctx.data.get("quiesced")) and not quiesce.frozen_info(ctx.rec)


# -- block jobs ------------------------------------------------------------------------
def disk_map(ctx: StepContext) -> dict[str, Disk]:
    return {d.target: d for d in ctx.hv.disks(ctx.domain)}


def overlays(ctx: StepContext) -> dict[str, str]:
    """target -> overlay path, as planned in the record."""
    return {a["disk"]: a["path"] for a in ctx.rec.artifacts_of("overlay")}


def originals(ctx: StepContext) -> dict[str, str]:
    return {d["target"]: d["source"] for d in ctx.data["disks"]}


ACTIVE = ("running", "paused")


def commit_offline(ctx: StepContext) -> None:
    """The domain went down on our overlays (powered off, its QEMU killed): commit each overlay into
    its original image with qemu-img, then point the persistent definition back at the originals.

    Every guest write since the snapshot is in the overlay, so none is lost; a re-run after a crash
    commits the same data again.
    """
    planned, original = overlays(ctx), originals(ctx)
    formats = {d["target"]: d.get("format") or "raw" for d in ctx.data["disks"]}
    on = on_overlay(ctx)
    for target in on:
        ctx.save("offline-commit-intent", disk=target)
        ctx.hv.commit_offline(ctx.domain, planned[target], original[target])
    if on:
        ctx.data["offline_commit"] = {"disks": on, "at": time.time()}
        ctx.save("redefine-intent", disks=on)
        ctx.hv.define_disk_sources(ctx.domain, {t: {"path": original[t], "format": formats[t]} for t in on})


def start_commits(ctx: StepContext) -> None:
    """Active blockcommit of every disk still on our overlay and without a job (offline if it is down)."""
    if ctx.hv.domain_state(ctx.domain) not in ACTIVE:
        commit_offline(ctx)
        return
    planned = overlays(ctx)
    for target, disk in disk_map(ctx).items():
        if target in planned and disk.source == planned[target] and disk.mirror_job is None:
            if ctx.hv.block_job(ctx.domain, target) is None:
                ctx.data.setdefault("commits", {})[target] = {"started_at": time.time()}
                ctx.save("commit-intent", disk=target)
                ctx.hv.block_commit_active(ctx.domain, target)


def wait_ready(ctx: StepContext, deadline: float) -> list[str]:
    """Poll until every disk on our overlay has a commit job ready to pivot.

    Returns the disks whose job vanished while they were still on the
    overlay: a vanished job is never taken as success.
    """
    planned = overlays(ctx)
    while True:
        ctx.check_cancel()
        ctx.guard()
        pending, vanished, done, total = [], [], 0, 0
        for target, disk in disk_map(ctx).items():
            if target not in planned or disk.source != planned[target]:
                continue  # pivoted already (or never snapshotted)
            job = ctx.hv.block_job(ctx.domain, target)
            if job is not None:
                done, total = done + job.cur, total + job.end
            if disk.mirror_job and disk.mirror_ready:
                continue
            if job is None and not disk.mirror_job:
                vanished.append(target)
            else:
                pending.append(target)
        ctx.progress("commit", done, total)
        if not pending:
            return vanished
        if time.time() > deadline:
            raise DeadlineExceeded(f"block commit of {', '.join(pending)} not ready by its deadline")
        ctx.sleep(POLL)


def pivot_all(ctx: StepContext) -> None:
    """Pivot every disk still on our overlay; a domain that went down meanwhile is committed offline."""
    planned, original = overlays(ctx), originals(ctx)
    for target, disk in disk_map(ctx).items():
        if target in planned and disk.source == planned[target]:
            if ctx.hv.domain_state(ctx.domain) not in ACTIVE:
                commit_offline(ctx)
                break
            ctx.save("pivot-intent", disk=target)
            try:
                ctx.hv.block_pivot(ctx.domain, target)
            except OperationFailed:
                if ctx.hv.domain_state(ctx.domain) in ACTIVE:
                    raise
                commit_offline(ctx)  # it died under the pivot
                break
    still = [t for t, d in disk_map(ctx).items() if t in original and d.source != original[t]]
    if still:
        raise StepFailed(f"after pivot, disks {still} are not on their original images")


def on_overlay(ctx: StepContext) -> list[str]:
    planned = overlays(ctx)
    return [t for t, d in disk_map(ctx).items() if t in planned and d.source == planned[t]]


def remove_overlays(ctx: StepContext) -> None:
    """Delete our overlay files that no disk uses any more."""
    using = {d.source for d in ctx.hv.disks(ctx.domain)}
    for art in ctx.rec.artifacts_of("overlay"):
        if art["path"] in using:
            raise StepFailed(f"overlay {art['path']} is still in use by {ctx.domain}")
        ctx.fx.files.remove_owned(art["path"])
        art["status"] = "deleted"


def get_off_overlays(ctx: StepContext) -> None:
    """Bring every disk back onto its original image: commit, wait, pivot, delete."""
    if on_overlay(ctx):
        start_commits(ctx)
        timeout = float(ctx.params.get("commit_timeout", DEFAULT_COMMIT_TIMEOUT))
        for _ in range(3):
            vanished = wait_ready(ctx, time.time() + timeout)
            if not vanished:
                break
            start_commits(ctx)
        pivot_all(ctx)
    remove_overlays(ctx)
    ctx.save("overlays-removed")



# -- disk copies into the target ----------------------------------------------------------
def copies_present(ctx: StepContext, kind: str) -> bool:
    """Every artifact of ``kind`` copied, checksummed and on disk."""
    return all(a["status"] == "present" and a.get("checksum") and os.path.exists(a["path"])
               for a in ctx.rec.artifacts_of(kind))


def copy_disks(ctx: StepContext, artifact_prefix: str) -> None:
    """Copy each of ``ctx.data["disks"]`` to its artifact ``<prefix>:<target>``.

    Resumable (a durable cursor per disk, persisted after each fsync),
    checksummed, limited by ``--bandwidth``, fenced and cancellable per chunk,
    with progress in the record.  A disk already copied is skipped.
    """
    cursors = ctx.data.setdefault("copy", {})
    total = sum(d["size"] for d in ctx.data["disks"])
    base_done = 0
    for disk in ctx.data["disks"]:
        name = f"{artifact_prefix}:{disk['target']}"
        art = ctx.rec.artifacts[name]
        if art["status"] == "present" and art.get("checksum") and os.path.exists(art["path"]):
            base_done += art["size"]
            continue
        cur = cursors.setdefault(disk["target"], {"offset": 0})
        partial = naming.partial_of(art["path"])
        art["partial"] = partial
        ctx.save("copy-intent", disk=disk["target"], partial=partial, offset=cur["offset"])

        def durable(pos: int, cur: dict[str, Any] = cur) -> None:
            cur["offset"] = pos
            ctx.save(None)

        def progress(pos: int, _total: int, done0: int = base_done, target: str = disk["target"]) -> None:
            ctx.progress("copy", done0 + pos, total, disk=target)

        def check() -> None:  # the lease is checked by the effects port, per chunk
            ctx.check_cancel()

        checksum, size = ctx.fx.files.copy_resumable(disk["source"], partial, art["path"], offset=cur["offset"],
                                                     on_progress=progress, on_durable=durable, check=check,
                                                     bandwidth=ctx.params.get("bandwidth") or 0, sleep=ctx.sleep)
        ctx.rec.set_artifact(name, status="present", checksum=f"sha256:{checksum}", size=size)
        ctx.save("copied", disk=disk["target"], bytes=size)
        base_done += size
    ctx.progress("copy", total, total, force=True)


def remove_copies(ctx: StepContext, kind: str) -> None:
    """Delete every artifact of ``kind`` and its partial file, only inside our own folder."""
    for art in ctx.rec.artifacts_of(kind):
        for path in (art["path"], naming.partial_of(art["path"])):
            ctx.fx.files.remove_owned(path)
        art["status"] = "deleted"
    ctx.data.pop("copy", None)


def plan_capture_folder(ctx: StepContext, folder: str) -> None:
    """Name the folder a capture writes into (created 0700 and exclusively by ``make_capture_folder``)."""
    ctx.rec.plan_artifact(Artifact("folder", "folder", folder))


def make_capture_folder(ctx: StepContext) -> str:
    """Create the planned capture folder (re-checking the target: it may have changed since submit)."""
    if "folder" not in ctx.rec.artifacts:  # a record planned before folders were artifacts
        plan_capture_folder(ctx, os.path.dirname(ctx.rec.artifacts["manifest"]["path"]))
    folder: str = ctx.rec.artifacts["folder"]["path"]
    parent = os.path.dirname(folder)
    if check_target_dir(parent) != parent:  # a folder on the way became a symlink since submit
        raise InvalidTarget(f"target directory {parent} now resolves to {os.path.realpath(parent)}; "
                            "refusing to follow it")
    ctx.fx.files.make_folder(folder)
    ctx.rec.set_artifact("folder", status="present")
    return folder


def remove_capture_folder(ctx: StepContext) -> None:
    """Remove the capture's folder once it is empty (a folder holding anything else stays)."""
    art = ctx.rec.artifacts.get("folder")
    if art and ctx.fx.files.remove_folder(art["path"]):
        art["status"] = "deleted"
