"""Resumable, checksummed file copies into a partial file, renamed when complete.

The copy is a three-stage pipeline over a small pool of reused buffers:

- a reader thread reads large chunks (``CHUNK``; under a bandwidth limit,
  what the limit lets through in ``PACE_SLICE``) with ``preadv``; a chunk
  lying wholly in a hole of the source (``SEEK_DATA``/``SEEK_HOLE``) is not
  read at all, nor is a hole inside a chunk.  The bandwidth limit paces
  this thread on the bytes it really read, before each read.  Pages it
  read are dropped from the host's page cache behind it
  (``posix_fadvise(DONTNEED)``), so a backup does not evict the host's
  working set;
- the calling thread checks the lease (``check``) per chunk and while it
  waits for one, writes non-zero chunks (zero chunks stay holes: the copy
  is sparse) and pushes them to disk behind itself (``sync_file_range``,
  then ``DONTNEED``), so dirty pages never pile up in the page cache;
- a hashing thread feeds every chunk, holes as zeroes, to sha256 (which
  releases the GIL on large buffers), so the checksum is the checksum of the
  file's bytes and costs no time of its own on two cores.

The cursor (bytes durably written) is handed to ``on_durable`` only after an
fdatasync, at most once per ``durable_interval`` seconds, so a resumed copy
truncates the partial file to the recorded cursor and continues from there.
See docs/datapath.md for the measurements behind these choices.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import queue
import stat
import threading
import time
from typing import Callable, Iterator

from .errors import OperationFailed

CHUNK = 8 * 1024 * 1024
DURABLE_INTERVAL = 1.0  # seconds between fdatasync + on_durable
CHECK_INTERVAL = 0.05  # seconds of copying between two lease checks (when a check is quick)
CHECK_SHARE = 10  # ... or this many times the last check's own time (a slow Redis is asked less often) ...
CHECK_LONGEST = 1.0  # ... but never more than this many seconds of copying apart
SPARSE_BLOCK = 1024 * 1024  # an all-zero block of this size stays a hole in the copy
WRITEBACK_WINDOW = 4  # chunks written but not yet waited for: the most the copy leaves dirty in the cache
HASH_BUFFERS = 4  # chunks read ahead of the hash in a pass over a whole file
BUFFERS = 6  # chunks in the pipeline at once (reader, writer, hasher, and queued between them)
PACE_SLICE = 0.1  # longest single sleep of the bandwidth limit (an abort waits no longer), and read at the limit
MIN_PIECE = 64 * 1024  # smallest chunk under a bandwidth limit
ZERO = bytes(CHUNK)
_ZERO_VIEW = memoryview(ZERO)

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def _writeback(fd: int, offset: int, length: int, wait: bool) -> None:
    """Start writing ``[offset, offset+length)`` to disk; with ``wait``, wait for it and drop the pages."""
    if length <= 0:
        return
    if _sync_file_range is not None:
        flags = _SYNC_FILE_RANGE_WRITE
        if wait:
            flags |= _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WAIT_AFTER
        if _sync_file_range(fd, offset, length, flags) != 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE):
                raise OSError(err, os.strerror(err))
    if wait:
        drop_cache(fd, offset, length)


def start_writeback(fd: int) -> None:
    """Start writing all of ``fd``'s dirty pages to disk, without waiting (a hint: errors are ignored)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to forget clean cached pages of ``fd`` (a hint: errors are ignored)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def sync_and_drop(fd: int, path: str) -> None:
    """``fdatasync`` of ``fd`` (``path`` names it in the error), then its now clean pages leave the cache."""
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise OperationFailed(f"fdatasync of {path} failed: {exc}", retryable=True) from exc
    drop_cache(fd)


@contextlib.contextmanager
def opened_nofollow(path: str) -> Iterator[int]:
    """A read-only descriptor of ``path``, never opened through a symlink; closed on leaving."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str, limit: int | None = None) -> str:
    """sha256 of a file's first ``limit`` bytes (all when None), read in large chunks, not cached."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _hash_fd(fd, h, limit)
    finally:
        os.close(fd)
    return h.hexdigest()


