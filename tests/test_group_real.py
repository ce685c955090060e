"""Consistency groups on real QEMU guests (qemu-guest-agent, a writer fsyncing numbered lines).

- two real guests with --quiesce require: the group succeeds, each member's counter.log in its backup is
  a clean gapless prefix, every member's point lies inside the recorded window (first freeze .. last
  thaw), nobody stays frozen or on an overlay, and verify checks the set;
- a member whose agent does not answer (a no-OS domain has none): with require the whole group rolls back
  within the freeze deadline and nobody stays frozen; with try it proceeds and says which member was not
  quiesced;
- a worker SIGKILLed after the first member's point: recovery thaws every member and the group rolls back;
  SIGKILLed while copying: the group resumes and succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .realenv import counter_in_image, images_identical, is_gapless_prefix

pytestmark = pytest.mark.real


def submit(cluster, members, target, *extra: str) -> str:
    out = cluster.cli("submit", "group-backup", "--group", "shop", "--domains", ",".join(m.name for m in members),
                      "--target", str(target), "--json", *extra)
    return json.loads(out.stdout)["id"]


def test_two_guests_captured_at_one_instant(cluster, guest_domain, tmp_path):
    guests = [guest_domain(), guest_domain()]
    for g in guests:
        g.wait_agent()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    wf = submit(cluster, guests, target, "--quiesce", "require")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", (doc["error"], doc["attention"])
    result = doc["result"]
    assert result["quiesced"] is True and result["quiesce_skipped"] == {}
    manifest = json.loads(open(result["manifest"]).read())
    window = manifest["window"]
    assert [m["domain"] for m in manifest["members"]] == [g.name for g in guests]
    for member in manifest["members"]:
        start, end = member["point"]
        assert window["first_freeze"] <= start <= end <= window["last_thaw"], (member["point"], window)
    for g in guests:
        assert g.on_original_disks() and not g.frozen()
        assert not [p for p in os.listdir(g.workdir) if "overlay" in p]
        vdb = result["members"][g.name]["files"]["vdb"]["path"]
        numbers, verdict = counter_in_image(vdb, tmp_path / f"scratch-{g.name}", replay_journal=False)
        assert verdict.startswith("rc=0"), verdict  # clean without a journal replay: frozen at its point
        assert numbers and is_gapless_prefix(numbers)
    verify = json.loads(cluster.cli("verify", wf, "--json").stdout)
    checks = verify["checks"] if isinstance(verify, dict) else verify
    assert checks and all(c["ok"] for c in checks)
    assert {c["item"].split(":")[0] for c in checks} >= {"group-manifest", *(g.name for g in guests)}


def test_a_member_without_an_agent(cluster, guest_domain, disk_domain, tmp_path):
    guest, mute = guest_domain(), disk_domain()
    guest.wait_agent()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    # require: the whole group rolls back within the freeze deadline, and nobody stays frozen
    started = time.time()
    wf = submit(cluster, [guest, mute], target, "--quiesce", "require", "--freeze-deadline", "10")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back", doc["status"]
    assert f"{mute.name} could not be frozen" in doc["error"]["message"]
    thawed = doc["data"]["last_thaw"]
    assert thawed["frozen_seconds"] < 10 and thawed["at"] - started < 10
    assert not guest.frozen() and guest.on_original_disks() and mute.on_original_disks()
    assert os.listdir(target) == []
    # try: it proceeds without quiescing that member, and says so
    wf = submit(cluster, [guest, mute], target, "--quiesce", "try")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", (doc["error"], doc["attention"])
    result = doc["result"]
    assert result["quiesced"] is False
    assert list(result["quiesce_skipped"]) == [mute.name] and result["quiesce_skipped"][mute.name]
    assert result["members"][guest.name]["quiesced"] is True
    assert not guest.frozen() and guest.on_original_disks() and mute.on_original_disks()
    for t, image in mute.references.items():
        assert images_identical(result["members"][mute.name]["files"][t]["path"], image)


def test_a_worker_killed_mid_group(cluster, guest_domain, tmp_path):
    """SIGKILL after the first member's point: recovery thaws both members and the whole group rolls back.
    SIGKILL while copying: the group resumes and succeeds, still quiesced."""
    guests = [guest_domain(), guest_domain()]
    for g in guests:
        g.wait_agent()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_recovery()
    doomed = cluster.start_worker(fault="kill-at:saved:point-taken:pointing_all")
    wf = submit(cluster, guests, target, "--quiesce", "require", "--freeze-deadline", "30")
    doomed.wait(timeout=120)
    assert doomed.returncode == -signal.SIGKILL
    assert all(g.frozen() for g in guests), "the fault should strike while every member is frozen"
    killed_at = time.time()
    while any(g.frozen() for g in guests):
        assert time.time() - killed_at < 15, "a member stayed frozen"
        time.sleep(0.1)
    live = cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back", doc["status"]
    assert [r["decision"] for r in doc["data"]["recoveries"]] == ["rollback"]
    assert all(g.on_original_disks() and not g.frozen() for g in guests)
    assert os.listdir(target) == []
    assert not [p for g in guests for p in os.listdir(g.workdir) if "overlay" in p]

    cluster.kill(live)  # idle: the next job goes to the doomed worker
    live.wait(timeout=30)
    doomed = cluster.start_worker(fault="kill-at:saved:*-intent:copying")
    wf = submit(cluster, guests, target, "--quiesce", "require")
    doomed.wait(timeout=120)
    assert doomed.returncode == -signal.SIGKILL
    assert cluster.show(wf)["state"] == "copying"
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", (doc["error"], doc["attention"])
    assert doc["result"]["quiesced"] is True
    assert all(g.on_original_disks() and not g.frozen() for g in guests)
    assert all(c["ok"] for c in json.loads(cluster.cli("verify", wf, "--json").stdout)["checks"])
