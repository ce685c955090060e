"""The save operations' contract, run against both the fake and real libvirt + QEMU.

The exhaustive crash tests of the save strategies (test_save_fake.py) rely on
the fake behaving like libvirt: states after each call, what a save image
reads back as, and which errors come from calling in the wrong state.
"""

from __future__ import annotations

import os

import pytest

from workflows.errors import DomcaptureError, HypervisorUnavailable, OperationFailed

from .contractkit import MIB, contract_env


@pytest.fixture(params=["fake", "libvirt"])
def env(request, tmp_path):
    yield from contract_env(request, tmp_path)


def test_inspection_of_a_running_domain(env):
    assert env.hv.is_persistent(env.name)
    assert not env.hv.has_managed_save_image(env.name)
    assert env.hv.get_active_job(env.name) is None
    assert env.hv.get_memory_bytes(env.name) >= 32 * MIB
    assert len(env.hv.get_uuid(env.name)) == 36


def test_managed_save_then_start_restores(env):
    env.hv.managed_save(env.name)
    assert env.hv.domain_state(env.name) == "shutoff"
    assert env.hv.has_managed_save_image(env.name)
    assert env.hv.get_active_job(env.name) is None
    env.hv.start(env.name)
    assert env.hv.domain_state(env.name) == "running"
    assert not env.hv.has_managed_save_image(env.name)  # consumed by the start


def test_save_image_reads_back_and_restores(env):
    path = os.path.join(str(env.dir), "domcapture-contract-memory.save")
    env.hv.save(env.name, path)
    assert env.hv.domain_state(env.name) == "shutoff"
    assert not env.hv.has_managed_save_image(env.name)  # the user owns this one
    info = env.hv.read_save_image(path)
    assert info == {"name": env.name, "uuid": env.hv.get_uuid(env.name), "disks": env.disks}
    env.hv.restore(path)
    assert env.hv.domain_state(env.name) == "running"
    assert env.hv.read_save_image(path) == info  # a restore leaves the image alone


def test_read_save_image_of_anything_else_is_none(env):
    assert env.hv.read_save_image(os.path.join(str(env.dir), "absent.save")) is None
    garbage = os.path.join(str(env.dir), "garbage.save")
    with open(garbage, "wb") as f:
        f.write(b"x" * 4096)
    assert env.hv.read_save_image(garbage) is None
    with pytest.raises(OperationFailed):
        env.hv.restore(garbage)


def test_calls_in_the_wrong_state_fail(env):
    path = os.path.join(str(env.dir), "domcapture-contract-memory.save")
    with pytest.raises(OperationFailed):
        env.hv.start(env.name)  # already running
    with pytest.raises(OperationFailed):
        env.hv.resume(env.name)  # not paused
    with pytest.raises(HypervisorUnavailable):
        env.hv.save(env.name, os.path.join(str(env.dir), "no-such-dir", "x.save"))
    assert env.hv.domain_state(env.name) == "running"
    env.hv.save(env.name, path)
    for call in (lambda: env.hv.managed_save(env.name), lambda: env.hv.save(env.name, path + "2"),
                 lambda: env.hv.destroy(env.name)):
        with pytest.raises(OperationFailed):
            call()
    env.hv.restore(path)
    with pytest.raises(OperationFailed):
        env.hv.restore(path)  # already active
    assert env.hv.domain_state(env.name) == "running"


def test_destroy_then_start_boots_afresh(env):
    env.hv.destroy(env.name)
    assert env.hv.domain_state(env.name) == "shutoff"
    assert env.hv.get_active_job(env.name) is None
    env.hv.start(env.name)
    assert env.hv.domain_state(env.name) == "running"


def test_unknown_domain(env):
    for call in (lambda: env.hv.managed_save("dctest-no-such-domain"),
                 lambda: env.hv.has_managed_save_image("dctest-no-such-domain")):
        with pytest.raises(DomcaptureError) as info:
            call()
        assert info.value.exit_code == 2
