"""One contract, two hypervisors: the in-memory fake and real libvirt + QEMU.

Every case runs against both, so the fake that the exhaustive crash tests
rely on cannot drift from what libvirt really does.
"""

from __future__ import annotations

import os
import time

import pytest

from workflows.errors import AgentUnavailable, DomainNotFound, OperationFailed

from .contractkit import contract_env


@pytest.fixture(params=["fake", "libvirt"])
def env(request, tmp_path):
    yield from contract_env(request, tmp_path)


def overlays_for(env) -> dict[str, str]:
    return {t: os.path.join(str(env.dir), f"domcapture-contract-{t}.overlay.qcow2") for t in env.disks}


def wait_ready(env, target: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        disk = {d.target: d for d in env.hv.disks(env.name)}[target]
        if disk.mirror_job and disk.mirror_ready:
            return
        env.hv.block_job(env.name, target)
        time.sleep(0.05)
    raise AssertionError(f"{target} never became ready")


def test_disks_lists_file_disks(env):
    disks = {d.target: d for d in env.hv.disks(env.name)}
    assert set(disks) == set(env.disks)
    for t, d in disks.items():
        assert d.source == env.disks[t] and d.type == "file" and d.device == "disk"
        assert d.backing == [] and d.mirror_job is None
    assert env.hv.domain_state(env.name) == "running"


def test_disks_report_read_only_and_shareable(env):
    """What disk selection reads: a read-only and a shareable disk of a running domain."""
    extra = {"vdx": str(env.dir / "contract-ro.img"), "vdy": str(env.dir / "contract-shared.img")}
    for path in extra.values():
        with open(path, "wb") as f:
            f.truncate(1024 * 1024)
    if hasattr(env.hv, "add_disk"):
        env.hv.add_disk(env.name, "vdx", extra["vdx"], readonly=True, fmt="raw")
        env.hv.add_disk(env.name, "vdy", extra["vdy"], shareable=True, fmt="raw")
    else:  # this machine type has no PCI hotplug: attach to the definition, then start again
        env.dom.virsh("destroy", env.name)
        for target, mode in (("vdx", "readonly"), ("vdy", "shareable")):
            env.dom.virsh("attach-disk", env.name, extra[target], target, "--driver", "qemu", "--subdriver",
                          "raw", "--mode", mode, "--config")
        env.dom.virsh("start", env.name)
    disks = {d.target: d for d in env.hv.disks(env.name)}
    assert (disks["vdx"].readonly, disks["vdx"].shareable) == (True, False)
    assert (disks["vdy"].readonly, disks["vdy"].shareable) == (False, True)
    assert all(not d.readonly and not d.shareable for t, d in disks.items() if t in env.disks)
    assert disks["vdx"].source == extra["vdx"] and disks["vdx"].device == "disk"


def test_unknown_domain(env):
    with pytest.raises(DomainNotFound):
        env.hv.disks("dctest-no-such-domain")
    with pytest.raises(DomainNotFound):
        env.hv.snapshot_disk_only("dctest-no-such-domain", {"vda": "/tmp/x"})


def test_freeze_without_agent(env):
    with pytest.raises(AgentUnavailable):
        env.hv.fs_freeze(env.name)
    with pytest.raises(AgentUnavailable):
        env.hv.fs_thaw(env.name)


def test_snapshot_commit_pivot_round_trip(env):
    ov = overlays_for(env)
    env.hv.snapshot_disk_only(env.name, ov)
    disks = {d.target: d for d in env.hv.disks(env.name)}
    for t in env.disks:
        assert disks[t].source == ov[t]
        assert disks[t].backing[:1] == [env.disks[t]]
        assert os.path.exists(ov[t])
    assert env.hv.block_job(env.name, "vda") is None
    env.write("vda", 0x77, 1, 1)  # lands on the overlay
    assert not env.original_has("vda", 0x77, 1, 1)
    for t in env.disks:
        env.hv.block_commit_active(env.name, t)
        job = env.hv.block_job(env.name, t)
        assert job is not None and job.type == "active-commit"
    for t in env.disks:
        wait_ready(env, t)
        env.hv.block_pivot(env.name, t)
    disks = {d.target: d for d in env.hv.disks(env.name)}
    for t in env.disks:
        assert disks[t].source == env.disks[t] and disks[t].backing == [] and disks[t].mirror_job is None
        assert env.hv.block_job(env.name, t) is None
    assert env.original_has("vda", 0x77, 1, 1)


def test_snapshot_refuses_an_existing_overlay_file_and_changes_nothing(env):
    ov = overlays_for(env)
    with open(ov["vdb"], "wb") as f:
        f.write(b"not ours to overwrite")
    with pytest.raises(OperationFailed):
        env.hv.snapshot_disk_only(env.name, ov)
    disks = {d.target: d.source for d in env.hv.disks(env.name)}
    assert disks == env.disks  # atomic: no disk moved
    assert open(ov["vdb"], "rb").read() == b"not ours to overwrite"


def test_commit_and_pivot_need_an_overlay_and_a_job(env):
    with pytest.raises(OperationFailed):
        env.hv.block_commit_active(env.name, "vda")
    with pytest.raises(OperationFailed):
        env.hv.block_pivot(env.name, "vda")
    with pytest.raises(OperationFailed):
        env.hv.block_job_abort(env.name, "vda")


def test_abort_leaves_the_disk_on_its_overlay(env):
    ov = overlays_for(env)
    env.hv.snapshot_disk_only(env.name, {"vda": ov["vda"]})
    env.hv.block_commit_active(env.name, "vda")
    env.hv.block_job_abort(env.name, "vda")
    deadline = time.time() + 10
    while env.hv.block_job(env.name, "vda") is not None and time.time() < deadline:
        time.sleep(0.05)
    disks = {d.target: d for d in env.hv.disks(env.name)}
    assert disks["vda"].source == ov["vda"] and disks["vda"].mirror_job is None
    assert disks["vdb"].source == env.disks["vdb"]  # not in the snapshot


def test_block_pull_leaves_the_active_image_standalone(env):
    ov = overlays_for(env)
    env.hv.snapshot_disk_only(env.name, ov)
    env.write("vda", 0x5A, 1, 1)  # lands on the overlay
    env.hv.block_pull(env.name, "vda")
    deadline = time.time() + 30
    while (job := env.hv.block_job(env.name, "vda")) is not None:
        assert job.type == "pull" and time.time() < deadline
        time.sleep(0.05)
    disks = {d.target: d for d in env.hv.disks(env.name)}
    assert disks["vda"].source == ov["vda"] and disks["vda"].backing == [] and disks["vda"].mirror_job is None
    assert disks["vdb"].backing == [env.disks["vdb"]]  # the other disk is still on its overlay
    assert not env.original_has("vda", 0x5A, 1, 1)  # the backing image was only read
@pytest.mark.parametrize("remove_nvram", [True, False])
def test_a_restored_uefi_domain_names_its_nvram_and_undefine_removes_it_only_when_asked(env, remove_nvram):
    name = f"{env.name}-uefi"
    nvram = os.path.join(str(env.dir), f"{name}_VARS.fd")
    with open("/usr/share/OVMF/OVMF_VARS_4M.fd", "rb") as src, open(nvram, "wb") as dst:
        dst.write(src.read())
    disk = next(iter(env.disks.values()))
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64' machine='q35'>hvm</type>"
           "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
           f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram}</nvram></os><features><acpi/></features>"
           f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
           "<target dev='vda' bus='virtio'/></disk></devices></domain>")
    env.hv.define_restored_domain(xml)
    try:
        assert env.hv.firmware(name).nvram == nvram
        assert env.hv.firmware(env.name).nvram is None
        env.hv.undefine_restored_domain(name, nvram=remove_nvram)
        assert env.hv.lookup_domain_description(name) is None
        assert os.path.exists(nvram) is not remove_nvram
    finally:
        if env.hv.lookup_domain_description(name) is not None:
            env.hv.undefine_restored_domain(name, nvram=True)


