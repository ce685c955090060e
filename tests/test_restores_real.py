"""The restore kinds on the real guest: one disk to a file, a mounted backup, with real worker and
recovery processes and SIGKILLs mid-workflow.

One guest serves the module: a full backup, then (the guest held still) an
incremental one, and a copy of the data disk taken at that instant, the
reference every restored byte is compared with (``qemu-img compare``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from types import SimpleNamespace

import pytest

from .conftest import REDIS_URL
from .realenv import ENDED, COUNTER_LINE, GuestDomain, WorkerCluster, run
from pathlib import Path
from workflows.store import Store

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def w(libvirt_uri, guest_image, redis_client, tmp_path_factory):
    base = tmp_path_factory.mktemp("restores")
    guest = GuestDomain.create(libvirt_uri, base / "guest")
    prefix = f"dcr-{uuid.uuid4().hex[:8]}"
    cluster = WorkerCluster(REDIS_URL, libvirt_uri, prefix, base / "logs")
    cluster.start_recovery()
    target = base / "backups"
    target.mkdir()
    world = SimpleNamespace(guest=guest, cluster=cluster, target=target, base=base, uri=libvirt_uri,
                            store=Store(redis_client, prefix), defined=[])
    try:
        guest.wait_agent()
        time.sleep(1)  # the writer writes a few lines
        world.full = backup(world)
        guest.sh("dd if=/dev/urandom of=/mnt/vdb/blob bs=1M count=3 conv=fsync 2>/dev/null")
        world.line_before = guest.last_counter()  # a line the guest wrote before the incremental backup
        guest.virsh("suspend", guest.name)
        try:
            world.inc = backup(world, "--incremental", "--mode", "pull")
            # the guest's data disk at the instant of the incremental backup
            xml = guest.virsh("dumpxml", guest.name)
            alias = xml.split("<target dev='vdb'", 1)[1].split("<alias name='", 1)[1].split("'", 1)[0]
            guest.virsh("qemu-monitor-command", guest.name, "--hmp",
                        f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "flush"')
            world.reference = base / "vdb-at-backup.qcow2"
            run("qemu-img", "convert", "-U", "-O", "qcow2", str(guest.disks["vdb"]), str(world.reference))
        finally:
            guest.virsh("resume", guest.name)
        yield world
    finally:
        for folder in base.glob("mnt-*"):
            run("umount", str(folder), check=False)
        cluster.stop()
        for name in world.defined:
            run("virsh", "-c", libvirt_uri, "destroy", name, check=False)
            run("virsh", "-c", libvirt_uri, "undefine", name, check=False)
        guest.destroy()
        for key in redis_client.scan_iter(f"{prefix}:*"):
            redis_client.delete(key)


def fresh_worker(w, fault: str | None = None):
    for p in list(w.cluster.workers):
        w.cluster.kill(p)
        w.cluster.workers.remove(p)
    return w.cluster.start_worker(fault=fault)


def show(w, wf: str) -> dict:
    doc = w.store.load(wf).to_dict()
    doc["history"] = w.store.history(wf)
    return doc


def wait_final(w, wf: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while True:
        doc = show(w, wf)
        if doc["status"] in ENDED:
            return doc
        assert time.time() < deadline, f"timed out; workflow is {doc['status']}/{doc['state']}"
        time.sleep(0.1)


def submit(w, strategy: str, *args: str) -> str:
    out = w.cluster.cli("submit", strategy, "--domain", w.guest.name, "--json", *args)
    return json.loads(out.stdout)["id"]


def backup(w, *args: str) -> dict:
    fresh_worker(w)
    doc = wait_final(w, submit(w, "direct-backup", "--target", str(w.target), "--quiesce", "off", *args))
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    return doc


def run_killed(w, point: str, strategy: str, *args: str) -> dict:
    """Submit with a worker that SIGKILLs itself at ``point``; a second worker and recovery finish it."""
    doomed = fresh_worker(w, fault=f"kill-at:{point}")
    wf = submit(w, strategy, *args)
    while w.store.load(wf).status == "queued":
        time.sleep(0.05)
    w.cluster.start_worker()
    doomed.wait(timeout=120)
    assert doomed.returncode == -signal.SIGKILL
    doc = wait_final(w, wf)
    assert [e["decision"] for e in doc["history"] if e["event"] == "recovered"] == ["resume"]
    return doc


def same_bytes(a, b) -> subprocess.CompletedProcess:
    return run("qemu-img", "compare", "-U", str(a), str(b), check=False)


# -- restore --disk --to --------------------------------------------------------------------------------
def test_one_disk_of_an_incremental_flattened_to_a_file(w):
    fresh_worker(w)
    to = w.base / "one-disk" / "vdb-restored.qcow2"
    to.parent.mkdir()
    doc = wait_final(w, submit(w, "restore", "--from", w.inc["id"], "--disk", "vdb", "--to", str(to)))
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["result"]["files"]["vdb"]["path"] == str(to)
    assert sorted(doc["result"]["files"]) == ["vdb"]
    assert doc["result"]["chain"] == [w.full["id"], w.inc["id"]]
    same = same_bytes(to, w.reference)
    assert same.returncode == 0, same.stdout + same.stderr
    info = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain", str(to)).stdout)
    assert len(info) == 1 and "backing-filename" not in info[0]  # standalone: no reference to the backup
    assert sorted(p.name for p in to.parent.iterdir()) == ["vdb-restored.qcow2"]
    assert w.cluster.cli("verify", doc["id"]).returncode == 0


def test_one_disk_restore_killed_mid_write_resumes(w):
    to = w.base / "one-disk-killed.qcow2"
    doc = run_killed(w, "saved:restore-intent:restoring", "restore", "--from", w.inc["id"], "--disk", "vdb",
                     "--to", str(to))
    assert doc["status"] == "succeeded", doc["error"]
    same = same_bytes(to, w.reference)
    assert same.returncode == 0, same.stdout + same.stderr
    assert not (w.base / "one-disk-killed.qcow2.partial").exists()


def test_one_disk_restore_refuses_bad_input_and_rolls_back_to_nothing(w):
    taken = w.base / "taken.qcow2"
    taken.write_bytes(b"someone's file")
    for args, msg in ((["--disk", "vdx", "--to", str(w.base / "n.qcow2")], "--disk vdx"),
                      (["--to", str(w.base / "n.qcow2")], "--to needs --disk"),
                      (["--disk", "vdb", "--to", str(taken)], "already exists"),
                      (["--disk", "vdb", "--to", str(w.base / "no" / "n.qcow2")], "does not exist")):
        out = w.cluster.cli("submit", "restore", "--domain", w.guest.name, "--from", w.inc["id"], *args,
                            check=False)
        assert out.returncode == 2 and msg in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert taken.read_bytes() == b"someone's file"
    # killed once the image is written, then rolled back by the operator: the file is gone
    w.cluster.kill(w.cluster.recovery)
    try:
        to = w.base / "rolled-back.qcow2"
        doomed = fresh_worker(w, fault="kill-at:executed:restoring")
        wf = submit(w, "restore", "--from", w.inc["id"], "--disk", "vdb", "--to", str(to))
        doomed.wait(timeout=120)
        assert to.exists()
        time.sleep(2.5)  # the dead worker's lease expires
        w.cluster.cli("rollback", wf)
        w.cluster.start_worker()
        assert wait_final(w, wf)["status"] == "rolled_back"
        assert not to.exists() and not (w.base / "rolled-back.qcow2.partial").exists()
    finally:
        w.cluster.start_recovery()


def counter_lines(text: str) -> list[int]:
    return [int(m.group(1)) for m in map(COUNTER_LINE.match, text.splitlines()) if m]


# -- mount / umount -------------------------------------------------------------------------------------
def mount_pieces(wf: str) -> dict:
    """What exists on the host of a mount workflow's pieces."""
    from workflows import mounts, naming
    export = naming.mount_export(wf, "vdb")
    return {"loops": mounts.loops_of(export), "daemon": mounts.daemon_pid(naming.mount_pidfile(wf)),
            "exported": mounts.exported(export), "folder": os.path.exists(naming.mount_dir(wf))}


