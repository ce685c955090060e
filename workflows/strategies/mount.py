"""``mount``: a backup (a whole incremental chain) as a read-only mounted file system; ``unmount``.

``mount --from ID [--disk vdb] --mountpoint DIR`` (the CLI's ``domcapture
mount ID [--disk vdb] DIR``) starts a ``qemu-storage-daemon`` that shows the
disk as it was at backup ``ID`` (the chain opened read-only, under an overlay
of ours that takes any journal replay), puts a loop device over that export
and mounts it ``ro,nosuid,nodev,noexec`` on DIR (``workflows/mounts.py``).
Each piece's intent is recorded before it is made, and each step's probe
finds its piece on the host, so a SIGKILL at any point resumes.  Rollback
takes every piece down again, newest first.

``unmount --from MOUNT_ID`` (``domcapture umount ID|DIR``) takes the pieces of
a succeeded mount down: unmount, detach the loop device, stop the daemon (and
lift its export if it was killed), delete the files and the folder.  Each
step finds what is left, so it resumes after a SIGKILL too.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any, Callable, Iterator

from .. import backupfolder as bf
from .. import mounts, naming, nbdio, validate
from ..definition import RESUME, Definition, Option
from ..effects import Inspect
from ..errors import InputError, InvalidTarget, StepFailed
from ..record import Artifact, Record
from ..steps import Step, StepContext
from . import chain as chain_mod
from . import common

NAME = "mount"
UNMOUNT = "unmount"
VERSION = 1

OPT_FROM = Option("from", "mount: the id of the backup to mount; unmount: the id of the mount workflow")
OPT_DISK = Option("disk", "the disk of the backup to mount (needed when the backup holds more than one)")
OPT_MOUNTPOINT = Option("mountpoint", "an empty folder to mount the backup's file system on")


# -- input -------------------------------------------------------------------------------------------
def resolve(load: Callable[[str], Record], params: dict[str, Any]) -> dict[str, Any]:
    params["chain"] = chain_mod.backup_chain(load, params.get("from"))
    return params


def check_mountpoint(value: Any) -> str:
    """An empty folder in a folder checked the way ``--target`` is; the last component is never resolved
    (a symlink there is refused), and the worker opens it with ``O_NOFOLLOW`` right before mounting."""
    if value is None:
        raise InputError("--mountpoint is required: an empty folder to mount the backup on")
    raw = validate.path("mountpoint", value).rstrip("/") or "/"
    base = os.path.basename(raw)
    if not base or base in (".", "..") or ".." in raw.split("/"):
        raise InvalidTarget(f"mount point {raw}: name a folder (no '..')")
    try:
        parent = common.check_target_dir(os.path.dirname(os.path.abspath(raw)))
    except InvalidTarget as exc:
        raise InvalidTarget(f"mount point {raw}: {exc}") from None
    path = os.path.join(parent, base)
    try:
        with opened_mountpoint(path) as fd:
            if os.path.ismount(path):
                raise InvalidTarget(f"mount point {path} already has a file system mounted on it")
            if os.listdir(fd):
                raise InvalidTarget(f"mount point {path} is not empty")
    except OSError as exc:
        raise InvalidTarget(f"mount point {path}: {exc.strerror}") from None
    return path


@contextlib.contextmanager
def opened_mountpoint(path: str) -> Iterator[int]:
    """The mount point's folder, opened without following a link (a symlink or a file there is refused)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise InvalidTarget(f"mount point {path} is not a folder: it does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidTarget(f"mount point {path} is {bf.kind_of(st.st_mode)}, not a folder; refusing to follow it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise InvalidTarget(f"mount point {path} changed while it was opened; refusing to follow it") from None
    try:
        yield fd
    finally:
        os.close(fd)


