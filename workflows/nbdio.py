"""Block-level I/O for direct backups: NBD exports in, qcow2 files out, qemu-img around.

- ``NbdExport`` reads a pull-mode backup's export (libvirt's NBD server) with
  libnbd: which extents hold data (``base:allocation``) or changed since the
  checkpoint (``qemu:dirty-bitmap:backup-<disk>``), and their bytes.
- ``QcowWriter`` writes into a local qcow2 file through a private
  ``qemu-nbd`` (socket activation: the server is this process's child and
  exits when the connection closes, also when this process is killed), so an
  incremental file holds exactly the changed clusters, zeroed ones included.
- ``copy_extents`` moves extents from one to the other with a durable cursor.
- The ``qemu-img`` helpers look at and assemble backup files.  Backup files
  are always opened with an explicit backing (``json:`` filenames), never
  through the backing name in their header.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Callable

from .errors import OperationFailed
from .hypervisor.backup_types import BLOCK_STATUS_DIRTY, BLOCK_STATUS_ZERO

CHUNK = 2 * 1024 * 1024
DURABLE_EVERY = 16 * 1024 * 1024
QEMU_IMG_TIMEOUT = 3600


def _nbd():
    import nbd  # Debian's python3-libnbd (system site packages)
    return nbd


def merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(extents):
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] >= off:
            prev_off, prev_len = out[-1]
            out[-1] = (prev_off, max(prev_len, off + length - prev_off))
        else:
            out.append((off, length))
    return out


class NbdExport:
    """One disk of a pull-mode backup, read over the backup job's NBD socket."""

    def __init__(self, socket: str, export: str, bitmap: str | None = None) -> None:
        nbd = _nbd()
        self.bitmap_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        self.h = nbd.NBD()
        self.h.set_export_name(export)
        self.h.add_meta_context("base:allocation")
        if self.bitmap_context:
            self.h.add_meta_context(self.bitmap_context)
        try:
            self.h.connect_unix(socket)
        except nbd.Error as exc:
            raise OperationFailed(f"cannot read export {export!r} at {socket}: {exc}") from exc
        self.size = self.h.get_size()

    def extents(self, dirty: bool) -> list[tuple[int, int]]:
        context = self.bitmap_context if dirty else "base:allocation"
        if context is None or not self.h.can_meta_context(context):
            raise OperationFailed(f"the export does not offer {context or 'a dirty bitmap'}")
        out: list[tuple[int, int]] = []
        replies: list[tuple[int, list[int]]] = []

        def collect(metacontext: str, at: int, entries: list[int], _err: Any) -> int:
            if metacontext == context:
                replies.append((at, list(entries)))
            return 0
        offset = 0
        while offset < self.size:
            replies.clear()
            self.h.block_status(min(self.size - offset, 1 << 30), offset, collect)
            pos = offset
            for at, entries in replies:
                pos = at
                for i in range(0, len(entries) - 1, 2):
                    length, flags = entries[i], entries[i + 1]
                    wanted = bool(flags & BLOCK_STATUS_DIRTY) if dirty else not flags & BLOCK_STATUS_ZERO
                    if wanted:
                        out.append((pos, min(length, self.size - pos)))
                    pos += length
            if pos <= offset:
                raise OperationFailed(f"block status made no progress at offset {offset}")
            offset = pos
        return merge(out)

    def pread(self, length: int, offset: int) -> bytes:
        return self.h.pread(length, offset)

    def close(self) -> None:
        try:
            self.h.shutdown()
        except Exception:  # the server may already be gone: nothing to flush on a read-only export
            pass
        del self.h


class QcowWriter:
    """A local qcow2 file written through a private qemu-nbd."""

    def __init__(self, path: str, create_size: int | None = None) -> None:
        nbd = _nbd()
        if create_size is not None:
            run_qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, str(create_size))
        self.path = path
        self.h = nbd.NBD()
        try:
            self.h.connect_systemd_socket_activation(["qemu-nbd", "-f", "qcow2", "--cache=writeback", path])
        except nbd.Error as exc:
            raise OperationFailed(f"cannot open {path} for writing through qemu-nbd: {exc}",
                                  retryable=True) from exc

    def pwrite(self, data: bytes, offset: int) -> None:
        self.h.pwrite(data, offset)

    def zero(self, length: int, offset: int) -> None:
        self.h.zero(length, offset)  # no trim: a zeroed cluster is recorded as such

    def flush(self) -> None:
        self.h.flush()

    def close(self) -> None:
        try:
            self.h.flush()
            self.h.shutdown()
        finally:
            del self.h


