"""One contract for the checkpoint and backup calls, two hypervisors: the fake and libvirt + QEMU.

The crash tests of direct-backup, checkpoint and restore run on the fake;
these cases keep it honest: the same calls, the same outcomes (files, bytes,
extents, job lifecycle) and the same errors on both.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from workflows import nbdio
from workflows.errors import CheckpointInconsistent, CheckpointNotFound, OperationFailed

from .contractkit import MIB, contract_env


@pytest.fixture(params=["fake", "libvirt"])
def env(request, tmp_path):
    yield from contract_env(request, tmp_path, real_mib=8)


def wait_job_gone(env, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while env.hv.get_backup_job(env.name) is not None:
        assert time.time() < deadline, "the backup job did not end"
        time.sleep(0.05)


def read_chain(env, files: list[str]) -> bytes:
    out = str(env.dir / "chain.raw")
    nbdio.run_qemu_img("convert", "-O", "raw", nbdio.chain_spec(files), out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def test_checkpoints_create_list_delete(env):
    assert env.hv.list_checkpoints(env.name) == []
    a = env.hv.checkpoint_create(env.name, "dc-a", ["vda", "vdb"])
    b = env.hv.checkpoint_create(env.name, "dc-b", ["vda", "vdb"])
    assert (a.parent, b.parent) == (None, "dc-a") and sorted(b.disks) == ["vda", "vdb"]
    assert [c.name for c in env.hv.list_checkpoints(env.name)] == ["dc-a", "dc-b"]
    assert env.hv.lookup_checkpoint(env.name, "dc-b").xml == b.xml
    assert env.hv.lookup_checkpoint(env.name, "dc-none") is None
    with pytest.raises(OperationFailed, match="already exists"):
        env.hv.checkpoint_create(env.name, "dc-a", ["vda"])
    env.hv.checkpoint_delete(env.name, "dc-a")
    (only,) = env.hv.list_checkpoints(env.name)
    assert only.name == "dc-b" and only.parent is None  # the child is re-parented
    with pytest.raises(CheckpointNotFound):
        env.hv.checkpoint_delete(env.name, "dc-a")


def test_redefine_parents_first_and_validated(env):
    a = env.hv.checkpoint_create(env.name, "dc-a", ["vda", "vdb"])
    b = env.hv.checkpoint_create(env.name, "dc-b", ["vda", "vdb"])
    for cp in ("dc-b", "dc-a"):
        env.hv.checkpoint_delete(env.name, cp, metadata_only=True)  # libvirt forgets; the bitmaps stay
    assert env.hv.list_checkpoints(env.name) == []
    with pytest.raises(OperationFailed, match="parent dc-a"):
        env.hv.checkpoint_redefine(env.name, b.xml)  # a child before its parent
    env.hv.checkpoint_redefine(env.name, a.xml)
    env.hv.checkpoint_redefine(env.name, b.xml)
    env.hv.checkpoint_redefine(env.name, b.xml)  # again: the same definition, no error
    assert [(c.name, c.parent) for c in env.hv.list_checkpoints(env.name)] == [("dc-a", None), ("dc-b", "dc-a")]
    env.hv.checkpoint_delete(env.name, "dc-b", metadata_only=True)
    env.drop_bitmap("vdb", "dc-b")
    with pytest.raises(CheckpointInconsistent, match="missing or broken bitmap"):
        env.hv.checkpoint_redefine(env.name, b.xml)


def test_push_full_then_incremental_holds_only_the_changes(env):
    full = str(env.dir / "full-vda.qcow2")
    env.hv.backup_begin(env.name, mode="push", disks={"vda": full}, checkpoint="dc-1")
    assert env.hv.lookup_checkpoint(env.name, "dc-1").disks == ["vda"]
    wait_job_gone(env)
    done = env.hv.get_completed_backup(env.name)
    assert done.success and done.processed == done.total == 8 * MIB
    assert read_chain(env, [full]) == env.disk_bytes("vda")
    assert nbdio.image_info(full)["virtual-size"] == 8 * MIB

    env.write("vda", 0x5A, 5, 1)
    inc = str(env.dir / "inc-vda.qcow2")
    env.hv.backup_begin(env.name, mode="push", disks={"vda": inc}, checkpoint="dc-2", incremental="dc-1")
    assert env.hv.lookup_checkpoint(env.name, "dc-2").parent == "dc-1"
    wait_job_gone(env)
    done = env.hv.get_completed_backup(env.name)
    assert done.success and done.total == 1 * MIB
    assert nbdio.allocated_bytes(inc) == 1 * MIB  # only the changed clusters
    assert read_chain(env, [full, inc]) == env.disk_bytes("vda")


def test_a_disk_taken_whole_has_no_bitmap_and_is_copied_in_full_by_an_incremental(env):
    """``full``: the disk of a format without a bitmap (here a qcow2 standing in for it): checkpoint='no', and
    backupmode='full' in an incremental, push and pull."""
    fa, fb = str(env.dir / "full-vda.qcow2"), str(env.dir / "full-vdb.qcow2")
    env.hv.backup_begin(env.name, mode="push", disks={"vda": fa, "vdb": fb}, checkpoint="dc-1", full=["vdb"])
    assert env.hv.lookup_checkpoint(env.name, "dc-1").disks == ["vda"]
    wait_job_gone(env)
    assert env.hv.get_completed_backup(env.name).success
    env.write("vda", 0x5A, 5, 1)
    env.write("vdb", 0x5B, 6, 1)
    ia, ib = str(env.dir / "inc-vda.qcow2"), str(env.dir / "inc-vdb.qcow2")
    env.hv.backup_begin(env.name, mode="push", disks={"vda": ia, "vdb": ib}, checkpoint="dc-2", incremental="dc-1",
                        full=["vdb"])
    assert env.hv.lookup_checkpoint(env.name, "dc-2").disks == ["vda"]
    wait_job_gone(env)
    assert env.hv.get_completed_backup(env.name).success
    assert nbdio.allocated_bytes(ia) == 1 * MIB  # only the changed clusters
    assert read_chain(env, [fa, ia]) == env.disk_bytes("vda")
    assert read_chain(env, [ib]) == env.disk_bytes("vdb")  # whole: it stands alone

    env.write("vda", 0x6A, 1, 1)
    sock = str(env.dir / "pull.sock")
    scratch = {t: str(env.dir / f"{t}.scratch") for t in ("vda", "vdb")}
    env.hv.backup_begin(env.name, mode="pull", disks=scratch, checkpoint="dc-3", incremental="dc-2", socket=sock,
                        full=["vdb"])
    job = env.hv.get_backup_job(env.name)
    try:
        ea, eb = env.hv.open_backup_export(env.name, job, "vda"), env.hv.open_backup_export(env.name, job, "vdb")
        try:
            assert ea.extents(dirty=True) == [(1 * MIB, 1 * MIB)]
            assert eb.pread(1 * MIB, 6 * MIB) == b"\x5b" * MIB  # the whole disk is served
        finally:
            ea.close()
            eb.close()
    finally:
        env.hv.backup_abort(env.name)
        wait_job_gone(env)


def test_pull_incremental_serves_the_dirty_extents_until_ended(env):
    env.hv.checkpoint_create(env.name, "dc-1", ["vda", "vdb"])
    env.write("vdb", 0x3C, 2, 1)
    env.zero("vdb", 0, 1)  # zeroes over data: a change too
    scratch = str(env.dir / "vdb.scratch")
    sock = str(env.dir / "pull.sock")
    env.hv.backup_begin(env.name, mode="pull", disks={"vdb": scratch}, checkpoint="dc-2", incremental="dc-1",
                        socket=sock)
    job = env.hv.get_backup_job(env.name)
    assert job.mode == "pull" and job.incremental == "dc-1" and job.disks == {"vdb": scratch}
    assert job.socket == sock and job.mentions("pull.sock") and not job.mentions("nothing-like-it")
    export = env.hv.open_backup_export(env.name, job, "vdb")
    try:
        assert export.size == 8 * MIB
        assert export.extents(dirty=True) == [(0, 1 * MIB), (2 * MIB, 1 * MIB)]
        assert export.extents(dirty=False) == [(1 * MIB, 4 * MIB)]  # data, not the zeroed first MiB
        assert export.pread(4096, 2 * MIB) == b"\x3c" * 4096
        env.write("vdb", 0x77, 2, 1)  # the export keeps the point in time
        assert export.pread(4096, 2 * MIB) == b"\x3c" * 4096
    finally:
        export.close()
    env.hv.backup_abort(env.name)
    wait_job_gone(env)
    done = env.hv.get_completed_backup(env.name)
    assert not done.success and "cancel" in (done.error or "").lower()
    assert not os.path.exists(scratch)
    with pytest.raises(OperationFailed, match="no job"):
        env.hv.backup_abort(env.name)


def test_backup_begin_refusals(env):
    target = str(env.dir / "t.qcow2")
    with open(target, "w") as f:
        f.write("not ours")
    with pytest.raises(OperationFailed, match="exists"):
        env.hv.backup_begin(env.name, mode="push", disks={"vda": target}, checkpoint="dc-1")
    os.unlink(target)
    with pytest.raises(CheckpointNotFound):
        env.hv.backup_begin(env.name, mode="push", disks={"vda": target}, checkpoint="dc-1", incremental="dc-0")
    env.hv.checkpoint_create(env.name, "dc-0", ["vda", "vdb"])
    with pytest.raises(OperationFailed, match="already exists"):
        env.hv.backup_begin(env.name, mode="push", disks={"vda": target}, checkpoint="dc-0")
    env.drop_bitmap("vda", "dc-0")
    with pytest.raises(CheckpointInconsistent, match="missing or broken bitmap"):
        env.hv.backup_begin(env.name, mode="push", disks={"vda": target}, checkpoint="dc-1", incremental="dc-0")
    assert env.hv.get_backup_job(env.name) is None and not os.path.exists(target)
    assert [c.name for c in env.hv.list_checkpoints(env.name)] == ["dc-0"]  # nothing half-made


def test_restored_domain_define_and_undefine(env):
    name = f"{env.name}-restored"
    assert env.hv.lookup_domain_description(name) is None
    xml = env.hv.get_inactive_xml(env.name).replace(f"<name>{env.name}</name>",
                                                    f"<name>{name}</name><description>made here</description>")
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml)
    env.hv.define_restored_domain(xml)
    try:
        assert env.hv.lookup_domain_description(name) == "made here"
        assert env.hv.domain_state(name) == "shutoff"
        assert env.hv.get_disk_capacity(env.name, "vda") == 8 * MIB
    finally:
        env.hv.undefine_restored_domain(name)
    assert env.hv.lookup_domain_description(name) is None