def test_commit_of_named_layers_and_who_uses_a_file(env):
    """The chain-aware calls: a commit names its top and base, and is refused when the top is not the
    active layer over that base; ``chain_users`` finds a file in any layer of a domain's chain."""
    ov = overlays_for(env)
    env.hv.snapshot_disk_only(env.name, {"vda": ov["vda"]})
    users = env.hv.chain_users([ov["vda"], env.disks["vda"], str(env.dir / "nobody.qcow2")])
    assert f"{env.name} (vda, running)" in users[ov["vda"]]
    assert any(u.startswith(f"{env.name} (vda, ") for u in users[env.disks["vda"]])  # the backing layer
    assert users[str(env.dir / "nobody.qcow2")] == []
    with pytest.raises(OperationFailed):  # the original is not the active layer: refused, nothing started
        env.hv.block_commit_active(env.name, "vda", env.disks["vda"], ov["vda"])
    assert env.hv.block_job(env.name, "vda") is None
    with pytest.raises(OperationFailed):  # our overlay is the active layer: an intermediate commit is refused
        env.hv.block_commit_intermediate(env.name, "vda", ov["vda"], env.disks["vda"])
    assert env.hv.block_job(env.name, "vda") is None
    env.write("vda", 0x3C, 2, 1)
    env.hv.block_commit_active(env.name, "vda", ov["vda"], env.disks["vda"])
    job = env.hv.block_job(env.name, "vda")
    assert job is not None and job.type == "active-commit"
    wait_ready(env, "vda")
    disk = {d.target: d for d in env.hv.disks(env.name)}["vda"]
    assert disk.mirror_job == "active-commit" and disk.mirror_source == env.disks["vda"]
    env.hv.block_pivot(env.name, "vda")
    assert env.original_has("vda", 0x3C, 2, 1)
    assert env.hv.chain_users([ov["vda"]])[ov["vda"]] == []


