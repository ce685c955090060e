"""prune on the in-memory hypervisor: what it keeps, consolidates and removes, and a crash at every boundary.

Four direct backups of one disk over two weeks (a full, then incrementals,
each from the one before): Mon and Tue of week 1, Mon and Tue of week 2.
``--keep-weekly 2`` keeps the newest of each week, Tue W1 and Tue W2: the
first becomes a synthetic full (its full and nothing else stays below it),
the second is rebased onto it (the Monday between goes).  The backups' times
are set in their records (``result["taken_at"]``, through the store under each
record's lease): the data is taken now, the calendar is the test's.

Invariants, right after each crash and at the end: every backup listed good
has all its files, each matching its recorded checksum, and its chain (from
the records) reads back exactly the disk as it was when that backup was
taken; libvirt's checkpoints are the ones our store holds committed.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from types import SimpleNamespace

from workflows.backups import CHAIN_INCOMPLETE, CONSOLIDATING, DELETED, GOOD, catalog
from workflows.checkpoints import COMMITTED, CheckpointStore
from workflows.filecopy import sha256_file
from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import SUCCEEDED, Record
from workflows.service import Captures
from workflows.store import Store
from workers import cli_backups

from .realenv import edit_record
from .crashkit import Crasher, drive_to_end, run_once
from .test_direct_backup_fake import chain_bytes

KIB = 1024
# Each crash point rebuilds four backups: every point of the enumeration takes minutes, so by default a
# crash is taken at the first and the last boundary of each kind; DOMCAPTURE_CRASH_EVERY_POINT=1 takes all.
EVERY_POINT = os.environ.get("DOMCAPTURE_CRASH_EVERY_POINT") == "1"
DAYS = ["2024-01-01T01:00", "2024-01-02T01:00", "2024-01-08T01:00", "2024-01-09T01:00"]  # Mon, Tue; Mon, Tue


def set_taken_at(store: Store, wf: str, iso: str) -> None:
    def stamp(rec: Record) -> None:
        rec.result["taken_at"] = datetime.fromisoformat(iso).replace(tzinfo=timezone.utc).timestamp()
    edit_record(store, wf, "test:clock", stamp)


class Series:
    """A fake domain with one disk and four direct backups (full, then incrementals) on the days above."""

    def __init__(self, tmp_path, store: Store) -> None:
        self.store, self.tmp = store, tmp_path
        (tmp_path / "disks").mkdir(parents=True)
        (tmp_path / "bk").mkdir()
        self.target = str(tmp_path / "bk")
        disk = str(tmp_path / "disks" / "vda.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(128 * KIB) + bytes(384 * KIB))
        self.uri = f"fake:///prune-{os.urandom(4).hex()}"
        self.fake = FakeHypervisor(self.uri)
        self.fake.add_domain("dom", {"vda": disk}, agent=True)
        self.disk = disk
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: None)
        self.cps = CheckpointStore(store)
        self.ids: list[str] = []
        self.content: dict[str, bytes] = {}
        for i, day in enumerate(DAYS):
            if i:
                self.fake.guest_write("dom", "vda", 64 * KIB * i, bytes([0x10 + i]) * 40000)
                self.fake.guest_write("dom", "vda", 0, bytes(4096))  # zeroing data is a change too
            with open(disk, "rb") as f:
                data = f.read()
            rec = self.captures.submit("direct-backup", "dom", self.uri,
                                       {"target": self.target, "incremental": i > 0, "quiesce": "off"})
            assert not run_once(store, self.fake, rec.id, None)
            done = store.load(rec.id)
            assert done.status == SUCCEEDED and done.result["kind"] == ("incremental" if i else "full")
            set_taken_at(store, rec.id, day)
            self.ids.append(rec.id)
            self.content[rec.id] = data

    def prune(self, **rules: int):
        return self.captures.submit("prune", "dom", self.uri, dict(rules))

    def backups(self):
        return {b.id: b for b in catalog(self.store, self.uri, "dom", include_deleted=True)}

    def check_invariants(self) -> None:
        every = self.backups()
        for b in every.values():
            if b.state != GOOD:
                continue
            for f in b.files.values():
                assert os.path.exists(f["path"]), f"good backup {b.id} lost {f['path']}"
                assert f"sha256:{sha256_file(f['path'])}" == f["checksum"], f"good backup {b.id}: checksum differs"
            assert all(every[c].state == GOOD for c in b.chain), (b.id, b.chain)
            assert every[b.chain[0]].kind == "full"
            files = [every[c].files["vda"]["path"] for c in b.chain]
            assert chain_bytes(files, str(self.tmp / "chain.raw")) == self.content[b.id], \
                f"the chain of good backup {b.id} does not read back its disk"
        live = {c.name: c for c in self.fake.list_checkpoints("dom")}
        ours = {c.name: c for c in self.cps.all(self.uri, "dom")}
        for name in live:
            assert name in ours and ours[name].state == COMMITTED, f"libvirt has {name}, our store does not"
        newest = every[self.ids[-1]]  # mid-prune it may read through a backup being rewritten; never deleted
        assert newest.state in (GOOD, CHAIN_INCOMPLETE, CONSOLIDATING), newest.state
        assert all(os.path.exists(f["path"]) for f in newest.files.values())
        assert f"domcapture-{newest.id}" in live, "the next incremental's base is gone"

    def check_done(self, rec: dict) -> None:
        assert rec["status"] == SUCCEEDED, (rec["status"], rec["error"])
        self.check_invariants()
        assert all(b.state in (GOOD, DELETED) for b in self.backups().values())
        b0, b1, b2, b3 = self.ids
        every = self.backups()
        assert rec["result"]["kept"] == [b3, b1] and sorted(rec["result"]["removed"]) == sorted([b0, b2])
        assert {i for i, b in every.items() if b.state == GOOD} == {b1, b3}
        assert all(every[i].state == DELETED for i in (b0, b2))
        assert every[b1].kind == "full" and every[b1].parent is None and every[b1].chain == [b1]
        assert every[b3].parent == b1 and every[b3].chain == [b1, b3]
        for gone in (b0, b2):
            assert not os.path.exists(os.path.join(self.target, f"domcapture-dom-{gone}"))
        live = {c.name for c in self.fake.list_checkpoints("dom")}
        ours = {c.name for c in self.cps.all(self.uri, "dom")}
        assert live == ours == {f"domcapture-{b1}", f"domcapture-{b3}"}
        assert not [p for _, _, fs in os.walk(self.target) for p in fs if p.endswith(".partial")]


def test_keep_weekly_consolidates_and_removes(tmp_path, store):
    s = Series(tmp_path, store)
    wf = s.prune(keep_weekly=2)
    assert not run_once(store, s.fake, wf.id, None)
    s.check_done(store.load(wf.id).to_dict())
    assert all(c["ok"] for c in s.captures.verify(wf.id))
    assert all(c["ok"] for c in s.captures.verify(s.ids[3]))
    # the next incremental still starts from the newest backup, and its chain reads back
    s.fake.guest_write("dom", "vda", 300 * KIB, b"\x77" * 5000)
    nxt = s.captures.submit("direct-backup", "dom", s.uri, {"target": s.target, "incremental": True,
                                                            "quiesce": "off"})
    assert not run_once(store, s.fake, nxt.id, None)
    rec = store.load(nxt.id)
    assert rec.result["kind"] == "incremental" and rec.result["parent_backup"] == s.ids[3]
    assert rec.result["chain"] == [s.ids[1], s.ids[3], nxt.id]
    with open(s.disk, "rb") as f:
        s.content[nxt.id] = f.read()
    s.ids.append(nxt.id)
    s.check_invariants()


def test_keep_last_keeps_a_whole_chain_without_rewriting(tmp_path, store):
    s = Series(tmp_path, store)
    wf = s.prune(keep_last=2)
    assert not run_once(store, s.fake, wf.id, None)
    rec = store.load(wf.id)
    assert rec.status == SUCCEEDED
    every = s.backups()
    b0, b1, b2, b3 = s.ids
    assert rec.result["consolidated"] == [{"id": b2, "onto": None}]  # a synthetic full; b3 stays on it
    assert every[b2].kind == "full" and every[b3].chain == [b2, b3]
    assert every[b0].state == every[b1].state == DELETED
    s.check_invariants()


def test_backups_command_lists_chains_and_states(tmp_path, store, capsys):
    s = Series(tmp_path, store)
    wf = s.prune(keep_last=2)
    assert not run_once(store, s.fake, wf.id, None)
    assert all(c["ok"] for c in s.captures.verify(s.ids[3]))
    rt = SimpleNamespace(store=store, settings=SimpleNamespace(libvirt_uri=s.uri), hypervisor=lambda uri: s.fake)
    b0, b1, b2, b3 = s.ids
    assert cli_backups.cmd_backups(SimpleNamespace(domain="dom", uri=None, all=False, json=False), rt) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["WORKFLOW", "KIND", "STATE", "PARENT"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {b2, b3}
    assert rows[b2][1:4] == ["full", "good", "-"] and rows[b2][-1] == b2
    assert rows[b3][1:4] == ["incremental", "good", b2] and rows[b3][6] == "ok"
    assert rows[b3][-3:] == [b2, ">", b3]
    assert cli_backups.cmd_backups(SimpleNamespace(domain="dom", uri=None, all=True, json=True), rt) == 0
    doc = json.loads(capsys.readouterr().out)
    states = {b["workflow"]: b["state"] for b in doc["backups"]}
    assert states == {b0: "deleted", b1: "deleted", b2: "good", b3: "good"}
    listed = {b["workflow"]: b for b in doc["backups"]}
    assert listed[b3]["checkpoint_state"] == "committed" and listed[b0]["checkpoint_state"].endswith("not-in-libvirt")
    assert listed[b3]["size"] == sum(f["size"] for f in store.load(b3).result["files"].values())


def test_every_crash_point_leaves_the_invariants(tmp_path, store):
    s = Series(tmp_path / "dry", store)
    wf = s.prune(keep_weekly=2)
    crasher = Crasher()
    s.fake.hook = crasher.hv_hook
    assert not run_once(store, s.fake, wf.id, crasher)
    s.check_done(store.load(wf.id).to_dict())
    points = crasher.seen
    labels = {label for label, _ in points}
    for expected in ("saved:prune-plan:preflight", "saved:consolidate-sealed:consolidating",
                     "hv-after:checkpoint_delete", "saved:backup-deleted:deleting", "executed:finalizing"):
        assert expected in labels, sorted(labels)
    if not EVERY_POINT:  # one crash per kind of boundary: each label's first and last occurrence
        first = {label: i for i, (label, _) in reversed(list(enumerate(points)))}
        last = {label: i for i, (label, _) in enumerate(points)}
        points = [points[i] for i in sorted(set(first.values()) | set(last.values()))]
    for i, point in enumerate(points):
        s = Series(tmp_path / f"c{i}", store)
        wf = s.prune(keep_weekly=2)
        crasher = Crasher(point)
        s.fake.hook = crasher.hv_hook
        assert run_once(store, s.fake, wf.id, crasher), f"no crash at {point}"
        s.check_invariants()
        s.check_done(drive_to_end(store, s.captures, s.fake, wf.id, crasher))
