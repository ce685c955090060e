"""snapshot / snapshot-revert / snapshot-delete on the real guest, with real worker processes.

One guest serves the module (it boots once); every test starts and ends
with it running on its original images, without snapshots.  Outcomes are
read where an operator would read them: ``virsh snapshot-list``,
``virsh domblklist``, the images (``qemu-img convert -U`` + ``e2fsck -fn``),
the guest's counter.log and the writer's lines mirrored live to the host.
Measured numbers are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from .realenv import COUNTER_LINE, GuestDomain, counter_in_image, is_gapless_prefix

pytestmark = pytest.mark.real


# -- the shared guest ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_guest(libvirt_uri, guest_image, tmp_path_factory):
    g = GuestDomain.create(libvirt_uri, tmp_path_factory.mktemp("snapshot-guest"))
    yield g
    g.destroy()


def snapshots(g: GuestDomain) -> list[str]:
    return [n for n in g.virsh("snapshot-list", g.name, "--name").split() if n]


def clean(g: GuestDomain) -> None:
    """Back to: running, no snapshot, on the original images, thawed."""
    for _ in range(10):
        leaves = [n for n in g.virsh("snapshot-list", g.name, "--leaves", "--name").split() if n]
        if not leaves:
            break
        for name in leaves:
            g.virsh("snapshot-delete", g.name, name, timeout=120)
    assert snapshots(g) == []
    if g.state() != "running":
        g.virsh("start", g.name)
        g.wait_agent()
    assert g.on_original_disks(), g.blklist()
    assert not g.frozen()


@pytest.fixture
def guest(shared_guest):
    clean(shared_guest)
    yield shared_guest
    clean(shared_guest)


def submit(cluster, g, strategy: str, *extra: str) -> str:
    out = cluster.cli("submit", strategy, "--domain", g.name, "--json", *extra)
    return json.loads(out.stdout)["id"]


def run_to_end(cluster, g, strategy: str, *extra: str) -> dict:
    wf = submit(cluster, g, strategy, *extra)
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", (doc["status"], doc["error"], doc["attention"])
    return doc


def mirrored(g: GuestDomain) -> list[tuple[int, float]]:
    """The writer's lines as the host received them, in arrival order."""
    out = []
    for line in g.writer_log.read_text().splitlines():
        m = COUNTER_LINE.match(line.strip())
        if m:
            out.append((int(m.group(1)), float(m.group(2))))
    return out


def guest_numbers(g: GuestDomain) -> list[int]:
    return [int(m.group(1)) for m in (COUNTER_LINE.match(x) for x in g.sh("cat /mnt/vdb/counter.log").splitlines())
            if m]


