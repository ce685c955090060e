"""The one port through which a step touches the world.

A step gets an ``Effects`` on its context (``ctx.fx``) and nothing else that
can change anything:

- ``fx.hv``: the hypervisor, fenced.  Every mutating method (declared by name
  in ``workflows.hypervisor.base.MUTATING``) checks the lease, and in forward
  mode the cancel flag, right before the call; a method declared nowhere
  cannot be called at all.
- ``fx.files``: owned-file operations.  Each takes a path the record names
  exactly (an artifact's path, its partial file, or, for a rename only, a
  domain disk recorded at preflight in ``data["disks"]``), is fenced the same way, creates with
  ``O_EXCL|O_NOFOLLOW`` and mode 0600 in folders made 0700, and never follows
  a symlink planted where one of our files goes.  The one exception to
  0600/0700 and our own user: a restored domain's TPM state, planned under
  libvirt's swtpm folder, gets the modes and owner libvirt gives swtpm
  (``make_tpm_folder``, ``write_tpm_file``).
- ``fx.checkpoints``: the checkpoint store of this deployment, handed in.
- ``fx.backups``: the backups' records (``workflows.backups``), each changed under its own lease.

Strategies therefore hold no ``os`` mutation, no store global and no
hand-placed guard; a type checker sees the whole boundary.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

from . import filecopy, naming, nbdio
from .backups import BackupRecords
from .checkpoints import CheckpointStore
from .errors import StepFailed
from .hypervisor.base import TPM_STATE_ROOT, Hypervisor
from .record import Record

Guard = Callable[[], None]

#: artifact kinds that name someone else's file (a domain's disk): renamed, never deleted
FOREIGN_KINDS = frozenset({"domain-disk"})


class NotOurs(StepFailed):
    """A file operation on a path the record does not name: refused, nothing touched."""


def _private_folder(path: str) -> bool:
    """A real directory (no symlink) of this process's user that group and others cannot write."""
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


