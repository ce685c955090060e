"""Hostile backup folders and operator-named paths, on real worker processes, Redis, libvirtd and QEMU.

A backup folder is untrusted input every time it is used.  One direct
backup chain (a full and an incremental of a no-OS QEMU domain) is made per
module; each case copies its folders (and clones their records in Redis) into
a folder of its own and then makes it hostile: a FIFO, a device or a symlink
out of the folder where a file was, a disk or ``domain.xml`` swapped after
submit, a qcow2 header naming an outside backing or data file.  Each case
asserts the outcome (exit 2 and one line at submit, or the workflow rolled
back naming the file, nothing defined), that nothing outside the folder was
read (an outside file's atime, set to an old value, is unchanged) or written
(sha256 unchanged), and that no process hangs (every command has a deadline).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from workflows.record import new_id
from workflows.store import Store

from .conftest import REDIS_URL
from .realenv import DOMCAPTURE, ENDED, DiskDomain, WorkerCluster, run

pytestmark = pytest.mark.real

OLD_ATIME_NS = 1_000_000_000 * 1_000_000  # 2001: a read of the file moves it (relatime)


# -- the module's backups ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w(libvirt_uri, redis_client, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    dom = DiskDomain.create(libvirt_uri, base / "dom", sizes_mib={"vda": 16}, fill_mib=2)
    prefix = f"dchostile-{uuid.uuid4().hex[:8]}"
    cluster = WorkerCluster(REDIS_URL, libvirt_uri, prefix, base / "logs")
    target = base / "backups"
    target.mkdir()
    world = SimpleNamespace(dom=dom, cluster=cluster, target=target, base=base, uri=libvirt_uri,
                            store=Store(redis_client, prefix), redis=redis_client, prefix=prefix, n=0)
    try:
        cluster.start_worker()
        world.full = _backup(world)
        dom.guest_write("vda", 0x5A, 4, 1)
        world.inc = _backup(world, "--incremental")
        stop_workers(world)
        yield world
    finally:
        cluster.stop()
        for name in run("virsh", "-c", libvirt_uri, "list", "--all", "--name").stdout.split():
            if name.startswith("dchostile-"):
                run("virsh", "-c", libvirt_uri, "destroy", name, check=False)
                run("virsh", "-c", libvirt_uri, "undefine", name, "--nvram", check=False)
        dom.destroy()
        for key in redis_client.scan_iter(f"{prefix}:*"):
            redis_client.delete(key)


def _backup(w, *args: str) -> dict:
    out = w.cluster.cli("submit", "direct-backup", "--domain", w.dom.name, "--target", str(w.target),
                        "--quiesce", "off", "--json", *args)
    doc = wait_final(w, json.loads(out.stdout)["id"])
    assert doc["status"] == "succeeded", doc["error"]
    return doc


def stop_workers(w) -> None:
    for p in list(w.cluster.workers):
        w.cluster.kill(p)
        w.cluster.workers.remove(p)


def wait_final(w, wf: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        doc = w.store.load(wf).to_dict()
        if doc["status"] in ENDED:
            return doc
        assert time.time() < deadline, f"workflow {wf} is still {doc['status']}/{doc['state']}"
        time.sleep(0.1)


def cli(w, *args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    """The real CLI with a deadline: a hang fails the test instead of blocking it."""
    t0 = time.monotonic()
    out = subprocess.run([DOMCAPTURE, *args], env=w.cluster.env, capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - t0


def one_line(out: subprocess.CompletedProcess, *names: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


# -- a case: the chain copied into a folder of its own, its records cloned -------------------------------------
def case(w, which: tuple[str, ...] = ("full",)) -> SimpleNamespace:
    """Copies of the backups ``which`` (full, inc) in a new folder, with records of their own."""
    w.n += 1
    root = w.base / "cases" / f"{w.n:03d}"
    folder = root / "backups"
    folder.mkdir(parents=True)
    outside = root / "outside"
    outside.mkdir()
    docs = {name: getattr(w, name) for name in ("full", "inc")}
    ids = {docs[name]["id"]: new_id() for name in which}
    folders = {}
    for name in which:
        old = Path(docs[name]["result"]["manifest"]).parent
        shutil.copytree(old, folder / old.name)
        folders[name] = folder / old.name
    for name in which:
        old_id = docs[name]["id"]
        raw = json.dumps(Store(w.redis, w.prefix).load(old_id).to_dict())  # a finished record is kept compressed
        olds = {n: str(Path(docs[n]["result"]["manifest"]).parent) for n in ("full", "inc")}
        for i, n in enumerate(olds):  # the paths first: the folders keep their names (a header names them)
            raw = raw.replace(olds[n], f"\0{i}\0")
        for a, b in ids.items():
            raw = raw.replace(a, b)
        for i, n in enumerate(olds):
            raw = raw.replace(f"\0{i}\0", str(folder / Path(olds[n]).name))
        rec = json.loads(raw)
        rec["result"].pop("checkpoint", None)
        w.redis.hset(f"{w.prefix}:wf:{ids[old_id]}", mapping={"rev": 1, "data": json.dumps(rec)})
        w.redis.zadd(f"{w.prefix}:index", {ids[old_id]: rec["created_at"]})
    Store(w.redis, w.prefix).indexes.reindex()  # the clones join the views' indexes, as records written whole
    return SimpleNamespace(root=root, folder=folder, outside=outside, folders=folders,
                           ids={name: ids[docs[name]["id"]] for name in which}, sentinels=[])


def sentinel(c, path: Path, data: bytes) -> Path:
    """An outside file whose sha256 and atime must not change."""
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(OLD_ATIME_NS, st.st_mtime_ns))
    c.sentinels.append((path, hashlib.sha256(data).hexdigest()))
    return path


def untouched(c) -> None:
    for path, digest in c.sentinels:
        st = path.stat()
        assert st.st_atime_ns == OLD_ATIME_NS, f"{path} was read"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} was written"


def plant(c, path: Path, kind: str) -> None:
    """Put something hostile where a file of the folder was; a symlink points at an exact outside copy (so
    following it would pass every check)."""
    data = path.read_bytes()
    if kind == "folder-symlink":
        moved = c.outside / path.parent.name
        path.parent.rename(moved)
        path.parent.symlink_to(moved)
        for f in moved.iterdir():
            sentinel(c, f, f.read_bytes())
        return
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: a reader never ends
    elif kind == "symlink":
        path.symlink_to(sentinel(c, c.outside / path.name, data))
    elif kind == "dotdot":
        path.symlink_to(Path("..") / ".." / "outside" / path.name)
        sentinel(c, c.outside / path.name, data)
    else:
        raise AssertionError(kind)


def member(c, name: str, which: str = "full") -> Path:
    """A file of a case's backup folder: ``disk`` is the disk image."""
    folder = c.folders[which]
    return folder / ("vda.qcow2" if name == "disk" else name)