class WriterWatch(threading.Thread):
    """Timestamps each new mirrored writer line: the longest silence is the stall the guest saw."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.arrivals: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self._stop_event.is_set():
            n = self.path.read_text().count("\n") if self.path.exists() else 0
            now = time.time()
            self.arrivals.extend([now] * max(0, n - seen))
            seen = max(seen, n)
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t in self.arrivals if start - 1 <= t <= end + 1]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def wait_lines(g: GuestDomain, more: int, timeout: float = 30) -> None:
    target = len(mirrored(g)) + more
    deadline = time.time() + timeout
    while len(mirrored(g)) < target:
        assert time.time() < deadline, "the writer stopped"
        time.sleep(0.1)


# -- success paths ------------------------------------------------------------------------
def test_internal_memory_snapshot_then_revert_restores_memory(cluster, guest):
    cluster.start_worker()
    wait_lines(guest, 10)
    watch = WriterWatch(guest.writer_log)
    watch.start()
    t0 = time.time()
    doc = run_to_end(cluster, guest, "snapshot", "--kind", "internal")
    t1 = time.time()
    res = doc["result"]
    snap = res["snapshot"]
    assert snap == f"domcapture-{doc['id']}" and snapshots(guest) == [snap]
    assert res["state"] == "running" and res["memory"] == "internal" and res["downtime_s"] > 0
    lines_at_snapshot = len(mirrored(guest))
    wait_lines(guest, 30)  # the guest runs on
    before = mirrored(guest)
    r0 = time.time()
    rev = run_to_end(cluster, guest, "snapshot-revert", "--name", snap)
    r1 = time.time()
    wait_lines(guest, 10)
    watch.stop()
    lines = mirrored(guest)
    after = lines[len(before):]
    # the counter went back to the snapshot point and continues from there
    drop = next(i for i, (n, _) in enumerate(after) if n <= before[-1][0])
    resumed_n, resumed_up = after[drop]
    assert resumed_n < before[-1][0] - 20
    first_time = {n: up for n, up in before}
    assert resumed_n in first_time and abs(resumed_up - first_time[resumed_n]) < 1.0, \
        "uptime does not continue from the snapshot's: memory was not restored"
    assert resumed_up < before[-1][1] - 1.0
    assert [n for n, _ in after[drop:]] == list(range(resumed_n, resumed_n + len(after) - drop))
    assert lines_at_snapshot - 40 < resumed_n <= lines_at_snapshot + 2
    numbers = guest_numbers(guest)
    assert is_gapless_prefix(numbers) and numbers[-1] >= resumed_n
    assert rev["result"]["current"] == snap and rev["result"]["memory_restored"] is True
    print(f"\n[measure] internal memory snapshot: call {res['snapshot_seconds']:.3f} s, writer stall "
          f"{watch.longest_gap(t0, t1):.3f} s; revert: call {rev['result']['revert_seconds']:.3f} s, "
          f"workflow {r1 - r0:.2f} s")
    del_doc = run_to_end(cluster, guest, "snapshot-delete", "--name", snap)
    assert del_doc["result"]["deleted_by"] == "libvirt" and snapshots(guest) == []


def test_external_disk_only_quiesced_snapshot_then_delete(cluster, guest, tmp_path):
    cluster.start_worker()
    wait_lines(guest, 10)
    watch = WriterWatch(guest.writer_log)
    watch.start()
    t0 = time.time()
    doc = run_to_end(cluster, guest, "snapshot", "--kind", "external", "--quiesce", "require")
    t1 = time.time()
    watch.stop()
    res = doc["result"]
    assert res["quiesced"] is True and res["state"] == "disk-snapshot" and res["memory"] == "no"
    assert guest.blklist() == res["overlays"] and all(f"domcapture-{doc['id']}-" in p for p in res["overlays"].values())
    assert snapshots(guest) == [res["snapshot"]]
    # the original data image stopped at the snapshot: clean without a journal replay, a gapless prefix
    numbers, verdict = counter_in_image(guest.disks["vdb"], tmp_path / "scratch", replay_journal=False)
    assert verdict.startswith("rc=0"), verdict
    assert numbers and is_gapless_prefix(numbers)
    wait_lines(guest, 5)
    assert guest.last_counter() > numbers[-1]
    print(f"\n[measure] external disk-only quiesced: freeze window {res['freeze_seconds']:.3f} s, snapshot call "
          f"{res['snapshot_seconds']:.3f} s, writer stall {watch.longest_gap(t0, t1):.3f} s")
    verify = cluster.cli("verify", doc["id"])
    assert "verified" in verify.stdout
    d0 = time.time()
    gone = run_to_end(cluster, guest, "snapshot-delete", "--name", res["snapshot"])
    assert gone["result"]["deleted_by"] == "libvirt"
    assert guest.on_original_disks() and snapshots(guest) == []
    assert not any(Path(p).exists() for p in res["overlays"].values())
    assert is_gapless_prefix(guest_numbers(guest))
    print(f"[measure] external snapshot delete (merge back): {time.time() - d0:.2f} s")


def test_snapshot_of_a_shut_off_domain(cluster, guest_domain):
    g = guest_domain(start=False)
    cluster.start_worker()
    refused = cluster.cli("submit", "snapshot", "--domain", g.name, "--memory", "--kind", "external", check=False)
    assert refused.returncode == 2 and "no memory to capture" in refused.stderr
    doc = run_to_end(cluster, g, "snapshot", "--kind", "internal", "--name", "cold")
    assert doc["result"]["state"] == "shutoff" and doc["result"]["memory"] == "no"
    assert snapshots(g) == ["cold"] and g.state() == "shut off" and g.on_original_disks()
    info = g.virsh("snapshot-info", g.name, "cold")
    assert re.search(r"Location:\s+internal", info)
    run_to_end(cluster, g, "snapshot-delete", "--name", "cold")
    assert snapshots(g) == []


# -- SIGKILL in each state ---------------------------------------------------------------------
CREATE_KILLS = [
    ("external", "saved:step-started:preflight"),
    ("external", "saved:freeze-intent:freezing"),
    ("external", "saved:snapshot-intent:snapshotting"),  # frozen, libvirt not called
    ("external", "executed:snapshotting"),               # created while frozen, not recorded
    ("external", "saved:step-started:thawing"),
    ("external", "executed:finalizing"),
    ("internal", "executed:snapshotting"),               # a memory snapshot made, not recorded
]


@pytest.mark.parametrize("kind, point", CREATE_KILLS)
def test_sigkill_during_create_resumes_to_exactly_one_snapshot(cluster, guest, kind, point):
    doomed = cluster.start_worker(fault=f"kill-at:{point}")
    cluster.start_recovery()
    extra = ["--quiesce", "require"] if kind == "external" else []
    wf = submit(cluster, guest, "snapshot", "--kind", kind, *extra)
    doomed.wait(timeout=60)
    assert doomed.returncode == -signal.SIGKILL
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", (doc["error"], doc["attention"])
    assert [e["decision"] for e in doc["history"] if e["event"] == "recovered"] == ["resume"]
    snap = f"domcapture-{wf}"
    assert snapshots(guest) == [snap], "exactly one snapshot of our name"
    # killed after the intent but before the call: issued again; after the call the probe finds it
    intents = [e for e in doc["history"] if e["event"] == "snapshot-intent"]
    assert len(intents) == (2 if point == "saved:snapshot-intent:snapshotting" else 1)
    assert not guest.frozen()
    if kind == "external":
        assert guest.blklist() == doc["result"]["overlays"]
    else:
        assert guest.on_original_disks()
    assert is_gapless_prefix(guest_numbers(guest))


@pytest.mark.parametrize("point", ["saved:revert-intent:reverting", "executed:reverting"])
def test_sigkill_during_revert_resumes(cluster, guest, point):
    guest.virsh("snapshot-create-as", guest.name, "r1", timeout=120)
    wait_lines(guest, 10)
    guest.virsh("snapshot-create-as", guest.name, "r2", timeout=120)
    wait_lines(guest, 10)
    before = len(mirrored(guest))
    doomed = cluster.start_worker(fault=f"kill-at:{point}")
    cluster.start_recovery()
    wf = submit(cluster, guest, "snapshot-revert", "--name", "r1")
    doomed.wait(timeout=60)
    assert doomed.returncode == -signal.SIGKILL
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", (doc["error"], doc["attention"])
    assert guest.virsh("snapshot-current", guest.name, "--name").strip() == "r1"
    intents = [e for e in doc["history"] if e["event"] == "revert-intent"]
    # killed before the call: issued again; after it: the probe sees r1 current and does not revert twice
    assert len(intents) == (2 if point.startswith("saved:") else 1)
    wait_lines(guest, 5)
    lines = mirrored(guest)[before - 1:]
    drops = [i for i, (a, b) in enumerate(zip(lines, lines[1:], strict=False)) if b[0] <= a[0]]
    assert len(drops) == 1, "reverted once"
    assert guest.state() == "running" and is_gapless_prefix(guest_numbers(guest))


# -- operator rollback --------------------------------------------------------------------------
def test_operator_rollback_commits_back_when_libvirt_cannot_delete(cluster, guest):
    """Under an internal snapshot libvirt 9.0 refuses to delete an external one: commit + pivot by hand."""
    guest.virsh("snapshot-create-as", guest.name, "user-base", timeout=120)
    doomed = cluster.start_worker(fault="kill-at:executed:snapshotting")
    wf = submit(cluster, guest, "snapshot", "--kind", "external", "--quiesce", "require", "--freeze-deadline", "30")
    doomed.wait(timeout=60)
    assert sorted(snapshots(guest)) == sorted([f"domcapture-{wf}", "user-base"])
    assert not guest.on_original_disks() and guest.frozen()  # stranded frozen on our overlays
    time.sleep(2.2)  # the dead worker's lease expires
    assert "rolling back" in cluster.cli("rollback", wf).stdout
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back", (doc["error"], doc["attention"])
    assert doc["data"]["deleted_by"] == "commit"
    assert "internal snapshot as parent" in doc["data"]["libvirt_delete_refused"]
    assert snapshots(guest) == ["user-base"]
    assert guest.on_original_disks() and not guest.frozen()
    assert not [p for p in Path(guest.workdir).iterdir() if wf in p.name]
    assert is_gapless_prefix(guest_numbers(guest))
    assert cluster.cli("resume", wf, check=False).returncode == 3


# -- bad input ----------------------------------------------------------------------------------
BAD_INPUT = [
    (["snapshot-revert"], "--name is required"),
    (["snapshot-revert", "--name", "nope"], "has no snapshot named 'nope'"),
    (["snapshot-delete", "--name", "nope"], "has no snapshot named 'nope'"),
    (["snapshot", "--kind", "bogus"], "--kind must be one of internal, external"),
    (["snapshot", "--kind", "internal", "--quiesce", "require"], "--quiesce applies to disk-only"),
    (["snapshot", "--kind", "external", "--memory", "--quiesce", "try"], "--quiesce applies to disk-only"),
    (["snapshot", "--name", "two words"], "is not a valid snapshot name"),
    (["snapshot", "--kind", "internal", "--target", "/tmp"], "--target applies to --kind external"),
    (["snapshot", "--name", "existing"], "already has a snapshot named 'existing'"),
    (["snapshot", "--kind", "external"], "already has a backing chain"),  # stacking on an external snapshot
    (["snapshot-revert", "--name", "ext"], "reverts only to internal snapshots"),
    (["snapshot-delete", "--name", "ext"], "has 1 child snapshot(s)"),
    (["snapshot-revert", "--name", "existing", "--kind", "internal"], "unrecognized arguments: --kind internal"),
]


def test_bad_input_is_refused_and_changes_nothing(cluster, guest):
    guest.virsh("snapshot-create-as", guest.name, "ext", "--disk-only", "--diskspec", "vda,snapshot=no",
                "--diskspec", f"vdb,file={guest.workdir}/ext-vdb.qcow2")
    guest.virsh("snapshot-create-as", guest.name, "existing", timeout=120)
    blk = guest.blklist()
    for args, message in BAD_INPUT:
        out = cluster.cli("submit", args[0], "--domain", guest.name, *args[1:], check=False)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and out.stderr.strip().count("\n") == 0, (args, out.stderr)
    assert json.loads(cluster.cli("list", "--json").stdout) == []
    assert sorted(snapshots(guest)) == ["existing", "ext"] and guest.blklist() == blk