HOLD = {"workflow": "0123456789abcdef", "strategy": "snapshot-backup", "prefix": "dc",
        "started": "2024-05-01T10:00:00.000Z", "started_epoch": 1714557600.0, "worker": "host-1:4242"}


def _plant_hold(env, xml: str) -> None:
    """Another tool writes into our namespace (any text libvirt accepts as an element)."""
    if env.kind == "fake":
        env.hv.plant_hold_xml(env.name, xml)
    else:
        env.dom.virsh("metadata", env.name, "https://domcapture.org/xmlns/hold/1", "--key", "other", "--set", xml,
                      "--live", "--config")


def test_hold_mark_round_trip_unreadable_and_removal(env):
    assert env.hv.hold_mark(env.name) is None
    env.hv.set_hold_mark(env.name, None)  # removing an absent mark is no error
    env.hv.set_hold_mark(env.name, HOLD)
    assert env.hv.hold_mark(env.name) == HOLD
    env.hv.set_hold_mark(env.name, {**HOLD, "workflow": "fedcba9876543210"})  # replaced, not added
    assert env.hv.hold_mark(env.name)["workflow"] == "fedcba9876543210"
    attrs = " ".join(f"{k}='{v}'" for k, v in HOLD.items() if k != "started_epoch")
    for planted in ("<hold workflow='../../etc' strategy='x' started='now' started-epoch='1' worker='w' prefix='p'/>",
                    "<other a='1'/>", f"<hold {attrs} started-epoch='nan'/>"):
        _plant_hold(env, planted)
        assert set(env.hv.hold_mark(env.name)) == {"unreadable"}, planted
    env.hv.set_hold_mark(env.name, None)
    assert env.hv.hold_mark(env.name) is None
    with pytest.raises(DomainNotFound):
        env.hv.hold_mark("dctest-no-such-domain")
    with pytest.raises(DomainNotFound):
        env.hv.set_hold_mark("dctest-no-such-domain", HOLD)


@pytest.mark.parametrize("env", ["libvirt"], indirect=True)  # the fake has no definition apart from its state
def test_hold_mark_is_written_live_and_in_the_definition(env):
    env.hv.set_hold_mark(env.name, HOLD)
    env.dom.virsh("destroy", env.name)
    assert env.hv.hold_mark(env.name) == HOLD  # the definition holds it too
    env.hv.set_hold_mark(env.name, None)  # a shut-off domain: its definition only
    env.dom.virsh("start", env.name)
    assert env.hv.hold_mark(env.name) is None