def defined() -> set[str]:
    """This module's domains (other tests on the host define their own)."""
    names = run("virsh", "-c", os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"), "list", "--all",
                "--name").stdout.split()
    return {n for n in names if n.startswith("dchostile-")}


def records(w) -> int:
    return int(w.redis.zcard(f"{w.prefix}:index"))


def argv(w, c, kind: str) -> list[str]:
    restore_target = c.root / "restored"
    restore_target.mkdir(exist_ok=True)
    name = f"dchostile-{c.root.name}"
    frm = c.ids.get("inc") or c.ids["full"]
    common = ["--domain", w.dom.name, "--from", frm]
    if kind == "restore":
        return ["submit", "restore", *common, "--target", str(restore_target)]
    if kind == "define":
        return ["submit", "restore", *common, "--target", str(restore_target), "--define", name]
    if kind == "instant":
        return ["submit", "instant-restore", *common, "--target", str(restore_target), "--define", name]
    if kind == "mount":
        mp = c.root / "mnt"
        mp.mkdir(exist_ok=True)
        return ["submit", "mount", *common, "--mountpoint", str(mp)]
    if kind == "verify":
        return ["verify", frm]
    raise AssertionError(kind)


# -- the checks themselves can fail ---------------------------------------------------------------------------
def test_a_read_moves_the_atime_here(w, tmp_path):
    """The atime sentinels can fail: on this file system a read of an old-atime file moves it."""
    c = SimpleNamespace(sentinels=[])
    p = sentinel(c, tmp_path / "probe", b"x")
    p.read_bytes()
    assert p.stat().st_atime_ns != OLD_ATIME_NS


def test_an_untouched_copy_verifies_and_restores(w):
    c = case(w, ("full", "inc"))
    out, _ = cli(w, "verify", c.ids["inc"])
    assert out.returncode == 0, out.stdout + out.stderr
    to = c.root / "vda.qcow2"
    out, _ = cli(w, "submit", "restore", "--domain", w.dom.name, "--from", c.ids["inc"], "--disk", "vda",
                 "--to", str(to), "--json")
    assert out.returncode == 0, out.stderr
    w.cluster.start_worker()
    try:
        doc = wait_final(w, json.loads(out.stdout)["id"])
    finally:
        stop_workers(w)
    assert doc["status"] == "succeeded", doc["error"]
    assert run("qemu-img", "compare", "-U", str(to), str(w.dom.disks["vda"]), check=False).returncode in (0, 1)
    assert json.loads(run("qemu-img", "info", "--output=json", str(to)).stdout).get("backing-filename") is None


