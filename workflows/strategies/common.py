"""Pieces several strategies share: input checks, quiesce steps, block-job helpers."""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from .. import hooks, naming, quiesce, validate
from ..errors import (InputError, DomainNotRunning, DomcaptureError, InvalidTarget,
                      StepFailed, UnsupportedDisk)
from ..definition import Option
from ..hypervisor.base import Disk, Hypervisor
from ..record import Artifact
from ..steps import Step, StepContext

QUIESCE_MODES = ("off", "try", "require")
DEFAULT_FREEZE_DEADLINE = 10.0

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


def check_key_file(name: str, value: Any) -> str:
    """An encryption key file: absolute path of a readable, non-empty regular file."""
    return validate.key_file(name, value)


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


OPT_DISKS = Option("disks", "capture only these disks, comma separated, e.g. vda,vdb (default: every writable "
                   "disk; cdrom, floppy, read-only and shareable disks are skipped)")
DEFAULT_OVERLAY_DIR = "/var/lib/domcapture/overlays"
OPT_OVERLAY_DIR = Option("overlay_dir", "folder for the temporary overlays: a block device's always go here "
                                        f"(default {DEFAULT_OVERLAY_DIR}); a file disk's go beside its image "
                                        "unless this is given")
OPT_EXCLUDE = Option("exclude", "leave these disks out, comma separated, e.g. vdc")

#: devices a capture leaves out unless ``--disks`` names them (then it refuses them), with the reason shown
SKIPPED_DEVICES = {"cdrom": "cdrom (removable media)", "floppy": "floppy (removable media)",
                   "lun": "lun (SCSI passthrough: the guest owns the device)"}


def parse_disk_selection(params: dict[str, Any]) -> dict[str, Any]:
    """``--disks`` and ``--exclude`` as lists of targets (which exist is checked against the domain)."""
    chosen = validate.disk_targets("disks", params.get("disks"))
    exclude = validate.disk_targets("exclude", params.get("exclude"))
    if chosen and exclude:
        both = [t for t in exclude if t in chosen]
        if both:
            raise InputError(f"--exclude names {', '.join(both)}, which --disks asks for")
    return {"disks": chosen, "exclude": exclude or []}


def skip_reason(d: Disk) -> str | None:
    """Why a capture leaves this disk out by default (None: it is captured)."""
    if d.device != "disk":
        return SKIPPED_DEVICES.get(d.device, f"{d.device} device")
    if d.readonly:
        return "read-only (nothing to capture that changes)"
    if d.shareable:
        return "shareable (another domain writes it too: no consistent point in time)"
    return None


def choose_disks(hv: Hypervisor, domain: str, params: dict[str, Any] | None = None, *,
                 backing_ok: bool = False, block_ok: bool = False,
                 network_ok: bool = False) -> tuple[list[Disk], list[dict[str, str]]]:
    """The disks a capture covers, and the ones it leaves out (``{"target", "reason"}`` each).

    ``params`` may hold ``disks`` / ``exclude`` as ``parse_disk_selection`` returns them.  A target
    either names that the domain does not have is refused, as is a disk ``--disks`` asks for that
    cannot be captured.  ``backing_ok``: the strategy handles disks with a backing chain.
    """
    params = params or {}
    wanted: list[str] | None = params.get("disks")
    exclude: list[str] = params.get("exclude") or []
    every = hv.disks(domain)
    known = [d.target for d in every]
    for name, targets in (("disks", wanted or []), ("exclude", exclude)):
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise UnsupportedDisk(f"--{name}: domain {domain} has no disk {', '.join(unknown)} "
                                  f"(its disks: {', '.join(known) or 'none'})")
    disks: list[Disk] = []
    skipped: list[dict[str, str]] = []
    for d in every:
        reason = skip_reason(d)
        if wanted is not None and d.target not in wanted:
            skipped.append({"target": d.target, "reason": "not named by --disks"})
        elif d.target in exclude:
            skipped.append({"target": d.target, "reason": "excluded by --exclude"})
        elif reason and wanted is not None:
            raise UnsupportedDisk(f"--disks names {d.target} of {domain}, a {reason.split(' (')[0]} disk; "
                                  "it cannot be captured")
        elif reason:
            skipped.append({"target": d.target, "reason": reason})
        else:
            disks.append(d)
    if not disks:
        left = "; ".join(f"{s['target']}: {s['reason']}" for s in skipped)
        raise UnsupportedDisk(f"domain {domain} has no disks to capture" + (f" ({left})" if left else ""))
    for d in disks:
        check_capturable(d, domain, backing_ok=backing_ok, block_ok=block_ok, network_ok=network_ok)
    return disks, skipped


def parse_overlay_dir(params: dict[str, Any]) -> str | None:
    """``--overlay-dir``: an absolute path outside /dev (created 0700 when the snapshot is taken)."""
    value = params.get("overlay_dir")
    if value is None:
        return None
    path = os.path.normpath(validate.path("overlay_dir", value))
    if not os.path.isabs(path):
        raise InputError(f"--overlay-dir must be an absolute path (got {value!r})")
    if path == "/dev" or path.startswith("/dev/"):
        raise InputError(f"--overlay-dir {path} is under /dev; overlays are files and go on a file system")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--overlay-dir {path} exists and is not a folder")
    return path


def overlay_for(d: Disk, wf_id: str, overlay_dir: str | None) -> str:
    """Where the temporary overlay of a disk goes: never beside a block device (that is /dev) or a
    network disk's name."""
    if d.type in ("block", "network"):
        return naming.overlay_in(overlay_dir or DEFAULT_OVERLAY_DIR, wf_id, d.target)
    if overlay_dir:
        return naming.overlay_in(overlay_dir, wf_id, d.target)
    return naming.overlay_path(source_of(d), wf_id, d.target)


