"""A backup chain exposed as a read-only mounted file system, piece by piece.

The pieces, each found again from the host's own state (never from a record
alone), so a probe after a SIGKILL sees what really exists:

1. a ``qemu-storage-daemon`` (daemonized, its own session: a killed worker
   does not take it along) whose FUSE export shows the disk as one raw file.
   The export is a qcow2 overlay of ours over the chain opened read-only, so
   the backup's files are only read and a journal the file system replays on
   mount lands in the overlay.  Found by its pidfile, and its command line
   naming that pidfile.
2. a loop device over the export file.  Found by its backing file
   (``losetup -J -l``).
3. the mount of the loop device on the operator's folder, ``ro,nosuid,nodev,
   noexec``.  Found by ``findmnt``.

Reads here run commands directly (they change nothing); every change goes
through the effects port (``ctx.fx.host``), fenced by the workflow's lease.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from . import nbdio
from .errors import OperationFailed
from .steps import StepContext

CMD_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
MOUNT_OPTIONS = "ro,nosuid,nodev,noexec"


def _read(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationFailed(f"{argv[0]}: {exc}") from exc
    return out.stdout if out.returncode == 0 else ""


def _change(ctx: StepContext, argv: list[str], what: str, timeout: float = CMD_TIMEOUT) -> None:
    out = ctx.fx.host.run(argv, timeout=timeout, env={})
    if out["exitcode"] != 0:
        detail = "timed out" if out["timed_out"] else (out["err"] or out["out"]).strip()
        raise OperationFailed(f"{what} failed: {detail}")


# -- what exists ---------------------------------------------------------------------------
def mounted_source(folder: str) -> str | None:
    """The device mounted on ``folder`` (the topmost mount), or None."""
    text = _read(["findmnt", "-J", "-n", "--mountpoint", folder, "-o", "SOURCE"])
    if not text:
        return None
    systems = json.loads(text).get("filesystems") or []
    return str(systems[-1]["source"]) if systems else None


def loops_of(path: str) -> list[str]:
    """The loop devices whose backing file is ``path``."""
    text = _read(["losetup", "-J", "-l", "-O", "NAME,BACK-FILE"])
    if not text:
        return []
    return [d["name"] for d in json.loads(text).get("loopdevices", []) if d.get("back-file") == path]


def daemon_pid(pidfile: str) -> int | None:
    """The storage daemon of this pidfile, if it runs (its command line names the pidfile)."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and pidfile.encode() in argv and b"qemu-storage-daemon" in argv[0] else None


def exported(path: str) -> bool:
    """Whether a FUSE file system (the daemon's export) is mounted on ``path``."""
    return mounted_source(path) is not None


# -- making them ---------------------------------------------------------------------------
def create_overlay(ctx: StepContext, path: str, size: int) -> None:
    """A qcow2 file of ours (created 0600 first, then formatted) with no backing named in it."""
    ctx.fx.files.prepare_for_writer(path)
    ctx.guard()
    nbdio.run_qemu_img("create", "-q", "-f", "qcow2", path, str(size))
    ctx.fx.files.fsync(path)


def start_daemon(ctx: StepContext, chain: list[str], overlay: str, export: str, pidfile: str) -> None:
    """The storage daemon: the chain read-only, our overlay over it, shown at ``export`` (FUSE)."""
    node: dict[str, Any] | None = None
    for path in chain:
        node = {"driver": "qcow2", "read-only": True,
                "file": {"driver": "file", "filename": path, "read-only": True}, "backing": node}
    top = {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": overlay},
           "backing": node}
    spec = {"type": "fuse", "id": "export", "node-name": "top", "mountpoint": export, "writable": True}
    _change(ctx, ["qemu-storage-daemon", "--daemonize", "--pidfile", pidfile,
                  "--blockdev", json.dumps(top, separators=(",", ":")),
                  "--export", json.dumps(spec, separators=(",", ":"))], "qemu-storage-daemon")


def attach_loop(ctx: StepContext, export: str) -> str:
    _change(ctx, ["losetup", "--find", "--nooverlap", export], f"losetup of {export}")
    loops = loops_of(export)
    if not loops:
        raise OperationFailed(f"losetup of {export}: no loop device shows it")
    return loops[0]


def mount(ctx: StepContext, device: str, folder: str) -> None:
    """Mount ``device`` on ``folder``; a ``/proc/<pid>/fd/<n>`` folder (the mount point we hold open) is
    passed to the kernel as it is, never resolved to a name again."""
    exact = ["--no-canonicalize"] if folder.startswith("/proc/") else []
    _change(ctx, ["mount", *exact, "-o", MOUNT_OPTIONS, device, folder], f"mount of {device} on {folder}")


# -- taking them down (each idempotent) ----------------------------------------------------
def unmount(ctx: StepContext, folder: str, export: str) -> None:
    """Unmount ``folder`` while one of our loop devices is mounted there."""
    loops = loops_of(export)
    while (src := mounted_source(folder)) is not None and src in loops:
        _change(ctx, ["umount", folder], f"umount of {folder}")


def detach_loops(ctx: StepContext, export: str) -> None:
    for loop in loops_of(export):
        _change(ctx, ["losetup", "-d", loop], f"losetup -d {loop}")


def stop_daemon(ctx: StepContext, pidfile: str, export: str) -> None:
    """Stop the storage daemon (SIGTERM, then SIGKILL), then lift its export if a killed daemon left it."""
    deadline = time.monotonic() + STOP_TIMEOUT
    sig = "-TERM"
    while (pid := daemon_pid(pidfile)) is not None:
        if time.monotonic() > deadline + STOP_TIMEOUT:
            raise OperationFailed(f"qemu-storage-daemon {pid} ({pidfile}) does not end", retryable=True)
        if time.monotonic() > deadline:
            sig = "-KILL"
        ctx.fx.host.run(["kill", sig, str(pid)], timeout=CMD_TIMEOUT, env={})
        ctx.sleep(0.1)
    if exported(export):  # a daemon killed with -9 leaves its FUSE mount behind, disconnected
        _change(ctx, ["umount", "-l", export], f"umount of the export {export}")
