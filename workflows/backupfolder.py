"""The one opener of a backup folder's files: each use reads the very file that was checked.

A backup folder is untrusted input every time it is used: whoever can write
it may have put a symlink, a FIFO or a device where a file was, changed a
byte, or named another file as a qcow2's backing file.  So every consumer
(``verify``, ``restore``, ``instant-restore``, ``mount``, ``prune``) goes
through here, in the process that uses the files, right before it uses them:

- the folder is opened one component at a time from ``/`` with
  ``O_NOFOLLOW|O_DIRECTORY`` (no symlinked folder anywhere on the way), and
  each file with ``O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC`` relative to it (a plain
  name: no ``/``, no ``..``); a symlink, FIFO, device, socket or folder is
  refused before it is opened (``lstat``) and again after (``fstat``), so a
  FIFO never blocks a reader;
- the manifest's signature (when a key is set) and its sha256 against the
  record, then every file's size and sha256 against the manifest and the
  record, are checked from the open descriptors, and no file more;
- a qcow2's header is read from its descriptor: no external data file, and
  its backing name must be the previous file of its own chain (the first
  stands alone); no name in a header is ever opened;
- what is used afterwards is the same open file: ``Opened.proc(path)`` names
  it as ``/proc/<pid>/fd/<n>`` for qemu-img and qemu-storage-daemon (a swap
  of the folder's name after the check changes nothing), ``Opened.read``
  returns its bytes, ``Opened.fd`` the descriptor itself (a hard link of it
  is what ``instant-restore`` hands libvirt).

A later step of the same workflow passes the identities checked before
(``Opened.known()``, kept in the record): a file whose device, inode, size,
mtime and ctime are unchanged is not read again, any other file is.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import stat
import struct
from typing import Any, Iterable

from . import manifest
from .errors import InputError

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SMALL = 16 << 20  # a quick check (at submit) reads files up to this size; larger ones by size only
MAX_MANIFEST = 16 << 20
CHUNK = 4 << 20

QCOW2_MAGIC = b"QFI\xfb"
EXT_DATA_FILE = 0x44415441
INCOMPAT_DATA_FILE = 1 << 2


class BadBackupFile(InputError):
    """A file of a backup folder that cannot be used as it is: one line naming it."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        super().__init__(f"{path}: {why}")


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _ident(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def open_folder(path: str) -> int:
    """A descriptor of folder ``path``, opened one component at a time without following any link."""
    if not isinstance(path, str) or not os.path.isabs(path) or os.path.normpath(path) != path:
        raise BadBackupFile(str(path), "not an absolute, normalised folder path")
    fd = os.open("/", DIR_FLAGS)
    done = ""
    try:
        for part in path.strip("/").split("/"):
            done += "/" + part
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    try:
                        what = kind_of(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                    except OSError:
                        what = "not a folder"
                    raise BadBackupFile(path, f"{done} is {what}; a backup folder is opened without following "
                                              "links") from None
                raise BadBackupFile(path, f"cannot open {done}: {exc.strerror}") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_member(dirfd: int, folder: str, name: str) -> tuple[int, os.stat_result]:
    """A regular file ``name`` of the folder open as ``dirfd``: (descriptor, fstat); refuses anything else."""
    path = os.path.join(folder, name)
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise BadBackupFile(path, "not a plain file name in the backup's folder")
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        raise BadBackupFile(path, "missing") from None
    except OSError as exc:
        raise BadBackupFile(path, f"cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadBackupFile(path, f"is {kind_of(st.st_mode)}, not a regular file; refusing to open it")
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        why = "became a symlink" if exc.errno == errno.ELOOP else f"cannot open it: {exc.strerror}"
        raise BadBackupFile(path, why) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BadBackupFile(path, f"is {kind_of(st.st_mode)}, not a regular file")
    return fd, st


def read_fd(fd: int, limit: int | None = None) -> bytes:
    out = bytearray()
    while True:
        chunk = os.pread(fd, CHUNK, len(out))
        if not chunk:
            return bytes(out)
        out += chunk
        if limit is not None and len(out) > limit:
            raise ValueError(f"larger than {limit} bytes")


def sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    pos = 0
    while chunk := os.pread(fd, CHUNK, pos):
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def _check(item: str, path: str, ok: bool, error: str = "", **extra: Any) -> dict[str, Any]:
    out = {"item": item, "path": path, "ok": ok, **extra}
    if error:
        out["error"] = error
    return out


class Opened:
    """The checked files, open: real path -> descriptor.  Close it (or use ``with``) when done."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.idents: dict[str, list[Any]] = {}
        self._dirs: list[int] = []

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in [*self.fds.values(), *self._dirs]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self._dirs.clear()

    def _keep(self, path: str, fd: int, st: os.stat_result, digest: str) -> None:
        old = self.fds.pop(path, None)
        if old is not None:
            os.close(old)
        self.fds[path] = fd
        if digest:  # a file checked by size only (a quick check) is read in full by the next check
            self.idents[path] = [*_ident(st), digest]
        else:
            self.idents.pop(path, None)

    def fd(self, path: str) -> int:
        try:
            return self.fds[path]
        except KeyError:
            raise BadBackupFile(path, "was not checked with its backup's folder") from None

    def proc(self, path: str) -> str:
        """A name of the checked open file that another process of ours opens (never the folder's name)."""
        return f"/proc/{os.getpid()}/fd/{self.fd(path)}"

    def read(self, path: str) -> bytes:
        return read_fd(self.fd(path))

    def known(self) -> dict[str, list[Any]]:
        """Each checked file's identity and sha256, for a later step of the same workflow."""
        return dict(self.idents)


def _digest(fd: int, st: os.stat_result, path: str, known: dict[str, Any] | None) -> str:
    prior = (known or {}).get(path)
    if prior and list(prior[:5]) == _ident(st):
        return str(prior[5])
    return sha256_fd(fd)


def inspect_folder(manifest_path: str, expected_sha256: str | None, *, key: bytes | None, deep: bool = True,
                   known: dict[str, Any] | None = None, record_files: dict[str, dict[str, Any]] | None = None,
                   into: Opened | None = None) -> list[dict[str, Any]]:
    """Check a version 2 backup folder; one check per file, the first failure that makes the rest
    meaningless ending the list.  A symlink, FIFO or device anywhere raises BadBackupFile (one line).
    The files checked stay open in ``into`` (else they are closed)."""
    folder, name = os.path.dirname(manifest_path), os.path.basename(manifest_path)
    sig_name = name + manifest.SIG_SUFFIX
    opened = into if into is not None else Opened()
    try:
        dirfd = open_folder(folder)
        opened._dirs.append(dirfd)
        mfd, mst = open_member(dirfd, folder, name)
        try:
            if mst.st_size > MAX_MANIFEST:
                return [_check(name, manifest_path, False, f"{mst.st_size} bytes; a manifest holds at most "
                                                           f"{MAX_MANIFEST}")]
            data = read_fd(mfd, MAX_MANIFEST)
        finally:
            os.close(mfd)
        checks: list[dict[str, Any]] = []
        if key is not None:
            sig_path = manifest.sig_path(manifest_path)
            try:
                sfd, _sst = open_member(dirfd, folder, sig_name)
            except BadBackupFile as exc:
                if not exc.args[0].endswith(": missing"):
                    raise
                return [_check(sig_name, sig_path, False,
                               f"missing, and {manifest.KEY_ENV} is set: the manifest is not signed")]
            try:
                stored = read_fd(sfd, 4096).decode(errors="replace").strip()
            except ValueError:
                stored = ""
            finally:
                os.close(sfd)
            if not hmac.compare_digest(stored, manifest.sign(data, key)):
                return [_check(sig_name, sig_path, False,
                               "the signature does not match the manifest (wrong key, or the manifest changed)")]
            checks.append(_check(sig_name, sig_path, True))
        actual = hashlib.sha256(data).hexdigest()
        if expected_sha256 is None:
            return [_check(name, manifest_path, False, "the record holds no checksum of the manifest")]
        if actual != expected_sha256:
            return [*checks, _check(name, manifest_path, False,
                                    "does not match the checksum in the workflow record (the manifest changed)",
                                    expected=expected_sha256, actual=actual)]
        checks.append(_check(name, manifest_path, True, actual=actual))
        try:
            doc = json.loads(data)
            listed = {str(e["name"]): {"size": int(e["size"]), "sha256": str(e["sha256"])}
                      for e in doc.get("contents", [])}
        except (ValueError, TypeError, KeyError, AttributeError):
            return [*checks, _check(name, manifest_path, False, "its contents are not a list of files")]
        for rel, e in sorted(listed.items()):
            path = os.path.join(folder, rel)
            try:
                fd, st = open_member(dirfd, folder, rel)
            except BadBackupFile as exc:
                if str(exc) != f"{path}: missing":
                    raise  # a link, FIFO or device: refused in one line, never opened
                checks.append(_check(rel, path, False, "missing (the manifest lists it)"))
                continue
            keep = False
            try:
                if st.st_size != e["size"]:
                    checks.append(_check(rel, path, False, f"size {st.st_size} differs from the manifest's "
                                                           f"{e['size']}"))
                    continue
                digest = ""
                if deep or st.st_size <= SMALL or path in (known or {}):
                    digest = _digest(fd, st, path, known)
                    if digest != e["sha256"]:
                        checks.append(_check(rel, path, False, "sha256 differs from the manifest",
                                             expected=e["sha256"], actual=digest))
                        continue
                rec = (record_files or {}).get(path)
                if rec is not None and (rec.get("size") not in (None, st.st_size) or
                                        (digest and str(rec.get("checksum", "")).removeprefix("sha256:") != digest)):
                    checks.append(_check(rel, path, False, "does not match the workflow record's size or checksum"))
                    continue
                opened._keep(path, fd, st, digest)
                keep = True
                checks.append(_check(rel, path, True, size=st.st_size))
            finally:
                if not keep:
                    os.close(fd)
        for rel in sorted(set(os.listdir(dirfd)) - set(listed) - {name, sig_name}):
            checks.append(_check(rel, os.path.join(folder, rel), False, "not in the manifest (an extra file)"))
        for path in sorted(set(record_files or {}) - {os.path.join(folder, r) for r in listed}):
            checks.append(_check(os.path.basename(path), path, False, "the record names it, the manifest does not"))
        return checks
    finally:
        if into is None:
            opened.close()


def open_files(files: Iterable[dict[str, Any]], *, into: Opened, known: dict[str, Any] | None = None,
               deep: bool = True) -> None:
    """Open and check files the records name (``{"path", "size", "checksum"}``; a version 1 backup, a prune's
    chain): each a regular file directly in its folder, with the recorded size and sha256."""
    for info in files:
        path = str(info["path"])
        folder = os.path.dirname(path)
        dirfd = open_folder(folder)
        into._dirs.append(dirfd)
        fd, st = open_member(dirfd, folder, os.path.basename(path))
        try:
            if info.get("size") is not None and st.st_size != info["size"]:
                raise BadBackupFile(path, f"size {st.st_size} differs from the record's {info['size']}")
            digest = ""
            if deep or st.st_size <= SMALL or path in (known or {}):
                digest = _digest(fd, st, path, known)
                if f"sha256:{digest}" != info.get("checksum"):
                    raise BadBackupFile(path, "does not match its recorded checksum")
        except BaseException:
            os.close(fd)
            raise
        into._keep(path, fd, st, digest)


def qcow2_header(fd: int, path: str) -> dict[str, Any]:
    """What a qcow2 header says about other files: its backing name, whether it is encrypted; refuses an
    image that is no qcow2 or names an external data file."""
    head = os.pread(fd, 65536, 0)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        raise BadBackupFile(path, "is not a qcow2 image")
    version, backing_off, backing_len = struct.unpack(">IQI", head[4:20])
    crypt = struct.unpack(">I", head[32:36])[0]
    if version >= 3 and len(head) >= 104:
        incompat = struct.unpack(">Q", head[72:80])[0]
        if incompat & INCOMPAT_DATA_FILE:
            raise BadBackupFile(path, "names an external data file; a backup's image holds its own data")
        pos = struct.unpack(">I", head[100:104])[0]
        while pos + 8 <= len(head):
            ext, length = struct.unpack(">II", head[pos:pos + 8])
            if ext == 0:
                break
            if ext == EXT_DATA_FILE:
                raise BadBackupFile(path, "names an external data file; a backup's image holds its own data")
            pos += 8 + (length + 7) // 8 * 8
    backing = None
    if backing_off:
        if backing_len > 1023:
            raise BadBackupFile(path, "names a backing file longer than qcow2 allows")
        raw = os.pread(fd, backing_len, backing_off)
        backing = raw.decode("utf-8", errors="replace")
    return {"backing": backing, "encrypted": bool(crypt)}


def check_chain_headers(opened: Opened, files: list[str]) -> None:
    """Each file of one disk's chain (full first) names, as its backing file, exactly the file before it."""
    for i, path in enumerate(files):
        backing = qcow2_header(opened.fd(path), path)["backing"]
        if i == 0:
            if backing:
                raise BadBackupFile(path, f"names a backing file ({backing!r}) but starts its chain; refusing to "
                                          "open it")
            continue
        if not backing:
            continue  # a layer that stands alone (a disk taken whole): nothing below it is read
        if ":" in backing.split("/")[0] and not backing.startswith("/"):
            raise BadBackupFile(path, f"names backing file {backing!r}, a protocol, not its chain's "
                                      f"{files[i - 1]}")
        named = os.path.normpath(os.path.join(os.path.dirname(path), backing))
        if named != files[i - 1]:
            raise BadBackupFile(path, f"names backing file {backing!r}, not its chain's {files[i - 1]}; refusing "
                                      "to open it")


def encrypted(opened: Opened, path: str) -> bool:
    return bool(qcow2_header(opened.fd(path), path)["encrypted"])


def read_small(path: str | None, limit: int = MAX_MANIFEST) -> bytes | None:
    """A small file of a backup folder (a manifest) read without following a link or blocking on a FIFO;
    None when it is missing, not a regular file, too large or unreadable."""
    if not path:
        return None
    try:
        dirfd = open_folder(os.path.dirname(path))
    except InputError:
        return None
    try:
        fd, st = open_member(dirfd, os.path.dirname(path), os.path.basename(path))
        try:
            return None if st.st_size > limit else read_fd(fd, limit)
        finally:
            os.close(fd)
    except (InputError, OSError, ValueError):
        return None
    finally:
        os.close(dirfd)
