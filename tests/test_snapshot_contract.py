"""The snapshot calls, one contract for the in-memory fake and for real libvirt + QEMU.

The exhaustive crash tests (test_snapshot_fake.py) rely on the fake doing
what libvirt 9.0 does: keeping metadata, refusing a duplicate name, moving
disks onto overlays, merging an external snapshot back when it is deleted,
refusing that under an internal parent, refusing to revert to an external
snapshot.
"""

from __future__ import annotations

import os
import time

import pytest

from workflows.errors import HypervisorError, OperationFailed
from workflows.hypervisor.libvirt_snapshot import snapshot_xml

from .contractkit import contract_env

DESC = "domcapture workflow contract"


@pytest.fixture(params=["fake", "libvirt"])
def env(request, tmp_path):
    yield from contract_env(request, tmp_path)


def overlays_for(env, tag: str = "c") -> dict[str, str]:
    return {t: os.path.join(str(env.dir), f"domcapture-{tag}-{t}.snapshot.qcow2") for t in env.disks}


def sources(env) -> dict[str, str]:
    return {d.target: d.source for d in env.hv.disks(env.name)}


def commit_back(env, targets) -> None:
    for t in targets:
        env.hv.block_commit_active(env.name, t)
    for t in targets:
        deadline = time.time() + 30
        while True:
            d = {d.target: d for d in env.hv.disks(env.name)}[t]
            if d.mirror_job and d.mirror_ready:
                break
            assert time.time() < deadline, f"{t} never became ready"
            env.hv.block_job(env.name, t)
            time.sleep(0.05)
        env.hv.block_pivot(env.name, t)


def test_internal_snapshot_create_lookup_revert_delete(env):
    env.write("vda", 0x21, 2, 1)
    env.hv.create_snapshot(env.name, "c1", description=DESC, memory=True)
    info = env.hv.lookup_snapshot(env.name, "c1")
    assert info.name == "c1" and info.description == DESC and info.state == "running"
    assert info.memory == "internal" and info.memory_file is None and not info.external
    assert info.disks == {t: "internal" for t in env.disks} and info.overlays == {}
    assert info.base == env.disks and info.current and info.parent is None and info.children == 0
    assert env.hv.list_snapshot_names(env.name) == ["c1"]
    assert env.hv.get_current_snapshot(env.name) == "c1"
    assert env.hv.is_domain_busy(env.name) is False
    env.write("vda", 0x77, 2, 1)
    env.hv.revert_to_snapshot(env.name, "c1")
    assert env.hv.domain_state(env.name) == "running"
    assert env.original_has("vda", 0x21, 2, 1) and not env.original_has("vda", 0x77, 2, 1)
    env.hv.create_snapshot(env.name, "c2", description="", memory=True)
    assert env.hv.lookup_snapshot(env.name, "c2").parent == "c1"
    assert env.hv.lookup_snapshot(env.name, "c1").children == 1
    env.hv.delete_snapshot(env.name, "c1")
    assert env.hv.lookup_snapshot(env.name, "c1") is None
    assert env.hv.lookup_snapshot(env.name, "c2").parent is None
    env.hv.delete_snapshot(env.name, "c2")
    assert env.hv.list_snapshot_names(env.name) == [] and env.hv.get_current_snapshot(env.name) is None


def test_a_duplicate_name_and_a_missing_snapshot(env):
    env.hv.create_snapshot(env.name, "dup", description=DESC, memory=True)
    with pytest.raises(OperationFailed, match="already exists"):
        env.hv.create_snapshot(env.name, "dup", description=DESC, memory=True)
    assert env.hv.lookup_snapshot(env.name, "dup").description == DESC
    assert env.hv.lookup_snapshot(env.name, "nope") is None
    with pytest.raises(HypervisorError, match="no domain snapshot with matching name"):
        env.hv.revert_to_snapshot(env.name, "nope")
    with pytest.raises(HypervisorError, match="no domain snapshot with matching name"):
        env.hv.delete_snapshot(env.name, "nope")
    env.hv.delete_snapshot(env.name, "dup")


def test_a_running_domain_needs_memory_for_an_internal_snapshot(env):
    with pytest.raises(OperationFailed, match="must include the memory state"):
        env.hv.create_snapshot(env.name, "nomem", description=DESC, memory=False)
    assert env.hv.list_snapshot_names(env.name) == []


