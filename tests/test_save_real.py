"""save, save-restore, managed-save and managed-save-restore on the real tiny guest,
with real worker and recovery processes.

One guest serves the whole module (it boots once); every test leaves it
running.  Outcomes are read where an operator would read them: ``virsh
domstate`` / ``dominfo``, the capture files and their checksums, and inside
the guest (guest-exec): its boot id (the same boot means memory was
restored, not rebooted), /proc/uptime, and the writer's counter.log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid

import pytest

from workflows.store import Store

from .conftest import REDIS_URL
from .realenv import COUNTER_LINE, ENDED, GuestDomain, WorkerCluster, counter_in_image

pytestmark = pytest.mark.real

MARKER = "written-after-the-capture"


# -- module fixtures: one guest, one set of processes ----------------------------------------------
@pytest.fixture(scope="module")
def guest(libvirt_uri, guest_image, tmp_path_factory):
    g = GuestDomain.create(libvirt_uri, tmp_path_factory.mktemp("save-guest"))
    yield g
    g.destroy()


@pytest.fixture(scope="module")
def procs(libvirt_uri, redis_client, tmp_path_factory):
    prefix = f"dct-{uuid.uuid4().hex[:8]}"
    c = WorkerCluster(REDIS_URL, libvirt_uri, prefix, tmp_path_factory.mktemp("save-logs"))
    c.store = Store(redis_client, prefix)  # read records in-process: cheaper than 'domcapture show'
    c.start_recovery()
    yield c
    c.stop()
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("save-captures")


# -- helpers ------------------------------------------------------------------------------------------
def submit(procs, strategy: str, guest, *extra: str) -> str:
    doc = json.loads(procs.cli("submit", strategy, "--domain", guest.name, "--json", *extra).stdout)
    assert doc["status"] == "queued"
    return doc["id"]


def show(procs, wf: str) -> dict:
    doc = procs.store.load(wf).to_dict()
    doc["history"] = procs.store.history(wf)
    return doc


def wait_final(procs, wf: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while True:
        doc = show(procs, wf)
        if doc["status"] in ENDED:
            return doc
        assert time.time() < deadline, f"timed out; workflow is {doc['status']}/{doc['state']}"
        time.sleep(0.1)


def run_to_end(procs, wf: str) -> dict:
    worker = procs.start_worker()
    try:
        return wait_final(procs, wf)
    finally:
        procs.kill(worker)


def killed_in_each_state(procs, points: list[str], submit_fn) -> dict:
    """One workflow; a worker SIGKILLs itself at each point in turn, and each time recovery
    hands the workflow to the next worker; a last worker finishes it."""
    doomed = procs.start_worker(fault=f"kill-at:{points[0]}")
    wf = submit_fn()
    for i, point in enumerate(points):
        if i:
            doomed = procs.start_worker(fault=f"kill-at:{point}")
        doomed.wait(timeout=120)
        assert doomed.returncode == -signal.SIGKILL, f"the worker did not reach {point}"
    doc = run_to_end(procs, wf)
    recoveries = [e for e in doc["history"] if e["event"] == "recovered"]
    assert [e["decision"] for e in recoveries] == ["resume"] * len(points)
    return doc


def guest_view(guest) -> dict:
    """The guest's boot id, uptime and counter.log lines, read inside it."""
    guest.wait_agent()
    out = guest.sh("cat /proc/sys/kernel/random/boot_id /proc/uptime; cat /mnt/vdb/counter.log")
    lines = out.splitlines()
    counter = [tuple(x.split()) for x in lines[2:] if COUNTER_LINE.match(x)]
    return {"boot_id": lines[0].strip(), "uptime": float(lines[1].split()[0]), "lines": lines[2:],
            "counter": [(int(n), float(u)) for n, u in counter]}


def wait_lines(guest, more: int) -> None:
    """Let the writer add ``more`` lines."""
    start = guest.last_counter()
    deadline = time.time() + 60
    while guest.last_counter() < start + more:
        assert time.time() < deadline, "the writer stopped"
        time.sleep(0.3)