def _hash_fd(fd: int, h: "hashlib._Hash", limit: int | None) -> int:
    """Feed ``fd``'s first ``limit`` bytes (all when None) to ``h``; returns how many there were.

    A reader thread reads ahead into a few reused buffers while this thread
    hashes (hashlib and preadv both release the GIL), so the pass costs the
    longer of the read and the hash, not their sum; the pages read are
    dropped behind it.
    """
    if (limit if limit is not None else os.fstat(fd).st_size) < CHUNK:
        # a small file (a manifest's domain XML, an empty incremental): one read, no reader
        # thread and no read-ahead buffers, which cost more than the hash
        pos = 0
        while limit is None or pos < limit:
            data = os.pread(fd, CHUNK if limit is None else limit - pos, pos)
            if not data:
                break
            h.update(data)
            pos += len(data)
        drop_cache(fd, 0, pos)
        return pos
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(HASH_BUFFERS):
        free.put(bytearray(CHUNK))
    ready: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def read() -> None:
        pos = 0
        try:
            while (limit is None or pos < limit) and not stop.is_set():
                buf = free.get()
                n = CHUNK if limit is None else min(CHUNK, limit - pos)
                got = os.preadv(fd, [memoryview(buf)[:n]], pos)
                if got <= 0:
                    break
                drop_cache(fd, pos, got)
                ready.put((buf, got))
                pos += got
            ready.put(None)
        except BaseException as exc:  # handed to the hashing thread, which raises it
            ready.put(exc)

    reader = threading.Thread(target=read, name="filecopy-hashread", daemon=True)
    reader.start()
    pos = 0
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            buf, got = item
            h.update(memoryview(buf)[:got])
            free.put(buf)
            pos += got
    finally:
        stop.set()
        free.put(bytearray(0))  # unblock a reader waiting for a buffer (an empty read ends it)
        reader.join()
    return pos


def _data_start(fd: int, pos: int, end: int) -> int:
    """The first offset >= ``pos`` holding data (``end`` when only a hole is left)."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), end)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a hole up to the end of the file
            return end
        return pos  # SEEK_DATA not supported: treat everything as data


def _hole_start(fd: int, pos: int, end: int) -> int:
    """The first offset >= ``pos`` in a hole (``end`` when data runs to there)."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_HOLE), end)
    except OSError:
        return end


def _read_data(fd: int, buf: bytearray, pos: int, n: int) -> int:
    """Fill ``buf[:n]`` with the source's bytes at ``pos``: its data read, its holes zeroed without a read.

    Returns the bytes really read (what the bandwidth limit counts); the
    pages read are dropped from the host's page cache.
    """
    view, end, at, read = memoryview(buf), pos + n, pos, 0
    while at < end:
        data = _data_start(fd, at, end)
        if data > at:
            view[at - pos:data - pos] = _ZERO_VIEW[:data - at]
        if data >= end:
            break
        stop = _hole_start(fd, data, end)
        got = os.preadv(fd, [view[data - pos:stop - pos]], data)
        if got < stop - data:
            raise OperationFailed(f"the source ended at {data + max(got, 0)} bytes, {end} were expected")
        drop_cache(fd, data, got)
        read += got
        at = stop
    return read


def _open_partial(partial: str, offset: int) -> tuple[int, int]:
    """Open the partial file without following a symlink; returns (fd, the offset to resume from).

    From offset 0 the file is created exclusively (mode 0600); a leftover
    regular file is removed first, anything else there is refused.
    """
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if offset:
        try:
            fd = os.open(partial, flags)
        except FileNotFoundError:
            offset = 0
        else:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size >= offset:
                return fd, offset
            os.close(fd)
            offset = 0
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise OperationFailed(f"{partial} exists and is not a regular file; it is left alone")
        os.unlink(partial)
    return os.open(partial, flags | os.O_CREAT | os.O_EXCL, 0o600), 0


class _Stopped(Exception):
    """The copy was aborted while the reader waited for the bandwidth limit."""


