"""The last pass over a backup file that a block job wrote: checked, made durable, hashed, at once.

A push backup's file is written by QEMU, a pull backup's by our qemu-nbd.
Before it is renamed into place it must pass ``qemu-img check``, have the
disk's virtual size, be on disk (fsync), and its checksum and allocation
are recorded.  Done one after the other, that is a second full read plus
several ``qemu-img`` runs after the job; here they run side by side (the
hash in a thread: hashlib and fsync release the GIL, qemu-img is a child
process), so the pass costs about as long as its slowest part, the read
for the hash, which drops the pages it read from the host's page cache.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from . import nbdio
from .errors import StepFailed
from .filecopy import drop_cache, fsync_dir, opened_nofollow, sha256_file, start_writeback


log = logging.getLogger(__name__)
_T = TypeVar("_T")

WRITE_BEHIND_INTERVAL = 0.5
_last_write_behind: dict[str, float] = {}


def write_behind(paths: list[str]) -> None:
    """While a block job writes ``paths``: start writing their dirty pages to disk and drop the clean ones.

    Called from the job's polling loop (at most every ``WRITE_BEHIND_INTERVAL``
    seconds per file), so the fsync at the end has little left to do and the
    host's page cache does not fill with the backup.  Only a hint: a file
    not there yet is skipped.
    """
    now = time.monotonic()
    for path in paths:
        if now - _last_write_behind.get(path, 0.0) < WRITE_BEHIND_INTERVAL:
            continue
        _last_write_behind[path] = now
        try:
            with opened_nofollow(path) as fd:
                start_writeback(fd)
                drop_cache(fd)
        except OSError:
            continue


@dataclass
class Sealed:
    checksum: str  # "sha256:<hex>" of the file's bytes
    size: int
    allocated: int  # bytes of guest data the file itself holds


def _fsync(path: str) -> None:
    with opened_nofollow(path) as fd:
        os.fsync(fd)
        drop_cache(fd)  # clean now: its pages need not stay in the host's cache


def _replace(partial: str, path: str) -> None:
    os.replace(partial, path)
    fsync_dir(os.path.dirname(path))


def seal(partial: str, path: str, virtual_size: int,
         rename: Callable[[str, str], None] = _replace, key: str | None = None,
         checksum: str | None = None) -> Sealed:
    """Check, fsync, hash and measure ``partial`` at once; then rename it to ``path``.

    Raises (and leaves ``partial`` in place) when ``qemu-img check`` fails or
    the virtual size is not ``virtual_size``.  ``key``: the key file of an
    encrypted backup (check and map must unlock it).  ``checksum``: the
    file's sha256 as its writer hashed it on the way (``qcow2.LaidOutFile``),
    so the file is not read again.  Called again after a crash that followed
    the rename, it only hashes and measures ``path``.
    """
    if os.path.exists(path):
        with ThreadPoolExecutor(2) as pool:
            digest = pool.submit(sha256_file, path)
            allocated = pool.submit(nbdio.allocated_bytes, path, key)
            return Sealed(f"sha256:{digest.result()}", os.path.getsize(path), allocated.result())
    t0 = time.monotonic()
    took: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return fn(*args)
        finally:
            took[name] = round(time.monotonic() - t0, 3)
    with ThreadPoolExecutor(5) as pool:
        checked = pool.submit(timed, "check", nbdio.check_image, partial, key)
        info = pool.submit(timed, "info", nbdio.image_info, partial)
        hashing: Future[str] | None = \
            pool.submit(timed, "hash", sha256_file, partial) if checksum is None else None
        allocated = pool.submit(timed, "map", nbdio.allocated_bytes, partial, key)
        synced = pool.submit(timed, "fsync", _fsync, partial)
        repaired = checked.result()  # a repair of leaks rewrites the file: hashed again below
        got = info.result()["virtual-size"]
        synced.result()
        hexdigest = hashing.result() if hashing is not None else (checksum or "").removeprefix("sha256:")
        held = allocated.result()
    log.info("sealed %s: each part done after (s) %s", partial, took)
    if got != virtual_size:
        raise StepFailed(f"the backup in {partial} has {got} bytes, the disk {virtual_size}")
    if repaired:
        hexdigest = sha256_file(partial)
        _fsync(partial)
    rename(partial, path)  # the effects port's rename in a workflow (fenced, owned paths only)
    return Sealed(f"sha256:{hexdigest}", os.path.getsize(path), held)