def assert_running_same_boot(guest, boot_id: str, uptime_at_least: float) -> dict:
    assert guest.state() == "running"
    view = guest_view(guest)
    assert view["boot_id"] == boot_id, "the guest was rebooted instead of restored"
    assert view["uptime"] >= uptime_at_least, "uptime went back: memory was not restored"
    return view


def assert_capture_files(procs, doc: dict) -> None:
    files = doc["result"]["files"]
    assert set(files) == {"memory", "vda", "vdb"}
    folder = doc["result"]["capture_dir"]
    assert sorted(os.listdir(folder)) == ["manifest.json", "memory.save", "vda.qcow2", "vdb.qcow2"]
    out = json.loads(procs.cli("verify", doc["id"], "--json").stdout)
    assert out["ok"] and {c["item"] for c in out["checks"]} == {"memory", "vda", "vdb"}


def gapless(counter: list[tuple[int, float]]) -> bool:
    return [n for n, _ in counter] == list(range(1, len(counter) + 1))


# -- the capture the rewinds go back to ------------------------------------------------------------
@pytest.fixture(scope="module")
def capture(procs, guest, target, tmp_path_factory):
    wait_lines(guest, 20)
    before = guest_view(guest)
    wf = submit(procs, "save", guest, "--target", str(target))
    doc = run_to_end(procs, wf)
    assert doc["status"] == "succeeded", doc["error"]
    numbers, _ = counter_in_image(doc["result"]["files"]["vdb"]["path"], tmp_path_factory.mktemp("scratch"))
    return {"doc": doc, "before": before, "numbers": numbers}


def test_save_captures_memory_and_disks_and_the_guest_runs_on(procs, guest, capture):
    doc, before = capture["doc"], capture["before"]
    res = doc["result"]
    assert_capture_files(procs, doc)
    assert res["memory_image_bytes"] > 16 * 1024 * 1024
    assert 0 < res["save_seconds"] < res["downtime_s"] and 0 < res["restore_seconds"] < res["downtime_s"]
    view = assert_running_same_boot(guest, before["boot_id"], before["uptime"])
    # the copy of the data disk holds the writer's lines up to the save, gapless
    numbers = capture["numbers"]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= len(before["counter"])
    assert gapless(view["counter"]) and view["counter"][-1][0] > numbers[-1]
    print(f"\nMEASURED save: downtime {res['downtime_s']} s (save {res['save_seconds']} s, copy "
          f"{res['copy_seconds']} s, restore {res['restore_seconds']} s), memory image "
          f"{res['memory_image_bytes']} bytes")


