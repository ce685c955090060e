"""Resumable, checksummed file copies into a partial file, renamed when complete.

The cursor (bytes durably written) is handed to ``on_durable`` only after an
fsync, so a resumed copy truncates the partial file to the recorded cursor
and continues from there.  Zero chunks are skipped (the copy stays sparse)
but hashed, so the checksum is the checksum of the file's bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

CHUNK = 1024 * 1024
SYNC_EVERY = 8 * 1024 * 1024


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while remaining is None or remaining > 0:
            n = CHUNK if remaining is None else min(CHUNK, remaining)
            buf = f.read(n)
            if not buf:
                break
            h.update(buf)
            if remaining is not None:
                remaining -= len(buf)
    return h.hexdigest()


def copy_resumable(src: str, partial: str, final: str, *, offset: int,
                   on_progress: Callable[[int, int], None], on_durable: Callable[[int], None],
                   check: Callable[[], None], bandwidth: float = 0,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[str, int]:
    """Copy ``src`` to ``partial`` from ``offset``; fsync, rename to ``final``.

    ``check`` runs before every chunk (it raises when the caller lost its
    lease or was cancelled).  ``bandwidth`` (bytes/s, 0 = unlimited) limits
    the read rate to spare the host's I/O.  Returns (sha256, size).
    """
    check()  # before anything is created: a fenced-out caller leaves no file behind
    total = os.path.getsize(src)
    h = hashlib.sha256()
    if offset and os.path.exists(partial) and os.path.getsize(partial) >= offset:
        with open(partial, "rb") as f:  # re-hash the part already copied
            remaining = offset
            while remaining:
                buf = f.read(min(CHUNK, remaining))
                if not buf:
                    break
                h.update(buf)
                remaining -= len(buf)
    else:
        offset = 0
    os.makedirs(os.path.dirname(final), exist_ok=True)
    fd_out = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd_out, offset)
        with open(src, "rb") as fin:
            fin.seek(offset)
            pos, since_sync = offset, 0
            started, start_pos = time.monotonic(), offset
            while True:
                check()
                buf = fin.read(CHUNK)
                if not buf:
                    break
                h.update(buf)
                if buf.count(0) == len(buf):
                    pass  # leave a hole
                else:
                    os.pwrite(fd_out, buf, pos)
                pos += len(buf)
                since_sync += len(buf)
                if since_sync >= SYNC_EVERY:
                    os.ftruncate(fd_out, pos)
                    os.fsync(fd_out)
                    on_durable(pos)
                    since_sync = 0
                on_progress(pos, total)
                if bandwidth > 0:
                    ahead = (pos - start_pos) / bandwidth - (time.monotonic() - started)
                    if ahead > 0:
                        sleep(ahead)
        os.ftruncate(fd_out, pos)
        os.fsync(fd_out)
    finally:
        os.close(fd_out)
    check()
    os.replace(partial, final)
    fsync_dir(os.path.dirname(final))
    on_durable(pos)
    on_progress(pos, total)
    return h.hexdigest(), pos
