"""direct-backup when another tool acts on the domain, on real libvirt + QEMU and real worker processes.

Another tool's backup job (an admin's ``virsh backup-begin``) is refused at submit, waited on by the engine's
retries in the workflow, and never aborted: the workflow rolls back leaving nothing of its own, or goes on
once the job has ended.  A checkpoint of ours deleted by someone else (``virsh checkpoint-delete``, with or
without ``--metadata``) makes the next incremental a full backup that says why, or a correct incremental.
Outcomes are read as an operator would: ``virsh domjobinfo`` / ``backup-dumpxml`` / ``checkpoint-list``, the
backup files (``qemu-img compare``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from .realenv import images_identical

pytestmark = pytest.mark.real


def begin_foreign_pull(dom, folder: Path) -> str:
    """Another tool's pull-mode backup of vda: it serves until someone runs ``virsh domjobabort``."""
    socket = folder / "theirs.sock"
    xml = folder / "theirs-backup.xml"
    xml.write_text(f"<domainbackup mode='pull'><server transport='unix' socket='{socket}'/><disks>"
                   f"<disk name='vda' backup='yes' type='file'><scratch file='{folder / 'theirs-vda.scratch'}'/>"
                   "</disk><disk name='vdb' backup='no'/></disks></domainbackup>")
    dom.virsh("backup-begin", dom.name, str(xml))
    assert foreign_job_runs(dom, str(socket))
    return str(socket)


def foreign_job_runs(dom, socket: str) -> bool:
    """The domain's job is a backup, and it is theirs (their socket)."""
    info = dom.virsh("domjobinfo", dom.name)
    if "Backup" not in info:
        return False
    return f"socket='{socket}'" in dom.virsh("backup-dumpxml", dom.name)


def end_foreign_job(dom) -> None:
    dom.virsh("domjobabort", dom.name)
    assert "Job type:         None" in wait_job_none(dom)


