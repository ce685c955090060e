"""Hooks around the freeze, on the real guest: a pre-freeze command's marker is in the backup, the
post-thaw command runs after the thaw; a hanging hook is cut off and the guest is never left frozen."""

from __future__ import annotations

import json
import time

import pytest

from .realenv import run

pytestmark = pytest.mark.real


def file_in_image(image: str, name: str, scratch) -> str:
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / "vdb.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", image, str(raw))
    run("e2fsck", "-fy", str(raw), check=False)
    out = run("debugfs", "-R", f"cat /{name}", str(raw)).stdout
    raw.unlink()
    return out


def submit(cluster, guest, target, *extra: str) -> str:
    out = cluster.cli("submit", "snapshot-backup", "--domain", guest.name, "--target", str(target), "--json",
                      *extra)
    return str(json.loads(out.stdout)["id"])


def test_pre_freeze_marker_is_in_the_backup_and_post_thaw_runs_after(cluster, guest_domain, tmp_path):
    guest = guest_domain()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    wf = submit(cluster, guest, target, "--quiesce", "require",
                "--pre-freeze", "echo hooked-$(cat /proc/uptime) > /mnt/vdb/marker && sync",
                "--post-thaw", "echo thawed > /mnt/vdb/after && sync")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    hooks = doc["data"]["hooks"]
    assert hooks["pre_freeze"]["ok"] and hooks["post_thaw"]["ok"] and hooks["pre_freeze"]["where"] == "guest"
    assert doc["result"]["quiesced"] is True
    marker = file_in_image(doc["result"]["files"]["vdb"]["path"], "marker", tmp_path / "s")
    assert marker.startswith("hooked-"), marker
    # the post-thaw file is written after the snapshot: in the guest, not in the backup
    assert guest.sh("cat /mnt/vdb/after").strip() == "thawed"
    assert "thawed" not in file_in_image(doc["result"]["files"]["vdb"]["path"], "after", tmp_path / "s")
    events = [e["event"] for e in doc["history"]]
    assert events.index("pre-freeze-done") < events.index("freeze-intent") < events.index("post-thaw-intent")
    assert not guest.frozen()


def test_a_hanging_pre_freeze_hook_is_cut_off_and_the_guest_is_not_frozen(cluster, guest_domain, tmp_path):
    guest = guest_domain()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    started = time.time()
    wf = submit(cluster, guest, target, "--quiesce", "try", "--pre-freeze", "sleep 600",
                "--post-thaw", "echo ran > /mnt/vdb/post && sync", "--hook-timeout", "3")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert time.time() - started < 120
    pre = doc["data"]["hooks"]["pre_freeze"]
    assert pre["timed_out"] is True and pre["ok"] is False and 3 <= pre["seconds"] < 10
    assert doc["result"]["quiesced"] is False and "cut off" in doc["data"]["quiesce_error"]
    assert doc["data"]["hooks"]["post_thaw"]["ok"] is True
    assert guest.sh("cat /mnt/vdb/post").strip() == "ran"
    assert not guest.frozen()
    assert "sleep 600" not in guest.sh("ps")  # killed in the guest, not left running


def test_a_failing_pre_freeze_hook_with_quiesce_require_rolls_back(cluster, guest_domain, tmp_path):
    guest = guest_domain()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    wf = submit(cluster, guest, target, "--quiesce", "require", "--pre-freeze", "exit 3",
                "--post-thaw", "echo ran > /mnt/vdb/post2 && sync")
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back"
    assert "pre-freeze hook failed: exit code 3" in doc["error"]["message"]
    assert doc["data"]["hooks"]["post_thaw"]["ok"] is True  # the post-thaw hook ran in the rollback
    assert guest.sh("cat /mnt/vdb/post2").strip() == "ran"
    assert not guest.frozen() and list(target.iterdir()) == []


def test_host_hooks_around_a_direct_backup_freeze_see_the_workflow(cluster, guest_domain, tmp_path):
    """``--hooks-on host`` with direct-backup: both commands run on the worker's host, in order around
    the freeze, with the domain, the workflow and the phase in their environment."""
    guest = guest_domain()
    guest.wait_agent()
    target = tmp_path / "backups"
    target.mkdir()
    log = tmp_path / "hooks.log"
    line = f'echo "$DOMCAPTURE_PHASE $DOMCAPTURE_WORKFLOW $DOMCAPTURE_DOMAIN" >> {log}'
    cluster.start_worker()
    out = cluster.cli("submit", "direct-backup", "--domain", guest.name, "--target", str(target), "--json",
                      "--quiesce", "require", "--hooks-on", "host", "--pre-freeze", line, "--post-thaw", line)
    wf = str(json.loads(out.stdout)["id"])
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert log.read_text().splitlines() == [f"pre-freeze {wf} {guest.name}", f"post-thaw {wf} {guest.name}"]
    hooks = doc["data"]["hooks"]
    assert hooks["pre_freeze"]["ok"] and hooks["post_thaw"]["ok"] and hooks["pre_freeze"]["where"] == "host"
    assert doc["result"]["quiesced"] is True
    events = [e["event"] for e in doc["history"]]
    assert events.index("pre-freeze-done") < events.index("freeze-intent") < events.index("post-thaw-intent")
    assert not guest.frozen()
