"""The hold mark on real services: what an admin sees with ``virsh metadata`` while a workflow holds a
domain, and what a submit refuses (another deployment's mark, another tool's block job in flight).

Outcomes are read the way an operator reads them: ``virsh metadata``, ``virsh blockjob``, the exit code
and the one line of ``domcapture submit``, the record.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest
import redis

from workflows.hypervisor.hold import NS

from .conftest import REDIS_URL
from .realenv import DOMCAPTURE

pytestmark = pytest.mark.real

KILL = "saved:copy-intent:copying"  # stable: the domain runs on our overlays, the copy not begun


def mark_on(dom) -> dict[str, str] | None:
    """``virsh metadata DOM NS``: our element's attributes, or None when the domain has none."""
    out = subprocess.run(["virsh", "-c", dom.uri, "metadata", dom.name, NS], capture_output=True, text=True)
    if out.returncode != 0:
        assert "metadata not found" in out.stderr.lower() or "no metadata" in out.stderr.lower(), out.stderr
        return None
    return dict(ET.fromstring(out.stdout.strip()).attrib)


def plant(dom, xml: str) -> None:
    """Another deployment (or anyone with libvirt access) writes into our namespace."""
    dom.virsh("metadata", dom.name, NS, "--key", "domcapture", "--set", xml, "--live", "--config")


def submit(cluster, dom, target, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DOMCAPTURE, "submit", "snapshot-backup", "--domain", dom.name, "--target", str(target),
                           "--json"], env=env or cluster.env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def other_deployment(cluster):
    """The environment of a second deployment on the same Redis and libvirt: its own prefix and queue."""
    prefix = f"{cluster.env['DOMCAPTURE_PREFIX']}-other"
    yield {**cluster.env, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q"}
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def test_mark_names_the_holder_while_held_refuses_another_deployment_and_goes_at_the_end(
        cluster, disk_domain, tmp_path, other_deployment):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    doomed = cluster.start_worker(fault=f"kill-at:{KILL}")
    out = submit(cluster, dom, target)
    assert out.returncode == 0, out.stderr
    wf = json.loads(out.stdout)["id"]
    doomed.wait(timeout=60)
    assert doomed.returncode == -signal.SIGKILL

    mark = mark_on(dom)
    assert mark is not None, "no hold mark while the workflow holds the domain"
    assert mark["workflow"] == wf and mark["strategy"] == "snapshot-backup"
    assert mark["prefix"] == cluster.env["DOMCAPTURE_PREFIX"]
    assert abs(float(mark["started-epoch"]) - time.time()) < 120 and mark["started"].endswith("Z")
    assert mark["worker"].endswith(f":{doomed.pid}")  # the worker that held it (hostname:pid)
    # in the definition too, for a tool that reads the persistent XML
    assert wf in dom.virsh("dumpxml", "--inactive", dom.name)
    assert cluster.show(wf)["data"]["hold"]["workflow"] == wf

    # this deployment: its own per-domain lock refuses (exit 3), as before
    again = submit(cluster, dom, target)
    assert again.returncode == 3 and wf in again.stderr and len(again.stderr.strip().splitlines()) == 1
    # another deployment cannot see that lock: the mark refuses it, one line naming the workflow
    other = submit(cluster, dom, target, env=other_deployment)
    assert other.returncode == 2, other.stderr
    line = other.stderr.strip()
    assert len(line.splitlines()) == 1 and wf in line and cluster.env["DOMCAPTURE_PREFIX"] in line, line
    holds = json.loads(cluster.cli("holds", "--json").stdout)["holds"]
    assert {(h["domain"], h["workflow"], h["state"], h["status"]) for h in holds} >= {(dom.name, wf, "live",
                                                                                       "running")}

    cluster.start_worker()
    cluster.start_recovery()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert mark_on(dom) is None, "the mark outlived the workflow"
    assert wf not in dom.virsh("dumpxml", "--inactive", dom.name)
    assert not [e for e in doc["history"] if e["event"].startswith("hold-mark")]  # nothing went wrong with it
    assert submit(cluster, dom, target, env=other_deployment).returncode == 0  # free for anyone now


def _mark_xml(workflow: str, prefix: str) -> str:
    return (f"<hold workflow='{workflow}' strategy='snapshot-backup' started='2024-05-01T10:00:00.000Z' "
            f"started-epoch='1714557600.000' worker='elsewhere:4242' prefix='{prefix}'/>")


def test_planted_marks_another_deployment_refuses_stale_and_unknown_do_not(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    ours = cluster.env["DOMCAPTURE_PREFIX"]
    cluster.start_worker()

    # a live mark of another deployment: refused, one line naming the workflow and the deployment
    plant(dom, _mark_xml("a1b2c3d4e5f60718", "elsewhere-dc"))
    out = submit(cluster, dom, target)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "a1b2c3d4e5f60718" in out.stderr and "elsewhere-dc" in out.stderr
    assert cluster.cli("list", "--json").stdout.strip() == "[]"  # nothing recorded

    # one that does not parse (a path for a workflow id): refused as unreadable, its text never used
    plant(dom, _mark_xml("../../etc/passwd", "elsewhere-dc"))
    out = submit(cluster, dom, target)
    assert out.returncode == 2 and "unreadable" in out.stderr and "passwd" not in out.stderr, out.stderr

    # a mark of this deployment naming a workflow its store does not know (expired, or a crash left it)
    plant(dom, _mark_xml("0000000000000000", ours))
    out = submit(cluster, dom, target)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)["id"]
    assert cluster.wait_final(first)["status"] == "succeeded"
    assert mark_on(dom) is None  # a stale mark is lifted with ours

    # a mark naming a workflow of ours that is final (a crash between its last save and the removal)
    plant(dom, _mark_xml(first, ours))
    holds = json.loads(cluster.cli("holds", "--json").stdout)["holds"]
    assert [(h["workflow"], h["state"], h["status"]) for h in holds if h["domain"] == dom.name] == \
        [(first, "stale", "succeeded")]
    out = submit(cluster, dom, target)
    assert out.returncode == 0, out.stderr
    assert cluster.wait_final(json.loads(out.stdout)["id"])["status"] == "succeeded"
    assert mark_on(dom) is None


def test_another_tools_block_job_is_refused_at_submit_naming_the_disk(cluster, disk_domain, tmp_path):
    dom = disk_domain(sizes_mib={"vda": 64, "vdb": 32}, fill_mib=48)
    target = tmp_path / "backups"
    target.mkdir()
    theirs = tmp_path / "theirs-vda.qcow2"
    dom.virsh("snapshot-create-as", dom.name, "s1", "--disk-only", "--no-metadata",
              "--diskspec", f"vda,file={theirs}", "--diskspec", "vdb,snapshot=no")
    dom.virsh("blockpull", dom.name, "vda", "--bandwidth", "1")  # 1 MiB/s over 49 MiB: in flight for long
    try:
        assert "vda" in dom.block_jobs()
        out = submit(cluster, dom, target)
        line = out.stderr.strip()
        assert out.returncode == 2 and len(line.splitlines()) == 1, out.stderr
        assert f"disk vda of {dom.name} has a block job (pull) of another tool in flight" in line
        assert cluster.cli("list", "--json").stdout.strip() == "[]"  # nothing recorded
        assert mark_on(dom) is None  # nothing written on the domain either
        assert "vda" in dom.block_jobs()  # their job untouched
    finally:
        dom.virsh("blockjob", dom.name, "vda", "--abort", check=False)
    deadline = time.time() + 30
    while dom.block_jobs():
        assert time.time() < deadline, "their pull did not end after --abort"
        time.sleep(0.2)
