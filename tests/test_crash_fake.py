"""Every crash point of snapshot-backup, exhaustively, on the in-memory hypervisor.

A dry run lists every boundary the engine and the hypervisor pass (record
saves, probes, effects, the instant before and after each libvirt call).
Then, for each one, a fresh workflow is crashed exactly there, recovered the
way the recovery process does it, and run to the end.  The outcome must be
``succeeded`` or ``rolled_back`` with: no disk on an overlay, no block job,
no frozen guest, no overlay file, guest writes preserved, and a succeeded
backup byte-identical to the disks at snapshot time.  The same contract is
checked against real libvirt in test_hypervisor_contract.py and
test_snapshot_backup_real.py.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time

import pytest

from workflows import strategies
from workflows.engine import Engine
from workflows.errors import LeaseLost
from workflows.hypervisor.base import UndeclaredCall, fenced
from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import ROLLED_BACK, SUCCEEDED
from workflows.service import Captures

from .crashkit import Crasher, drive_to_end, make_engine, run_once

POST_SNAPSHOT_WRITE = (8192, b"\xee" * 4096)


class World:
    def __init__(self, tmp_path, store, quiesce: str = "require", **params) -> None:
        self.store = store
        self.dir = tmp_path / "disks"
        self.dir.mkdir(parents=True)
        (tmp_path / "bk").mkdir()
        self.target = str(tmp_path / "bk")
        self.paths = {"vda": str(self.dir / "vda.img"), "vdb": str(self.dir / "vdb.img")}
        self.initial = {"vda": os.urandom(3 * 1024 * 1024 + 123), "vdb": os.urandom(200 * 1024)}
        for t, p in self.paths.items():
            with open(p, "wb") as f:
                f.write(self.initial[t])
        self.fake = FakeHypervisor()
        self.fake.add_domain("dom", self.paths, agent=True)
        self.crasher = Crasher()
        self.wrote_after_snapshot = False
        self.frozen_at_snapshot: bool | None = None  # what the hypervisor saw, not what the record says
        self.fake.hook = self._hv_hook
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: None)
        self.rec = self.captures.submit("snapshot-backup", "dom", "fake:///default",
                                        {"target": self.target, "quiesce": quiesce, **params})

    def _hv_hook(self, when: str, method: str) -> None:
        if (when, method) == ("after", "snapshot_disk_only"):
            self.frozen_at_snapshot = self.fake.domains["dom"].frozen
        if (when, method) == ("after", "snapshot_disk_only") and not self.wrote_after_snapshot:
            self.wrote_after_snapshot = True  # the guest keeps writing: onto the overlay
            self.fake.guest_write("dom", "vda", *POST_SNAPSHOT_WRITE)
        self.crasher(f"hv-{when}:{method}")

    def engine(self, worker: str = "w1") -> Engine:
        return make_engine(self.store, self.fake, self.crasher, worker)

    def run(self, worker: str = "w1") -> bool:
        return run_once(self.store, self.fake, self.rec.id, self.crasher, worker)

    def drive_to_end(self) -> dict:
        return drive_to_end(self.store, self.captures, self.fake, self.rec.id, self.crasher)

    def expected_live(self, target: str) -> bytes:
        data = bytearray(self.initial[target])
        if target == "vda" and self.wrote_after_snapshot:
            off, payload = POST_SNAPSHOT_WRITE
            data[off:off + len(payload)] = payload
        return bytes(data)

    def expected_quiesced(self, rec: dict) -> bool:
        """Quiesced exactly when the guest was frozen at the instant of the snapshot and the
        worker itself ended that freeze.  A freeze that recovery had to break after a crash is
        reported as not quiesced (an understatement, never an overstatement)."""
        assert self.frozen_at_snapshot is not None, "no snapshot was taken"
        broken_by = (rec["data"].get("last_thaw") or {}).get("by")
        return self.frozen_at_snapshot and broken_by not in ("recovery", "freeze-watchdog")

    def check_invariants(self, rec: dict) -> None:
        dom = self.fake.domains["dom"]
        assert rec["status"] in (SUCCEEDED, ROLLED_BACK), rec["status"]
        assert not dom.frozen, "guest left frozen"
        for t, d in dom.disks.items():
            assert d.overlay is None, f"{t} left on overlay {d.overlay}"
            assert d.job_polls is None, f"{t} left with a block job"
            with open(self.paths[t], "rb") as f:
                assert f.read() == self.expected_live(t), f"guest data of {t} lost"
        assert [p for p in os.listdir(self.dir) if "overlay" in p] == []
        backup_dirs = os.listdir(self.target)
        if rec["status"] == SUCCEEDED:
            (bdir,) = backup_dirs
            manifest = json.load(open(os.path.join(self.target, bdir, "manifest.json")))
            assert manifest["workflow"] == self.rec.id
            assert manifest["quiesced"] is self.expected_quiesced(rec), (manifest["quiesced"], rec["data"])
            assert rec["result"]["quiesced"] is manifest["quiesced"]
            for f in manifest["files"]:
                with open(f["path"], "rb") as fh:
                    assert fh.read() == self.initial[f["disk"]], f"backup of {f['disk']} differs"
            assert not [p for p in os.listdir(os.path.join(self.target, bdir)) if p.endswith(".partial")]
        else:
            assert backup_dirs == [], f"rollback left {backup_dirs}"


def _points(tmp_path, store, **kw) -> list[tuple[str, int]]:
    w = World(tmp_path / "dry", store, **kw)
    assert not w.run()
    rec = store.load(w.rec.id)
    assert rec.status == SUCCEEDED
    w.check_invariants(rec.to_dict())
    return w.crasher.seen


def test_dry_run_passes_every_kind_of_boundary(tmp_path, store):
    labels = {label for label, _ in _points(tmp_path, store)}
    for expected in ("saved:snapshot-intent:snapshotting", "hv-after:snapshot_disk_only",
                     "executed:snapshotting", "hv-before:block_commit_active", "hv-after:block_pivot",
                     "saved:progress:copying", "hv-after:fs_freeze", "hv-after:fs_thaw"):
        assert expected in labels


def test_every_crash_point_resumes_or_rolls_back_cleanly(tmp_path, store):
    points = _points(tmp_path, store)
    outcomes: collections.Counter = collections.Counter()
    for i, point in enumerate(points):
        w = World(tmp_path / f"p{i}", store)
        w.crasher.target = point
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        w.check_invariants(rec)
        outcomes[rec["status"]] += 1
    # Every crash point resumes: nothing in this sequence needs a rollback.
    assert outcomes == {SUCCEEDED: len(points)}, outcomes


def test_recovery_thaws_a_guest_frozen_by_a_dead_worker(tmp_path, store):
    w = World(tmp_path, store)
    w.crasher.target = ("hv-after:fs_freeze", 1)
    assert w.run()
    assert w.fake.domains["dom"].frozen
    assert w.captures.recover(w.rec.id) == "resume"
    assert not w.fake.domains["dom"].frozen
    rec = w.store.load(w.rec.id)
    assert rec.data["freeze_broken"] and rec.data["last_thaw"]["by"] == "recovery"
    final = w.drive_to_end()
    w.check_invariants(final)
    # the snapshot went back through freezing: the guest was frozen again when it was taken,
    # the worker thawed it, and the capture says quiesced
    assert w.frozen_at_snapshot is True
    assert final["data"]["last_thaw"]["by"].startswith("w")
    assert "freeze_broken" not in final["data"]
    assert final["result"]["quiesced"] is True


def test_a_capture_taken_without_a_freeze_says_it_is_not_quiesced(tmp_path, store):
    w = World(tmp_path, store, quiesce="off")
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    w.check_invariants(rec)
    assert w.frozen_at_snapshot is False
    assert rec["result"]["quiesced"] is False


def _rollback_points(tmp_path, store, crash_first: tuple[str, int]) -> list[tuple[str, int]]:
    w = World(tmp_path / "rb-dry", store)
    w.crasher.target = crash_first
    assert w.run()
    w.captures.rollback(w.rec.id)
    w.crasher = Crasher()
    assert not w.run()
    rec = w.store.load(w.rec.id).to_dict()
    w.check_invariants(rec)
    assert rec["status"] == ROLLED_BACK
    return w.crasher.seen


@pytest.mark.parametrize("first", [("executed:snapshotting", 1), ("saved:progress:copying", 1),
                                   ("hv-after:block_commit_active", 1), ("hv-after:fs_freeze", 1)])
def test_every_crash_point_of_an_operator_rollback(tmp_path, store, first):
    points = _rollback_points(tmp_path, store, first)
    for i, point in enumerate(points):
        w = World(tmp_path / f"r{i}", store)
        w.crasher.target = first
        assert w.run()
        w.captures.rollback(w.rec.id)
        w.crasher = Crasher(point)
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        assert rec["status"] == ROLLED_BACK
        w.check_invariants(rec)


def test_a_worker_woken_after_losing_its_lease_changes_nothing(tmp_path, store):
    """SIGSTOP until the lease expires, another worker finishes, then SIGCONT."""
    w = World(tmp_path, store)
    outcome = {}

    def stop_here(label: str) -> None:
        if label == "saved:copy-intent:copying" and not outcome:
            # "stopped": the lease expires, recovery hands the workflow to w2
            store.r.delete(f"{store.prefix}:wf:{w.rec.id}:lease")
            assert w.captures.recover(w.rec.id) == "resume"
            outcome["other"] = w.engine("w2").run(w.rec.id)
            outcome["snapshot"] = (store.load(w.rec.id).rev, open(w.paths["vda"], "rb").read(),
                                   sorted(os.listdir(w.target)))
    zombie = Engine(store, strategies.DEFINITIONS, lambda uri: w.fake, "w1", retry_delays=(0,),
                    crash_hook=stop_here, sleep=lambda s: None)
    # the zombie's local clock says its lease is gone as soon as it wakes
    result = zombie.run(w.rec.id)
    assert outcome["other"] == SUCCEEDED
    assert result == "lease-lost"
    rev, vda, listing = outcome["snapshot"]
    assert store.load(w.rec.id).rev == rev
    assert open(w.paths["vda"], "rb").read() == vda
    assert sorted(os.listdir(w.target)) == listing
    w.check_invariants(store.load(w.rec.id).to_dict())


def test_lease_lost_is_raised_by_the_fence_before_any_effect(tmp_path, store):
    """The real fenced wrapper around the fake: a lost lease stops a mutating call before the
    hypervisor sees it; with the lease held, the very same call goes through."""
    w = World(tmp_path, store)
    seen: list[tuple[str, str]] = []
    w.fake.hook = lambda when, method: seen.append((when, method))
    lease = store.acquire_lease(w.rec.id, "w1", 5)
    hv = fenced(w.fake, lambda call: lease.check())
    overlays = {t: str(w.dir / f"domcapture-{w.rec.id}-{t}.overlay") for t in w.paths}
    store.r.delete(f"{store.prefix}:wf:{w.rec.id}:lease")  # taken away, as by an expiry
    with pytest.raises(LeaseLost):
        hv.snapshot_disk_only("dom", overlays)
    with pytest.raises(LeaseLost):
        hv.fs_freeze("dom")
    assert seen == []  # the fake was never called
    dom = w.fake.domains["dom"]
    assert not dom.frozen
    assert all(d.overlay is None for d in dom.disks.values())
    assert sorted(os.listdir(w.dir)) == ["vda.img", "vdb.img"]
    # looking stays allowed, and a method declared nowhere cannot be reached at all
    assert [d.source for d in hv.disks("dom")] == [w.paths["vda"], w.paths["vdb"]]
    with pytest.raises(UndeclaredCall):
        hv.guest_write  # noqa: B018 (a fake-only method, in neither READ_ONLY nor MUTATING)
    # the control: the same call with a lease that is ours changes the domain
    held = store.acquire_lease(w.rec.id, "w2", 5)
    hv = fenced(w.fake, lambda call: held.check())
    hv.snapshot_disk_only("dom", overlays)
    assert seen == [("before", "snapshot_disk_only"), ("after", "snapshot_disk_only")]
    assert {t: d.overlay for t, d in dom.disks.items()} == overlays
    assert all(os.path.exists(p) for p in overlays.values())


def test_a_guest_frozen_past_its_deadline_is_thawed_once_by_the_watchdog_and_a_hung_thaw_keeps_the_lease(
        tmp_path, store):
    """The snapshot call hangs 3 s with the guest frozen and a 0.5 s deadline: the freeze watchdog
    thaws it once, while the step still hangs, and records it; its own thaw hangs 2 s, longer than
    the 1 s lease, and the lease is renewed all the same (a renewal that waited on the agent would
    lose it, and the step's next fenced call would end the run as lease-lost)."""
    w = World(tmp_path / "w", store, freeze_deadline=0.5)
    seen: list[tuple[str, str, str, bool]] = []
    hung = {"snapshot": False, "thaw": False}

    def hook(when: str, method: str) -> None:
        seen.append((threading.current_thread().name, when, method, w.fake.domains["dom"].frozen))
        if (when, method) == ("before", "snapshot_disk_only") and not hung["snapshot"]:
            hung["snapshot"] = True
            time.sleep(3.0)
        if (when, method) == ("before", "fs_thaw") and not hung["thaw"]:
            hung["thaw"] = True
            time.sleep(2.0)
        w._hv_hook(when, method)
    w.fake.hook = hook

    engine = Engine(store, strategies.DEFINITIONS, lambda uri: w.fake, "w1", lease_ttl=1.0,
                    retry_delays=(0,), sleep=lambda s: None)
    assert engine.run(w.rec.id) == SUCCEEDED  # never lease-lost, never recovered
    thaws = [(thread, frozen) for thread, when, method, frozen in seen if (when, method) == ("before", "fs_thaw")]
    assert thaws[0] == (f"freeze-watchdog-{w.rec.id}", True)  # the watchdog thawed a frozen guest ...
    assert all(not frozen for _, frozen in thaws[1:])  # ... and nothing thawed a frozen guest again
    done = store.load(w.rec.id).to_dict()
    events = [e for e in store.history(w.rec.id) if e["event"] == "thawed-at-deadline"]
    assert len(events) == 1 and events[0]["by"] == "freeze-watchdog" and events[0]["thawed_filesystems"] == 2
    assert events[0]["frozen_seconds"] >= 0.5
    assert done["data"]["freeze_broken"] == "thawed at its deadline by the freeze watchdog"
    assert not [e for e in store.history(w.rec.id) if e["event"] in ("lease-lost", "recovered")]
    assert w.frozen_at_snapshot is False  # thawed before the snapshot: the backup is not called quiesced
    w.check_invariants(done)
    assert done["result"]["quiesced"] is False


def test_an_expired_workers_watchdog_does_not_thaw_the_new_owners_freeze(tmp_path, store):
    """A worker whose lease expired (stopped longer than its TTL) wakes with a freeze deadline passed in
    its watchdog; meanwhile another worker took the workflow over and froze the guest itself.  The old
    watchdog asks for the lease right before it would thaw, finds it gone, and stops: the new owner's
    guest stays frozen, its freeze its own."""
    from workflows.engine import FreezeWatchdog
    w = World(tmp_path / "w", store)
    old = store.acquire_lease(w.rec.id, "old-worker", 0.3)
    assert old is not None
    deadline = time.monotonic() + 5
    while (new := store.acquire_lease(w.rec.id, "new-worker", 30)) is None:  # the old one's TTL runs out
        assert time.monotonic() < deadline
        time.sleep(0.05)
    w.fake.fs_freeze("dom")  # the new owner's freeze
    dog = FreezeWatchdog(store, w.rec.id, "dom", old, lambda: w.fake, poll=0.01)
    dog.observe({"since": time.time() - 10, "until": time.time() - 1})  # the old worker's deadline, passed
    dog.start()
    dog.join(timeout=5)
    assert not dog.is_alive()  # it stopped by itself, on the lease
    assert w.fake.domains["dom"].frozen  # ... without thawing the new owner's guest
    assert not [e for e in store.history(w.rec.id) if e["event"] == "thawed-at-deadline"]
    # the new owner's own watchdog, past its deadline, does thaw
    mine = FreezeWatchdog(store, w.rec.id, "dom", new, lambda: w.fake, poll=0.01)
    mine.observe({"since": time.time() - 10, "until": time.time() - 1})
    mine.start()
    limit = time.monotonic() + 5
    while w.fake.domains["dom"].frozen:
        assert time.monotonic() < limit, "the owner's watchdog never thawed"
        time.sleep(0.01)
    mine.stop()
    mine.join(timeout=5)
    new.release()