def validate_mount(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    chain = params.get("chain") or []
    disks = chain_mod.check_chain(chain, params.get("from"), domain)
    disk = chain_mod.pick_disk(disks, params.get("disk"), chain[-1]["id"], required=True)
    with chain_mod.open_chain(chain, disks={str(disk)}, deep=False) as opened:  # nothing followed or blocking
        chain_mod.refuse_encrypted(chain, "mount", opened)
    return {"from": chain[-1]["id"], "chain": chain, "disk": disk,
            "mountpoint": check_mountpoint(params.get("mountpoint")), "on_error": common.parse_on_error(params)}


def resolve_unmount(load: Callable[[str], Record], params: dict[str, Any]) -> dict[str, Any]:
    ref = params.get("from")
    if not ref:
        raise InputError("--from is required: the id of a mount workflow")
    src = load(str(ref))
    if src.strategy != NAME:
        raise InputError(f"workflow {ref} is a {src.strategy} workflow, not a mount")
    if src.status != "succeeded":
        raise InputError(f"mount {ref} is {src.status}; roll it back instead ('domcapture rollback {ref}')")
    params["mount"] = {"id": src.id, "disk": src.params["disk"], "mountpoint": src.params["mountpoint"]}
    return params


def validate_unmount(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    mount = params.get("mount")
    if not mount:
        raise InputError("--from is required: the id of a mount workflow")
    if not os.path.isdir(naming.mount_dir(mount["id"])):
        raise InputError(f"mount {mount['id']} is already taken down")
    return {"from": mount["id"], "mount": mount, "on_error": common.parse_on_error(params)}


# -- the pieces, named from the mount workflow's id -------------------------------------------------
def _pieces(wf_id: str, disk: str) -> dict[str, str]:
    return {"folder": naming.mount_dir(wf_id), "overlay": naming.mount_overlay(wf_id, disk),
            "export": naming.mount_export(wf_id, disk), "pidfile": naming.mount_pidfile(wf_id)}


def plan_pieces(ctx: StepContext, wf_id: str, disk: str) -> None:
    p = _pieces(wf_id, disk)
    common.plan_capture_folder(ctx, p["folder"])
    ctx.rec.plan_artifact(Artifact("overlay", "mount-overlay", p["overlay"], disk))
    ctx.rec.plan_artifact(Artifact("export", "mount-export", p["export"], disk))
    ctx.rec.plan_artifact(Artifact("pidfile", "pidfile", p["pidfile"]))


def _path(ctx: StepContext, name: str) -> str:
    path: str = ctx.rec.artifacts[name]["path"]
    return path


def remove_files(ctx: StepContext) -> None:
    """The daemon is stopped: delete the overlay, the export file, the pidfile, then the folder."""
    for name in ("overlay", "export", "pidfile"):
        for path in (_path(ctx, name), naming.partial_of(_path(ctx, name))):
            ctx.fx.files.remove_owned(path)
        ctx.rec.set_artifact(name, status="deleted")
    common.remove_capture_folder(ctx)


# -- mount steps -------------------------------------------------------------------------------------
def _open_checked(ctx: StepContext) -> bf.Opened:
    """The disk's chain, checked again in this worker and held open (``chain.open_chain``)."""
    try:
        opened = chain_mod.open_chain(ctx.params["chain"], disks={ctx.params["disk"]},
                                      known=ctx.data.get("checked"))
    except InputError as exc:
        raise StepFailed(str(exc)) from None
    ctx.data["checked"] = {**(ctx.data.get("checked") or {}), **opened.known()}
    return opened


class Preflight(Step):
    description = "check the chain's files of the disk against their checksums; name the pieces"

    def execute(self, ctx: StepContext) -> None:
        ctx.data.pop("checked", None)  # the folders may have changed since submit: every byte is read again
        _open_checked(ctx).close()
        plan_pieces(ctx, ctx.rec.id, ctx.params["disk"])

    def revert(self, ctx: StepContext) -> None:
        if "folder" in ctx.rec.artifacts:
            common.remove_capture_folder(ctx)


class Export(Step):
    description = "qemu-storage-daemon: the chain read-only under an overlay of ours, exported as a file (FUSE)"

    def probe(self, ctx: StepContext) -> bool:
        return mounts.daemon_pid(_path(ctx, "pidfile")) is not None and mounts.exported(_path(ctx, "export"))

    def execute(self, ctx: StepContext) -> None:
        disk = ctx.params["disk"]
        export, overlay, pidfile = _path(ctx, "export"), _path(ctx, "overlay"), _path(ctx, "pidfile")
        ctx.fx.files.make_shared_folder(naming.RUN_DIR)
        common.make_capture_folder(ctx)
        mounts.stop_daemon(ctx, pidfile, export)  # an earlier attempt's daemon, half started
        files = chain_mod.files_of(ctx.params["chain"], disk)
        with _open_checked(ctx) as opened:  # right before the daemon opens them: it opens these open files
            self._start(ctx, opened, files, export, overlay, pidfile)

    def _start(self, ctx: StepContext, opened: bf.Opened, files: list[str], export: str, overlay: str,
               pidfile: str) -> None:
        size = int(nbdio.image_info(opened.proc(files[-1]))["virtual-size"])
        ctx.save("overlay-intent", path=overlay)
        mounts.create_overlay(ctx, overlay, size)
        ctx.rec.set_artifact("overlay", status="present")
        ctx.fx.files.prepare_for_writer(export)  # the export's mount point: a private file of ours
        ctx.rec.set_artifact("export", status="present")
        ctx.save("export-intent", export=export, pidfile=pidfile, chain=files)
        mounts.start_daemon(ctx, [opened.proc(p) for p in files], overlay, export, pidfile)
        ctx.rec.set_artifact("pidfile", status="present")

    def revert(self, ctx: StepContext) -> None:
        if "pidfile" not in ctx.rec.artifacts:
            return
        mounts.stop_daemon(ctx, _path(ctx, "pidfile"), _path(ctx, "export"))
        remove_files(ctx)


class Attach(Step):
    description = "a loop device over the export file"

    def probe(self, ctx: StepContext) -> bool:
        return bool(mounts.loops_of(_path(ctx, "export")))

    def execute(self, ctx: StepContext) -> None:
        ctx.save("attach-intent", export=_path(ctx, "export"))
        ctx.data["loop"] = mounts.attach_loop(ctx, _path(ctx, "export"))

    def revert(self, ctx: StepContext) -> None:
        mounts.detach_loops(ctx, _path(ctx, "export"))


class Mount(Step):
    description = "mount the loop device read-only (ro,nosuid,nodev,noexec) on the mount point"

    def probe(self, ctx: StepContext) -> bool:
        return mounts.mounted_source(ctx.params["mountpoint"]) in mounts.loops_of(_path(ctx, "export"))

    def execute(self, ctx: StepContext) -> None:
        loops = mounts.loops_of(_path(ctx, "export"))
        if not loops:
            raise StepFailed(f"the loop device over {_path(ctx, 'export')} is gone", retryable=True)
        folder = ctx.params["mountpoint"]
        try:
            with opened_mountpoint(folder) as fd:  # the folder itself, never a link put there since submit
                if os.path.ismount(folder) or os.listdir(fd):
                    raise StepFailed(f"mount point {folder} changed since submit: it is no longer an empty folder")
                ctx.data["loop"] = loops[0]
                ctx.save("mount-intent", device=loops[0], mountpoint=folder)
                mounts.mount(ctx, loops[0], f"/proc/{os.getpid()}/fd/{fd}")
        except InvalidTarget as exc:
            raise StepFailed(str(exc)) from None

    def next_trigger(self, ctx: StepContext) -> str:
        loops = mounts.loops_of(_path(ctx, "export"))
        ctx.rec.result = {"mountpoint": ctx.params["mountpoint"], "disk": ctx.params["disk"],
                          "from": ctx.params["from"], "chain": [link["id"] for link in ctx.params["chain"]],
                          "loop": loops[0] if loops else ctx.data.get("loop"),
                          "daemon_pid": mounts.daemon_pid(_path(ctx, "pidfile")),
                          "export": _path(ctx, "export"), "folder": naming.mount_dir(ctx.rec.id)}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        mounts.unmount(ctx, ctx.params["mountpoint"], _path(ctx, "export"))


# -- unmount steps -----------------------------------------------------------------------------------
class UnmountPreflight(Step):
    description = "name the mount's pieces as this workflow's own (what it may delete)"

    def execute(self, ctx: StepContext) -> None:
        plan_pieces(ctx, ctx.params["mount"]["id"], ctx.params["mount"]["disk"])


class Unmount(Step):
    description = "unmount the mount point (only while our loop device is mounted there)"

    def probe(self, ctx: StepContext) -> bool:
        return mounts.mounted_source(ctx.params["mount"]["mountpoint"]) not in mounts.loops_of(_path(ctx, "export"))

    def execute(self, ctx: StepContext) -> None:
        ctx.save("unmount-intent", mountpoint=ctx.params["mount"]["mountpoint"])
        mounts.unmount(ctx, ctx.params["mount"]["mountpoint"], _path(ctx, "export"))


class Detach(Step):
    description = "detach the loop devices over the export file"

    def probe(self, ctx: StepContext) -> bool:
        return not mounts.loops_of(_path(ctx, "export"))

    def execute(self, ctx: StepContext) -> None:
        ctx.save("detach-intent", export=_path(ctx, "export"))
        mounts.detach_loops(ctx, _path(ctx, "export"))


class Stop(Step):
    description = "stop the storage daemon; lift its export if it was killed; delete the files and the folder"

    def probe(self, ctx: StepContext) -> bool:
        return not os.path.lexists(_path(ctx, "folder"))

    def execute(self, ctx: StepContext) -> None:
        ctx.save("stop-intent", pidfile=_path(ctx, "pidfile"))
        mounts.stop_daemon(ctx, _path(ctx, "pidfile"), _path(ctx, "export"))
        remove_files(ctx)
        if os.path.lexists(_path(ctx, "folder")):
            raise StepFailed(f"{_path(ctx, 'folder')} holds files this workflow did not make; it stays")

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.result = {"unmounted": ctx.params["mount"]["id"], "mountpoint": ctx.params["mount"]["mountpoint"]}
        return "advance"


STATES = ["preflight", "exporting", "attaching", "mounting"]
TRANSITIONS = [
    # trigger    source        dest
    ["advance", "preflight", "exporting"],   # the chain is intact; the pieces are named
    ["advance", "exporting", "attaching"],   # the daemon shows the disk as a file
    ["advance", "attaching", "mounting"],    # a loop device over it
    ["advance", "mounting",  "succeeded"],   # mounted read-only on the mount point
]
STEPS: dict[str, Step] = {"preflight": Preflight(), "exporting": Export(), "attaching": Attach(), "mounting": Mount()}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate_mount, resolve=resolve, holds_domain=False,
                        options=(OPT_FROM, OPT_DISK, OPT_MOUNTPOINT, common.OPT_ON_ERROR),
                        summary="mount a backup (its whole chain) read-only on a folder; 'domcapture mount'")

UNMOUNT_STATES = ["preflight", "unmounting", "detaching", "stopping"]
UNMOUNT_TRANSITIONS = [
    ["advance", "preflight", "unmounting"],
    ["advance", "unmounting", "detaching"],
    ["advance", "detaching", "stopping"],
    ["advance", "stopping", "succeeded"],
]
UNMOUNT_STEPS: dict[str, Step] = {"preflight": UnmountPreflight(), "unmounting": Unmount(), "detaching": Detach(),
                                  "stopping": Stop()}

UNMOUNT_DEFINITION = Definition(UNMOUNT, VERSION, UNMOUNT_STATES, UNMOUNT_TRANSITIONS, UNMOUNT_STEPS,
                                on_crash={s: RESUME for s in UNMOUNT_STATES},
                                validate=validate_unmount, resolve=resolve_unmount, holds_domain=False,
                                options=(OPT_FROM, common.OPT_ON_ERROR),
                                summary="take a mounted backup down (unmount, loop device, daemon, files); "
                                        "'domcapture umount'")