class OwnedFiles:
    """File operations on the paths a workflow's record names, each fenced."""

    def __init__(self, rec: Record, guard: Guard) -> None:
        self.rec = rec
        self.guard = guard

    # -- what the record names --------------------------------------------------
    def owned(self) -> set[str]:
        out: set[str] = set()
        for art in self.rec.artifacts.values():
            if art.get("kind") in FOREIGN_KINDS or not art.get("path"):
                continue
            out.add(art["path"])
            out.add(naming.partial_of(art["path"]))
            if art.get("partial"):
                out.add(art["partial"])
        return out

    def named(self) -> set[str]:
        """Owned paths plus the domain disks recorded (which may be renamed, never deleted)."""
        out = self.owned()
        out.update(a["path"] for a in self.rec.artifacts.values() if a.get("kind") in FOREIGN_KINDS)
        out.update(d["source"] for d in self.rec.data.get("disks", []) if isinstance(d, dict) and d.get("source"))
        return out

    def _check(self, path: str, allowed: set[str], what: str) -> None:
        if path not in allowed:
            raise NotOurs(f"refusing to {what} {path}: workflow {self.rec.id} did not plan it")

    # -- folders ------------------------------------------------------------------
    def make_folder(self, path: str) -> None:
        """Create a capture folder 0700, exclusively; accept it again only if it is ours already.

        Ours means: a real directory (no symlink), owned by this process's
        user, not writable by group or others.
        """
        self._check(path, self.owned(), "create the folder")
        self.guard()
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not _private_folder(path):
                raise NotOurs(f"{path} exists and is not a private folder of ours; refusing to use it") from None
            return
        filecopy.fsync_dir(os.path.dirname(path))

    def make_shared_folder(self, path: str) -> None:
        """A folder shared by workflows (the NBD socket folder): created 0700 if missing, never
        removed, and refused when it is a symlink, someone else's, or writable by others."""
        self.guard()
        try:
            os.makedirs(path, 0o700)
        except FileExistsError:
            pass
        if not _private_folder(path):
            raise NotOurs(f"{path} is not a private folder of this user; refusing to put sockets there")

    def remove_folder(self, path: str) -> bool:
        """Remove our (empty) folder; a folder with anything else in it stays.  True if removed."""
        self._check(path, self.owned(), "remove the folder")
        if not os.path.isdir(path) or os.path.islink(path) or os.listdir(path):
            return False
        self.guard()
        os.rmdir(path)
        return True

    # -- a restored domain's TPM state ----------------------------------------------
    def _check_tpm(self, path: str, what: str) -> None:
        self._check(path, self.owned(), what)
        if not path.startswith(TPM_STATE_ROOT + "/") or os.path.normpath(path) != path:
            raise NotOurs(f"refusing to {what} {path}: not in a TPM state folder under {TPM_STATE_ROOT}")

    def make_tpm_folder(self, path: str, *, mode: int, owner: tuple[int, int]) -> None:
        """A planned folder of a restored domain's TPM state, as libvirt makes it for swtpm: created
        exclusively, then given ``mode`` and ``owner`` (swtpm's user).  Accepted again (a resumed
        restore) only when it is a real directory of ours or that owner that group and others cannot write."""
        self._check_tpm(path, "create the TPM folder")
        self.guard()
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            # ours: made by an earlier attempt, before (our user) or after (swtpm's) it was handed over
            if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.geteuid(), owner[0]) or st.st_mode & 0o022:
                raise NotOurs(f"{path} exists and is not a TPM folder of ours; refusing to use it") from None
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, *owner)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        filecopy.fsync_dir(os.path.dirname(path))

    def write_tpm_file(self, src: str, path: str, *, owner: tuple[int, int]) -> tuple[str, int]:
        """Copy ``src`` (a captured TPM file) to a planned file of a restored domain's TPM state: written
        0600 through its partial file (exclusive, no symlink followed), given swtpm's ``owner``, fsynced,
        renamed in place; returns (sha256, size)."""
        self._check_tpm(path, "write the TPM file")
        tmp = naming.partial_of(path)
        fd = self.create_exclusive(tmp)
        try:
            digest = hashlib.sha256()
            size = 0
            with open(src, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rename(tmp, path)
        return digest.hexdigest(), size

    # -- files --------------------------------------------------------------------
    def create_exclusive(self, path: str, *, replace_stale: bool = True) -> int:
        """Open a new file of ours for writing (0600, never through a symlink); returns the fd.

        A leftover regular file at ``path`` (an earlier attempt of this workflow)
        is removed first when ``replace_stale``; a symlink there is refused.
        """
        self._check(path, self.owned(), "create")
        if replace_stale:
            self.remove_owned(path)
        self.guard()
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise NotOurs(f"{path} appeared while it was being created; refusing to write into it") from None

    def write_atomic(self, path: str, content: bytes | str | dict[str, Any]) -> None:
        """Write ``path`` through its partial file: exclusive create, fsync, rename, fsync the folder."""
        if isinstance(content, dict):
            content = json.dumps(content, indent=2, sort_keys=True)
        data = content.encode() if isinstance(content, str) else content
        tmp = naming.partial_of(path)
        fd = self.create_exclusive(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rename(tmp, path)

    def rename(self, src: str, dst: str) -> None:
        """Rename between two paths the record names (ours, or a recorded domain disk); fsyncs the folders."""
        allowed = self.named()
        self._check(src, allowed, "rename")
        self._check(dst, allowed, "rename onto")
        self.guard()
        os.rename(src, dst)
        filecopy.fsync_dir(os.path.dirname(dst))
        if os.path.dirname(src) != os.path.dirname(dst):
            filecopy.fsync_dir(os.path.dirname(src))

    def rename_noreplace(self, src: str, dst: str) -> None:
        """Put ``src`` (ours) at ``dst`` without ever replacing what is there: a hard link (which fails on
        any name there, a dangling symlink included, and follows none), then ``src`` goes.  A link made
        before a crash (``dst`` is ``src``'s own inode) is accepted."""
        owned = self.owned()
        self._check(src, owned, "rename")
        self._check(dst, owned, "rename onto")
        self.guard()
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            a, b = os.lstat(src), os.lstat(dst)
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                raise NotOurs(f"{dst} appeared after submit; refusing to replace it (nothing was written "
                              "there)") from None
        os.unlink(src)
        filecopy.fsync_dir(os.path.dirname(dst))

    def pin(self, fd: int, path: str) -> str:
        """A file of ours at ``path`` holding exactly the open file ``fd`` (a checked backup file): a hard
        link of that inode, or, on another file system, a copy of it; returns the copy's sha256 ("" for
        a link: the inode is the one checked).  A swap of the backup folder's names changes nothing here."""
        self._check(path, self.owned(), "create")
        self.remove_owned(path)
        self.guard()
        try:
            os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
            return ""
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT):
                raise
        out = self.create_exclusive(path)
        h = hashlib.sha256()
        try:
            pos = 0
            while chunk := os.pread(fd, 4 << 20, pos):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                pos += len(chunk)
            os.fsync(out)
        finally:
            os.close(out)
        return h.hexdigest()

    def remove_owned(self, path: str) -> bool:
        """Delete a file the record names exactly (a symlink there is removed, never followed).

        Returns whether something was deleted.  Raises NotOurs for any other path.
        """
        self._check(path, self.owned(), "delete")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            raise NotOurs(f"refusing to delete {path}: it is a folder")
        self.guard()
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def fsync(self, path: str) -> None:
        """Make a file of ours (written by QEMU or libvirt) durable."""
        self._check(path, self.owned(), "fsync")
        with filecopy.opened_nofollow(path) as fd:
            os.fsync(fd)

    def prepare_for_writer(self, path: str) -> None:
        """Create an empty file of ours that a helper process (qemu-img, libvirt) will fill.

        The file is made 0600 with ``O_EXCL|O_NOFOLLOW`` here, so the writer
        opens an existing private file instead of creating one with its umask
        or through a planted symlink.
        """
        os.close(self.create_exclusive(path))

    def copy_resumable(self, src: str, partial: str, final: str, *, offset: int,
                       on_progress: Callable[[int, int], None], on_durable: Callable[[int], None],
                       check: Guard, bandwidth: float = 0,
                       sleep: Callable[[float], None] | None = None) -> tuple[str, int]:
        """The resumable, checksummed copy (``filecopy.copy_resumable``) into files of ours."""
        owned = self.owned()
        self._check(partial, owned, "write")
        self._check(final, owned, "write")
        if offset == 0:
            self.remove_owned(partial)
        elif os.path.islink(partial):
            raise NotOurs(f"{partial} is a symlink; refusing to write through it")

        def fenced_check() -> None:
            check()
            self.guard()

        kwargs: dict[str, Any] = {}
        if sleep is not None:
            kwargs["sleep"] = sleep
        return filecopy.copy_resumable(src, partial, final, offset=offset, on_progress=on_progress,
                                       on_durable=on_durable, check=fenced_check, bandwidth=bandwidth, **kwargs)

    def convert_flat(self, src: str, fmt: str, partial: str, final: str) -> tuple[str, int]:
        """``qemu-img convert`` of ``src`` (read through its whole backing chain) into one standalone
        qcow2 file of ours: written as ``partial``, fsynced, renamed to ``final``; returns (sha256, size).

        Not resumable: a run cut short starts over from an empty partial file.
        """
        owned = self.owned()
        self._check(partial, owned, "write")
        self._check(final, owned, "write")
        self.remove_owned(partial)
        self.prepare_for_writer(partial)  # 0600, exclusive: qemu-img writes into it
        self.guard()
        nbdio.run_qemu_img("convert", "-f", fmt, "-O", "qcow2", "-o", "compat=1.1", src, partial)
        self.fsync(partial)
        checksum = filecopy.sha256_file(partial)
        size = os.path.getsize(partial)
        self.rename(partial, final)
        return checksum, size


class HostCommands:
    """Commands an operator asked to run on the worker's host (hooks), fenced, each with a timeout."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def run(self, argv: list[str], *, timeout: float, env: dict[str, str]) -> dict[str, Any]:
        self.guard()
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **env})
        except subprocess.TimeoutExpired:
            return {"exitcode": None, "timed_out": True, "out": "", "err": ""}
        except OSError as exc:
            return {"exitcode": None, "timed_out": False, "out": "", "err": str(exc)}
        return {"exitcode": out.returncode, "timed_out": False, "out": out.stdout[-2000:], "err": out.stderr[-2000:]}


class OfflineImages:
    """A shut-off domain's qcow2 images, handled with qemu-img and qemu-nbd: their persistent bitmaps (the
    same layout libvirt's checkpoints keep: one enabled bitmap per checkpoint, named as it) and a read-only
    export of their blocks.  Each tool takes the image's lock, so a domain started meanwhile fails to open
    it (and an image QEMU holds is refused here)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    @staticmethod
    def bitmaps(path: str) -> dict[str, list[str]]:
        """Persistent bitmap name -> flags (``auto`` = enabled; ``in-use`` = not saved cleanly: unusable)."""
        info = json.loads(nbdio.run_qemu_img("info", "-U", "--output=json", "-f", "qcow2", path))
        data = (info.get("format-specific") or {}).get("data") or {}
        return {b["name"]: list(b.get("flags", [])) for b in data.get("bitmaps", [])}

    def add_bitmap(self, path: str, name: str) -> None:
        self.guard()
        nbdio.run_qemu_img("bitmap", "--add", "--enable", "-f", "qcow2", path, name)

    def remove_bitmap(self, path: str, name: str) -> None:
        self.guard()
        nbdio.run_qemu_img("bitmap", "--remove", "-f", "qcow2", path, name)

    @staticmethod
    def open_export(path: str, bitmap: str | None) -> nbdio.ImageExport:
        """The image's blocks (and ``bitmap``'s dirty extents) through a private read-only qemu-nbd."""
        return nbdio.ImageExport(path, bitmap)


@dataclass
class Effects:
    """Everything a step may change: the fenced hypervisor, our files, the checkpoint store, host commands,
    and (for a prune) the records of a domain's backups."""

    hv: Hypervisor
    files: OwnedFiles
    checkpoints: CheckpointStore
    host: HostCommands
    images: OfflineImages | None = None
    backups: BackupRecords | None = None


@dataclass
class Inspect:
    """What ``validate`` and ``verify`` may look at: nothing here can change anything."""

    hv: Hypervisor
    checkpoints: CheckpointStore