# -- verify: a FIFO, a device or a symlink in the folder -----------------------------------------------------
@pytest.mark.parametrize("name", ["manifest.json", "domain.xml", "disk"])
@pytest.mark.parametrize("kind", ["fifo", "device", "symlink", "dotdot"])
def test_verify_refuses_a_file_that_is_not_a_regular_file(w, name, kind):
    c = case(w)
    path = member(c, name)
    plant(c, path, kind)
    out, took = cli(w, "verify", c.ids["full"])
    one_line(out, path.name)
    assert took < 5 if kind in ("fifo", "device") else True  # never blocks on a FIFO or a device
    untouched(c)


def test_verify_of_a_manifest_fifo_is_one_line_within_two_seconds(w):
    c = case(w)
    plant(c, member(c, "manifest.json"), "fifo")
    out, took = cli(w, "verify", c.ids["full"])
    one_line(out, "manifest.json", "FIFO")
    assert took < 2.0


def test_verify_refuses_a_symlinked_backup_folder(w):
    c = case(w)
    plant(c, member(c, "manifest.json"), "folder-symlink")
    out, _ = cli(w, "verify", c.ids["full"])
    one_line(out, "symlink")
    untouched(c)


# -- submit: every restore kind refuses a hostile folder, records nothing ------------------------------------
@pytest.mark.parametrize("kind", ["restore", "define", "instant", "mount"])
@pytest.mark.parametrize("name,how", [("manifest.json", "fifo"), ("manifest.json", "symlink"),
                                      ("domain.xml", "fifo"), ("domain.xml", "symlink"),
                                      ("disk", "fifo"), ("disk", "symlink"), ("disk", "device")])
def test_submit_refuses_a_hostile_file(w, kind, name, how):
    c = case(w)
    path = member(c, name)
    plant(c, path, how)
    before, names = records(w), defined()
    out, took = cli(w, *argv(w, c, kind))
    one_line(out, path.name)
    assert took < 10
    assert records(w) == before and defined() == names  # nothing recorded, nothing defined
    untouched(c)


@pytest.mark.parametrize("kind", ["restore", "instant", "mount"])
def test_submit_refuses_a_symlinked_folder(w, kind):
    c = case(w)
    plant(c, member(c, "manifest.json"), "folder-symlink")
    before = records(w)
    out, _ = cli(w, *argv(w, c, kind))
    one_line(out, "symlink")
    assert records(w) == before
    untouched(c)


# -- a qcow2 header naming a file outside the chain --------------------------------------------------------------
def reseal(w, c, path: Path) -> None:
    """Someone who can write the folder and Redis (no signing key here) makes the changed file match again:
    the manifest's line, the manifest's checksum and the record's file entry."""
    folder = path.parent
    mpath = folder / "manifest.json"
    doc = json.loads(mpath.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    size = path.stat().st_size
    for e in doc["contents"]:
        if e["name"] == path.name:
            e.update(sha256=digest, size=size)
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    mpath.write_bytes(data)
    wf = next(i for n, i in c.ids.items() if c.folders[n] == folder)
    key = f"{w.prefix}:wf:{wf}"
    rec = json.loads(w.redis.hget(key, "data"))
    rec["result"]["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    for info in rec["result"]["files"].values():
        if info["path"] == str(path):
            info.update(checksum=f"sha256:{digest}", size=size)
    w.redis.hset(key, "data", json.dumps(rec))


def hostile_header(w, c, path: Path, how: str) -> None:
    outside = sentinel(c, c.outside / "secret.qcow2", (w.dom.references["vda"]).read_bytes())
    if how == "backing-absolute":
        run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(outside), str(path))
    elif how == "backing-relative":
        run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", os.path.relpath(outside, path.parent), str(path))
    elif how == "backing-json":
        spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(outside)}})
        run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "json:" + spec, str(path))
    elif how == "data-file":
        data = c.outside / "data.raw"
        tmp = path.with_suffix(".tmp")
        run("qemu-img", "convert", "-O", "qcow2", "-o", f"data_file={data}", str(path), str(tmp))
        tmp.rename(path)
        sentinel(c, data, data.read_bytes())
    else:
        raise AssertionError(how)
    reseal(w, c, path)