class _Pipeline:
    """The reader and hasher threads around the calling thread's writes."""

    def __init__(self, fd_in: int, start: int, total: int, h: "hashlib._Hash", *, bandwidth: float = 0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.fd_in, self.pos, self.total, self.h = fd_in, start, total, h
        self.bandwidth, self.sleep, self.clock = bandwidth, sleep, clock
        # under a limit a chunk takes at most PACE_SLICE to read: a small file is paced too, and the
        # progress, the cursor and the lease checks move in these small steps
        self.step = min(CHUNK, max(MIN_PIECE, int(bandwidth * PACE_SLICE) // MIN_PIECE * MIN_PIECE)) \
            if bandwidth > 0 else CHUNK
        self.started: float | None = None
        self.read = 0
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(BUFFERS):
            self.free.put(bytearray(CHUNK))
        self.ready: queue.Queue[tuple[int, int, bytearray | None] | BaseException | None] = queue.Queue()
        self.to_hash: queue.Queue[tuple[int, bytearray | None] | None] = queue.Queue()
        self.stop = threading.Event()
        self.hash_error: BaseException | None = None
        self.reader = threading.Thread(target=self._read, name="filecopy-read", daemon=True)
        self.hasher = threading.Thread(target=self._hash, name="filecopy-hash", daemon=True)
        self.reader.start()
        self.hasher.start()

    def _read(self) -> None:
        try:
            pos, end = self.pos, self.total
            while pos < end and not self.stop.is_set():
                n = min(self.step, end - pos)
                if _data_start(self.fd_in, pos, end) >= pos + n:
                    self.ready.put((pos, n, None))  # a hole: nothing to read
                    pos += n
                    continue
                buf = self.free.get()
                if self.stop.is_set():
                    break
                if self.bandwidth > 0:
                    self._pace()
                self.read += _read_data(self.fd_in, buf, pos, n)
                self.ready.put((pos, n, buf))
                pos += n
            self.ready.put(None)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the writer, which raises it
            self.ready.put(exc)

    def _pace(self) -> None:
        """Before a read: wait until the bytes read so far fit the limit (so never after the last read),
        in short sleeps so that an abort is not held up."""
        if self.started is None:
            self.started = self.clock()
        until = self.started + self.read / self.bandwidth
        while not self.stop.is_set():
            ahead = until - self.clock()
            if ahead <= 0:
                break
            self.sleep(min(ahead, PACE_SLICE))
        if self.stop.is_set():
            raise _Stopped()

    def _hash(self) -> None:
        while True:
            item = self.to_hash.get()
            if item is None:
                return
            n, buf = item
            try:
                if self.hash_error is None:
                    self.h.update(_ZERO_VIEW[:n] if buf is None else memoryview(buf)[:n])
            except BaseException as exc:
                self.hash_error = exc
            if buf is not None:
                self.free.put(buf)

    def next(self, timeout: float) -> tuple[int, int, bytearray | None] | None | bool:
        """The next chunk, None at the end, or False when none came within ``timeout`` seconds."""
        try:
            item = self.ready.get(timeout=timeout)
        except queue.Empty:
            return False
        if isinstance(item, BaseException):
            raise item
        return item

    def finish(self) -> None:
        """Wait for the hasher to take in every chunk handed to it."""
        self.to_hash.put(None)
        self.hasher.join()
        self.reader.join()
        if self.hash_error is not None:
            raise self.hash_error

    def abort(self) -> None:
        self.stop.set()
        self.to_hash.put(None)
        for _ in range(BUFFERS):  # unblock a reader waiting for a buffer
            self.free.put(bytearray(0))
        self.reader.join(timeout=10)
        self.hasher.join(timeout=10)


def copy_resumable(src: str, partial: str, final: str, *, offset: int,
                   on_progress: Callable[[int, int], None], on_durable: Callable[[int], None],
                   check: Callable[[], None], bandwidth: float = 0,
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic,
                   durable_interval: float | None = None,
                   check_interval: float | None = None) -> tuple[str, int]:
    """Copy ``src`` to ``partial`` from ``offset``; fsync, rename to ``final``.

    ``check`` runs before a chunk once ``check_interval`` seconds passed since
    it last ran, so at most that long of copying goes unchecked (it raises
    when the caller lost its lease or was cancelled; a Redis round trip per
    8 MiB cost seconds per GiB on a busy server).  ``bandwidth`` (bytes/s, 0 = unlimited) limits
    the read rate to spare the host's I/O: it counts the bytes really read
    (holes of the source are not read) and waits, with ``sleep`` against
    ``clock``, before a read, never after the last one.  ``final``'s
    directory must exist.
    Returns (sha256, size).
    """
    check()  # before anything is created: a fenced-out caller leaves no file behind
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = os.fstat(fd_in).st_size
        try:
            os.posix_fadvise(fd_in, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
        fd_out, offset = _open_partial(partial, offset)
        try:
            h = hashlib.sha256()
            if offset:
                fd_old = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:  # re-hash the part already copied
                    if _hash_fd(fd_old, h, offset) != offset:
                        raise OperationFailed(f"{partial} is shorter than its cursor {offset}")
                finally:
                    os.close(fd_old)
            os.ftruncate(fd_out, offset)
            pos = _copy_from(fd_in, fd_out, offset, total, h, on_progress=on_progress, on_durable=on_durable,
                             check=check, bandwidth=bandwidth, sleep=sleep, clock=clock,
                             durable_interval=DURABLE_INTERVAL if durable_interval is None else durable_interval,
                             check_interval=CHECK_INTERVAL if check_interval is None else check_interval)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    check()
    os.replace(partial, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    on_durable(pos)
    on_progress(pos, total)
    return h.hexdigest(), pos


class CheckCadence:
    """Runs ``check`` (a lease and cancel check: Redis round trips) at most ``interval`` seconds apart,
    or ``CHECK_SHARE`` times its own last duration apart when it is slow (a busy shared Redis server
    answers in tens of ms: checked every 50 ms, the copy would wait on Redis most of the time), but never
    more than ``CHECK_LONGEST`` apart."""

    def __init__(self, check: Callable[[], None], interval: float) -> None:
        self.check, self.base, self.interval = check, interval, interval
        self.last = time.monotonic() - interval

    def due(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.check()
            self.last = time.monotonic()
            took = self.last - now
            if took > CHECK_LONGEST:  # a stall (a stopped process, a paused VM) inside the check: what it
                self.check()  # answered may be stale by now, so it is asked again before anything is written
                self.last = time.monotonic()
                took = self.base
            self.interval = min(max(self.base, CHECK_SHARE * took), max(self.base, CHECK_LONGEST))


def _write_sparse(fd: int, buf: bytearray, at: int, n: int) -> None:
    """Write ``buf[:n]`` at ``at``, leaving every all-zero ``SPARSE_BLOCK`` of it a hole."""
    view = memoryview(buf)
    run_start = -1
    for i in range(0, n, SPARSE_BLOCK):
        zero = buf.startswith(_ZERO_VIEW[:min(SPARSE_BLOCK, n - i)], i)
        if zero and run_start >= 0:
            os.pwrite(fd, view[run_start:i], at + run_start)
            run_start = -1
        elif not zero and run_start < 0:
            run_start = i
    if run_start >= 0:
        os.pwrite(fd, view[run_start:n], at + run_start)


def _extend(fd: int, size: int) -> None:
    """Make the file at least ``size`` bytes long (a trailing hole counts), never shorter.

    Not ``ftruncate``: a copier stopped (SIGSTOP, a VM pause) between its
    lease check and this call may wake after another worker resumed the
    same partial file from the cursor and renamed it into place; its
    ``ftruncate`` to its own, older position would cut the finished backup
    short.  ``fallocate`` of the last byte only ever grows the file, and the
    bytes such a copier writes are the source's, at their own offsets.
    """
    if size > 0:
        os.posix_fallocate(fd, size - 1, 1)


def _copy_from(fd_in: int, fd_out: int, start: int, total: int, h: "hashlib._Hash", *,
               on_progress: Callable[[int, int], None], on_durable: Callable[[int], None],
               check: Callable[[], None], bandwidth: float, sleep: Callable[[float], None],
               clock: Callable[[], float], durable_interval: float, check_interval: float) -> int:
    pos = start
    pipe = _Pipeline(fd_in, start, total, h, bandwidth=bandwidth, sleep=sleep, clock=clock)
    last_durable = time.monotonic()
    checks = CheckCadence(check, check_interval)
    behind: collections.deque[tuple[int, int]] = collections.deque()  # written ranges still being written back
    try:
        while True:
            checks.due()
            item = pipe.next(checks.interval)
            if isinstance(item, bool):  # the reader is paced or slow: the lease is still checked meanwhile
                continue
            if item is None:
                break
            at, n, buf = item
            checks.due()  # again after the wait for the chunk: a stop there is seen before the write
            if buf is not None and not buf.startswith(_ZERO_VIEW[:n]):
                _write_sparse(fd_out, buf, at, n)
                _writeback(fd_out, at, n, wait=False)
                behind.append((at, n))
                if len(behind) > WRITEBACK_WINDOW:
                    _writeback(fd_out, *behind.popleft(), wait=True)
            pipe.to_hash.put((n, buf))
            pos = at + n
            now = time.monotonic()
            if now - last_durable >= durable_interval:
                _extend(fd_out, pos)
                os.fdatasync(fd_out)
                on_durable(pos)
                last_durable = time.monotonic()
            on_progress(pos, total)
        pipe.finish()
    except BaseException:
        pipe.abort()
        raise
    os.ftruncate(fd_out, pos)
    while behind:
        _writeback(fd_out, *behind.popleft(), wait=True)
    os.fsync(fd_out)
    return pos