NOTHING: dict[str, object] = {"loops": [], "daemon": None, "exported": False, "folder": False}


def assert_backup_intact(w) -> None:
    for doc in (w.full, w.inc):
        assert w.cluster.cli("verify", doc["id"]).returncode == 0  # the backup's files were only read


def read_counter(folder) -> list[int]:
    numbers = counter_lines((folder / "counter.log").read_text())
    return numbers


def test_mount_shows_a_line_the_guest_wrote_before_the_backup_and_umount_takes_it_all_down(w):
    fresh_worker(w)
    folder = w.base / "mnt-plain"
    folder.mkdir()
    out = w.cluster.cli("mount", w.inc["id"], "--disk", "vdb", str(folder), "--json")
    doc = json.loads(out.stdout)
    assert doc["status"] == "succeeded"
    wf = doc["id"]
    fs = json.loads(run("findmnt", "-J", "--mountpoint", str(folder)).stdout)["filesystems"][0]
    assert fs["options"].split(",")[0] == "ro" and "nosuid" in fs["options"], fs
    numbers = read_counter(folder)
    assert w.line_before in numbers and numbers == list(range(1, len(numbers) + 1))
    assert (folder / "blob").stat().st_size == 3 * 1024 * 1024
    pieces = mount_pieces(wf)
    assert pieces["loops"] == [doc["result"]["loop"]] and pieces["daemon"] == doc["result"]["daemon_pid"]
    assert pieces["exported"] and pieces["folder"]
    # read-only: the mounted file system refuses writes
    assert run("touch", str(folder / "new-file"), check=False).returncode != 0
    # a second mount on the same folder is refused before anything is made
    again = w.cluster.cli("mount", w.inc["id"], "--disk", "vdb", str(folder), check=False)
    assert again.returncode == 2 and "already has a file system mounted" in again.stderr, again.stderr
    out = w.cluster.cli("umount", str(folder))
    assert "unmounted" in out.stdout
    assert not os.path.ismount(folder) and list(folder.iterdir()) == []
    assert mount_pieces(wf) == NOTHING
    assert_backup_intact(w)


