"""The data path's copies, killed mid-way and resumed from their durable cursor, give the same bytes.

Real files, a real SIGKILL of the copying process, real qemu-nbd and libnbd
for the pull copy.  No timing here: speed is measured in bench/bench_datapath.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workflows import filecopy, nbdio, qcow2
from workflows.errors import OperationFailed
from workflows.filecopy import copy_resumable

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def make_source(path: Path, mib: int) -> bytes:
    """A sparse file: random data, pattern data, holes, and a zero-filled but allocated stretch."""
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
        for i in range(0, mib, 4):
            f.seek(i * MIB)
            f.write(os.urandom(MIB) if i % 8 else bytes([0x5A]) * 2 * MIB)
        f.seek(mib // 2 * MIB)
        f.write(bytes(3 * MIB))  # written zeroes: data to SEEK_DATA, a hole in the copy
    return path.read_bytes()


def run_until_cursor(script: str, min_cursor: int, timeout: float = 60) -> int:
    """Run ``script`` (printing one durable cursor per line), SIGKILL it once a cursor >= ``min_cursor``
    is printed; returns the last cursor it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    last, deadline = 0, time.time() + timeout
    assert p.stdout is not None
    try:
        for line in p.stdout:
            last = int(line)
            if last >= min_cursor or time.time() > deadline:
                break
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        wait_group_gone(p.pid)
    return last


def wait_group_gone(pgid: int, timeout: float = 10) -> None:
    """Until no live process of group ``pgid`` is left (a killed copy's qemu-nbd, a grandchild, holds its
    image's lock until it has really exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                alive.append(stat.parent.name)
        if not alive:
            return
        time.sleep(0.02)
    raise AssertionError(f"processes {alive} of the killed group {pgid} are still alive")


COPY_CHILD = """
import sys
from workflows.filecopy import copy_resumable
copy_resumable({src!r}, {partial!r}, {final!r}, offset=0, on_progress=lambda p, t: None,
               on_durable=lambda pos: print(pos, flush=True), check=lambda: None,
               bandwidth=16 * 1024 * 1024, durable_interval=0.05)