HEADERS = ["backing-absolute", "backing-relative", "backing-json", "data-file"]


@pytest.mark.parametrize("kind", ["restore", "instant", "mount"])
@pytest.mark.parametrize("how", HEADERS)
def test_submit_refuses_a_header_naming_a_file_outside_the_chain(w, kind, how):
    c = case(w)
    path = member(c, "disk")
    hostile_header(w, c, path, how)
    before = records(w)
    out, _ = cli(w, *argv(w, c, kind))
    one_line(out, path.name)
    assert records(w) == before
    untouched(c)


# -- swapped after submit: the worker checks again right before use, and rolls back ------------------------------
QEMU_COMMANDLINE = ("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                    "<qemu:arg value='-no-reboot'/></qemu:commandline>")


def swap(c, path: Path, what: str) -> None:
    if what == "domain.xml":  # the hostile review's case: a qemu:commandline added after submit
        text = path.read_text()
        path.write_text(text.replace("</domain>", QEMU_COMMANDLINE + "</domain>"))
    else:  # the disk becomes a symlink to an exact copy outside
        plant(c, path, "symlink")


@pytest.mark.parametrize("kind", ["restore", "define", "instant", "mount"])
@pytest.mark.parametrize("what", ["domain.xml", "disk"])
def test_a_file_swapped_after_submit_is_refused_by_the_worker(w, kind, what):
    c = case(w)
    names = defined()
    out, _ = cli(w, *argv(w, c, kind), "--json")
    assert out.returncode == 0, out.stderr
    wf = json.loads(out.stdout)["id"]
    path = member(c, what)
    swap(c, path, what)
    w.cluster.start_worker()
    try:
        doc = wait_final(w, wf)
    finally:
        stop_workers(w)
    assert doc["status"] == "rolled_back", (doc["status"], doc["error"])
    assert path.name in json.dumps(doc["error"]), doc["error"]
    assert defined() == names  # nothing defined, nothing started
    restored = c.root / "restored"
    assert not restored.exists() or not any(restored.iterdir())
    if kind == "mount":
        assert run("findmnt", "--mountpoint", str(c.root / "mnt"), check=False).returncode != 0
    untouched(c)


def test_instant_restore_runs_on_pins_of_the_checked_files(w):
    """The success path: the new domain's backing chain is our pins (same inodes), never the folder's names;
    once its images stand alone the pins are gone and the backup still verifies."""
    c = case(w)
    name = f"dchostile-{c.root.name}"
    out, _ = cli(w, *argv(w, c, "instant"), "--json")
    assert out.returncode == 0, out.stderr
    w.cluster.start_worker()
    try:
        doc = wait_final(w, json.loads(out.stdout)["id"], timeout=120)
    finally:
        stop_workers(w)
    try:
        assert doc["status"] == "succeeded", doc["error"]
        xml = run("virsh", "-c", w.uri, "dumpxml", name).stdout
        assert str(c.folder) not in xml
        assert not list((c.root / "restored").rglob("backing.*"))
        assert cli(w, "verify", c.ids["full"])[0].returncode == 0
    finally:
        run("virsh", "-c", w.uri, "destroy", name, check=False)
        run("virsh", "-c", w.uri, "undefine", name, check=False)


# -- prune: every file checked before anything is rewritten --------------------------------------------------------
@pytest.mark.parametrize("how", ["inc-byte", "full-symlink", "full-fifo", "inc-backing-outside"])
def test_prune_checks_every_file_before_a_rewrite(w, how):
    c = case(w, ("full", "inc"))
    inc_disk, full_disk = member(c, "disk", "inc"), member(c, "disk", "full")
    if how == "inc-byte":
        with open(inc_disk, "r+b") as f:
            f.seek(inc_disk.stat().st_size - 1)
            last = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([last[0] ^ 0xFF]))
    elif how == "full-symlink":
        plant(c, full_disk, "symlink")
    elif how == "full-fifo":
        plant(c, full_disk, "fifo")
    else:
        hostile_header(w, c, inc_disk, "backing-absolute")
    inc_sha = hashlib.sha256(inc_disk.read_bytes()).hexdigest()
    out, _ = cli(w, "submit", "prune", "--domain", w.dom.name, "--keep-last", "1", "--target", str(c.folder),
                 "--json")
    assert out.returncode == 0, out.stderr
    w.cluster.start_worker()
    try:
        doc = wait_final(w, json.loads(out.stdout)["id"])
    finally:
        stop_workers(w)
    assert doc["status"] == "rolled_back", (doc["status"], doc["error"])
    named = full_disk.name if how.startswith("full") else inc_disk.name
    assert named in json.dumps(doc["error"])
    assert hashlib.sha256(inc_disk.read_bytes()).hexdigest() == inc_sha  # nothing rewritten
    assert not any(p.name.endswith(".partial") for p in c.folder.rglob("*"))
    for wf in c.ids.values():  # both backups still good
        assert (w.store.load(wf).data.get("retention") or {}).get("state", "good") == "good"
    untouched(c)