def wait_job_none(dom, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while True:
        info = dom.virsh("domjobinfo", dom.name)
        if "Job type:         None" in info or time.time() > deadline:
            return info
        time.sleep(0.1)


def checkpoints(dom) -> list[str]:
    return dom.virsh("checkpoint-list", dom.name, "--name", "--topological").split()


def our_checkpoints(cluster, dom) -> list[dict]:
    return json.loads(cluster.cli("checkpoints", "--domain", dom.name, "--json").stdout)["checkpoints"]


def submit(cluster, dom, target: Path, *extra: str, check: bool = True):
    return cluster.cli("submit", "direct-backup", "--domain", dom.name, "--target", str(target), "--quiesce", "off",
                       "--json", *extra, check=check)


def backup(cluster, store, dom, target: Path, *extra: str) -> dict:
    wf = json.loads(submit(cluster, dom, target, *extra).stdout)["id"]
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    doc["history"] = store.history(wf)
    return doc


def nothing_of_ours(cluster, dom, target: Path) -> None:
    assert checkpoints(dom) == []
    assert our_checkpoints(cluster, dom) == []  # no pending entry either
    assert os.listdir(target) == []
    assert dom.on_original_disks()


def test_foreign_backup_job_at_submit_is_refused_in_one_line(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    socket = begin_foreign_pull(dom, tmp_path)
    try:
        out = submit(cluster, dom, target, check=False)
        assert out.returncode == 2, (out.stdout, out.stderr)
        message = out.stderr.strip()
        # the submit-time check of every strategy (a block job of another tool) or direct-backup's own
        # (a backup job that is not ours): either names the other tool's backup
        assert "another tool" in message and "backup" in message and dom.name in message, message
        assert len(message.splitlines()) == 1, message
        assert dom.name not in cluster.cli("list", "--json").stdout  # no workflow was recorded
        assert foreign_job_runs(dom, socket)  # untouched
        nothing_of_ours(cluster, dom, target)
    finally:
        end_foreign_job(dom)


def test_foreign_backup_job_is_waited_on_then_rolled_back_never_aborted(cluster, disk_domain, store, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    wf = json.loads(submit(cluster, dom, target, "--mode", "pull").stdout)["id"]  # no worker yet
    socket = begin_foreign_pull(dom, tmp_path)  # the admin's job begins before ours can
    try:
        cluster.start_worker()
        cluster.start_recovery()
        doc = cluster.wait_final(wf, timeout=120)
        assert doc["status"] == "rolled_back", doc
        reason = doc["error"]["message"]
        assert f"domain {dom.name} already has a backup job that is not ours" in reason and socket in reason
        assert "waiting for it to end" in reason
        history = store.history(wf)
        retries = [e for e in history if e["event"] == "step-retry"]
        assert len(retries) == 4 and all("not ours" in e["error"] for e in retries), retries
        assert not [e for e in history if e["event"] in ("backup-intent", "backup-end-intent")]
        # their job runs on, untouched; nothing of ours is left
        assert foreign_job_runs(dom, socket)
        nothing_of_ours(cluster, dom, target)
    finally:
        end_foreign_job(dom)


def test_foreign_job_begun_just_before_our_begin_is_waited_out_and_the_backup_goes_on(cluster, disk_domain, store,
                                                                                      tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    doomed = cluster.start_worker(fault="kill-at:saved:step-started:beginning")
    wf = json.loads(submit(cluster, dom, target).stdout)["id"]
    doomed.wait(timeout=90)
    socket = begin_foreign_pull(dom, tmp_path)  # between our chain check and our backupBegin
    try:
        cluster.start_worker()
        cluster.start_recovery()
        cluster.wait(wf, lambda d: any(e["event"] == "step-retry" and e.get("step") == "beginning"
                                       for e in store.history(wf)), timeout=60)
        assert foreign_job_runs(dom, socket)  # waited on, never aborted
        assert checkpoints(dom) == []
    finally:
        end_foreign_job(dom)  # the admin's job ends: ours may begin
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert checkpoints(dom) == [doc["result"]["checkpoint"]]
    for t, info in doc["result"]["files"].items():
        assert images_identical(info["path"], dom.disks[t]), t
    assert "Job type:         None" in dom.virsh("domjobinfo", dom.name)


def test_checkpoint_deleted_by_another_tool_next_incremental_is_full_and_says_why(cluster, disk_domain, store,
                                                                                 tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    cluster.start_recovery()
    full = backup(cluster, store, dom, target)
    dom.guest_write("vdb", 0x3A, 4, 2)
    inc = backup(cluster, store, dom, target, "--incremental")
    assert inc["result"]["kind"] == "incremental" and inc["result"]["parent_backup"] == full["id"]
    # someone deletes our older checkpoint: libvirt re-parents the newer one, whose bitmap stays; the next
    # incremental is a true one from it
    oldest, middle = full["result"]["checkpoint"], inc["result"]["checkpoint"]
    dom.virsh("checkpoint-delete", dom.name, oldest)
    assert checkpoints(dom) == [middle]
    dom.guest_write("vdb", 0x2E, 8, 1)
    inc = backup(cluster, store, dom, target, "--incremental")
    assert inc["result"]["kind"] == "incremental" and inc["result"]["fallback"] is None, inc["result"]
    for t, info in inc["result"]["files"].items():
        assert images_identical(info["path"], dom.disks[t]), t  # read through both parents' files
    ours = inc["result"]["checkpoint"]

    # someone deletes our newest checkpoint (libvirt merges its bitmap into its parent's: ours is gone)
    dom.virsh("checkpoint-delete", dom.name, ours)
    assert ours not in checkpoints(dom)
    dom.guest_write("vdb", 0x4B, 10, 1)
    again = backup(cluster, store, dom, target, "--incremental")
    r = again["result"]
    assert r["kind"] == "full" and r["parent_backup"] is None, r
    assert ours in r["fallback"] and "incremental requested, taking a full backup" in r["fallback"], r["fallback"]
    assert "libvirt no longer has it and its bitmap is gone" in r["fallback"], r["fallback"]
    why = [e for e in again["history"] if e["event"] == "fallback-to-full"]
    assert why and ours in why[0]["reason"], again["history"]
    manifest = json.load(open(r["manifest"]))
    assert manifest["kind"] == "full" and manifest["parent"] is None and manifest["fallback"] == r["fallback"]
    for t, info in r["files"].items():
        assert info["kind"] == "full" and images_identical(info["path"], dom.disks[t]), t
    listed = {c["name"]: c for c in our_checkpoints(cluster, dom)}
    assert listed[ours]["broken"] and listed[oldest]["broken"]
    assert not listed[middle]["broken"]  # re-parented by libvirt, not a descendant of the lost one

    # the same checkpoint forgotten by libvirt only (--metadata): its bitmaps stay, and the next incremental
    # is a true one from it (redefined first); the chain reads back as the disk
    newest = r["checkpoint"]
    dom.virsh("checkpoint-delete", dom.name, newest, "--metadata")
    assert newest not in checkpoints(dom)
    dom.guest_write("vda", 0x5C, 20, 1)
    dom.guest_write("vdb", 0x6D, 0, 1)
    last = backup(cluster, store, dom, target, "--incremental", "--mode", "pull")
    lr = last["result"]
    assert lr["kind"] == "incremental" and lr["parent_backup"] == again["id"] and lr["fallback"] is None, lr
    assert lr["redefined"] == [newest]
    assert checkpoints(dom)[-2:] == [newest, lr["checkpoint"]]
    for t, info in lr["files"].items():
        assert info["kind"] == "incremental"
        assert images_identical(info["path"], dom.disks[t]), t  # read through its parent's file
    assert "Job type:         None" in dom.virsh("domjobinfo", dom.name)
