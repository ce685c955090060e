"""Bad input: one clear line naming the problem, a non-zero exit, and nothing changed.

"Nothing changed" is checked for real: no record and no job in Redis, no
file in the target or beside the disks, the domain on the same disks.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import redis

from .realenv import DOMCAPTURE, run

pytestmark = pytest.mark.real


@pytest.fixture
def dom(disk_domain):
    return disk_domain(sizes_mib={"vda": 16})


def assert_nothing_changed(cluster, dom, target) -> None:
    assert json.loads(cluster.cli("list", "--json").stdout) == []
    r = redis.Redis.from_url(cluster.env["DOMCAPTURE_REDIS_URL"])
    prefix = cluster.env["DOMCAPTURE_PREFIX"]
    assert r.llen(f"{prefix}:rq:queue:{cluster.env['DOMCAPTURE_QUEUE']}") == 0
    assert list(r.scan_iter(f"rq:*{cluster.env['DOMCAPTURE_QUEUE']}*")) == []
    assert list(target.iterdir()) == []
    assert dom.leftover_overlays() == []
    assert dom.on_original_disks()


@pytest.mark.parametrize("args, code, message", [
    (["submit", "nope", "--domain", "{dom}", "--target", "{target}"], 2, "unknown strategy 'nope'"),
    (["submit", "snapshot-backup", "--domain", "dctest-missing", "--target", "{target}"], 2, "Domain not found"),
    (["submit", "snapshot-backup", "--domain", "{dom}", "--target", "{target}/absent"], 2, "does not exist"),
    (["submit", "snapshot-backup", "--domain", "{dom}", "--target", "{target}", "--quiesce", "maybe"], 2,
     "--quiesce must be one of off, try, require"),
    (["submit", "snapshot-backup", "--domain", "{dom}", "--target", "{target}", "--bandwidth", "fast"], 2,
     "--bandwidth must look like"),
    (["submit", "snapshot-backup", "--domain", "{dom}"], 2, "--target is required"),
    (["submit", "snapshot-backup", "--domain", "{dom}", "--target", "{target}",
      "--uri", "qemu+unix:///system?socket=/run/libvirt/domcapture-nonexistent-sock"], 4, "cannot connect to libvirt"),
    (["--redis-url", "redis://127.0.0.1:1/0", "submit", "snapshot-backup", "--domain", "{dom}",
      "--target", "{target}"], 4, "redis unreachable"),
    (["submit"], 2, "the following arguments are required: STRATEGY"),
    (["show", "0123456789abcdef"], 2, "no workflow with id"),
])
def test_bad_submit_input(cluster, dom, tmp_path, args, code, message):
    target = tmp_path / "target"
    target.mkdir()
    argv = [a.format(dom=dom.name, target=target) for a in args]
    out = cluster.cli(*argv, check=False)
    assert out.returncode == code, out.stderr
    assert message in out.stderr
    assert out.stderr.endswith("\n") and out.stderr.count("\n") == 1, out.stderr  # one line
    assert_nothing_changed(cluster, dom, target)


def test_target_that_is_a_file(cluster, dom, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    out = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(dom.disks["vda"]),
                      check=False)
    assert out.returncode == 2, out.stderr
    assert "does not exist" in out.stderr
    assert_nothing_changed(cluster, dom, target)


def test_stopped_domain_is_refused(cluster, dom, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    dom.virsh("destroy", dom.name)  # both backups read a shut-off domain offline; a lone checkpoint needs QEMU
    out = cluster.cli("submit", "checkpoint", "--domain", dom.name, check=False)
    assert out.returncode == 2 and f"domain {dom.name} is shutoff" in out.stderr
    assert json.loads(cluster.cli("list", "--json").stdout) == []


def test_disk_with_a_backing_chain_is_refused(cluster, libvirt_uri, tmp_path, disk_domain):
    dom = disk_domain(sizes_mib={"vda": 16})
    dom.virsh("destroy", dom.name)
    top = dom.workdir / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(dom.disks["vda"]), str(top))
    xml = dom.virsh("dumpxml", dom.name).replace(str(dom.disks["vda"]), str(top))
    (dom.workdir / "chain.xml").write_text(xml)
    dom.virsh("define", str(dom.workdir / "chain.xml"))
    dom.virsh("start", dom.name)
    target = tmp_path / "target"
    target.mkdir()
    out = cluster.cli("submit", "save", "--domain", dom.name, "--target", str(target), check=False)
    assert out.returncode == 2 and "already has a backing chain" in out.stderr
    assert json.loads(cluster.cli("list", "--json").stdout) == []
    assert list(target.iterdir()) == []


def test_second_capture_of_a_busy_domain_is_refused(cluster, dom, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    first = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target)).stdout.strip()
    out = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target), check=False)
    assert out.returncode == 3 and f"busy with workflow {first}" in out.stderr
    assert [d["id"] for d in json.loads(cluster.cli("list", "--json").stdout)] == [first]


def test_cli_help_runs_without_services():
    out = subprocess.run([DOMCAPTURE, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "submit" in out.stdout