def check_capturable(d: Disk, domain: str, *, backing_ok: bool = False, block_ok: bool = False,
                     network_ok: bool = False) -> None:
    kinds = ("file", "block", "network") if network_ok else ("file", "block") if block_ok else ("file",)
    if d.type not in kinds or not (d.source or d.url):
        raise UnsupportedDisk(f"disk {d.target} of {domain} is a {d.type} disk; only "
                              f"{', '.join(kinds)} disks are supported by this strategy")
    if d.type == "network":
        if not d.url:
            raise UnsupportedDisk(f"disk {d.target} of {domain} is a network disk of a protocol domcapture does "
                                  "not read (nbd, iscsi and rbd are read through qemu-img)")
        if d.format not in ("qcow2", "raw"):
            raise UnsupportedDisk(f"disk {d.target} of {domain} has format {d.format}; qcow2 or raw expected")
        if d.mirror_job:
            raise UnsupportedDisk(f"disk {d.target} of {domain} has a {d.mirror_job} block job running")
        return  # not a local path: never looked for on this host
    if d.format not in ("qcow2", "raw"):
        raise UnsupportedDisk(f"disk {d.target} of {domain} has format {d.format}; qcow2 or raw expected")
    if d.backing and not backing_ok:
        raise UnsupportedDisk(f"disk {d.target} of {domain} already has a backing chain "
                              f"({' <- '.join(d.backing)}); commit it first")
    if d.mirror_job:
        raise UnsupportedDisk(f"disk {d.target} of {domain} has a {d.mirror_job} block job running")
    if not d.source or not os.path.exists(d.source):
        raise UnsupportedDisk(f"disk {d.target} of {domain}: {d.source} is not visible on this host")


def capture_disks(hv: Hypervisor, domain: str) -> list[Disk]:
    """The domain's disks a capture covers (every writable disk); refuses what cannot be captured."""
    return choose_disks(hv, domain)[0]


def chain_size(d: Disk, hv: Hypervisor | None = None, domain: str = "") -> int:
    """Bytes of the disk's image files (its own and every backing file on this host): what a copy needs
    at most.  A block device's size is asked of the hypervisor (``getsize`` says 0 for a device)."""
    if d.type in ("block", "network") and hv is not None:
        return hv.get_disk_capacity(domain, d.target)
    return sum(os.path.getsize(p) for p in [source_of(d), *d.backing] if p and os.path.exists(p))


def flattens(d: Disk) -> bool:
    """Copied by ``qemu-img convert`` into one qcow2: a disk over a backing chain, a block device, or a
    network disk (read through qemu-img from its URL, never as a local path)."""
    return bool(d.backing) or d.type in ("block", "network")


def backup_format(d: Disk) -> str:
    """The format of a disk's backup file: qcow2 when flattened, else the disk's own."""
    return "qcow2" if flattens(d) else (d.format or "raw")


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
        if ctx.data.get("offline"):  # a shut-off domain: nothing runs that could be frozen
            ctx.data["quiesced"] = False
            ctx.data["quiesce_error"] = "the domain is shut off: its disks are at rest"
            return
        if ctx.hv.domain_state(ctx.domain) == "paused":
            # libvirt refuses a freeze (and a thaw) of a paused domain; its guest is held still anyway.  A
            # freeze tried here failed, its thaw failed too, and the rollback retried that thaw for ever.
            ctx.data["quiesced"] = False
            ctx.data["paused"] = True
            ctx.data["quiesce_error"] = "the domain is paused: its guest is held still, nothing was frozen"
            if mode == "require":
                raise StepFailed(f"quiesce=require but {ctx.domain} is paused (no guest agent answers)")
            ctx.save("quiesce-skipped", reason=ctx.data["quiesce_error"])
            return
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
        partial = naming.partial_of(art["path"])
        art["partial"] = partial
        if disk.get("flatten"):  # a backing chain or a block device: one standalone qcow2 image
            ctx.save("flatten-intent", disk=disk["target"], partial=partial, chain=disk.get("backing", []))
            ctx.check_cancel()
            checksum, size = ctx.fx.files.convert_flat(disk.get("url") or disk["source"], disk["format"] or "raw",
                                                       partial, art["path"])
            ctx.rec.set_artifact(name, status="present", checksum=f"sha256:{checksum}", size=size)
            ctx.save("copied", disk=disk["target"], bytes=size, flattened=True)
            base_done += disk["size"]
            ctx.progress("copy", base_done, total, disk=disk["target"])
            continue
        cur = cursors.setdefault(disk["target"], {"offset": 0})
        ctx.save("copy-intent", disk=disk["target"], partial=partial, offset=cur["offset"])

        def durable(pos: int, cur: dict[str, Any] = cur) -> None:
            cur["offset"] = pos
            ctx.save(None)

        def progress(pos: int, _total: int, done0: int = base_done, target: str = disk["target"]) -> None:
            ctx.progress("copy", done0 + pos, total, disk=target)

        def check() -> None:  # the effects port's guard checks the lease and the cancel flag (one read less)
            pass

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


def check_quiesce_state(domain: str, state: str, quiesce: str) -> None:
    """``--quiesce require`` needs a running guest's agent: refused for a paused or shut-off domain."""
    if state == "paused" and quiesce == "require":
        raise InputError(f"--quiesce require: domain {domain} is paused (its guest agent cannot answer); resume "
                         "it, or use --quiesce off or try (a paused guest is held still, nothing is frozen)")
    if state == "shutoff" and quiesce == "require":
        raise InputError(f"--quiesce require: domain {domain} is shut off (no guest agent to freeze); its disks "
                         "are at rest, use --quiesce off or try")