def test_mount_and_umount_killed_mid_way_resume(w):
    folder = w.base / "mnt-killed"
    folder.mkdir()
    # killed with the storage daemon started but not recorded
    doc = run_killed(w, "executed:exporting", "mount", "--from", w.inc["id"], "--disk", "vdb",
                     "--mountpoint", str(folder))
    assert doc["status"] == "succeeded", doc["error"]
    assert w.line_before in read_counter(folder)
    assert len(mount_pieces(doc["id"])["loops"]) == 1  # the resumed step found the daemon, made one loop
    # killed with the mount point unmounted but the loop device still attached
    down = run_killed(w, "saved:detach-intent:detaching", "unmount", "--from", doc["id"])
    assert down["status"] == "succeeded", down["error"]
    assert not os.path.ismount(folder)
    assert mount_pieces(doc["id"]) == NOTHING
    assert_backup_intact(w)


def test_mount_killed_once_mounted_and_rolled_back_leaves_nothing(w):
    folder = w.base / "mnt-rolled-back"
    folder.mkdir()
    w.cluster.kill(w.cluster.recovery)
    try:
        doomed = fresh_worker(w, fault="kill-at:executed:mounting")
        wf = submit(w, "mount", "--from", w.inc["id"], "--disk", "vdb", "--mountpoint", str(folder))
        doomed.wait(timeout=120)
        assert os.path.ismount(folder)
        time.sleep(2.5)  # the dead worker's lease expires
        w.cluster.cli("rollback", wf)
        w.cluster.start_worker()
        assert wait_final(w, wf)["status"] == "rolled_back"
    finally:
        w.cluster.start_recovery()
    assert not os.path.ismount(folder)
    assert mount_pieces(wf) == NOTHING
    assert w.cluster.cli("umount", str(folder), check=False).returncode == 2


# -- instant restore ----------------------------------------------------------------------------------
def instant(w, tag: str) -> tuple[str, "Path"]:
    name = f"dctest-i{uuid.uuid4().hex[:7]}"
    w.defined.append(name)
    out = w.base / f"instant-{tag}"
    out.mkdir()
    return name, out


def assert_standalone(w, doc: dict) -> None:
    name = doc["result"]["defined"]
    files = doc["result"]["files"]
    assert sorted(files) == ["vda", "vdb"]
    for f in files.values():
        chain = json.loads(run("qemu-img", "info", "-U", "--output=json", "--backing-chain", f["path"]).stdout)
        assert len(chain) == 1 and "backing-filename" not in chain[0], chain
    xml = run("virsh", "-c", w.uri, "dumpxml", name).stdout
    assert str(w.target) not in xml  # no reference to the backup's files
    blk = run("virsh", "-c", w.uri, "domblklist", name).stdout
    assert all(f["path"] in blk for f in files.values())
    assert run("virsh", "-c", w.uri, "domjobinfo", name).stdout.count("None") >= 1
    new = GuestDomain(w.uri, name, w.base)
    new.wait_agent()
    assert w.line_before in counter_lines(new.sh("cat /mnt/vdb/counter.log"))
    assert_backup_intact(w)