# -- operator-named paths: created, never resolved then written ------------------------------------------------------
def to_case(w, how: str) -> tuple[SimpleNamespace, Path, str]:
    c = case(w)
    folder = c.root / "out"
    folder.mkdir()
    to = folder / "vda.qcow2"
    msg = "already exists"
    if how == "dangling-symlink":
        to.symlink_to(c.outside / "created-through-link")
    elif how == "symlink-to-file":
        to.symlink_to(sentinel(c, c.outside / "victim", b"someone's file"))
    elif how == "partial-symlink":
        Path(str(to) + ".partial").symlink_to(c.outside / "created-through-link")
    elif how == "world-writable-folder":
        folder.chmod(0o777)
        msg = "without the sticky bit"
    elif how == "foreign-folder":
        os.chown(folder, 65534, 65534)
        msg = "owned by uid 65534"
    elif how == "dotdot":
        to = folder / ".." / "out" / "vda.qcow2"
        msg = "'..'"
    elif how == "folder-missing":
        to = folder / "nope" / "vda.qcow2"
        msg = "does not exist"
    else:
        raise AssertionError(how)
    return c, to, msg


@pytest.mark.parametrize("how", ["dangling-symlink", "symlink-to-file", "partial-symlink", "world-writable-folder",
                                 "foreign-folder", "dotdot", "folder-missing"])
def test_restore_to_refuses_a_path_it_would_have_to_follow(w, how):
    c, to, msg = to_case(w, how)
    before = records(w)
    out, _ = cli(w, "submit", "restore", "--domain", w.dom.name, "--from", c.ids["full"], "--disk", "vda",
                 "--to", str(to))
    one_line(out, msg)
    assert records(w) == before
    assert not (c.outside / "created-through-link").exists()
    untouched(c)


def test_restore_to_a_symlink_planted_after_submit_in_a_sticky_folder_writes_nothing_through_it(w):
    c = case(w)
    folder = c.root / "shared"
    folder.mkdir()
    folder.chmod(0o1777)  # like /tmp: accepted
    to = folder / "vda.qcow2"
    out, _ = cli(w, "submit", "restore", "--domain", w.dom.name, "--from", c.ids["full"], "--disk", "vda",
                 "--to", str(to), "--json")
    assert out.returncode == 0, out.stderr
    to.symlink_to(c.outside / "created-through-link")  # another user's dangling link, after submit
    os.lchown(to, 65534, 65534)
    w.cluster.start_worker()
    try:
        doc = wait_final(w, json.loads(out.stdout)["id"])
    finally:
        stop_workers(w)
    assert doc["status"] == "rolled_back", (doc["status"], doc["error"])
    assert "vda.qcow2" in json.dumps(doc["error"])
    assert not (c.outside / "created-through-link").exists()
    assert to.is_symlink() and os.lstat(to).st_uid == 65534  # their link is left as it was
    assert not Path(str(to) + ".partial").exists()


@pytest.mark.parametrize("how", ["symlink", "world-writable-parent", "fifo", "not-empty"])
def test_mount_refuses_a_mountpoint_it_would_have_to_follow(w, how):
    c = case(w)
    parent = c.root / "mnts"
    parent.mkdir()
    mp = parent / "mnt"
    msg = "mount point"
    if how == "symlink":
        real = c.outside / "elsewhere"
        real.mkdir()
        mp.symlink_to(real)
        msg = "symlink"
    elif how == "world-writable-parent":
        mp.mkdir()
        parent.chmod(0o777)
        msg = "without the sticky bit"
    elif how == "fifo":
        os.mkfifo(mp)
        msg = "FIFO"
    else:
        mp.mkdir()
        sentinel(c, mp / "x", b"x")
        msg = "not empty"
    before = records(w)
    out, took = cli(w, "submit", "mount", "--domain", w.dom.name, "--from", c.ids["full"], "--mountpoint", str(mp))
    one_line(out, msg)
    assert took < 10 and records(w) == before
    assert run("findmnt", "--mountpoint", str(mp), check=False).returncode != 0
    untouched(c)