def test_external_disk_only_snapshot_and_its_delete_merges_back(env):
    ov = overlays_for(env)
    env.hv.create_snapshot(env.name, "e1", description=DESC, memory=False, overlays=ov)
    assert sources(env) == ov
    disks = {d.target: d for d in env.hv.disks(env.name)}
    assert all(disks[t].backing[:1] == [env.disks[t]] for t in env.disks)
    info = env.hv.lookup_snapshot(env.name, "e1")
    assert info.external and info.state == "disk-snapshot" and info.memory == "no"
    assert info.overlays == ov and info.base == env.disks and info.current
    env.write("vdb", 0x5C, 3, 1)  # lands on the overlay
    assert not env.original_has("vdb", 0x5C, 3, 1)
    with pytest.raises(OperationFailed, match="revert to external snapshot not supported"):
        env.hv.revert_to_snapshot(env.name, "e1")
    env.hv.delete_snapshot(env.name, "e1")
    assert sources(env) == env.disks
    assert env.hv.lookup_snapshot(env.name, "e1") is None
    assert not any(os.path.exists(p) for p in ov.values())
    assert env.original_has("vdb", 0x5C, 3, 1), "the overlay was not merged into the original"


def test_external_snapshot_of_some_disks_only(env):
    ov = {"vdb": overlays_for(env)["vdb"]}
    env.hv.create_snapshot(env.name, "e2", description=DESC, memory=False, overlays=ov)
    assert sources(env) == {"vda": env.disks["vda"], "vdb": ov["vdb"]}
    assert env.hv.lookup_snapshot(env.name, "e2").disks == {"vda": "no", "vdb": ov["vdb"]}
    env.hv.delete_snapshot(env.name, "e2")
    assert sources(env) == env.disks


def test_external_delete_under_an_internal_parent_is_refused_metadata_only_works(env):
    env.hv.create_snapshot(env.name, "parent", description="", memory=True)
    ov = overlays_for(env)
    env.hv.create_snapshot(env.name, "child", description=DESC, memory=False, overlays=ov)
    assert env.hv.lookup_snapshot(env.name, "child").parent == "parent"
    with pytest.raises(OperationFailed, match="internal snapshot as parent"):
        env.hv.delete_snapshot(env.name, "child")
    assert sources(env) == ov and env.hv.lookup_snapshot(env.name, "child") is not None
    env.hv.delete_snapshot(env.name, "child", metadata_only=True)
    assert env.hv.lookup_snapshot(env.name, "child") is None
    assert sources(env) == ov and all(os.path.exists(p) for p in ov.values())  # the metadata only
    assert env.hv.get_current_snapshot(env.name) == "parent"
    commit_back(env, list(env.disks))
    assert sources(env) == env.disks


def test_an_existing_overlay_file_is_refused_and_nothing_changes(env):
    ov = overlays_for(env)
    with open(ov["vdb"], "wb") as f:
        f.write(b"not ours to overwrite")
    with pytest.raises(OperationFailed, match="already exists"):
        env.hv.create_snapshot(env.name, "e3", description=DESC, memory=False, overlays=ov)
    assert sources(env) == env.disks and env.hv.lookup_snapshot(env.name, "e3") is None
    assert open(ov["vdb"], "rb").read() == b"not ours to overwrite"


def test_snapshot_xml_escapes_and_leaves_out_disks():
    xml = snapshot_xml("a&b", "it's <ours>", ["vda", "vdb"], memory=False, overlays={"vdb": "/x/o'v.qcow2"},
                       memory_file=None)
    assert "<name>a&amp;b</name>" in xml and "it&apos;s &lt;ours&gt;" in xml
    assert "<disk name='vda' snapshot='no'/>" in xml and "file='/x/o&apos;v.qcow2'" in xml
    assert "<memory snapshot='no'/>" in xml


def test_external_snapshot_with_memory_leaves_its_memory_file_on_delete(env):
    ov = overlays_for(env)
    mem = os.path.join(str(env.dir), "domcapture-c.memory")
    env.hv.create_snapshot(env.name, "m1", description=DESC, memory=True, overlays=ov, memory_file=mem)
    info = env.hv.lookup_snapshot(env.name, "m1")
    assert info.state == "running" and info.memory == "external" and info.memory_file == mem
    assert info.external and info.overlays == ov and os.path.getsize(mem) > 0
    assert env.hv.domain_state(env.name) == "running" and sources(env) == ov
    env.hv.delete_snapshot(env.name, "m1")
    assert sources(env) == env.disks and env.hv.lookup_snapshot(env.name, "m1") is None
    assert os.path.exists(mem), "libvirt 9.0 leaves the memory file: removing it is the caller's job"
