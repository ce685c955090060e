"""Every crash point of group-backup, exhaustively, on the in-memory hypervisor.

A dry run lists every boundary the engine and the hypervisor pass; then, for each, a fresh group backup
of two domains is crashed exactly there, recovered as the recovery process does it, and run to the end.
The group ends succeeded or rolled_back as a whole: no member frozen, on an overlay or with a block job,
every guest write kept, no overlay file left; a succeeded group has every member's backup byte-identical
to its disks at the point, and every point was taken while every member was frozen; a rolled-back group
leaves nothing in the target.
"""

from __future__ import annotations

import collections
import json
import os
import time

import pytest

from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import ROLLED_BACK, SUCCEEDED
from workflows.service import Captures

from .crashkit import Crasher, drive_to_end, run_once

MEMBERS = ("app", "db")
POST_POINT_WRITE = (4096, b"\xab" * 4096)


class GroupWorld:
    def __init__(self, tmp_path, store, quiesce: str = "require", agents: tuple[bool, ...] = (True, True),
                 **params) -> None:
        self.store = store
        (tmp_path / "bk").mkdir(parents=True)
        self.target = str(tmp_path / "bk")
        self.fake = FakeHypervisor()
        self.paths: dict[str, dict[str, str]] = {}
        self.initial: dict[str, dict[str, bytes]] = {}
        self.dirs = []
        for name, agent in zip(MEMBERS, agents, strict=True):
            folder = tmp_path / name
            folder.mkdir()
            self.dirs.append(folder)
            self.paths[name] = {"vda": str(folder / "vda.img"), "vdb": str(folder / "vdb.img")}
            self.initial[name] = {"vda": os.urandom(64 * 1024 + 7), "vdb": os.urandom(16 * 1024)}
            for t, p in self.paths[name].items():
                with open(p, "wb") as f:
                    f.write(self.initial[name][t])
            self.fake.add_domain(name, self.paths[name], agent=agent)
        self.crasher = Crasher()
        self.frozen_at_points: list[dict[str, bool]] = []  # what the hypervisor saw at each snapshot
        self.written: set[str] = set()
        self.before_snapshot = None
        self.fake.hook = self._hv_hook
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: None)
        self.rec = self.captures.submit("group-backup", "group:shop", "fake:///default",
                                        {"group": "shop", "domains": ",".join(MEMBERS), "target": self.target,
                                         "quiesce": quiesce, **params})

    def _hv_hook(self, when: str, method: str) -> None:
        if (when, method) == ("before", "snapshot_disk_only") and self.before_snapshot:
            self.before_snapshot()
        if (when, method) == ("after", "snapshot_disk_only"):
            self.frozen_at_points.append({n: d.frozen for n, d in self.fake.domains.items()})
            for name, d in self.fake.domains.items():  # each guest keeps writing: onto its overlay
                if name not in self.written and d.disks["vda"].overlay:
                    self.written.add(name)
                    self.fake.guest_write(name, "vda", *POST_POINT_WRITE)
        self.crasher(f"hv-{when}:{method}")

    def run(self, worker: str = "w1") -> bool:
        return run_once(self.store, self.fake, self.rec.id, self.crasher, worker)

    def drive_to_end(self) -> dict:
        return drive_to_end(self.store, self.captures, self.fake, self.rec.id, self.crasher)

    def expected_live(self, name: str, target: str) -> bytes:
        data = bytearray(self.initial[name][target])
        if target == "vda" and name in self.written:
            off, payload = POST_POINT_WRITE
            data[off:off + len(payload)] = payload
        return bytes(data)

    def check_invariants(self, rec: dict) -> None:
        assert rec["status"] in (SUCCEEDED, ROLLED_BACK), (rec["status"], rec["attention"], rec["error"])
        for name, dom in self.fake.domains.items():
            assert not dom.frozen, f"{name} left frozen"
            for t, d in dom.disks.items():
                assert d.overlay is None, f"{name}/{t} left on overlay {d.overlay}"
                assert d.job_polls is None, f"{name}/{t} left with a block job"
                with open(self.paths[name][t], "rb") as f:
                    assert f.read() == self.expected_live(name, t), f"guest data of {name}/{t} lost"
        for folder in self.dirs:
            assert [p for p in os.listdir(folder) if "overlay" in p] == []
        left = sorted(os.listdir(self.target))
        if rec["status"] == ROLLED_BACK:
            assert left == [], f"rollback left {left}"
            return
        doc = json.load(open(rec["result"]["manifest"]))
        assert doc["workflow"] == self.rec.id and [m["domain"] for m in doc["members"]] == list(MEMBERS)
        window = doc["window"]
        for m in doc["members"]:
            start, end = m["point"]
            if doc["quiesced"]:
                assert window["first_freeze"] <= start <= end <= window["last_thaw"], (m["point"], window)
            for f in m["files"]:
                with open(f["path"], "rb") as fh:
                    assert fh.read() == self.initial[m["domain"]][f["disk"]], f"backup of {m['domain']} differs"
        if rec["params"]["quiesce"] == "require":
            assert doc["quiesced"] is True
            # the instant is one window: at every point taken, every member was frozen
            assert self.frozen_at_points and all(all(seen.values()) for seen in self.frozen_at_points)
        assert len(left) == len(MEMBERS) + 1


def _points(tmp_path, store) -> list[tuple[str, int]]:
    w = GroupWorld(tmp_path / "dry", store)
    assert not w.run()
    rec = store.load(w.rec.id)
    assert rec.status == SUCCEEDED, rec.error
    w.check_invariants(rec.to_dict())
    return w.crasher.seen


