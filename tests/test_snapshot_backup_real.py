"""snapshot-backup end to end on real services: redis-server, libvirtd + QEMU,
and the real ``domcapture worker`` / ``domcapture recovery`` processes.

Outcomes are read where an operator would read them: ``virsh domblklist``,
``virsh blockjob --info``, the domain XML, the image files and their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import time

import pytest

from .realenv import image_has_pattern, images_identical

pytestmark = pytest.mark.real

GUEST_WRITE = (0x5A, 40, 1)  # pattern, offset MiB, length MiB (vda is 64 MiB)


def submit(cluster, dom, target, *extra: str) -> str:
    out = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target), "--json", *extra)
    doc = json.loads(out.stdout)
    assert doc["status"] == "queued" and doc["state"] == "preflight"
    return doc["id"]


def assert_domain_clean(dom) -> None:
    assert dom.state() == "running"
    assert dom.on_original_disks(), dom.blklist()
    assert dom.block_jobs() == {}
    assert dom.mirrors() == []
    assert dom.leftover_overlays() == []


def assert_backup_matches(doc: dict, expected: dict) -> None:
    """Every backup file equals its expected image (guest view) and its recorded checksum."""
    files = doc["result"]["files"]
    assert set(files) == set(expected)
    manifest = json.load(open(doc["result"]["manifest"]))
    assert manifest["workflow"] == doc["id"]
    for target, info in files.items():
        assert images_identical(info["path"], expected[target]), f"backup of {target} differs"
        digest = hashlib.sha256(open(info["path"], "rb").read()).hexdigest()
        assert info["checksum"] == f"sha256:{digest}"
        assert not os.path.exists(info["path"] + ".partial")


def test_capture_succeeds_and_backup_is_byte_identical(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    wf = submit(cluster, dom, target, "--quiesce", "try")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert_domain_clean(dom)
    assert_backup_matches(doc, dom.references)
    # try without a guest agent: crash-consistent, and the record says so
    assert doc["result"]["quiesced"] is False and "agent" in doc["data"]["quiesce_error"]
    events = [e["event"] for e in doc["history"]]
    assert events[0] == "submitted" and events[-1] == "step-done"
    assert all(e["ts"] and (e["worker"] or e["event"] == "submitted") for e in doc["history"])
    assert doc["progress"]["bytes_done"] == doc["progress"]["bytes_total"] > 0
    shown = cluster.cli("show", wf).stdout
    assert "status:    succeeded" in shown and "history:" in shown


def test_quiesce_require_without_agent_rolls_back_and_creates_nothing(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    cluster.start_worker()
    wf = submit(cluster, dom, tmp_path, "--quiesce", "require")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back"
    assert "could not be frozen" in doc["error"]["message"]
    assert_domain_clean(dom)
    assert [p for p in os.listdir(tmp_path) if p.startswith("domcapture-")] == []


KILL_POINTS = [
    "saved:step-started:preflight",
    "saved:freeze-intent:freezing",
    "saved:snapshot-intent:snapshotting",   # intent recorded, libvirt not called
    "executed:snapshotting",                # overlays in use, not yet recorded
    "saved:step-started:thawing",
    "saved:copy-intent:copying",
    "executed:copying",
    "saved:commit-intent:committing",       # between snapshot and commit
    "executed:committing",                  # jobs running, not recorded
    "saved:step-started:waiting_ready",
    "saved:pivot-intent:pivoting",
    "executed:pivoting",
    "saved:step-started:cleaning",
    "executed:cleaning",
    "executed:finalizing",
]


#: killed before the snapshot was taken: the guest's write (made while nobody runs the workflow)
#: comes before the capture's point in time, so the backup holds it
BEFORE_SNAPSHOT = KILL_POINTS[:KILL_POINTS.index("executed:snapshotting")]
#: killed while the domain runs on our overlays
ON_OVERLAY = KILL_POINTS[KILL_POINTS.index("executed:snapshotting"):KILL_POINTS.index("executed:pivoting")]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_in_every_state(cluster, disk_domain, tmp_path, point):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    doomed = cluster.start_worker(fault=f"kill-at:{point}")
    cluster.start_recovery()
    wf = submit(cluster, dom, target)
    doomed.wait(timeout=60)
    killed_at = time.time()
    assert doomed.returncode == -signal.SIGKILL
    # the guest keeps writing while nobody runs the workflow
    assert (not dom.on_original_disks()) is (point in ON_OVERLAY), dom.blklist()
    dom.guest_write("vda", *GUEST_WRITE)
    cluster.start_worker()
    moving = cluster.wait(wf, lambda d: any(e["event"] == "recovered" for e in d["history"]), timeout=30)
    recovered_at = next(e["ts"] for e in moving["history"] if e["event"] == "recovered")
    assert recovered_at - killed_at < 2 * 2.0 + 2  # lease TTL 2 s in tests, sweep every 0.5 s
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    assert_domain_clean(dom)
    assert image_has_pattern(dom.disks["vda"], *GUEST_WRITE), "the guest's write was lost"
    if point in BEFORE_SNAPSHOT:
        assert image_has_pattern(doc["result"]["files"]["vda"]["path"], *GUEST_WRITE)
    else:  # the capture's point in time precedes the write: the backup is the disks as they were
        assert_backup_matches(doc, dom.references)
    epochs = {e["epoch"] for e in doc["history"]}
    assert len(epochs) >= 3  # first worker, recovery, second worker: each fenced apart


def test_sigkill_mid_copy_resumes_from_the_cursor(cluster, disk_domain, tmp_path):
    dom = disk_domain(random_mib=24)
    target = tmp_path / "backups"
    target.mkdir()
    first = cluster.start_worker()
    cluster.start_recovery()
    wf = submit(cluster, dom, target, "--bandwidth", "4M")
    doc = cluster.wait(wf, lambda d: d["state"] == "copying" and d["data"].get("copy", {}).get("vda", {})
                       .get("offset", 0) > 0, timeout=60)
    progress = doc["progress"]
    assert progress["phase"] == "copy" and 0 < progress["percent"] < 100 and progress["rate_bytes_per_s"] > 0
    cluster.kill(first)
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    intents = [e for e in doc["history"] if e["event"] == "copy-intent" and e["disk"] == "vda"]
    assert intents[0]["offset"] == 0 and intents[-1]["offset"] > 0, "the copy started over"
    assert_domain_clean(dom)
    assert_backup_matches(doc, dom.references)


def test_operator_rollback_of_a_crashed_workflow(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    doomed = cluster.start_worker(fault="kill-at:executed:copying")
    wf = submit(cluster, dom, target)
    doomed.wait(timeout=60)
    assert not dom.on_original_disks()  # stranded on our overlay, no recovery running
    dom.guest_write("vda", *GUEST_WRITE)
    time.sleep(2.2)  # the dead worker's lease expires
    out = cluster.cli("rollback", wf)
    assert "rolling back" in out.stdout
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back"
    assert_domain_clean(dom)
    assert image_has_pattern(dom.disks["vda"], *GUEST_WRITE)
    assert os.listdir(target) == []
    kinds = {a["kind"]: a["status"] for a in doc["artifacts"].values()}
    assert kinds["overlay"] == "deleted" and kinds["backup-file"] == "deleted"
    # a final workflow refuses further operator commands, and the domain is free again
    assert cluster.cli("resume", wf, check=False).returncode == 3
    assert cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target)).returncode == 0


def test_abort_of_a_running_workflow_rolls_back(cluster, disk_domain, tmp_path):
    dom = disk_domain(random_mib=24)
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    wf = submit(cluster, dom, target, "--bandwidth", "4M")
    cluster.wait(wf, lambda d: d["state"] == "copying" and d["progress"].get("bytes_done", 0) > 0, timeout=60)
    # a running workflow refuses a plain rollback, and says what to do instead
    refused = cluster.cli("rollback", wf, check=False)
    assert refused.returncode == 3 and "abort" in refused.stderr
    out = cluster.cli("abort", wf)
    assert "cancel requested" in out.stdout
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back"
    assert doc["error"]["message"] == "aborted by operator"
    assert_domain_clean(dom)
    assert os.listdir(target) == []


def test_sigstopped_worker_cannot_change_anything_after_sigcont(cluster, disk_domain, tmp_path):
    dom = disk_domain(random_mib=16)
    target = tmp_path / "backups"
    target.mkdir()
    sleeper = cluster.start_worker()
    cluster.start_recovery()
    wf = submit(cluster, dom, target, "--bandwidth", "4M")
    cluster.wait(wf, lambda d: d["state"] == "copying" and d["progress"].get("bytes_done", 0) > 0, timeout=60)
    os.killpg(sleeper.pid, signal.SIGSTOP)
    cluster.start_worker()
    doc = cluster.wait_final(wf, timeout=120)
    assert doc["status"] == "succeeded"
    zombie_id = f"{socket.gethostname()}:{sleeper.pid}"
    zombie_epochs = {e["epoch"] for e in doc["history"] if e.get("worker") == zombie_id}
    assert zombie_epochs and max(zombie_epochs) < doc["epoch"], (zombie_epochs, doc["epoch"])
    before = (doc["rev"], len(doc["history"]),
              {t: open(f["path"], "rb").read() for t, f in doc["result"]["files"].items()})
    os.killpg(sleeper.pid, signal.SIGCONT)
    # the zombie wakes in the middle of its copy, and its next fenced step is refused
    deadline = time.time() + 30
    while f"workflow {wf}: lease-lost" not in cluster.log_of(sleeper):
        assert time.time() < deadline, cluster.log_of(sleeper)[-2000:]
        time.sleep(0.2)
    refused = re.findall(rf"workflow {wf}: .*?epoch (\d+).*; stopping without further changes",
                         cluster.log_of(sleeper))
    assert [int(e) for e in refused] == [max(zombie_epochs)], cluster.log_of(sleeper)[-2000:]
    after = cluster.show(wf)
    assert (after["rev"], len(after["history"])) == before[:2]
    assert not [e for e in after["history"][len(doc["history"]):] if e.get("worker") == zombie_id]
    assert {t: open(f["path"], "rb").read() for t, f in after["result"]["files"].items()} == before[2]
    assert_domain_clean(dom)
    assert sorted(os.listdir(os.path.dirname(doc["result"]["manifest"]))) == ["manifest.json", "vda.qcow2",
                                                                               "vdb.qcow2"]
    assert sleeper.poll() is None  # the worker process lives on, ready for the next job
