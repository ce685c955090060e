"""Every crash point of snapshot, snapshot-revert and snapshot-delete, on the in-memory hypervisor.

A dry run lists every boundary (record saves, probes, the instant before and
after each libvirt call); then a fresh workflow is crashed at each one,
recovered the way the recovery process does it, and run to the end.  The
outcome must be ``succeeded`` with exactly one snapshot of our name, or
``rolled_back`` with none and the domain on its original images; never a
frozen guest, a block job, a stray file, or a guest write lost.
"""

from __future__ import annotations

import collections
import json
import os
from typing import cast

import pytest

from workflows import naming
from workflows.hypervisor.fake import FakeHypervisor
from workflows.hypervisor.snapshot_info import SnapshotInfo
from workflows.record import PARTIALLY_ROLLED_BACK, ROLLED_BACK, SUCCEEDED
from workflows.service import Captures

from .crashkit import Crasher, drive_to_end, run_once

POST_WRITE = (8192, b"\xee" * 4096)  # what the guest writes right after the snapshot


class World:
    """A fake domain with two disks of known bytes, a guest that keeps running, one workflow."""

    s1: dict[str, bytes]  # the disks at snapshot s1 (set by the revert set-ups)
    cold: dict[str, bytes]  # the disks at the shut-off snapshot "cold"

    def __init__(self, tmp_path, store, strategy: str, params: dict, *, state: str = "running",
                 setup=None) -> None:
        self.store = store
        self.dir = tmp_path / "disks"
        self.dir.mkdir(parents=True)
        self.paths = {"vda": str(self.dir / "vda.qcow2"), "vdb": str(self.dir / "vdb.qcow2")}
        self.initial = {"vda": os.urandom(64 * 1024), "vdb": os.urandom(32 * 1024)}
        for t, p in self.paths.items():
            with open(p, "wb") as f:
                f.write(self.initial[t])
        self.fake = FakeHypervisor()
        self.fake.add_domain("dom", self.paths, agent=True, state=state)
        self.fake.guest_runs("dom", 100)
        if setup:
            setup(self)
        self.before = {t: open(p, "rb").read() for t, p in self.paths.items()}
        self.snaps_before = self.fake.list_snapshot_names("dom")
        self.crasher = Crasher()
        self.wrote = False
        self.fake.hook = self._hv_hook
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: None)
        self.rec = self.captures.submit(strategy, "dom", "fake:///default", params)

    def _hv_hook(self, when: str, method: str) -> None:
        if when == "after" and method == "create_snapshot" and not self.wrote:
            self.wrote = True  # the guest runs on and writes, right after the libvirt call
            self.fake.guest_runs("dom", 7)
            if self.fake.domains["dom"].state == "running":
                self.fake.guest_write("dom", "vda", *POST_WRITE)
        self.crasher(f"hv-{when}:{method}")

    def run(self, worker: str = "w1") -> bool:
        return run_once(self.store, self.fake, self.rec.id, self.crasher, worker)

    def drive_to_end(self) -> dict:
        return drive_to_end(self.store, self.captures, self.fake, self.rec.id, self.crasher)

    def live(self, target: str) -> bytes:
        """The guest's view of a disk, overlay writes included."""
        d = self.fake.domains["dom"].disks[target]
        data = bytearray(open(d.base, "rb").read())
        if d.overlay:
            for off, hexdata in json.load(open(d.overlay))["writes"]:
                data[off:off + len(hexdata) // 2] = bytes.fromhex(hexdata)
        return bytes(data)

    def expected_live(self, target: str) -> bytes:
        data = bytearray(self.before[target])
        if target == "vda" and self.wrote and self.fake.domains["dom"].state == "running":
            off, payload = POST_WRITE
            data[off:off + len(payload)] = payload
        return bytes(data)

    def our_files(self) -> list[str]:
        return sorted(p for p in os.listdir(self.dir) if self.rec.id in p)

    def check_common(self, rec: dict) -> None:
        dom = self.fake.domains["dom"]
        assert rec["status"] in (SUCCEEDED, ROLLED_BACK), (rec["status"], rec["error"], rec["attention"])
        assert not dom.frozen, "guest left frozen"
        assert all(d.job_polls is None for d in dom.disks.values()), "block job left behind"


# -- create ----------------------------------------------------------------------------
CREATE_CASES = {
    "internal-running": ({"kind": "internal"}, "running"),
    "external-disk-only-quiesced": ({"kind": "external", "quiesce": "require"}, "running"),
    "external-memory": ({"kind": "external", "memory": True}, "running"),
    "internal-shutoff": ({"kind": "internal"}, "shutoff"),
    "external-shutoff": ({"kind": "external"}, "shutoff"),
}


def internal_parent(w: World) -> None:
    """A user's internal snapshot exists: libvirt 9.0 then refuses to delete an external child."""
    w.fake.create_snapshot("dom", "user-base", description="the user's", memory=True)


def check_create(w: World, rec: dict) -> None:
    w.check_common(rec)
    dom = w.fake.domains["dom"]
    snap = naming.snapshot_name(w.rec.id)
    names = w.fake.list_snapshot_names("dom")
    assert [n for n in w.snaps_before] == [n for n in names if n != snap], "someone else's snapshot touched"
    for t in w.paths:
        assert w.live(t) == w.expected_live(t), f"guest data of {t} lost"
    if rec["status"] == SUCCEEDED:
        assert names.count(snap) == 1
        info = cast(SnapshotInfo, w.fake.lookup_snapshot("dom", snap))  # the count above: it exists
        assert info.description == f"domcapture workflow {w.rec.id}" and info.current
        assert rec["result"]["snapshot"] == snap
        if rec["params"]["kind"] == "external":
            assert {t: d.overlay for t, d in dom.disks.items()} == info.overlays
            for t, d in dom.disks.items():  # the originals stopped at the snapshot
                assert open(d.base, "rb").read() == w.before[t]
            if rec["params"]["memory"]:
                mem = rec["result"]["files"]["memory"]
                assert os.path.exists(mem["path"]) and json.load(open(mem["path"]))["uptime"] == 100
        else:
            assert w.our_files() == []
            assert all(d.overlay is None for d in dom.disks.values())
        # a freeze a recovery had to break is not claimed, even if the snapshot may have been taken under it
        assert rec["result"]["quiesced"] == (rec["params"]["quiesce"] != "off" and not rec["data"].get("freeze_broken"))
    else:
        assert snap not in names
        assert all(d.overlay is None for d in dom.disks.values()), "left on an overlay"
        assert w.our_files() == [], w.our_files()


def _dry(tmp_path, store, params, state, setup=None) -> list[tuple[str, int]]:
    w = World(tmp_path / "dry", store, "snapshot", params, state=state, setup=setup)
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == SUCCEEDED, rec["error"]
    check_create(w, rec)
    return w.crasher.seen


def test_dry_run_passes_every_kind_of_boundary(tmp_path, store):
    labels = {label for label, _ in _dry(tmp_path, store, {"kind": "external", "quiesce": "require"}, "running")}
    for expected in ("saved:snapshot-intent:snapshotting", "hv-before:create_snapshot", "hv-after:create_snapshot",
                     "executed:snapshotting", "hv-after:fs_freeze", "hv-after:fs_thaw", "probed:snapshotting",
                     "saved:step-done:finalizing"):
        assert expected in labels, expected


@pytest.mark.parametrize("case", sorted(CREATE_CASES))
def test_create_every_crash_point_resumes(tmp_path, store, case):
    params, state = CREATE_CASES[case]
    points = _dry(tmp_path, store, params, state)
    outcomes: collections.Counter = collections.Counter()
    for i, point in enumerate(points):
        w = World(tmp_path / f"p{i}", store, "snapshot", params, state=state)
        w.crasher.target = point
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        check_create(w, rec)
        outcomes[rec["status"]] += 1
    assert outcomes == {SUCCEEDED: len(points)}, outcomes


ROLLBACK_CASES = [  # where the first worker died, and what the rollback then deletes the snapshot with
    (("saved:snapshot-intent:snapshotting", 1), None),    # intent recorded, libvirt not called
    (("hv-after:fs_freeze", 1), None),                    # frozen, nothing created
    (("saved:step-started:thawing", 1), None),            # created, still frozen: libvirt's delete
    (("executed:snapshotting", 1), internal_parent),      # libvirt refuses: commit + pivot by hand
]


@pytest.mark.parametrize("first, setup", ROLLBACK_CASES, ids=lambda v: v[0] if isinstance(v, tuple) else
                         (v.__name__ if v else "plain"))
def test_create_every_crash_point_of_an_operator_rollback(tmp_path, store, first, setup):
    params, state = {"kind": "external", "quiesce": "require"}, "running"
    dry = World(tmp_path / "dry", store, "snapshot", params, state=state, setup=setup)
    dry.crasher.target = first
    assert dry.run()
    dry.captures.rollback(dry.rec.id)
    dry.crasher = Crasher()
    assert not dry.run()
    rec = store.load(dry.rec.id).to_dict()
    assert rec["status"] == ROLLED_BACK, rec["attention"]
    check_create(dry, rec)
    if setup and first[0] in ("executed:snapshotting", "saved:step-started:thawing"):
        assert rec["data"]["deleted_by"] == "commit" and "internal snapshot as parent" in \
            rec["data"]["libvirt_delete_refused"]
    for i, point in enumerate(dry.crasher.seen):
        w = World(tmp_path / f"r{i}", store, "snapshot", params, state=state, setup=setup)
        w.crasher.target = first
        assert w.run()
        w.captures.rollback(w.rec.id)
        w.crasher = Crasher(point)
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        assert rec["status"] == ROLLED_BACK, (point, rec["attention"])
        check_create(w, rec)


def test_rollback_of_an_internal_memory_snapshot(tmp_path, store):
    w = World(tmp_path, store, "snapshot", {"kind": "internal"})
    w.crasher.target = ("executed:snapshotting", 1)
    assert w.run()
    assert naming.snapshot_name(w.rec.id) in w.fake.list_snapshot_names("dom")
    w.captures.rollback(w.rec.id)
    rec = w.drive_to_end()
    assert rec["status"] == ROLLED_BACK and rec["data"]["deleted_by"] == "libvirt"
    check_create(w, rec)


def test_a_create_still_running_in_libvirtd_is_waited_for(tmp_path, store):
    """The worker died inside the libvirt call; libvirtd still holds the domain when the next one
    probes, and the snapshot exists only once that job ends.  A probe that looked without waiting
    would find nothing and create the snapshot a second time."""
    w = World(tmp_path, store, "snapshot", {"kind": "internal"})
    w.crasher.target = ("hv-after:create_snapshot", 1)
    assert w.run()
    snap = naming.snapshot_name(w.rec.id)
    st = w.fake._snap_state("dom")
    made_by_libvirtd, current = st.snaps.pop(snap), st.current
    st.current = made_by_libvirtd.info.parent
    w.fake.set_domain_busy("dom", 3)
    busy = w.fake.is_domain_busy

    def libvirtd_job(name: str) -> bool:  # after its last busy answer the job has ended: the snapshot is there
        if busy(name):
            return True
        if snap not in st.snaps:
            st.snaps[snap], st.current = made_by_libvirtd, current
        return False
    w.fake.is_domain_busy = libvirtd_job
    rec = w.drive_to_end()
    assert rec["status"] == SUCCEEDED and rec["data"]["waited_for_libvirt"] == 1
    check_create(w, rec)
    assert st.snaps[snap] is made_by_libvirtd, "the snapshot was created a second time"
    assert [e["event"] for e in store.history(w.rec.id)].count("snapshot-intent") == 1


def test_someone_elses_snapshot_of_the_same_name_is_never_deleted(tmp_path, store):
    w = World(tmp_path, store, "snapshot", {"kind": "internal", "name": "nightly"})
    # between submit and snapshot, a user creates "nightly" by hand
    w.fake.create_snapshot("dom", "nightly", description="made by hand", memory=True)
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == ROLLED_BACK and "did not create" in rec["error"]["message"]
    assert w.fake.lookup_snapshot("dom", "nightly").description == "made by hand"


def test_snapshot_named_by_the_user(tmp_path, store):
    w = World(tmp_path, store, "snapshot", {"kind": "internal", "name": "before-upgrade"})
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == SUCCEEDED and rec["result"]["snapshot"] == "before-upgrade"
    assert w.fake.get_current_snapshot("dom") == "before-upgrade"


# -- revert ---------------------------------------------------------------------------
def two_snapshots(w: World) -> None:
    """s1 (uptime 100, the disks as made), then the guest writes and runs, then s2."""
    w.fake.create_snapshot("dom", "s1", description="", memory=True)
    w.s1 = {t: open(p, "rb").read() for t, p in w.paths.items()}
    w.fake.guest_write("dom", "vdb", 0, b"\x42" * 4096)
    w.fake.guest_runs("dom", 50)
    w.fake.create_snapshot("dom", "s2", description="", memory=True)


def one_snapshot(w: World) -> None:
    w.fake.create_snapshot("dom", "s1", description="", memory=True)
    w.s1 = {t: open(p, "rb").read() for t, p in w.paths.items()}
    w.fake.guest_write("dom", "vdb", 0, b"\x42" * 4096)
    w.fake.guest_runs("dom", 50)


def check_reverted(w: World, rec: dict) -> None:
    w.check_common(rec)
    assert rec["status"] == SUCCEEDED, rec["error"]
    for t, p in w.paths.items():
        assert open(p, "rb").read() == w.s1[t], f"{t} is not at the snapshot"
    assert w.fake.guest_uptime("dom") == 100, "memory not restored"
    assert w.fake.get_current_snapshot("dom") == "s1"
    assert rec["result"]["memory_restored"] is True


@pytest.mark.parametrize("setup", [two_snapshots, one_snapshot], ids=["other-current", "already-current"])
def test_revert_every_crash_point_resumes(tmp_path, store, setup):
    dry = World(tmp_path / "dry", store, "snapshot-revert", {"name": "s1"}, setup=setup)
    assert not dry.run()
    check_reverted(dry, store.load(dry.rec.id).to_dict())
    for i, point in enumerate(dry.crasher.seen):
        w = World(tmp_path / f"p{i}", store, "snapshot-revert", {"name": "s1"}, setup=setup)
        w.crasher.target = point
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        check_reverted(w, rec)
        reverts = [e for e in store.history(w.rec.id) if e["event"] == "revert-intent"]
        if setup is two_snapshots and point[0] in ("hv-after:revert_to_snapshot", "executed:reverting"):
            assert len(reverts) == 1, "the probe did not see the revert had happened"


def test_revert_rolled_back_before_it_is_issued_changes_nothing(tmp_path, store):
    w = World(tmp_path, store, "snapshot-revert", {"name": "s1"}, setup=two_snapshots)
    w.crasher.target = ("saved:step-started:reverting", 1)
    assert w.run()
    w.captures.rollback(w.rec.id)
    rec = w.drive_to_end()
    assert rec["status"] == ROLLED_BACK and "effects_standing" not in rec["data"]
    assert {t: open(p, "rb").read() for t, p in w.paths.items()} == w.before
    assert w.fake.guest_uptime("dom") == 150 and w.fake.get_current_snapshot("dom") == "s2"


def test_revert_rolled_back_after_it_took_effect_says_so(tmp_path, store):
    w = World(tmp_path, store, "snapshot-revert", {"name": "s1"}, setup=two_snapshots)
    w.crasher.target = ("hv-after:revert_to_snapshot", 1)
    assert w.run()
    w.captures.rollback(w.rec.id)
    rec = w.drive_to_end()
    assert rec["status"] == PARTIALLY_ROLLED_BACK and rec["state"] == "partially_rolled_back"
    assert "cannot be undone" in rec["result"]["effects_standing"][0]
    stands = [e for e in store.history(w.rec.id) if e["event"] == "effect-stands"]
    assert [e["reason"] for e in stands] == rec["result"]["effects_standing"]
    # and it does stand: the domain is at s1, and the record says libvirt showed the revert
    assert rec["data"]["reverted"] is True
    assert {t: open(p, "rb").read() for t, p in w.paths.items()} == w.s1
    assert w.fake.get_current_snapshot("dom") == "s1"


def test_revert_of_a_shutoff_snapshot_stops_the_domain(tmp_path, store):
    def setup(w: World) -> None:
        w.fake.domains["dom"].state = "shutoff"
        w.fake.create_snapshot("dom", "cold", description="", memory=False)
        w.cold = {t: open(p, "rb").read() for t, p in w.paths.items()}
        w.fake.domains["dom"].state = "running"
        w.fake.guest_write("dom", "vda", 0, b"\x01" * 512)
    w = World(tmp_path, store, "snapshot-revert", {"name": "cold"}, setup=setup)
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == SUCCEEDED and rec["result"]["state"] == "shutoff"
    assert {t: open(p, "rb").read() for t, p in w.paths.items()} == w.cold


# -- delete -----------------------------------------------------------------------------
def internal_snap(w: World) -> None:
    w.fake.create_snapshot("dom", "old", description="", memory=True)


def external_snap(w: World) -> None:
    w.fake.create_snapshot("dom", "old", description="", memory=False,
                           overlays={t: str(w.dir / f"old-{t}.qcow2") for t in w.paths})
    w.fake.guest_write("dom", "vdb", 4096, b"\x33" * 4096)  # lands on the overlay


def external_snap_with_internal_parent(w: World) -> None:
    internal_parent(w)
    w.fake.create_snapshot("dom", "old", description="", memory=True,
                           overlays={t: str(w.dir / f"domcapture-x-{t}.snapshot.qcow2") for t in w.paths},
                           memory_file=str(w.dir / "domcapture-x.memory"))
    w.fake.guest_write("dom", "vdb", 4096, b"\x33" * 4096)


DELETE_CASES = {"internal": (internal_snap, "libvirt"), "external": (external_snap, "libvirt"),
                "external-internal-parent": (external_snap_with_internal_parent, "commit")}


def check_deleted(w: World, rec: dict, how: str | None) -> None:
    w.check_common(rec)
    dom = w.fake.domains["dom"]
    assert rec["status"] == SUCCEEDED, (rec["error"], rec["attention"])
    assert "old" not in w.fake.list_snapshot_names("dom")
    assert all(d.overlay is None for d in dom.disks.values())
    assert [p for p in os.listdir(w.dir) if "old" in p or p.startswith("domcapture-x")] == []
    with open(w.paths["vdb"], "rb") as f:
        f.seek(4096)
        if rec["result"]["kind"] == "external":
            assert f.read(4096) == b"\x33" * 4096, "the overlay's data was not merged"
    if how:
        assert rec["result"]["deleted_by"] == how
    if "user-base" in w.snaps_before:
        assert "user-base" in w.fake.list_snapshot_names("dom")


@pytest.mark.parametrize("case", sorted(DELETE_CASES))
def test_delete_every_crash_point_resumes(tmp_path, store, case):
    setup, how = DELETE_CASES[case]
    dry = World(tmp_path / "dry", store, "snapshot-delete", {"name": "old"}, setup=setup)
    assert not dry.run()
    check_deleted(dry, store.load(dry.rec.id).to_dict(), how)
    for i, point in enumerate(dry.crasher.seen):
        w = World(tmp_path / f"p{i}", store, "snapshot-delete", {"name": "old"}, setup=setup)
        w.crasher.target = point
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        check_deleted(w, rec, None)


def test_delete_rolled_back_mid_commit_keeps_the_snapshot_whole(tmp_path, store):
    w = World(tmp_path, store, "snapshot-delete", {"name": "old"}, setup=external_snap_with_internal_parent)
    w.crasher.target = ("hv-after:block_commit_active", 2)
    assert w.run()
    w.captures.rollback(w.rec.id)
    rec = w.drive_to_end()
    assert rec["status"] == ROLLED_BACK and "effects_standing" not in rec["data"]
    info = w.fake.lookup_snapshot("dom", "old")
    dom = w.fake.domains["dom"]
    assert info is not None and {t: d.overlay for t, d in dom.disks.items()} == info.overlays
    assert all(d.job_polls is None for d in dom.disks.values())
    assert all(os.path.exists(p) for p in info.overlays.values()) and os.path.exists(info.memory_file)


def test_delete_rolled_back_after_a_pivot_completes_it(tmp_path, store):
    w = World(tmp_path, store, "snapshot-delete", {"name": "old"}, setup=external_snap_with_internal_parent)
    w.crasher.target = ("hv-after:block_pivot", 1)
    assert w.run()
    w.captures.rollback(w.rec.id)
    rec = w.drive_to_end()
    assert rec["status"] == PARTIALLY_ROLLED_BACK
    assert "completed it" in rec["result"]["effects_standing"][0]
    assert "old" not in w.fake.list_snapshot_names("dom")
    assert all(d.overlay is None for d in w.fake.domains["dom"].disks.values())


def test_delete_keeps_a_memory_file_domcapture_did_not_name(tmp_path, store):
    def setup(w: World) -> None:
        w.fake.create_snapshot("dom", "old", description="", memory=True,
                               overlays={"vdb": str(w.dir / "old-vdb.qcow2")}, memory_file=str(w.dir / "mine.mem"))
    w = World(tmp_path, store, "snapshot-delete", {"name": "old"}, setup=setup)
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == SUCCEEDED and rec["result"]["kept"] == [str(w.dir / "mine.mem")]
    assert os.path.exists(w.dir / "mine.mem") and not os.path.exists(w.dir / "old-vdb.qcow2")


def test_external_files_go_to_target_and_a_rollback_removes_them(tmp_path, store):
    target = tmp_path / "snapfiles"
    target.mkdir()
    w = World(tmp_path / "w", store, "snapshot", {"kind": "external", "memory": True, "target": str(target)})
    w.crasher.target = ("saved:step-started:finalizing", 1)
    assert w.run()
    names = sorted(os.listdir(target))
    assert names == sorted([f"domcapture-{w.rec.id}-vda.snapshot.qcow2", f"domcapture-{w.rec.id}-vdb.snapshot.qcow2",
                            f"domcapture-{w.rec.id}.memory"])
    w.captures.rollback(w.rec.id)
    rec = w.drive_to_end()
    assert rec["status"] == ROLLED_BACK and os.listdir(target) == []
    check_create(w, rec)