def test_every_crash_point_ends_the_group_whole(tmp_path, store):
    points = _points(tmp_path, store)
    labels = {label for label, _ in points}
    assert {"saved:freeze-intent:freezing_all", "hv-after:fs_freeze", "saved:point-taken:pointing_all",
            "hv-after:fs_thaw", "hv-after:block_pivot", "executed:sealing"} <= labels
    outcomes: collections.Counter = collections.Counter()
    for i, point in enumerate(points):
        w = GroupWorld(tmp_path / f"p{i}", store)
        w.crasher.target = point
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        w.check_invariants(rec)
        outcomes[rec["status"]] += 1
    # a crash before every point is taken rolls the group back; from the thaw on, it resumes
    assert outcomes[ROLLED_BACK] > 0 and outcomes[SUCCEEDED] > 0, outcomes


def test_a_member_without_an_agent_rolls_the_whole_group_back_under_require(tmp_path, store):
    w = GroupWorld(tmp_path, store, agents=(True, False))
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == ROLLED_BACK
    assert "db could not be frozen" in rec["error"]["message"]
    assert w.frozen_at_points == []  # no point was taken
    w.check_invariants(rec)


def test_try_proceeds_without_the_member_that_cannot_freeze_and_says_so(tmp_path, store):
    w = GroupWorld(tmp_path, store, quiesce="try", agents=(True, False))
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    w.check_invariants(rec)
    assert rec["status"] == SUCCEEDED
    assert rec["result"]["quiesced"] is False
    assert list(rec["result"]["quiesce_skipped"]) == ["db"]
    assert all(seen["app"] for seen in w.frozen_at_points)
    doc = json.load(open(rec["result"]["manifest"]))
    assert {m["domain"]: m["quiesced"] for m in doc["members"]} == {"app": True, "db": False}


def test_a_window_past_its_deadline_rolls_the_group_back(tmp_path, store):
    w = GroupWorld(tmp_path, store, freeze_deadline="0.05")
    w.before_snapshot = lambda: time.sleep(0.06)  # the first point makes the window overrun
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == ROLLED_BACK
    assert "deadline" in rec["error"]["message"]
    w.check_invariants(rec)


def test_verify_checks_the_set(tmp_path, store):
    w = GroupWorld(tmp_path, store)
    assert not w.run()
    assert all(c["ok"] for c in w.captures.verify(w.rec.id))
    rec = store.load(w.rec.id)
    victim = rec.result["members"]["db"]["files"]["vdb"]["path"]
    with open(victim, "r+b") as f:
        f.write(b"\x00")
    failed = [c["item"] for c in w.captures.verify(w.rec.id) if not c["ok"]]
    assert failed and all(item.startswith("db:") for item in failed), failed


@pytest.mark.parametrize("params, why", [({"domains": "app"}, "at least two"),
                                         ({"domains": "app,app"}, "at least two"),
                                         ({"group": "bad name"}, "--group")])
def test_bad_groups_are_refused_before_anything(tmp_path, store, params, why):
    from workflows.errors import InputError
    captures = Captures(store, lambda uri: FakeHypervisor(), lambda rec: None)
    base = {"group": "shop", "domains": "app,db", "target": str(tmp_path)}
    with pytest.raises(InputError, match=why):
        captures.submit("group-backup", f"group:{params.get('group', 'shop')}", "fake:///default",
                        {**base, **params})


def test_a_member_busy_with_another_workflow_refuses_the_group(tmp_path, store):
    from workflows.errors import DomainBusy
    w = GroupWorld(tmp_path, store)
    assert not w.run()  # the group ran; its own lock is released
    single = w.captures.submit("snapshot-backup", "db", "fake:///default", {"target": w.target})
    with pytest.raises(DomainBusy, match=f"member 'db' is busy with workflow {single.id}"):
        w.captures.submit("group-backup", "group:shop", "fake:///default",
                          {"group": "shop", "domains": "app,db", "target": w.target})


def test_the_freeze_watchdog_thaws_every_member_at_the_deadline(tmp_path, store):
    w = GroupWorld(tmp_path, store, freeze_deadline="0.3")
    seen_during: list[dict[str, bool]] = []

    def stall() -> None:  # a point that hangs past the deadline: the watchdog must thaw every member
        deadline = time.time() + 5
        while any(d.frozen for d in w.fake.domains.values()) and time.time() < deadline:
            time.sleep(0.02)
        seen_during.append({n: d.frozen for n, d in w.fake.domains.items()})
    w.before_snapshot = stall
    assert not w.run()
    assert seen_during[0] == {"app": False, "db": False}
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == ROLLED_BACK
    thawed = [e for e in store.history(w.rec.id) if e["event"] == "thawed-at-deadline"]
    assert len(thawed) == 1 and thawed[0]["thawed_filesystems"] == 4  # two disks each, both members
    w.check_invariants(rec)


def test_members_carry_the_groups_hold_mark_while_it_runs(tmp_path, store):
    from workflows.errors import DomainHeld
    w = GroupWorld(tmp_path, store)
    w.crasher.target = ("saved:point-taken:pointing_all", 1)
    assert w.run()
    for name in MEMBERS:
        assert w.fake.hold_mark(name)["workflow"] == w.rec.id
        with pytest.raises(DomainHeld, match=w.rec.id):
            w.captures.submit("snapshot-backup", name, "fake:///default", {"target": w.target})
    rec = w.drive_to_end()
    w.check_invariants(rec)
    assert all(w.fake.hold_mark(name) is None for name in MEMBERS)
