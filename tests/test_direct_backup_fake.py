"""Every crash point of direct-backup, checkpoint and restore, on the in-memory hypervisor.

A dry run lists every boundary the engine and the fake hypervisor pass; then
a fresh workflow is crashed exactly at each one, recovered the way the
recovery process does it, and run to the end.  It must end ``succeeded`` or
``rolled_back`` with: no frozen guest, no backup job left, no checkpoint in
libvirt that our store does not hold committed, no pending store entry, the
guest's data untouched, and either a complete backup whose chain reads back
exactly the disks at the instant the backup began, or nothing at all.
The fake's disks are raw files; its backups are real qcow2 files (written
through qemu-nbd, read back with qemu-img).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import pytest

from workflows import nbdio
from workflows.checkpoints import COMMITTED, CheckpointStore
from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import PARTIALLY_ROLLED_BACK, ROLLED_BACK, SUCCEEDED
from workflows.service import Captures

from .crashkit import Crasher, drive_to_end, run_once

KIB = 1024
POST_BEGIN_WRITE = ("vda", 64 * KIB, b"\xee" * 4096)  # the guest keeps writing once the backup began


def chain_bytes(files: list[str], scratch: str) -> bytes:
    nbdio.run_qemu_img("convert", "-O", "raw", nbdio.chain_spec(files), scratch)
    with open(scratch, "rb") as f:
        data = f.read()
    os.unlink(scratch)
    return data


class World:
    """A fake domain with two disks, a backup target, and a direct-backup workflow submitted."""

    def __init__(self, tmp_path, store, *, mode: str = "push", incremental: bool = False,
                 quiesce: str = "require", with_base: bool | None = None) -> None:
        self.store = store
        self.tmp = tmp_path
        self.dir = tmp_path / "disks"
        self.dir.mkdir(parents=True)
        (tmp_path / "bk").mkdir()
        self.target = str(tmp_path / "bk")
        self.paths = {"vda": str(self.dir / "vda.img"), "vdb": str(self.dir / "vdb.img")}
        initial = {"vda": os.urandom(256 * KIB) + bytes(256 * KIB), "vdb": bytes(128 * KIB) + os.urandom(128 * KIB)}
        for t, p in self.paths.items():
            with open(p, "wb") as f:
                f.write(initial[t])
        self.uri = f"fake:///{os.path.basename(str(tmp_path))}-{os.urandom(4).hex()}"  # its own checkpoint store
        self.fake = FakeHypervisor(self.uri)
        self.fake.add_domain("dom", self.paths, agent=True)
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: None)
        self.cps = CheckpointStore(store)
        self.base = None
        if incremental if with_base is None else with_base:  # a full backup first, then the guest writes
            self.base = self.submit("push", False)
            assert not run_once(store, self.fake, self.base.id, None)
            assert store.load(self.base.id).status == SUCCEEDED
            self.fake.guest_write("dom", "vda", 320 * KIB, b"\x42" * 70000)  # into the zero half
            self.fake.guest_write("dom", "vdb", 128 * KIB, bytes(64 * KIB))  # data zeroed: a change too
        self.at_begin = {t: self.read(t) for t in self.paths}
        self.crasher = Crasher()
        self.wrote = False
        self.fake.hook = self._hv_hook
        self.rec = self.submit(mode, incremental, quiesce)

    def submit(self, mode: str, incremental: bool, quiesce: str = "require"):
        params: dict[str, Any] = {"target": self.target, "mode": mode, "quiesce": quiesce}
        if incremental:
            params["incremental"] = True
        return self.captures.submit("direct-backup", "dom", self.uri, params)

    def read(self, target: str) -> bytes:
        with open(self.paths[target], "rb") as f:
            return f.read()

    def _hv_hook(self, when: str, method: str) -> None:
        if (when, method) == ("after", "backup_begin") and not self.wrote:
            self.wrote = True
            self.fake.guest_write("dom", *POST_BEGIN_WRITE)
        self.crasher(f"hv-{when}:{method}")

    def run(self, worker: str = "w1") -> bool:
        return run_once(self.store, self.fake, self.rec.id, self.crasher, worker)

    def drive_to_end(self) -> dict:
        return drive_to_end(self.store, self.captures, self.fake, self.rec.id, self.crasher)

    def live_expected(self, target: str) -> bytes:
        data = bytearray(self.at_begin[target])
        t, off, payload = POST_BEGIN_WRITE
        if t == target and self.wrote:
            data[off:off + len(payload)] = payload
        return bytes(data)

    def check_invariants(self, rec: dict) -> None:
        st = self.fake._bk("dom")
        assert rec["status"] in (SUCCEEDED, ROLLED_BACK), (rec["status"], rec["error"])
        assert not self.fake.domains["dom"].frozen, "guest left frozen"
        assert st.job is None, "a backup job was left on the domain"
        for t in self.paths:
            assert self.read(t) == self.live_expected(t), f"guest data of {t} changed"
        ours = {c.name: c for c in self.cps.all(self.uri, "dom")}
        for name in st.checkpoints:
            assert name in ours and ours[name].state == COMMITTED, f"libvirt has {name}, our store does not commit it"
        assert all(c.state == COMMITTED for c in ours.values()), "a pending checkpoint was left in the store"
        assert {n for n, c in ours.items() if c.usable} <= set(st.checkpoints), "libvirt lacks a usable checkpoint"
        name = f"domcapture-{self.rec.id}"
        folder = os.path.join(self.target, f"domcapture-dom-{self.rec.id}")
        if rec["status"] == SUCCEEDED:
            assert name in st.checkpoints and ours[name].state == COMMITTED
            manifest = json.load(open(os.path.join(folder, "manifest.json")))
            assert manifest["workflow"] == self.rec.id and manifest["chain"][-1] == self.rec.id
            assert sorted(os.listdir(folder)) == ["domain.xml", "manifest.json", "vda.qcow2", "vdb.qcow2"]
            chain = [json.load(open(os.path.join(self.target, f"domcapture-dom-{wf}", "manifest.json")))
                     for wf in manifest["chain"]]
            for t in self.paths:
                files = [next(f["path"] for f in m["files"] if f["disk"] == t) for m in chain]
                assert chain_bytes(files, str(self.tmp / "chain.raw")) == self.at_begin[t], \
                    f"the backup of {t} is not the disk at the instant the backup began"
            if self.base is not None:
                assert manifest["kind"] == "incremental" and manifest["parent"]["workflow"] == self.base.id
        else:
            assert name not in st.checkpoints and name not in ours
            assert not os.path.exists(folder), os.listdir(folder)
        assert not [p for p in os.listdir(self.target) if p.endswith(".partial")]


def _points(tmp_path, store, **kw) -> list[tuple[str, int]]:
    w = World(tmp_path / "dry", store, **kw)
    assert not w.run()
    rec = store.load(w.rec.id)
    assert rec.status == SUCCEEDED, rec.error
    w.check_invariants(rec.to_dict())
    return w.crasher.seen


SCENARIOS = {"push-full": {"mode": "push"}, "pull-incremental": {"mode": "pull", "incremental": True},
             "pull-full": {"mode": "pull"}, "push-incremental": {"mode": "push", "incremental": True}}


def test_dry_run_passes_every_kind_of_boundary(tmp_path, store):
    labels = {label for label, _ in _points(tmp_path, store, mode="pull", incremental=True)}
    for expected in ("saved:backup-intent:beginning", "hv-after:backup_begin", "executed:beginning",
                     "hv-after:fs_freeze", "hv-after:fs_thaw", "saved:transfer-intent:transferring",
                     "saved:pulled:transferring", "hv-after:backup_abort", "executed:committing",
                     "executed:finalizing"):
        assert expected in labels


@pytest.mark.parametrize("scenario", ["push-full", "pull-incremental"])
def test_every_crash_point_resumes_or_rolls_back_cleanly(tmp_path, store, scenario):
    kw = SCENARIOS[scenario]
    points = _points(tmp_path, store, **kw)
    outcomes: collections.Counter = collections.Counter()
    for i, point in enumerate(points):
        w = World(tmp_path / f"p{i}", store, **kw)
        w.crasher.target = point
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        w.check_invariants(rec)
        outcomes[rec["status"]] += 1
    assert outcomes == {SUCCEEDED: len(points)}, outcomes  # every state resumes


@pytest.mark.parametrize("scenario", ["pull-full", "push-incremental"])
def test_other_modes_succeed_and_read_back_exactly(tmp_path, store, scenario):
    w = World(tmp_path, store, **SCENARIOS[scenario])
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    w.check_invariants(rec)
    assert rec["status"] == SUCCEEDED and rec["result"]["kind"] == ("incremental" if w.base else "full")


def test_incremental_reads_only_what_changed(tmp_path, store):
    w = World(tmp_path, store, mode="pull", incremental=True)
    assert not w.run()
    result = store.load(w.rec.id).result
    # 70000 bytes over two 64 KiB blocks of vda, one zeroed block of vdb
    assert result["bytes_read"] == 3 * 64 * KIB, result
    assert result["kind"] == "incremental" and result["parent_backup"] == w.base.id


def test_incremental_without_a_committed_checkpoint_is_full_and_says_why(tmp_path, store):
    w = World(tmp_path, store, mode="pull", incremental=True, with_base=False)
    assert not w.run()
    rec = store.load(w.rec.id)
    assert rec.status == SUCCEEDED and rec.result["kind"] == "full"
    assert "no committed backup checkpoint" in rec.result["fallback"]


def test_lost_checkpoints_are_redefined_before_the_next_incremental(tmp_path, store):
    w = World(tmp_path, store, mode="push", incremental=True)
    w.fake.forget_checkpoints("dom")  # undefine + define, or checkpoint-delete --metadata
    assert not w.run()
    rec = store.load(w.rec.id)
    assert rec.status == SUCCEEDED and rec.result["kind"] == "incremental", rec.result
    assert rec.result["redefined"] == [f"domcapture-{w.base.id}"]
    w.check_invariants(rec.to_dict())


def test_a_broken_chain_falls_back_to_full_and_says_so(tmp_path, store):
    w = World(tmp_path, store, mode="pull", incremental=True)
    w.fake.forget_checkpoints("dom")
    w.fake.drop_bitmap("dom", "vdb", f"domcapture-{w.base.id}")  # the bitmap is gone from the image
    assert not w.run()
    rec = store.load(w.rec.id)
    assert rec.status == SUCCEEDED and rec.result["kind"] == "full"
    assert "broken" in rec.result["fallback"] and "missing or broken bitmap" in rec.result["fallback"]
    assert w.cps.get(w.uri, "dom", f"domcapture-{w.base.id}").broken
    w.base = None
    w.check_invariants(rec.to_dict())


def test_a_bitmap_lost_behind_libvirt_s_back_falls_back_at_begin(tmp_path, store):
    w = World(tmp_path, store, mode="push", incremental=True)
    w.fake.drop_bitmap("dom", "vda", f"domcapture-{w.base.id}")  # libvirt still lists the checkpoint
    assert not w.run()
    rec = store.load(w.rec.id)
    assert rec.status == SUCCEEDED and rec.result["kind"] == "full"
    assert "refused" in rec.result["fallback"]
    assert any(e["event"] == "fallback-to-full" for e in store.history(w.rec.id))
    w.base = None
    w.check_invariants(rec.to_dict())


def _rollback_points(tmp_path, store, first, **kw) -> list[tuple[str, int]]:
    w = World(tmp_path / "rb-dry", store, **kw)
    w.crasher.target = first
    assert w.run()
    w.captures.rollback(w.rec.id)
    w.crasher = Crasher()
    assert not w.run()
    rec = store.load(w.rec.id).to_dict()
    assert rec["status"] == ROLLED_BACK
    w.check_invariants(rec)
    return w.crasher.seen


@pytest.mark.parametrize("first, kw", [
    (("saved:transfer-intent:transferring", 1), SCENARIOS["pull-incremental"]),
    (("executed:committing", 1), SCENARIOS["push-full"]),
    (("hv-after:fs_freeze", 1), SCENARIOS["push-full"]),
])
def test_every_crash_point_of_an_operator_rollback(tmp_path, store, first, kw):
    points = _rollback_points(tmp_path, store, first, **kw)
    for i, point in enumerate(points):
        w = World(tmp_path / f"r{i}", store, **kw)
        w.crasher.target = first
        assert w.run()
        w.captures.rollback(w.rec.id)
        w.crasher = Crasher(point)
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        assert rec["status"] == ROLLED_BACK
        w.check_invariants(rec)


# -- checkpoint ------------------------------------------------------------------------------------------
def _two_backups(path, store) -> World:
    """A domain with two committed backup checkpoints: the full's, and the incremental's (its child)."""
    w = World(path, store, mode="push", incremental=True)
    assert not w.run()
    assert store.load(w.rec.id).status == SUCCEEDED
    return w


def _crash_everywhere(tmp_path, store, make, check) -> None:
    """``make(path) -> (world, workflow id)``; crash the workflow at each boundary of a dry run."""
    w, wf = make(tmp_path / "dry")
    crasher = Crasher()
    w.fake.hook = crasher.hv_hook
    assert not run_once(store, w.fake, wf, crasher)
    check(w, store.load(wf).to_dict())
    for i, point in enumerate(crasher.seen):
        w, wf = make(tmp_path / f"c{i}")
        crasher = Crasher(point)
        w.fake.hook = crasher.hv_hook
        assert run_once(store, w.fake, wf, crasher), f"no crash at {point}"
        check(w, drive_to_end(store, w.captures, w.fake, wf, crasher))


def _store_mirrors_libvirt(w: World) -> None:
    live = {c.name: c for c in w.fake.list_checkpoints("dom")}
    ours = {c.name: c for c in w.cps.all(w.uri, "dom")}
    assert set(live) == set(ours), (sorted(live), sorted(ours))
    for name, cp in ours.items():
        assert cp.state == COMMITTED and cp.parent == live[name].parent and cp.xml == live[name].xml


def test_checkpoint_create_at_every_crash_point(tmp_path, store):
    shared: dict = {}

    def make(path):  # one domain for every run: each run adds a checkpoint on top of the last
        if "w" not in shared:
            shared["w"] = _two_backups(path, store)
        w = shared["w"]
        shared["parent"] = w.fake.list_checkpoints("dom")[-1].name
        return w, w.captures.submit("checkpoint", "dom", w.uri, {"action": "create"}).id

    def check(w, rec):
        assert rec["status"] == SUCCEEDED, rec["error"]
        name = rec["result"]["checkpoint"]
        assert name == f"domcapture-{rec['id']}" and w.cps.get(w.uri, "dom", name).kind == "checkpoint"
        assert w.fake.lookup_checkpoint("dom", name).parent == shared["parent"]
        _store_mirrors_libvirt(w)
    _crash_everywhere(tmp_path, store, make, check)


def test_checkpoint_delete_at_every_crash_point(tmp_path, store):
    def make(path):
        w = _two_backups(path, store)
        return w, w.captures.submit("checkpoint", "dom", w.uri,
                                    {"action": "delete", "checkpoint": f"domcapture-{w.base.id}"}).id

    def check(w, rec):
        assert rec["status"] == SUCCEEDED, rec["error"]
        assert rec["result"]["deleted"] == [f"domcapture-{w.base.id}"]
        (child,) = w.fake.list_checkpoints("dom")
        assert child.name == f"domcapture-{w.rec.id}" and child.parent is None  # re-parented by libvirt
        assert w.fake.bitmaps_of("dom", "vda") == [child.name]  # a real delete: its bitmap went too
        _store_mirrors_libvirt(w)
    _crash_everywhere(tmp_path, store, make, check)


def test_checkpoint_delete_with_children_and_redefine(tmp_path, store):
    w = _two_backups(tmp_path, store)
    w.fake.forget_checkpoints("dom")
    wf = w.captures.submit("checkpoint", "dom", w.uri, {"action": "redefine"}).id
    assert not run_once(store, w.fake, wf, None)
    rec = store.load(wf)
    assert rec.status == SUCCEEDED and rec.result["redefined"] == [f"domcapture-{w.base.id}",
                                                                   f"domcapture-{w.rec.id}"]
    _store_mirrors_libvirt(w)
    assert all(c["ok"] for c in w.captures.verify(wf))
    wf = w.captures.submit("checkpoint", "dom", w.uri, {"action": "delete", "checkpoint": f"domcapture-{w.base.id}",
                                                       "children": True}).id
    assert not run_once(store, w.fake, wf, None)
    rec = store.load(wf)
    assert rec.status == SUCCEEDED and sorted(rec.result["deleted"]) == sorted(
        [f"domcapture-{w.base.id}", f"domcapture-{w.rec.id}"])
    assert w.fake.list_checkpoints("dom") == [] and w.cps.all(w.uri, "dom") == []
    assert all(c["ok"] for c in w.captures.verify(wf))


@pytest.mark.parametrize("cut", ["hv-before:checkpoint_delete", "hv-after:checkpoint_delete"])
def test_rollback_of_a_checkpoint_delete_says_whether_the_delete_stands(tmp_path, store, cut):
    """Cut before libvirt's delete: the rollback leaves everything as it was (rolled_back).  Cut
    after it: the checkpoint and its bitmap are gone for good, and the workflow says so
    (partially_rolled_back, the checkpoint named), never rolled_back."""
    w = _two_backups(tmp_path, store)
    name = f"domcapture-{w.base.id}"
    wf = w.captures.submit("checkpoint", "dom", w.uri, {"action": "delete", "checkpoint": name}).id
    crasher = Crasher((cut, 1))
    w.fake.hook = crasher.hv_hook
    assert run_once(store, w.fake, wf, crasher)
    w.captures.recover(wf)
    w.captures.rollback(wf)
    assert not run_once(store, w.fake, wf, None)
    rec = store.load(wf)
    if cut == "hv-before:checkpoint_delete":
        assert rec.status == ROLLED_BACK and not rec.data.get("effects_standing")
        assert sorted(c.name for c in w.fake.list_checkpoints("dom")) == sorted([name, f"domcapture-{w.rec.id}"])
        assert name in w.fake.bitmaps_of("dom", "vda")
    else:
        assert rec.status == PARTIALLY_ROLLED_BACK
        (standing,) = rec.result["effects_standing"]
        assert standing.startswith(f"checkpoint {name} ") and "was deleted" in standing
        assert w.fake.lookup_checkpoint("dom", name) is None and name not in w.fake.bitmaps_of("dom", "vda")
        assert [e["event"] for e in store.history(wf)].count("effect-stands") == 1
    _store_mirrors_libvirt(w)


def test_rollback_of_a_checkpoint_create_removes_it_everywhere(tmp_path, store):
    w = _two_backups(tmp_path, store)
    wf = w.captures.submit("checkpoint", "dom", w.uri, {"action": "create"}).id
    crasher = Crasher(("hv-after:checkpoint_create", 1))
    w.fake.hook = crasher.hv_hook
    assert run_once(store, w.fake, wf, crasher)
    assert w.fake.lookup_checkpoint("dom", f"domcapture-{wf}") is not None
    w.captures.rollback(wf)
    assert not run_once(store, w.fake, wf, None)
    assert store.load(wf).status == ROLLED_BACK
    assert w.fake.lookup_checkpoint("dom", f"domcapture-{wf}") is None
    _store_mirrors_libvirt(w)


# -- restore -------------------------------------------------------------------------------------------------
def test_restore_at_every_crash_point(tmp_path, store):
    shared: dict = {}

    def make(path):  # the backups are only read: one chain serves every run
        if "w" not in shared:
            shared["w"] = _two_backups(tmp_path / "chain", store)
        w = shared["w"]
        path.mkdir()
        shared["name"] = f"dom-restored-{path.name}"
        wf = w.captures.submit("restore", "dom", w.uri, {"from": w.rec.id, "target": str(path),
                                                        "define": shared["name"]}).id
        return w, wf

    def check(w, rec):
        assert rec["status"] == SUCCEEDED, rec["error"]
        assert rec["result"]["chain"] == [w.base.id, w.rec.id]
        for t, info in rec["result"]["files"].items():
            assert chain_bytes([info["path"]], str(w.tmp / "r.raw")) == w.at_begin[t]
        restored = w.fake.domains[shared["name"]]
        assert restored.state == "shutoff"
        assert {t: d.base for t, d in restored.disks.items()} == {t: f["path"] for t, f in
                                                                   rec["result"]["files"].items()}
        assert all(c["ok"] for c in w.captures.verify(rec["id"]))
        assert not [p for p in os.listdir(rec["result"]["restore_dir"]) if p.endswith(".partial")]
    _crash_everywhere(tmp_path, store, make, check)


def test_rollback_of_a_restore_deletes_images_and_the_domain(tmp_path, store):
    w = _two_backups(tmp_path, store)
    (tmp_path / "restored").mkdir()
    wf = w.captures.submit("restore", "dom", w.uri, {"from": w.rec.id, "target": str(tmp_path / "restored"),
                                                  "define": "dom-restored"}).id
    assert run_once(store, w.fake, wf, Crasher(("executed:defining", 1)))
    assert "dom-restored" in w.fake.domains
    w.captures.rollback(wf)
    assert not run_once(store, w.fake, wf, None)
    assert store.load(wf).status == ROLLED_BACK
    assert "dom-restored" not in w.fake.domains
    assert os.listdir(tmp_path / "restored") == []
