"""Backing chains as the image files themselves state them: for definitions libvirt has not probed.

A shut-off domain's XML may name only its top image; the layers below are in the qcow2 headers.  Before
a file of ours is deleted, every definition that could open it is followed down to its last layer.  The
files read here are named by domain definitions, so they are opened without blocking (a FIFO cannot hang
the reader), only regular files are read, and only the header's fixed fields and its backing name.
"""

from __future__ import annotations

import os
import stat
import struct

QCOW2_MAGIC = b"QFI\xfb"
MAX_DEPTH = 64
MAX_NAME = 1023  # qcow2's own limit on a backing file name


def backing_of(path: str) -> str | None:
    """The backing file named in a qcow2 image's header (absolute), or None: no backing, not qcow2,
    not a regular file, unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, 20, 0)
        if len(head) < 20 or head[:4] != QCOW2_MAGIC:
            return None
        offset, size = struct.unpack(">QI", head[8:20])
        if not offset or not size or size > MAX_NAME:
            return None
        raw = os.pread(fd, size, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    name = raw.decode("utf-8", errors="replace")
    if "\0" in name or ":" in name.split("/", 1)[0] and not name.startswith("/"):
        return None  # a protocol (nbd:, rbd:...) or a name no file can have: not a local layer
    return os.path.normpath(os.path.join(os.path.dirname(path), name))


def follow(path: str) -> list[str]:
    """``path`` and every layer below it, as the headers say (stops at a loop or MAX_DEPTH)."""
    out = [path]
    while len(out) < MAX_DEPTH:
        nxt = backing_of(out[-1])
        if nxt is None or nxt in out:
            break
        out.append(nxt)
    return out
