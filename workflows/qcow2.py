"""qcow2 files written in one pass: every table laid out before the first data byte arrives.

A plain pull backup (neither compressed nor encrypted) knows before it reads
a byte which clusters it will store: the export's extents, widened to whole
clusters.  So the image is laid out first (header, L1 table, refcount table
and blocks, L2 tables) and then every stored cluster follows in disk order.
The data goes straight from the NBD read buffer into its place in the file
(no qemu-nbd in between, no second copy), and a thread hashes the file's
bytes in file order as the copy's cursor passes them: when the last byte is
written the file's sha256 is known, and sealing it needs no second read.

The layout is a pure function of (virtual size, extents, backing name), so a
resumed copy rebuilds the very same file: it checks the tables on disk
against its own, re-hashes what lies below the durable cursor and goes on.

Format facts (QEMU's docs/interop/qcow2.txt): version 3, 64 KiB clusters,
16-bit refcounts (refcount_order 4), every cluster used has refcount 1 so
L1 and L2 entries carry QCOW_OFLAG_COPIED; an unallocated L2 entry reads
through the backing file (an incremental's unchanged clusters).  A stored
cluster that read as zeroes is left a hole in the file: it reads as zeroes,
and being allocated it hides the backing file's cluster, as a zeroed one must.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import OperationFailed
from .filecopy import drop_cache, sync_and_drop

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
L2_SPAN = CLUSTER * L2_ENTRIES  # guest bytes one L2 table maps (512 MiB)
REFS_PER_BLOCK = CLUSTER // 2  # 16-bit refcounts
COPIED = 1 << 63
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the version 3 header, 104 bytes
EXT_BACKING_FORMAT = 0xE2792ACA
MAX_BACKING_NAME = 1023  # QEMU's limit
READ_BACK = 8 * 1024 * 1024


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def widen(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Extents grown to whole clusters (the last one cut at ``size``), merged, in disk order."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(extents):
        start, end = off // CLUSTER * CLUSTER, min(_ceil(off + length, CLUSTER) * CLUSTER, size)
        if end <= start:
            continue
        if out and out[-1][0] + out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end - out[-1][0]))
        else:
            out.append((start, end - start))
    return out


class Layout:
    """Where everything of one image goes: [header][L1][refcount table][refcount blocks][L2 tables][data]."""

    def __init__(self, size: int, extents: list[tuple[int, int]], backing: str | None = None) -> None:
        if extents != widen(extents, size):
            raise ValueError("the extents of a layout must be whole clusters, merged, in disk order")
        name = (backing or "").encode()
        if len(name) > MAX_BACKING_NAME:
            raise ValueError(f"a backing name of {len(name)} bytes is longer than qcow2 allows")
        self.size, self.extents, self.backing = size, extents, backing
        self.l1_size = max(1, _ceil(size, L2_SPAN))
        l1_clusters = _ceil(self.l1_size * 8, CLUSTER)
        tables: set[int] = set()
        for off, length in extents:
            tables.update(range(off // L2_SPAN, (off + length - 1) // L2_SPAN + 1))
        self.l2_tables = sorted(tables)
        stored = [_ceil(length, CLUSTER) for _, length in extents]
        self.data_clusters = sum(stored)
        fixed = 1 + l1_clusters + len(self.l2_tables) + self.data_clusters
        blocks, table = 1, 1
        while True:  # the refcount blocks count themselves and the table
            need_blocks = _ceil(fixed + blocks + table, REFS_PER_BLOCK)
            need_table = _ceil(need_blocks * 8, CLUSTER)
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = max(blocks, need_blocks), max(table, need_table)
        self.refblocks, self.reftable_clusters = blocks, table
        self.clusters = fixed + blocks + table
        self.l1_offset = CLUSTER
        self.reftable_offset = self.l1_offset + l1_clusters * CLUSTER
        self.refblock_offset = self.reftable_offset + table * CLUSTER
        self.l2_offset = self.refblock_offset + blocks * CLUSTER
        self.data_offset = self.l2_offset + len(self.l2_tables) * CLUSTER
        self.file_size = self.clusters * CLUSTER
        self._starts = [off for off, _ in extents]
        self._before: list[int] = []  # data bytes stored before each extent
        total = 0
        for n in stored:
            self._before.append(total)
            total += n * CLUSTER

    def file_offset(self, guest: int) -> int:
        """Where the byte at disk offset ``guest`` (inside an extent, or the end of one) lives in the file."""
        i = bisect.bisect_right(self._starts, guest) - 1
        if i < 0:
            return self.data_offset
        off, length = self.extents[i]
        if guest >= off + length:  # past this extent: the start of the next one's data
            return self.data_offset + self._before[i] + _ceil(length, CLUSTER) * CLUSTER
        return self.data_offset + self._before[i] + guest - off

    def metadata(self) -> Iterator[bytes]:
        """The file's bytes below ``data_offset``, in order."""
        yield self._header()
        l1 = [0] * self.l1_size
        for k, t in enumerate(self.l2_tables):
            l1[t] = (self.l2_offset + k * CLUSTER) | COPIED
        yield _padded(struct.pack(f">{self.l1_size}Q", *l1))
        yield _padded(struct.pack(f">{self.refblocks}Q",
                                  *(self.refblock_offset + i * CLUSTER for i in range(self.refblocks))))
        yield _padded(b"\x00\x01" * self.clusters)
        for t in self.l2_tables:
            yield self._l2(t)

    def _header(self) -> bytes:
        name = (self.backing or "").encode()
        ext = b""
        if name:
            ext += struct.pack(">II", EXT_BACKING_FORMAT, 5) + b"qcow2".ljust(8, b"\x00")
        ext += struct.pack(">II", 0, 0)
        name_at = HEADER.size + len(ext) if name else 0
        head = HEADER.pack(b"QFI\xfb", 3, name_at, len(name), CLUSTER_BITS, self.size, 0, self.l1_size,
                           self.l1_offset, self.reftable_offset, self.reftable_clusters, 0, 0, 0, 0, 0, 4,
                           HEADER.size)
        return _padded(head + ext + name)

    def _l2(self, table: int) -> bytes:
        entries = [0] * L2_ENTRIES
        lo, hi = table * L2_SPAN, (table + 1) * L2_SPAN
        for off, length in self.extents[max(0, bisect.bisect_right(self._starts, lo) - 1):]:
            if off >= hi:
                break
            start, end = max(off, lo), min(off + length, hi)
            at = self.file_offset(start) | COPIED  # an extent's clusters lie one after the other in the file
            for k in range(_ceil(end - start, CLUSTER)):
                entries[(start - lo) // CLUSTER + k] = at + k * CLUSTER
        return struct.pack(f">{L2_ENTRIES}Q", *entries)


def _padded(data: bytes) -> bytes:
    return data + bytes(_ceil(len(data), CLUSTER) * CLUSTER - len(data))


class LaidOutFile:
    """A qcow2 file of ours being written by the layout: data placed, file bytes hashed in file order.

    ``fresh``: the (empty, ours) file is sized and its tables written.
    Otherwise the tables on disk must be the layout's (``OperationFailed``
    if not: the caller starts the file over) and ``resume_at`` re-hashes
    what the durable cursor covers.
    """

    def __init__(self, path: str, layout: Layout, *, fresh: bool) -> None:
        self.path, self.layout = path, layout
        self.fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="qcow2-hash")  # in order: one thread, FIFO
        self.hashed_to = 0  # file offset the hash has been fed up to (queued)
        try:
            if fresh:
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, layout.file_size)
            elif os.fstat(self.fd).st_size != layout.file_size:
                raise OperationFailed(f"{path} is not the size its layout gives: starting it over")
            pos = 0
            for part in layout.metadata():  # written (fresh) or compared (resumed), and hashed, in one pass
                if fresh:
                    os.pwrite(self.fd, part, pos)
                elif os.pread(self.fd, len(part), pos) != part:
                    raise OperationFailed(f"the tables in {path} are not its layout's: starting it over")
                self.feed(part)
                pos += len(part)
        except BaseException:
            self.close()
            raise

    def feed(self, data: Any) -> Future[None]:
        """Queue the next bytes of the file (in file order) for the hash."""
        self.hashed_to += len(data)
        return self._hasher.submit(self._hash.update, data)

    def resume_at(self, guest: int) -> None:
        """Re-hash the data below disk offset ``guest`` (durable) and clear what lies past it."""
        end = self.layout.file_offset(guest)
        pos = self.hashed_to
        while pos < end:
            data = os.pread(self.fd, min(READ_BACK, end - pos), pos)
            if not data:
                raise OperationFailed(f"{self.path} ends before its durable cursor")
            self.feed(data).result()
            pos += len(data)
        drop_cache(self.fd)
        os.ftruncate(self.fd, end)  # whatever a killed copy wrote past the cursor: gone, holes again
        os.ftruncate(self.fd, self.layout.file_size)

    def pwrite(self, data: Any, guest: int) -> None:
        view = memoryview(data)
        at, done = self.layout.file_offset(guest), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], at + done)

    def sync(self) -> None:
        """What was written is on disk; its (clean) pages leave the host's cache."""
        sync_and_drop(self.fd, self.path)

    def finish(self) -> str:
        """Hash the rest of the file (zeroes: the tail of a last partial cluster) and return its checksum."""
        rest = self.layout.file_size - self.hashed_to
        if rest < 0:
            raise OperationFailed(f"more bytes were hashed than {self.path} holds")
        zeros = bytes(min(rest, READ_BACK))
        while rest:
            n = min(rest, len(zeros))
            self.feed(memoryview(zeros)[:n])
            rest -= n
        self._hasher.submit(lambda: None).result()
        self.sync()
        return f"sha256:{self._hash.hexdigest()}"

    def close(self) -> None:
        self._hasher.shutdown(wait=True)
        os.close(self.fd)