def copy_extents(source: Any, extents: list[tuple[int, int]], writer: Any, *, start: int,
                 stats: dict[str, int], check: Callable[[], None],
                 on_progress: Callable[[int], None], on_durable: Callable[[int, dict[str, int]], None],
                 zero_writes: bool) -> dict[str, int]:
    """Copy ``extents`` (sorted, merged) from ``source`` to ``writer``, from disk offset ``start``.

    Every extent below the cursor handed to ``on_durable`` is flushed to the
    file.  ``stats`` counts bytes read, written and zeroed, as of the cursor.
    An all-zero chunk is written as zeroes when ``zero_writes`` (an
    incremental: the change must be recorded), skipped otherwise (a full
    backup into a fresh image reads as zeroes there anyway).
    """
    stats = {"read": 0, "written": 0, "zeroed": 0, **stats}
    done = sum(max(0, min(off + ln, start) - off) for off, ln in extents)
    since = 0
    for off, length in extents:
        end = off + length
        pos = max(off, start)
        while pos < end:
            check()
            n = min(CHUNK, end - pos)
            data = source.pread(n, pos)
            stats["read"] += n
            if data.count(0) == n:
                if zero_writes:
                    writer.zero(n, pos)
                    stats["zeroed"] += n
            else:
                writer.pwrite(data, pos)
                stats["written"] += n
            pos += n
            done += n
            since += n
            on_progress(done)
            if since >= DURABLE_EVERY:
                writer.flush()
                on_durable(pos, dict(stats))
                since = 0
    writer.flush()
    return stats


# -- qemu-img ------------------------------------------------------------------------------
def run_qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    try:
        out = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationFailed(f"qemu-img {args[0]}: {exc}") from exc
    if out.returncode != 0:
        raise OperationFailed(f"qemu-img {args[0]} failed: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def chain_spec(files: list[str]) -> str:
    """A ``json:`` filename reading ``files`` (full first, then each incremental) as one image.

    The backing chain is spelled out, so the backing names written in the
    files' headers are never used.
    """
    node: dict[str, Any] | None = None
    for path in files:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": os.path.abspath(path)},
                "backing": node}
    if node is None:
        raise ValueError("an empty chain")
    return "json:" + json.dumps(node, separators=(",", ":"))


def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info`` of one file alone (its backing, if named, is not opened)."""
    return json.loads(run_qemu_img("info", "--output=json", "-U", chain_spec([path])))


def check_image(path: str) -> None:
    """``qemu-img check``; leaked clusters (a writer killed mid-way) are repaired, anything else refused."""
    out = subprocess.run(["qemu-img", "check", "-q", "-U", chain_spec([path])], capture_output=True, text=True,
                         timeout=QEMU_IMG_TIMEOUT)
    if out.returncode == 3:  # leaks only: the data is intact
        run_qemu_img("check", "-q", "-r", "leaks", chain_spec([path]))
    elif out.returncode != 0:
        raise OperationFailed(f"qemu-img check of {path} failed: {(out.stderr or out.stdout).strip()}")


def allocated_bytes(path: str) -> int:
    """Bytes of guest data the file itself holds (clusters with data; not holes, not zeroed clusters)."""
    extents = json.loads(run_qemu_img("map", "--output=json", "-U", chain_spec([path])))
    return sum(e["length"] for e in extents if e.get("data") and e.get("depth", 0) == 0)


def set_backing(path: str, backing: str | None) -> None:
    """Rewrite the backing name in ``path``'s header (nothing is copied; ``backing`` relative to it)."""
    if backing:
        run_qemu_img("rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, path)
    else:
        run_qemu_img("rebase", "-u", "-f", "qcow2", "-b", "", path)


def convert_chain(files: list[str], out: str) -> None:
    run_qemu_img("convert", "-O", "qcow2", "-o", "compat=1.1", chain_spec(files), out)


def same_content(files: list[str], image: str) -> bool:
    out = subprocess.run(["qemu-img", "compare", "-U", chain_spec(files), image], capture_output=True, text=True,
                         timeout=QEMU_IMG_TIMEOUT)
    if out.returncode not in (0, 1):
        raise OperationFailed(f"qemu-img compare failed: {(out.stderr or out.stdout).strip()}")
    return out.returncode == 0
