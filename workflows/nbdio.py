"""Block-level I/O for direct backups: NBD exports in, qcow2 files out, qemu-img around.

- ``NbdExport`` reads a pull-mode backup's export (libvirt's NBD server) with
  libnbd: which extents hold data (``base:allocation``) or changed since the
  checkpoint (``qemu:dirty-bitmap:backup-<disk>``), and their bytes.
- ``QcowWriter`` writes into a local qcow2 file through a private
  ``qemu-nbd`` (socket activation: the server is this process's child and
  exits when the connection closes, also when this process is killed), so an
  incremental file holds exactly the changed clusters, zeroed ones included.
- ``copy_extents`` moves extents from one to the other with a durable cursor:
  over several connections to the export when it advertises multi-conn,
  with many requests in flight (libnbd's asynchronous calls, each chunk
  read into an ``nbd.Buffer`` and written from that same buffer).  The
  cursor only advances over a contiguous run of completed chunks, and is
  reported durable after a flush of the file that covers them.
- The ``qemu-img`` helpers look at and assemble backup files.  Backup files
  are always opened with an explicit backing (``json:`` filenames), never
  through the backing name in their header.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, cast

from .errors import InputError, OperationFailed
from .filecopy import CheckCadence, sync_and_drop
from .hypervisor.backup_types import BLOCK_STATUS_DIRTY, BLOCK_STATUS_ZERO
from .qcow2 import LaidOutFile

CHUNK = 2 * 1024 * 1024
DURABLE_EVERY = 16 * 1024 * 1024
REQUEST = 4 * 1024 * 1024  # bytes per NBD request in the parallel copy
IN_FLIGHT = 12  # requests in flight at once (reads and writes together)
CONNECTIONS = 4  # connections to an export that advertises multi-conn
DURABLE_INTERVAL = 1.0  # seconds between flushes that make the cursor durable
# QEMU's own flushes are no-ops in the writer: with --cache=writeback the qcow2 driver orders its metadata
# writes with an fdatasync each (2 GiB: 10.9 s against 6.3 s here), so the copy makes the file durable itself
# (QcowWriter.sync) at each durable cursor and at the end, and a resumed file is repaired first (repair_image)
WRITER_OPTIONS = ["--cache=unsafe"]
CHECK_INTERVAL = 0.05  # seconds between lease checks while requests are issued
QEMU_IMG_TIMEOUT = 3600


def _nbd() -> ModuleType:
    import nbd  # Debian's python3-libnbd (system site packages)
    return cast(ModuleType, nbd)  # the module carries no type information


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
        self.socket, self.export = socket, export
        self.extra: list[Any] = []

    def connections(self, wanted: int) -> list[Any]:
        """Up to ``wanted`` handles on this export: more than one only when it advertises multi-conn."""
        nbd = _nbd()
        if wanted > 1 and self.h.can_multi_conn():
            while len(self.extra) < wanted - 1:
                h = nbd.NBD()
                h.set_export_name(self.export)
                try:
                    h.connect_unix(self.socket)
                except nbd.Error:
                    break  # what is open is enough
                self.extra.append(h)
        return [self.h, *self.extra]

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
        data: bytes = self.h.pread(length, offset)
        return data

    def close(self) -> None:
        for h in [self.h, *self.extra]:
            try:
                h.shutdown()
            except _nbd().Error:  # the server may already be gone: nothing to flush on a read-only export
                pass
        self.extra = []
        del self.h


class ImageExport(NbdExport):
    """A shut-off domain's image, served read-only by a private qemu-nbd (socket activation: the server is
    this process's child and exits with the connection).  With ``bitmap``, its persistent bitmap's dirty
    extents are offered as ``qemu:dirty-bitmap:<bitmap>``.  qemu-nbd holds the image's lock meanwhile: QEMU
    cannot start the domain on it."""

    def __init__(self, path: str, bitmap: str | None = None) -> None:
        nbd = _nbd()
        self.bitmap_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        self.h = nbd.NBD()
        self.h.add_meta_context("base:allocation")
        if self.bitmap_context:
            self.h.add_meta_context(self.bitmap_context)
        argv = ["qemu-nbd", "--read-only", "-f", "qcow2",
                *(["--bitmap", bitmap] if bitmap else []), path]
        try:
            self.h.connect_systemd_socket_activation(argv)
        except nbd.Error as exc:
            raise OperationFailed(f"cannot read {path} through qemu-nbd: {exc}") from exc
        self.size = self.h.get_size()
        self.socket, self.export = "", ""
        self.extra = []

    def connections(self, wanted: int) -> list[Any]:
        return [self.h]  # one connection: the server is private to it


def _opt(value: str) -> str:
    """``value`` inside a QEMU option string (a comma is doubled)."""
    return value.replace(",", ",,")


class QcowWriter:
    """A local qcow2 file written through a private qemu-nbd.

    With ``compress`` the file is created with ``compression_type=zstd`` and
    written through QEMU's ``compress`` filter, so every cluster written is
    a zstd-compressed cluster: plain ``qemu-img`` (and ``restore``) read it
    as any qcow2 file.
    """

    def __init__(self, path: str, create_size: int | None = None, *, compress: bool = False,
                 key: str | None = None) -> None:
        if compress and key:
            raise ValueError("compressed and encrypted together is not offered")
        nbd = _nbd()
        if create_size is not None:
            options = "compat=1.1" + (",compression_type=zstd" if compress else "")
            if key:
                options += f",encrypt.format=luks,encrypt.key-secret={SECRET_ID}"
            create_image(path, create_size, options, key)
        elif os.path.exists(path):  # the file a killed copy left: its metadata made consistent first
            repair_image(path, key)
        self.path, self.compress = path, compress
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # for fdatasync and the page cache
        if compress:
            qcow = f"driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={_opt(path)}"
        else:
            qcow = f"driver=qcow2,file.driver=file,file.filename={_opt(path)}"
            if key:
                qcow += f",encrypt.key-secret={SECRET_ID}"
        self.h = nbd.NBD()
        try:
            self.h.connect_systemd_socket_activation(["qemu-nbd", *WRITER_OPTIONS, *secret_args(key, "--object"),
                                                      *(["--discard=unmap"] if compress else []),
                                                      "--image-opts", qcow])
        except nbd.Error as exc:
            os.close(self._fd)
            raise OperationFailed(f"cannot open {path} for writing through qemu-nbd: {exc}",
                                  retryable=True) from exc

    def pwrite(self, data: bytes, offset: int) -> None:
        self.h.pwrite(data, offset)

    def zero(self, length: int, offset: int) -> None:
        self.h.zero(length, offset)  # no trim: a zeroed cluster is recorded as such

    def sync(self) -> None:
        """Make what qemu-nbd handed to the kernel durable (the server's flushes do not reach the disk), then
        drop those now clean pages from the host's cache.  Safe on another thread than the handle's."""
        sync_and_drop(self._fd, self.path)

    def flush(self) -> None:
        """Everything written so far on disk: qemu-nbd's caches to the kernel, then ``sync``."""
        self.h.flush()
        self.sync()

    def forget_from(self, offset: int, size: int) -> None:
        """Unallocate ``[offset, size)``: what a killed copy wrote past its cursor.

        Needed before a resumed copy into a compressed image only: qcow2
        refuses to write a compressed cluster over an allocated one.
        """
        while offset < size:
            n = min(1 << 30, size - offset)
            self.h.trim(n, offset)
            offset += n

    def close(self) -> None:
        """qemu-nbd's caches handed to the kernel and the server stopped; the file is made durable by
        whoever seals it (``datapath.seal`` fsyncs it)."""
        try:
            self.h.flush()
            self.h.shutdown()
        finally:
            del self.h
            os.close(self._fd)


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
    if getattr(writer, "compress", False):  # a compressed cluster is written whole, once
        extents = whole_clusters(extents, getattr(source, "size", None))
        if start:
            writer.forget_from(start, source.size)
    if isinstance(source, NbdExport) and isinstance(writer, QcowWriter):
        return _copy_parallel(source, extents, writer, start=start, stats=stats, check=check,
                              on_progress=on_progress, on_durable=on_durable, zero_writes=zero_writes)
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


COMPRESS_CLUSTER = 64 * 1024  # qcow2's default cluster size, which the compressed images are created with


def whole_clusters(extents: list[tuple[int, int]], size: int | None) -> list[tuple[int, int]]:
    """``extents`` widened to whole ``COMPRESS_CLUSTER`` clusters (cut at ``size``), merged.

    Widening reads a little more of the export (what it holds there is the
    disk's content too), and every request stays cluster-aligned, so a
    compressed cluster is never rewritten by a second, partial request.
    """
    c = COMPRESS_CLUSTER
    out = []
    for off, length in extents:
        start, end = off // c * c, -(-(off + length) // c) * c
        out.append((start, (min(end, size) if size is not None else end) - start))
    return merge(out)


def _chunks(extents: list[tuple[int, int]], start: int) -> list[tuple[int, int]]:
    out = []
    for off, length in extents:
        pos, end = max(off, start), off + length
        while pos < end:
            n = min(REQUEST, end - pos)
            out.append((pos, n))
            pos += n
    return out


def _cursor_pos(chunks: list[tuple[int, int]], cursor: int, start: int) -> int:
    """The disk offset of chunk ``cursor`` (the first not yet done): the end of the last one when all are."""
    return chunks[cursor][0] if cursor < len(chunks) else (chunks[-1][0] + chunks[-1][1] if chunks else start)


def _readers(source: NbdExport) -> list[Any]:
    """The source's connections for a parallel copy, each reading into buffers it need not zero first."""
    sources = source.connections(CONNECTIONS)
    for h in sources:
        h.set_pread_initialize(False)  # every byte of a buffer is overwritten by a successful read
    return sources


def _copy_parallel(source: NbdExport, extents: list[tuple[int, int]], writer: QcowWriter, *, start: int,
                   stats: dict[str, int], check: Callable[[], None], on_progress: Callable[[int], None],
                   on_durable: Callable[[int, dict[str, int]], None], zero_writes: bool) -> dict[str, int]:
    """``copy_extents`` over several connections with ``IN_FLIGHT`` requests at once.

    Each chunk goes: read on one of the source connections into its own
    buffer -> write of that buffer (or a zero request, or nothing for a
    zero chunk of a full backup) on the writer -> done.  ``on_durable`` gets
    the start of the first chunk not yet done (everything below it is
    written), once a flush issued after those writes completed.
    """
    nbd = _nbd()
    chunks = _chunks(extents, start)
    done = sum(max(0, min(off + ln, start) - off) for off, ln in extents)
    sources = _readers(source)
    w = writer.h
    handles = [*sources, w]
    fds = {h.aio_get_fd(): h for h in handles}
    per_chunk: list[tuple[int, int, int] | None] = [None] * len(chunks)  # (read, written, zeroed) when done
    inflight: dict[int, tuple[str, Any, int, Any]] = {}  # chunk index -> (stage, handle, cookie, buffer)
    free: list[Any] = []  # buffers back from a finished chunk: reused, their pages already mapped
    next_chunk = cursor = 0
    pending_flush: tuple[int, int, dict[str, int]] | None = None  # cookie, position, stats
    pending_sync: tuple[Future[None], int, dict[str, int]] | None = None  # the fdatasync after that flush
    syncer = ThreadPoolExecutor(1, thread_name_prefix="nbd-sync")  # the copy goes on while the disk catches up
    last_flush = time.monotonic()
    checks = CheckCadence(check, CHECK_INTERVAL)
    checks.due()

    def cursor_pos() -> int:
        return _cursor_pos(chunks, cursor, start)

    while cursor < len(chunks):
        while next_chunk < len(chunks) and len(inflight) < IN_FLIGHT:
            checks.due()
            off, n = chunks[next_chunk]
            buf = free.pop() if free and n == REQUEST else nbd.Buffer(n)
            h = sources[next_chunk % len(sources)]
            inflight[next_chunk] = ("read", h, h.aio_pread(buf, off), buf)
            next_chunk += 1
        readable, writable = [], []
        for h in handles:
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                readable.append(h.aio_get_fd())
            if d & nbd.AIO_DIRECTION_WRITE:
                writable.append(h.aio_get_fd())
        r, wr, _ = select.select(readable, writable, [], 5.0)
        for fd in r:
            fds[fd].aio_notify_read()
        for fd in wr:
            fds[fd].aio_notify_write()
        for i, (stage, h, cookie, buf) in list(inflight.items()):
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as exc:
                where = "read from the export" if stage == "read" else f"write to {writer.path}"
                raise OperationFailed(f"{where} at offset {chunks[i][0]} failed: {exc}",
                                      retryable=True) from exc
            off, n = chunks[i]
            if stage == "read":
                if not buf.is_zero():
                    inflight[i] = ("write", w, w.aio_pwrite(buf, off), buf)
                    per_chunk[i] = (n, n, 0)
                    continue
                if zero_writes:
                    inflight[i] = ("write", w, w.aio_zero(n, off), None)
                    per_chunk[i] = (n, 0, n)
                else:
                    del inflight[i]
                    per_chunk[i] = (n, 0, 0)
                    done += n
            else:
                del inflight[i]
                done += n
            if buf is not None and buf.size() == REQUEST:  # a shorter one (an extent's tail) is dropped
                free.append(buf)
        while cursor < len(chunks) and per_chunk[cursor] is not None and cursor not in inflight:
            read, written, zeroed = per_chunk[cursor]  # type: ignore[misc]
            stats["read"] += read
            stats["written"] += written
            stats["zeroed"] += zeroed
            cursor += 1
        on_progress(done)
        if pending_sync is not None and pending_sync[0].done():
            future, pos, at = pending_sync
            future.result()  # an OperationFailed of the fdatasync
            on_durable(pos, at)
            pending_sync = None
        if pending_flush is not None:
            cookie, pos, at = pending_flush
            try:
                flushed = w.aio_command_completed(cookie)
            except nbd.Error as exc:
                raise OperationFailed(f"flush of {writer.path} failed: {exc}", retryable=True) from exc
            if flushed:  # qemu-nbd's caches are in the kernel: on disk once the fdatasync returns
                pending_sync = (syncer.submit(writer.sync), pos, at)
                pending_flush = None
        elif pending_sync is None and time.monotonic() - last_flush >= DURABLE_INTERVAL and cursor < len(chunks):
            pending_flush = (w.aio_flush(), cursor_pos(), dict(stats))
            last_flush = time.monotonic()
    check()
    while pending_flush is not None and not w.aio_command_completed(pending_flush[0]):
        w.poll(-1)
    syncer.shutdown(wait=True)
    writer.flush()
    return stats


def copy_laid_out(source: NbdExport, out: LaidOutFile, *, start: int, stats: dict[str, int],
                  check: Callable[[], None], on_progress: Callable[[int], None],
                  on_durable: Callable[[int, dict[str, int]], None]) -> dict[str, int]:
    """Copy the layout's extents from ``source`` into ``out`` from disk offset ``start``; like ``_copy_parallel``.

    Each chunk is read on one of the source connections into its own buffer
    and written from it into its place in the file as soon as it arrives
    (any order); the hash thread is fed the chunks in disk order as the
    cursor passes them (an all-zero chunk stays a hole and is fed as
    zeroes), and a buffer is reused once hashed.  ``on_durable`` gets the
    cursor once an fdatasync issued after the writes below it returned.
    """
    chunks = _chunks(out.layout.extents, start)
    done = sum(max(0, min(off + ln, start) - off) for off, ln in out.layout.extents)
    stats = {"read": 0, "written": 0, "zeroed": 0, **stats}
    if not isinstance(source, NbdExport):  # an export without libnbd's handles (the in-memory hypervisor's)
        since = time.monotonic()
        for off, n in chunks:
            check()
            data = source.pread(n, off)
            zero = data.count(0) == n
            if not zero:
                out.pwrite(data, off)
            out.feed(data).result()
            stats["read"] += n
            stats["zeroed" if zero else "written"] += n
            done += n
            on_progress(done)
            if time.monotonic() - since >= DURABLE_INTERVAL:
                out.sync()
                on_durable(off + n, dict(stats))
                since = time.monotonic()
        check()
        return stats
    nbd = _nbd()
    sources = _readers(source)
    fds = {h.aio_get_fd(): h for h in sources}
    per_chunk: list[tuple[Any, bool] | None] = [None] * len(chunks)  # (buffer, all zero) once written
    inflight: dict[int, tuple[Any, int, Any]] = {}  # chunk index -> (handle, cookie, buffer)
    hashing: list[tuple[Future[None], Any]] = []  # buffers queued for the hash, oldest first
    free: list[Any] = []
    zeros = memoryview(bytes(REQUEST))
    next_chunk = cursor = 0
    pending_sync: tuple[Future[None], int, dict[str, int]] | None = None
    syncer = ThreadPoolExecutor(1, thread_name_prefix="qcow2-sync")  # the copy goes on while the disk catches up
    last_sync = time.monotonic()
    checks = CheckCadence(check, CHECK_INTERVAL)
    checks.due()
    # a hashed chunk frees a slot for the next read: the hash thread wakes the select below, so a
    # copy whose reads all arrived does not sleep out the select's timeout
    waker = _Waker()

    def cursor_pos() -> int:
        return _cursor_pos(chunks, cursor, start)

    try:
        while cursor < len(chunks):
            while hashing and hashing[0][0].done():
                future, buf = hashing.pop(0)
                future.result()
                if buf is not None and buf.size() == REQUEST:  # a shorter one (an extent's tail) is dropped
                    free.append(buf)
            while next_chunk < len(chunks) and len(inflight) < IN_FLIGHT and len(hashing) < IN_FLIGHT:
                checks.due()
                off, n = chunks[next_chunk]
                buf = free.pop() if free and n == REQUEST else nbd.Buffer(n)
                h = sources[next_chunk % len(sources)]
                inflight[next_chunk] = (h, h.aio_pread(buf, off), buf)
                next_chunk += 1
            readable = [h.aio_get_fd() for h in sources if h.aio_get_direction() & nbd.AIO_DIRECTION_READ]
            writable = [h.aio_get_fd() for h in sources if h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE]
            r, wr, _ = select.select([*readable, waker.fd], writable, [], 0.05 if hashing else 5.0)
            for fd in r:
                if fd == waker.fd:
                    waker.drain()
                else:
                    fds[fd].aio_notify_read()
            for fd in wr:
                fds[fd].aio_notify_write()
            for i, (h, cookie, buf) in list(inflight.items()):
                try:
                    if not h.aio_command_completed(cookie):
                        continue
                except nbd.Error as exc:
                    raise OperationFailed(f"read from the export at offset {chunks[i][0]} failed: {exc}",
                                          retryable=True) from exc
                del inflight[i]
                off, n = chunks[i]
                zero = buf.is_zero()
                if not zero:
                    out.pwrite(buf.to_buffer(), off)
                per_chunk[i] = (buf, zero)
                done += n
            while cursor < len(chunks) and per_chunk[cursor] is not None:
                buf, zero = per_chunk[cursor]  # type: ignore[misc]
                per_chunk[cursor] = None
                n = chunks[cursor][1]
                fed = out.feed(zeros[:n] if zero else buf.to_buffer())
                fed.add_done_callback(waker.wake)
                hashing.append((fed, buf))
                stats["read"] += n
                stats["zeroed" if zero else "written"] += n
                cursor += 1
            on_progress(done)
            if pending_sync is not None and pending_sync[0].done():
                future, pos, at = pending_sync
                future.result()  # an OperationFailed of the fdatasync
                on_durable(pos, at)
                pending_sync = None
            elif pending_sync is None and time.monotonic() - last_sync >= DURABLE_INTERVAL and cursor < len(chunks):
                pending_sync = (syncer.submit(out.sync), cursor_pos(), dict(stats))
                last_sync = time.monotonic()
        check()
        for future, _ in hashing:
            future.result()
    finally:
        syncer.shutdown(wait=True)
        waker.close()
    return stats


class _Waker:
    """An eventfd that other threads signal to wake a ``select``; closed once, never signalled after."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self, _future: object = None) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)  # reads the counter back to zero
        except BlockingIOError:  # already drained
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.fd)


# -- qemu-img ------------------------------------------------------------------------------
SECRET_ID = "dcsec0"  # the secret object that holds an encrypted backup's key, by file: never in argv


def secret_args(key: str | None, flag: str = "--object") -> list[str]:
    """The QEMU object that reads the passphrase of encrypted images from the file ``key`` (none without)."""
    return [flag, f"secret,id={SECRET_ID},file={_opt(key)},format=raw"] if key else []


def is_encrypted(path: str) -> bool:
    """Whether a qcow2 file's header says it is LUKS-encrypted (read without the key)."""
    return bool(image_info(path).get("encrypted"))


def check_key(path: str, key: str | None) -> None:
    """Refuse (InputError) when ``path`` is encrypted and ``key`` is missing or does not unlock it."""
    if not is_encrypted(path):
        return
    if not key:
        raise InputError(f"{path} is encrypted: give its key with --encrypt-key-file")
    # map opens the image for I/O, which unlocks a LUKS key slot (info does not)
    out = subprocess.run(["qemu-img", "map", "-U", *secret_args(key), "--output=json", "--max-length", "65536",
                          chain_spec([path], key)],
                         capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    if out.returncode != 0:
        why = "the key does not unlock it" if "password" in out.stderr.lower() else out.stderr.strip()
        raise InputError(f"--encrypt-key-file: {path}: {why}")


#: QEMU's LUKS header creation times PBKDF2 on the thread's CPU clock (crypto/pbkdf.c, getrusage): its
#: first round (2^15 iterations) takes a few ms, and where that clock moves in coarse ticks (a VM, a busy
#: host) the round can measure 0 ms, and qemu-img fails with this.  On the test host 3 plain creates in 8
#: failed so, each within milliseconds.  No qemu-img option skips that timing (``encrypt.iter-time`` only
#: scales its result), so the create is tried again: each try fails or not independently of the last.
CALIBRATION_FAILURE = "Unable to get accurate CPU usage"
CREATE_ATTEMPTS = 20


def create_image(path: str, size: int, options: str, key: str | None = None, *,
                 attempts: int = CREATE_ATTEMPTS, pause: float = 0.05) -> None:
    """``qemu-img create`` of a qcow2 file; with ``key``, a LUKS-encrypted one whose key timing may fail
    (CALIBRATION_FAILURE): that failure alone is retried, ``attempts`` times at most."""
    for attempt in range(1, attempts + 1):
        try:
            run_qemu_img("create", *secret_args(key), "-q", "-f", "qcow2", "-o", options, path, str(size))
            return
        except OperationFailed as exc:
            if CALIBRATION_FAILURE not in str(exc) or attempt == attempts:
                raise
            time.sleep(pause)


def run_qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    try:
        out = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationFailed(f"qemu-img {args[0]}: {exc}") from exc
    if out.returncode != 0:
        raise OperationFailed(f"qemu-img {args[0]} failed: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def chain_spec(files: list[str], key: str | None = None) -> str:
    """A ``json:`` filename reading ``files`` (full first, then each incremental) as one image.

    The backing chain is spelled out, so the backing names written in the
    files' headers are never used.  With ``key`` (a file; its secret object
    is ``secret_args(key)``) the encrypted files among them are unlocked.
    """
    node: dict[str, Any] | None = None
    for path in files:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": os.path.abspath(path)},
                "backing": node}
        if key and is_encrypted(path):
            node["encrypt"] = {"key-secret": SECRET_ID}
    if node is None:
        raise ValueError("an empty chain")
    return "json:" + json.dumps(node, separators=(",", ":"))


def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info`` of one file alone (its backing, if named, is not opened)."""
    info: dict[str, Any] = json.loads(run_qemu_img("info", "--output=json", "-U", chain_spec([path])))
    return info


def repair_image(path: str, key: str | None = None) -> None:
    """``qemu-img check -r all`` of a partial file before a copy goes on writing it.

    The writer runs without QEMU's ordering flushes, so after a host crash
    the file may hold an L2 entry whose cluster's refcount never reached the
    disk; written again as it is, that cluster could be handed out twice.
    The repair makes the refcounts match what the tables reference (after a
    killed process, nothing to repair).  Raises OperationFailed when the
    file cannot be repaired (the caller starts that disk over).
    """
    run_qemu_img("check", *secret_args(key), "-q", "-r", "all", chain_spec([path], key))


def check_image(path: str, key: str | None = None) -> bool:
    """``qemu-img check``; leaked clusters (a writer killed mid-way) are repaired (returns True), anything
    else refused."""
    out = subprocess.run(["qemu-img", "check", *secret_args(key), "-q", "-U", chain_spec([path], key)],
                         capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    if out.returncode == 3:  # leaks only: the data is intact
        run_qemu_img("check", *secret_args(key), "-q", "-r", "leaks", chain_spec([path], key))
        return True
    if out.returncode != 0:
        raise OperationFailed(f"qemu-img check of {path} failed: {(out.stderr or out.stdout).strip()}")
    return False


def allocated_bytes(path: str, key: str | None = None) -> int:
    """Bytes of guest data the file itself holds (clusters with data; not holes, not zeroed clusters)."""
    extents = json.loads(run_qemu_img("map", *secret_args(key), "--output=json", "-U", chain_spec([path], key)))
    return sum(e["length"] for e in extents if e.get("data") and e.get("depth", 0) == 0)


def set_backing(path: str, backing: str | None, key: str | None = None) -> None:
    """Rewrite the backing name in ``path``'s header (nothing is copied; ``backing`` relative to it)."""
    image = ["--image-opts", f"driver=qcow2,file.filename={_opt(path)},encrypt.key-secret={SECRET_ID}"] \
        if key and is_encrypted(path) else ["-f", "qcow2", path]
    if backing:
        run_qemu_img("rebase", *secret_args(key), "-u", "-F", "qcow2", "-b", backing, *image)
    else:
        run_qemu_img("rebase", *secret_args(key), "-u", "-b", "", *image)


def rebase_onto(image: str, old: list[str], new: list[str], name: str) -> None:
    """Rebase ``image`` (a copy of a layer, ours) from the chain ``old`` onto the chain ``new`` (each full
    first; what differs is copied in), then name its new backing file ``name`` in its header.  Both
    chains are spelled out (``json:``), so no backing name in any header is opened; a ``new`` chain too
    long to spell out in a qcow2 header (1023 bytes) is named by ``name`` instead, which the caller has
    checked.
    """
    node: dict[str, Any] | None = None
    for path in old:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": node}
    top = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": os.path.abspath(image)},
                                "backing": node}, separators=(",", ":"))
    spelled = chain_spec(new)
    run_qemu_img("rebase", "-F", "qcow2", "-b", spelled if len(spelled) <= 1000 else name, top)
    set_backing(image, name)


def convert_chain(files: list[str], out: str, key: str | None = None) -> None:
    """The chain's disk as one plain qcow2 image (decrypted, uncompressed)."""
    run_qemu_img("convert", *secret_args(key), "-O", "qcow2", "-o", "compat=1.1", chain_spec(files, key), out)


def same_content(files: list[str], image: str, key: str | None = None) -> bool:
    out = subprocess.run(["qemu-img", "compare", *secret_args(key), "-U", chain_spec(files, key), image],
                         capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    if out.returncode not in (0, 1):
        raise OperationFailed(f"qemu-img compare failed: {(out.stderr or out.stdout).strip()}")
    return out.returncode == 0