"""


def test_a_killed_copy_resumes_from_its_cursor_to_identical_bytes(tmp_path: Path) -> None:
    src, partial, final = tmp_path / "src.img", tmp_path / "out.img.partial", tmp_path / "out.img"
    data = make_source(src, 48)
    cursor = run_until_cursor(COPY_CHILD.format(src=str(src), partial=str(partial), final=str(final)), 8 * MIB)
    assert 0 < cursor < len(data) and partial.exists() and not final.exists()
    assert partial.stat().st_mode & 0o777 == 0o600
    durable: list[int] = []
    checksum, size = copy_resumable(str(src), str(partial), str(final), offset=cursor,
                                    on_progress=lambda p, t: None, on_durable=durable.append,
                                    check=lambda: None)
    assert final.read_bytes() == data and size == len(data)
    assert checksum == hashlib.sha256(data).hexdigest()
    assert durable[-1] == len(data) and not partial.exists()
    assert final.stat().st_blocks * 512 < len(data)  # holes and zero chunks stayed holes


def test_a_copier_that_wakes_after_another_finished_its_file_leaves_the_backup_as_it_is(tmp_path: Path) -> None:
    """A copier stopped right after a passing lease check (SIGSTOP, a paused VM) wakes after another
    worker resumed the same partial file from the cursor and renamed it into place.  Before its next
    check fails it may still write the chunk it holds (the source's bytes, at their offset) and reach a
    durable point: that must never cut the finished file short."""
    src, partial, final = tmp_path / "src.img", tmp_path / "out.img.partial", tmp_path / "out.img"
    src.write_bytes(os.urandom(64 * MIB))
    durable: list[int] = []
    paused, resume, lease_lost = threading.Event(), threading.Event(), threading.Event()

    def zombie_check() -> None:
        if lease_lost.is_set():
            raise OperationFailed("lease lost")
        if len(durable) >= 2 and not paused.is_set():  # passes, then the process "stops" for a while
            paused.set()
            resume.wait(timeout=60)
            time.sleep(1.5)  # longer than the cadence's longest interval

    def zombie_durable(pos: int) -> None:  # a worker records its cursor with a fenced save
        if lease_lost.is_set():
            raise OperationFailed("lease lost")
        durable.append(pos)
    errors: list[BaseException] = []

    def zombie() -> None:
        try:
            copy_resumable(str(src), str(partial), str(final), offset=0, on_progress=lambda p, t: None,
                           on_durable=zombie_durable, check=zombie_check, durable_interval=0, check_interval=0)
        except BaseException as exc:  # noqa: BLE001 - the fenced-out end is the expected one
            errors.append(exc)
    t = threading.Thread(target=zombie)
    t.start()
    assert paused.wait(timeout=60)
    cursor = durable[-1]
    assert 0 < cursor < 64 * MIB
    # the next owner resumes the same partial file from the durable cursor and finishes it
    copy_resumable(str(src), str(partial), str(final), offset=cursor, on_progress=lambda p, t: None,
                   on_durable=lambda p: None, check=lambda: None)
    finished = final.read_bytes()
    assert finished == src.read_bytes()
    lease_lost.set()
    resume.set()  # the stopped copier wakes
    t.join(timeout=60)
    assert not t.is_alive() and errors and "lease lost" in str(errors[0])
    assert final.read_bytes() == finished and not partial.exists()


def test_a_leftover_partial_is_replaced_and_a_symlink_is_never_followed(tmp_path: Path) -> None:
    src, partial, final = tmp_path / "src.img", tmp_path / "out.partial", tmp_path / "out.img"
    data = make_source(src, 8)
    partial.write_bytes(b"left by an earlier attempt" * 1000)
    copy_resumable(str(src), str(partial), str(final), offset=0, on_progress=lambda p, t: None,
                   on_durable=lambda p: None, check=lambda: None)
    assert final.read_bytes() == data

    victim = tmp_path / "victim"
    victim.write_bytes(b"not ours")
    os.symlink(victim, partial)
    for offset in (0, MIB):
        with pytest.raises((OperationFailed, OSError)):
            copy_resumable(str(src), str(partial), str(tmp_path / "other.img"), offset=offset,
                           on_progress=lambda p, t: None, on_durable=lambda p: None, check=lambda: None)
    assert victim.read_bytes() == b"not ours" and partial.is_symlink()
    assert not (tmp_path / "other.img").exists()


PULL_CHILD = """
import time
from workflows import nbdio, qcow2
nbdio.REQUEST, nbdio.IN_FLIGHT, nbdio.DURABLE_INTERVAL = 256 * 1024, 2, 0.05
export = nbdio.NbdExport({sock!r}, "vda")
writer = nbdio.QcowWriter({partial!r}, export.size, compress={compress!r})
nbdio.copy_extents(export, export.extents(False), writer, start=0, stats={{}}, check=lambda: None,
                   on_progress=lambda d: time.sleep(0.01), on_durable=lambda pos, st: print(pos, flush=True),
                   zero_writes=False)
"""


@pytest.fixture
def served_image(tmp_path: Path):
    """A qcow2 image served read-only by qemu-nbd, several connections allowed (multi-conn)."""
    raw = tmp_path / "src.raw"
    make_source(raw, 48)
    img = tmp_path / "src.qcow2"
    nbdio.run_qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    sock = tmp_path / "src.sock"
    server = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "8", "-x", "vda", "-f", "qcow2", "-k", str(sock),
                               str(img)])
    deadline = time.time() + 20
    while not sock.exists():
        assert time.time() < deadline and server.poll() is None, "qemu-nbd did not start"
        time.sleep(0.05)
    yield img, str(sock)
    server.kill()
    server.wait(timeout=10)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_a_killed_pull_resumes_from_its_cursor_to_identical_data(tmp_path: Path, served_image, compress) -> None:
    """Compressed too: qcow2 refuses a compressed cluster over an allocated one, so what the killed
    copy wrote past its cursor is unallocated before the copy goes on."""
    img, sock = served_image
    partial = tmp_path / "backup.qcow2.partial"
    cursor = run_until_cursor(PULL_CHILD.format(sock=sock, partial=str(partial), compress=compress), 4 * MIB)
    export = nbdio.NbdExport(sock, "vda")
    try:
        assert len(export.connections(nbdio.CONNECTIONS)) > 1  # the export advertises multi-conn: used
        extents = export.extents(False)
        assert 0 < cursor < extents[-1][0] + extents[-1][1]
        writer = nbdio.QcowWriter(str(partial), compress=compress)  # the partial file as the killed copy left it
        try:
            durable: list[int] = []
            stats = nbdio.copy_extents(export, extents, writer, start=cursor, stats={}, check=lambda: None,
                                       on_progress=lambda d: None, on_durable=lambda p, s: durable.append(p),
                                       zero_writes=False)
        finally:
            writer.close()
    finally:
        export.close()
    assert stats["read"] == sum(max(0, off + n - max(off, cursor)) for off, n in extents)
    nbdio.check_image(str(partial))
    out = subprocess.run(["qemu-img", "compare", "-U", str(img), str(partial)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    info = nbdio.image_info(str(partial))["format-specific"]["data"]
    if compress:  # zstd clusters: the 2 MiB runs of one byte shrink to almost nothing, random data stays
        assert info["compression-type"] == "zstd"
        assert partial.stat().st_blocks * 512 < os.stat(img).st_blocks * 512 * 0.6
    else:
        assert partial.stat().st_blocks * 512 >= os.stat(img).st_blocks * 512 * 0.9


PULL_LAID_OUT_CHILD = """
import time
from workflows import nbdio, qcow2
nbdio.REQUEST, nbdio.IN_FLIGHT, nbdio.DURABLE_INTERVAL = 256 * 1024, 2, 0.05
export = nbdio.NbdExport({sock!r}, "vda")
layout = qcow2.Layout(export.size, qcow2.widen(export.extents(False), export.size), {backing!r})
open({partial!r}, "x").close()
out = qcow2.LaidOutFile({partial!r}, layout, fresh=True)
nbdio.copy_laid_out(export, out, start=0, stats={{}}, check=lambda: None,
                    on_progress=lambda d: time.sleep(0.01), on_durable=lambda pos, st: print(pos, flush=True))
"""


def test_a_killed_pull_of_our_own_layout_resumes_to_identical_data_and_a_true_checksum(
        tmp_path: Path, served_image) -> None:
    """The file is written by our layout (no qemu-nbd) and hashed on the way: after a SIGKILL and a resume
    from the durable cursor, the checksum it reports is the sha256 of the file's bytes on disk, the file
    passes qemu-img check and holds the disk.  Its header names a backing file from the start."""
    img, sock = served_image
    partial = tmp_path / "backup.qcow2.partial"
    cursor = run_until_cursor(PULL_LAID_OUT_CHILD.format(sock=sock, partial=str(partial), backing=None), 4 * MIB)
    export = nbdio.NbdExport(sock, "vda")
    try:
        layout = qcow2.Layout(export.size, qcow2.widen(export.extents(False), export.size))
        assert 0 < cursor < layout.extents[-1][0] + layout.extents[-1][1]
        out = qcow2.LaidOutFile(str(partial), layout, fresh=False)
        try:
            out.resume_at(cursor)
            stats = nbdio.copy_laid_out(export, out, start=cursor, stats={}, check=lambda: None,
                                        on_progress=lambda d: None, on_durable=lambda p, s: None)
            checksum = out.finish()
        finally:
            out.close()
    finally:
        export.close()
    assert stats["read"] == sum(max(0, off + n - max(off, cursor)) for off, n in layout.extents)
    assert checksum == "sha256:" + hashlib.sha256(partial.read_bytes()).hexdigest()
    assert os.path.getsize(partial) == layout.file_size
    nbdio.check_image(str(partial))
    out_cmp = subprocess.run(["qemu-img", "compare", "-U", str(img), str(partial)], capture_output=True, text=True)
    assert out_cmp.returncode == 0, out_cmp.stdout + out_cmp.stderr
    assert nbdio.allocated_bytes(str(partial)) == sum(n for _, n in layout.extents)  # every extent, no more


def test_our_layout_names_its_backing_and_refuses_a_file_that_is_not_its_own(tmp_path: Path,
                                                                               served_image) -> None:
    img, sock = served_image
    partial = tmp_path / "inc.qcow2.partial"
    run_until_cursor(PULL_LAID_OUT_CHILD.format(sock=sock, partial=str(partial), backing="../base/vda.qcow2"),
                     1 << 62, timeout=60)  # runs to the end
    info = nbdio.image_info(str(partial))
    assert info["backing-filename"] == "../base/vda.qcow2" and info["backing-filename-format"] == "qcow2"
    export = nbdio.NbdExport(sock, "vda")
    try:
        layout = qcow2.Layout(export.size, qcow2.widen(export.extents(False), export.size), "../base/vda.qcow2")
        other = qcow2.Layout(export.size, layout.extents[1:], "../base/vda.qcow2")  # another extent list
    finally:
        export.close()
    qcow2.LaidOutFile(str(partial), layout, fresh=False).close()  # its own: accepted
    with pytest.raises(OperationFailed, match="not its layout's|not the size"):
        qcow2.LaidOutFile(str(partial), other, fresh=False)
    with open(partial, "r+b") as f:  # one byte of its L1 table changed
        f.seek(layout.l1_offset + 7)
        f.write(b"\xff")
    with pytest.raises(OperationFailed, match="not its layout's"):
        qcow2.LaidOutFile(str(partial), layout, fresh=False)


@pytest.mark.parametrize("size, extents", [
    (1 << 30, []),  # an incremental with nothing changed: tables only
    (10 * MIB + 512, [(10 * MIB, 512)]),  # a disk that ends inside a cluster, its last bytes changed
    (5 << 40, [(0, MIB), ((5 << 40) - 65536, 65536), (3 << 39, 3 * 65536 + 1)]),  # 5 TiB: L1 of 2 clusters
], ids=["empty", "partial-last-cluster", "5TiB"])
def test_our_layout_is_a_qcow2_that_qemu_reads_as_written(tmp_path: Path, size: int,
                                                          extents: list[tuple[int, int]]) -> None:
    """Written without any copy loop: qemu-img check is clean, qemu-img map shows exactly the stored
    clusters as data, each reads back its bytes, and the checksum is the file's sha256."""
    path = tmp_path / "img.qcow2"
    path.touch()
    layout = qcow2.Layout(size, qcow2.widen(extents, size))
    written: dict[int, bytes] = {}
    out = qcow2.LaidOutFile(str(path), layout, fresh=True)
    try:
        for off, length in layout.extents:
            data = os.urandom(length)
            written[off] = data
            out.pwrite(data, off)
            out.feed(data)
            out.feed(bytes(-length % qcow2.CLUSTER))
        checksum = out.finish()
    finally:
        out.close()
    assert checksum == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.path.getsize(path) == layout.file_size
    nbdio.check_image(str(path))
    assert nbdio.image_info(str(path))["virtual-size"] == size
    mapped = [(e["start"], e["length"]) for e in json.loads(nbdio.run_qemu_img(
        "map", "--output=json", "-f", "qcow2", str(path))) if e["data"]]
    assert nbdio.merge(mapped) == layout.extents
    export = nbdio.ImageExport(str(path))  # a private read-only qemu-nbd on the file
    try:
        for off, data in written.items():
            assert export.pread(len(data), off) == data
    finally:
        export.close()


def test_the_bandwidth_limit_counts_bytes_read_and_never_waits_after_the_last_read(tmp_path: Path) -> None:
    """Paced on a clock that moves only when the copy sleeps: the time it waited is the bytes it read
    before its last read divided by the limit; holes (whole chunks or inside one) are not read."""
    src, partial, final = tmp_path / "src.img", tmp_path / "out.img.partial", tmp_path / "out.img"
    with open(src, "wb") as f:
        f.truncate(40 * MIB)
        for at, mib in ((0, 1), (9, 1), (20, 2), (33, 1)):  # 8 MiB chunks: 1, 1, 2, a hole, 1 MiB of data
            f.seek(at * MIB)
            f.write(os.urandom(mib * MIB))
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    checksum, size = copy_resumable(str(src), str(partial), str(final), offset=0, on_progress=lambda p, t: None,
                                    on_durable=lambda pos: None, check=lambda: None, bandwidth=MIB,
                                    sleep=sleep, clock=lambda: now[0])
    assert checksum == hashlib.sha256(src.read_bytes()).hexdigest() and size == 40 * MIB
    assert final.read_bytes() == src.read_bytes()
    # 5 MiB read at 1 MiB/s, in reads of at most 0.1 s each, the wait before each one: none after the last
    assert 4.9 <= now[0] < 5.0
    assert max(sleeps) <= 0.1 + 1e-9  # short sleeps: an abort is not held up


def _zero_refcount_of_a_data_cluster(img: Path) -> int:
    """What a host crash can leave behind a writer without ordering flushes: a cluster the L2 table
    references whose refcount never reached the disk.  Returns that cluster's offset in the file."""
    import json
    import struct
    raw = img.read_bytes()
    cluster_bits = struct.unpack(">I", raw[20:24])[0]
    refcount_table = struct.unpack(">Q", raw[48:56])[0]
    refcount_order = struct.unpack(">I", raw[96:100])[0]
    assert refcount_order == 4  # 16-bit refcounts
    block = struct.unpack(">Q", raw[refcount_table:refcount_table + 8])[0]
    mapped = json.loads(subprocess.run(["qemu-img", "map", "-U", "--output=json", str(img)], check=True,
                                       capture_output=True, text=True).stdout)
    data = next(e["offset"] for e in mapped if e.get("data") and "offset" in e)
    entry = block + 2 * (data >> cluster_bits)
    assert struct.unpack(">H", raw[entry:entry + 2])[0] == 1
    with open(img, "r+b") as f:
        f.seek(entry)
        f.write(b"\0\0")
    return int(data)


def test_a_resumed_pull_first_repairs_refcounts_a_host_crash_left_behind(tmp_path: Path, served_image) -> None:
    img, sock = served_image
    partial = tmp_path / "backup.qcow2.partial"
    cursor = run_until_cursor(PULL_CHILD.format(sock=sock, partial=str(partial), compress=False), 4 * MIB)
    _zero_refcount_of_a_data_cluster(partial)
    broken = subprocess.run(["qemu-img", "check", str(partial)], capture_output=True, text=True)
    assert broken.returncode == 2 and "refcount=0 reference=1" in broken.stderr, broken.stderr
    export = nbdio.NbdExport(sock, "vda")
    try:
        writer = nbdio.QcowWriter(str(partial))  # repairs first
        try:
            nbdio.copy_extents(export, export.extents(False), writer, start=cursor, stats={}, check=lambda: None,
                               on_progress=lambda d: None, on_durable=lambda p, s: None, zero_writes=False)
        finally:
            writer.close()
    finally:
        export.close()
    assert subprocess.run(["qemu-img", "check", "-q", str(partial)]).returncode == 0
    out = subprocess.run(["qemu-img", "compare", "-U", str(img), str(partial)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("size", [0, 1, filecopy.CHUNK - 1, filecopy.CHUNK, filecopy.CHUNK + 1,
                                  3 * filecopy.CHUNK + 17])
def test_the_file_hash_is_the_sha256_of_the_bytes_whatever_the_size(tmp_path: Path, size: int) -> None:
    # small files take one read, large ones the read-ahead thread: both give sha256sum's answer,
    # for the whole file and for a prefix
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    assert filecopy.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
    assert filecopy.sha256_file(str(path), limit=size // 2) == hashlib.sha256(data[:size // 2]).hexdigest()
    assert subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()[0] == hashlib.sha256(data).hexdigest()