def test_rewind_to_the_capture(procs, guest, capture):
    """After more lines and a marker, the rewind brings back the capture's disks and memory."""
    guest.sh(f"echo {MARKER} >> /mnt/vdb/counter.log; sync /mnt/vdb/counter.log")
    wait_lines(guest, 10)
    wf = submit(procs, "save-restore", guest, "--from", capture["doc"]["id"])
    doc = run_to_end(procs, wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert_rewound(guest, capture, doc)
    res = doc["result"]
    print(f"\nMEASURED save-restore: downtime {res['downtime_s']} s (safety save {res['stop_seconds']} s, "
          f"swap {res['swap_seconds']} s, restore {res['restore_seconds']} s)")


def assert_rewound(guest, capture: dict, doc: dict) -> None:
    saved = capture["numbers"][-1]
    before = capture["before"]
    view = assert_running_same_boot(guest, before["boot_id"], before["uptime"])
    assert not any(MARKER in line for line in view["lines"]), "lines written after the capture survived"
    assert gapless(view["counter"]), "the writer did not continue from the capture"
    # the lines up to the capture are the very lines the guest had written then
    assert view["counter"][:len(before["counter"])] == before["counter"]
    # and the writer continues from the saved point with the saved clock
    after = [u for n, u in view["counter"] if n > saved]
    saved_uptime = dict(view["counter"])[saved]
    assert after and min(after) >= saved_uptime
    folder = os.path.dirname(guest.disks["vda"])
    assert [p for p in os.listdir(folder) if p.startswith("domcapture-")] == []
    assert guest.on_original_disks()
    assert doc["result"]["downtime_s"] > 0


def test_managed_save_and_the_way_back(procs, guest):
    before = guest_view(guest)
    wf = submit(procs, "managed-save", guest)
    doc = run_to_end(procs, wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert guest.state() == "shut off"
    assert "Managed save:   yes" in guest.virsh("dominfo", guest.name)
    assert json.loads(procs.cli("verify", wf, "--json").stdout)["ok"]
    back = run_to_end(procs, submit(procs, "managed-save-restore", guest))
    assert back["status"] == "succeeded", back["error"]
    assert "Managed save:   no" in guest.virsh("dominfo", guest.name)
    view = assert_running_same_boot(guest, before["boot_id"], before["uptime"])
    assert gapless(view["counter"])
    print(f"\nMEASURED managed-save: save {doc['result']['save_seconds']} s; "
          f"managed-save-restore: {back['result']['restore_seconds']} s")

    # a restore keeps nothing: verify says what it did and when (exit 5), never a failure caused by a later
    # stop of the domain, which says nothing about the restore
    said = procs.cli("verify", back["id"], check=False)
    assert said.returncode == 5, said.stdout + said.stderr
    assert said.stdout.startswith(f"{back['id']}: nothing kept to verify: started {guest.name} from its managed "
                                  "save image"), said.stdout
    guest.shutdown()
    try:
        later = procs.cli("verify", back["id"], "--json", check=False)
        assert later.returncode == 5, later.stdout + later.stderr
        out = json.loads(later.stdout)
        assert out["outcome"] == "nothing-kept" and out["ok"], out
        assert out["checks"][0]["at"] == back["data"]["start_started_at"]
        assert procs.cli("verify", back["id"], check=False).stdout == said.stdout
    finally:
        guest.virsh("start", guest.name)
        guest.wait_agent()


# -- SIGKILL in each state ------------------------------------------------------------------------------
SAVE_KILLS = ["saved:save-intent:saving",        # intent recorded, libvirt not called
              "executed:saving",                 # the guest is stopped, the record does not say so yet
              "saved:copy-intent:copying",
              "saved:restore-intent:restoring",  # stopped, about to restore
              "executed:restoring",              # running again, the moment not recorded
              "executed:finalizing"]
REWIND_KILLS = ["saved:stage-intent:staging",
                "executed:stopping",             # the guest saved to its safety image, not recorded
                "saved:swap-intent:swapping",    # one disk set aside, the capture not yet in place
                "saved:restore-intent:restoring",
                "saved:commit:committing"]


def test_sigkill_in_each_state_of_a_save(procs, guest, target):
    before = guest_view(guest)
    doc = killed_in_each_state(procs, SAVE_KILLS, lambda: submit(procs, "save", guest, "--target", str(target)))
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    assert_capture_files(procs, doc)
    assert_running_same_boot(guest, before["boot_id"], before["uptime"])
    # the kill at executed:restoring lost the moment the guest ran again: the next worker found
    # it running, so the downtime it reports is an upper bound, and says so
    assert doc["result"]["downtime_is_upper_bound"] is True
    assert doc["result"]["downtime_s"] > 0
    shutil.rmtree(doc["result"]["capture_dir"])


def test_sigkill_in_each_state_of_a_rewind(procs, guest, capture):
    guest.sh(f"echo {MARKER} >> /mnt/vdb/counter.log; sync /mnt/vdb/counter.log")
    doc = killed_in_each_state(procs, REWIND_KILLS,
                               lambda: submit(procs, "save-restore", guest, "--from", capture["doc"]["id"]))
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    assert_rewound(guest, capture, doc)


def test_sigkill_in_each_state_of_managed_save_and_back(procs, guest):
    before = guest_view(guest)
    doc = killed_in_each_state(procs, ["saved:managed-save-intent:saving", "executed:saving"],
                               lambda: submit(procs, "managed-save", guest))
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    assert guest.state() == "shut off" and "Managed save:   yes" in guest.virsh("dominfo", guest.name)
    doc = killed_in_each_state(procs, ["saved:start-intent:starting", "executed:starting"],
                               lambda: submit(procs, "managed-save-restore", guest))
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    assert_running_same_boot(guest, before["boot_id"], before["uptime"])


# -- rollback by an operator ---------------------------------------------------------------------------
def stranded(procs, point: str, submit_fn) -> str:
    """Killed at ``point`` with no recovery running; the lease then expires."""
    procs.kill(procs.recovery)
    try:
        doomed = procs.start_worker(fault=f"kill-at:{point}")
        wf = submit_fn()
        doomed.wait(timeout=120)
        assert doomed.returncode == -signal.SIGKILL
        time.sleep(2.2)  # the dead worker's lease expires
        assert "rolling back" in procs.cli("rollback", wf).stdout
        return wf
    finally:
        procs.start_recovery()


def test_operator_rollback_of_a_save_restarts_the_stopped_guest(procs, guest, target):
    before = guest_view(guest)
    wf = stranded(procs, "executed:saving", lambda: submit(procs, "save", guest, "--target", str(target)))
    doc = run_to_end(procs, wf)
    assert doc["status"] == "rolled_back"
    assert_running_same_boot(guest, before["boot_id"], before["uptime"])
    assert not [p for p in os.listdir(target) if wf in p], "the rollback left capture files"


def test_operator_rollback_of_a_rewind_puts_everything_back(procs, guest, capture):
    guest.sh(f"echo {MARKER} >> /mnt/vdb/counter.log; sync /mnt/vdb/counter.log")
    wait_lines(guest, 5)
    before = guest_view(guest)
    wf = stranded(procs, "saved:swap-intent:swapping",
                  lambda: submit(procs, "save-restore", guest, "--from", capture["doc"]["id"]))
    doc = run_to_end(procs, wf)
    assert doc["status"] == "rolled_back"
    view = assert_running_same_boot(guest, before["boot_id"], before["uptime"])
    # the guest is where it was before the rewind: the marker and every later line are there
    assert any(MARKER in line for line in view["lines"])
    assert view["counter"][:len(before["counter"])] == before["counter"]
    folder = os.path.dirname(guest.disks["vda"])
    assert [p for p in os.listdir(folder) if p.startswith("domcapture-")] == []
    assert guest.on_original_disks()


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["save-restore"], "--from is required"),
    (["managed-save-restore"], "is running; only a shut off domain"),
    (["managed-save", "--quiesce", "off"], "unrecognized arguments: --quiesce off"),
])
def test_bad_input_is_one_line_and_changes_nothing(procs, guest, args, message):
    before = procs.store.ids()
    out = procs.cli("submit", args[0], "--domain", guest.name, *args[1:], check=False)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.strip().count("\n") == 0
    assert procs.store.ids() == before
    assert guest.state() == "running"


def test_abort_of_a_running_rewind_leaves_the_guest_alone(procs, guest, capture):
    guest.sh(f"echo {MARKER} >> /mnt/vdb/counter.log; sync /mnt/vdb/counter.log")
    before = guest_view(guest)
    worker = procs.start_worker()
    try:
        wf = submit(procs, "save-restore", guest, "--from", capture["doc"]["id"], "--bandwidth", "1M")
        deadline = time.time() + 60
        while not (show(procs, wf)["state"] == "staging" and show(procs, wf)["progress"].get("bytes_done", 0) > 0):
            assert time.time() < deadline, "the rewind never started staging"
            time.sleep(0.1)
        assert "cancel requested" in procs.cli("abort", wf).stdout
        doc = wait_final(procs, wf)
    finally:
        procs.kill(worker)
    assert doc["status"] == "rolled_back" and doc["error"]["message"] == "aborted by operator"
    view = assert_running_same_boot(guest, before["boot_id"], before["uptime"])
    assert any(MARKER in line for line in view["lines"]), "an aborted rewind changed the disks"
    folder = os.path.dirname(guest.disks["vda"])
    assert [p for p in os.listdir(folder) if p.startswith("domcapture-")] == []