def drop(w, name: str) -> None:
    run("virsh", "-c", w.uri, "destroy", name, check=False)
    run("virsh", "-c", w.uri, "undefine", name, check=False)


def test_instant_restore_runs_at_once_and_ends_on_standalone_images(w):
    fresh_worker(w)
    name, out = instant(w, "plain")
    wf = submit(w, "instant-restore", "--from", w.inc["id"], "--define", name, "--target", str(out))
    doc = wait_final(w, wf)
    assert doc["status"] == "succeeded", doc["error"]
    started = next(e for e in doc["history"] if e["event"] == "start-intent")["ts"]
    pulled = next(e for e in doc["history"] if e["event"] == "pull-started")["ts"]
    assert started <= pulled  # the guest ran before its data was streamed in
    assert_standalone(w, doc)
    drop(w, name)


def test_instant_restore_killed_mid_pull_resumes(w):
    name, out = instant(w, "killed")
    doc = run_killed(w, "saved:pull-started:pulling", "instant-restore", "--from", w.inc["id"], "--define", name,
                     "--target", str(out))
    assert doc["status"] == "succeeded", doc["error"]
    assert_standalone(w, doc)
    drop(w, name)


def test_instant_restore_whose_domain_died_mid_pull_starts_it_again_and_finishes(w):
    name, out = instant(w, "died")
    w.cluster.kill(w.cluster.recovery)
    try:
        doomed = fresh_worker(w, fault="kill-at:saved:pull-started:pulling")
        wf = submit(w, "instant-restore", "--from", w.inc["id"], "--define", name, "--target", str(out))
        doomed.wait(timeout=120)
        run("virsh", "-c", w.uri, "destroy", name)  # its QEMU gone with the pull, as after a crash
        w.cluster.start_worker()
    finally:
        w.cluster.start_recovery()
    doc = wait_final(w, wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert [e["event"] for e in doc["history"]].count("restart-intent") == 1
    assert_standalone(w, doc)
    drop(w, name)


def test_instant_restore_rolled_back_leaves_no_domain_and_no_file(w):
    name, out = instant(w, "rolled-back")
    w.cluster.kill(w.cluster.recovery)
    try:
        doomed = fresh_worker(w, fault="kill-at:saved:pull-started:pulling")
        wf = submit(w, "instant-restore", "--from", w.inc["id"], "--define", name, "--target", str(out))
        doomed.wait(timeout=120)
        assert run("virsh", "-c", w.uri, "domstate", name).stdout.strip() == "running"
        time.sleep(2.5)  # the dead worker's lease expires
        w.cluster.cli("rollback", wf)
        w.cluster.start_worker()
        doc = wait_final(w, wf)
        assert doc["status"] == "rolled_back", (doc["status"], doc["error"])
    finally:
        w.cluster.start_recovery()
    assert run("virsh", "-c", w.uri, "dominfo", name, check=False).returncode != 0
    assert list(out.iterdir()) == []
    assert_backup_intact(w)


def test_mount_and_umount_refuse_bad_input_with_one_line_and_no_workflow(w):
    empty = w.base / "mnt-bad-input"
    empty.mkdir()
    full = w.base / "mnt-not-empty"
    full.mkdir()
    (full / "x").write_text("x")
    before = len(list(w.store.ids()))
    for args, msg in ((["mount", "nothex", str(empty)], "is not a workflow id"),
                      (["mount", w.inc["id"], str(empty)], "choose one with --disk"),
                      (["mount", w.inc["id"], "--disk", "vdx", str(empty)], "--disk vdx"),
                      (["mount", w.inc["id"], "--disk", "vdb", str(full)], "is not empty"),
                      (["mount", w.inc["id"], "--disk", "vdb", str(w.base / "none")], "is not a folder"),
                      (["umount", str(empty)], "no mounted backup of ours"),
                      (["umount", w.inc["id"]], "not a mount")):
        out = w.cluster.cli(*args, check=False)
        assert out.returncode == 2 and msg in out.stderr, (args, out.returncode, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert len(list(w.store.ids())) == before
    assert not os.path.ismount(empty) and (full / "x").read_text() == "x"
