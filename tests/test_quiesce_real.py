"""Quiescing on the real guest (qemu-guest-agent, a writer fsyncing numbered lines).

- a quiesced snapshot-backup holds a clean filesystem (``e2fsck -fn``) whose
  counter.log is a gapless prefix of what the guest wrote;
- a worker SIGKILLed while the guest is frozen: recovery thaws the guest
  within the lease TTL plus a sweep, and the capture still ends quiesced
  (it goes back to ``freezing``) and succeeds.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from .realenv import counter_in_image, is_gapless_prefix

pytestmark = pytest.mark.real

LEASE_TTL = 2.0  # WorkerCluster's default in tests
SWEEP = 0.5


def submit(cluster, guest, target, *extra: str) -> str:
    out = cluster.cli("submit", "snapshot-backup", "--domain", guest.name, "--target", str(target), "--json",
                      *extra)
    return json.loads(out.stdout)["id"]


def test_quiesced_backup_is_clean_and_gapless(cluster, guest_domain, tmp_path):
    guest = guest_domain()
    target = tmp_path / "backups"
    target.mkdir()
    time.sleep(1)  # let the writer write a few lines
    cluster.start_worker()
    wf = submit(cluster, guest, target, "--quiesce", "require")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["result"]["quiesced"] is True
    assert 0 < doc["data"]["downtime_s"] < 5
    assert doc["data"]["frozen_filesystems"] == 2
    assert guest.on_original_disks() and not guest.frozen()
    numbers, verdict = counter_in_image(doc["result"]["files"]["vdb"]["path"], tmp_path / "scratch",
                                        replay_journal=False)
    assert verdict.startswith("rc=0"), verdict  # clean without a journal replay
    assert numbers and is_gapless_prefix(numbers)
    # the guest went on writing after the capture
    assert guest.last_counter() > numbers[-1]


@pytest.mark.parametrize("point", ["executed:freezing", "saved:snapshot-intent:snapshotting"])
def test_worker_killed_while_frozen_is_thawed_by_recovery(cluster, guest_domain, tmp_path, point):
    guest = guest_domain()
    target = tmp_path / "backups"
    target.mkdir()
    doomed = cluster.start_worker(fault=f"kill-at:{point}")
    cluster.start_recovery()
    wf = submit(cluster, guest, target, "--quiesce", "require", "--freeze-deadline", "30")
    doomed.wait(timeout=60)
    killed_at = time.time()
    assert doomed.returncode == -signal.SIGKILL
    assert guest.frozen(), "the fault should strike while the guest is frozen"
    while guest.frozen():
        assert time.time() - killed_at < 15, "the guest stayed frozen"
        time.sleep(0.1)
    thawed_after = time.time() - killed_at
    # bound: lease TTL + one sweep + the thaw call itself
    assert thawed_after < LEASE_TTL + 2 * SWEEP + 2, thawed_after
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    thaws = [e for e in doc["history"] if e["event"] == "thawed"]
    assert thaws and thaws[0]["by"].startswith("recovery")
    # the guest was frozen again before the snapshot: the capture is still quiesced
    assert len([e for e in doc["history"] if e["event"] == "freeze-intent"]) == 2
    if point.endswith(":snapshotting"):
        assert [e for e in doc["history"] if e["event"] == "step-done" and e.get("trigger") == "refreeze"]
    assert doc["result"]["quiesced"] is True
    numbers, verdict = counter_in_image(doc["result"]["files"]["vdb"]["path"], tmp_path / "scratch",
                                        replay_journal=False)
    assert verdict.startswith("rc=0"), verdict
    assert is_gapless_prefix(numbers)
    print(f"guest thawed {thawed_after:.2f} s after the worker died (lease TTL {LEASE_TTL} s)")
