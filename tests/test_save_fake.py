"""Every crash point of managed-save, managed-save-restore, save and save-restore,
exhaustively, on the in-memory hypervisor.

A dry run lists every boundary (record saves, probes, effects, the instant
before and after each libvirt call, and for a rewind the instants between
two renames of a disk file).  Then, for each one, a fresh workflow is crashed
exactly there, recovered as the recovery process does it, and run to the
end, while the guest keeps running between rounds.  The outcome must be
``succeeded`` or ``rolled_back`` with the domain either where the capture (or
the rewind) leaves it or where it was, its memory continuing (never a
reboot), no file of ours half-written or left behind, and a capture's files
identical to the guest's disks at the save.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import pytest

from workflows.errors import InputError, RecordNotFound
from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import PARTIALLY_ROLLED_BACK, ROLLED_BACK, SUCCEEDED
from workflows.service import Captures

from .crashkit import Crasher, drive_to_end, run_once

POST_CAPTURE_WRITE = (4096, b"\xab" * 8192)


@pytest.fixture
def tmp_path(tmp_path_factory):
    """On tmpfs when the host has one: these tests fsync hundreds of small files, and on a
    disk shared with running guests the fsync latency, not the code, set their pace."""
    base = "/dev/shm"
    if not (os.path.isdir(base) and os.access(base, os.W_OK)):
        yield tmp_path_factory.mktemp("save")
        return
    folder = tempfile.mkdtemp(prefix="dctest-save-", dir=base)
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


class World:
    def __init__(self, tmp_path, store) -> None:
        self.store = store
        self.dir = tmp_path / "disks"
        self.dir.mkdir(parents=True)
        self.target = tmp_path / "captures"
        self.target.mkdir()
        self.paths = {"vda": str(self.dir / "vda.qcow2"), "vdb": str(self.dir / "vdb.qcow2")}
        for i, p in enumerate(self.paths.values()):
            with open(p, "wb") as f:
                f.write(os.urandom((4 + i) * 256 * 1024 + 777))
        self.fake = FakeHypervisor()
        self.fake.add_domain("dom", self.paths, agent=True)
        self.fake.guest_tick("dom", 10)
        self.crasher = Crasher()
        self.at_save: dict | None = None  # disks and memory at the instant of the (first) save
        self.at_save_locked = False
        self.fake.hook = self._hv_hook
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: None)
        self.wf = ""

    def _hv_hook(self, when: str, method: str) -> None:
        if (when, method) == ("before", "save") and not self.at_save_locked:
            self._pending = {"disks": self.disks(), "memory": self.fake.memory_of("dom")}
        if (when, method) == ("after", "save") and not self.at_save_locked:
            self.at_save, self.at_save_locked = self._pending, True
        self.crasher(f"hv-{when}:{method}")

    # -- driving ----------------------------------------------------------------------------
    def submit(self, strategy: str, **params) -> str:
        self.wf = self.captures.submit(strategy, "dom", "fake:///default", params).id
        return self.wf

    def run(self, worker: str = "w1") -> bool:
        return run_once(self.store, self.fake, self.wf, self.crasher, worker)

    def between(self) -> None:
        """The guest keeps running (its uptime grows) while nobody runs the workflow."""
        self.fake.guest_tick("dom", 3)

    def drive_to_end(self) -> dict:
        return drive_to_end(self.store, self.captures, self.fake, self.wf, self.crasher, between=self.between)

    # -- looking --------------------------------------------------------------------------------
    def disks(self) -> dict[str, bytes]:
        return {t: open(p, "rb").read() for t, p in self.paths.items()}

    def state(self) -> str:
        return self.fake.domain_state("dom")

    def ours_beside_disks(self) -> list[str]:
        return sorted(p for p in os.listdir(self.dir) if p.startswith("domcapture-"))

    def capture_dirs(self) -> list[str]:
        return sorted(os.listdir(self.target))


def assert_memory_continues(memory: dict | None, before: dict) -> None:
    """Same boot, uptime not behind: restored, never rebooted."""
    assert memory is not None
    assert memory["boot"] == before["boot"], f"the guest was rebooted: {memory} after {before}"
    assert memory["ticks"] >= before["ticks"], f"uptime went back: {memory} after {before}"


def assert_save_capture(w: World, rec: dict) -> None:
    at_save = cast(dict[str, Any], w.at_save)  # set by the save the capture made
    files = rec["result"]["files"]
    assert set(files) == {"memory", "vda", "vdb"}
    for t in ("vda", "vdb"):
        assert open(files[t]["path"], "rb").read() == at_save["disks"][t], f"copy of {t} differs"
    for info in files.values():
        import hashlib
        assert info["checksum"] == "sha256:" + hashlib.sha256(open(info["path"], "rb").read()).hexdigest()
        assert not os.path.exists(info["path"] + ".partial")
    image = json.load(open(files["memory"]["path"]))
    assert image["memory"] == at_save["memory"]
    (folder,) = w.capture_dirs()
    assert sorted(os.listdir(w.target / folder)) == ["manifest.json", "memory.save", "vda.qcow2", "vdb.qcow2"]


# -- scenarios ---------------------------------------------------------------------------------
class Scenario:
    """Sets a world up for one strategy, submits it, and checks the outcome."""

    strategy = ""
    params: dict = {}

    def setup(self, w: World) -> None:
        self.memory_before = w.fake.memory_of("dom")
        self.disks_before = w.disks()

    def submit(self, w: World) -> None:
        w.submit(self.strategy, **self.params)

    def check(self, w: World, rec: dict) -> None:
        assert rec["status"] in (SUCCEEDED, ROLLED_BACK, PARTIALLY_ROLLED_BACK), \
            (rec["status"], rec["error"], rec["attention"])
        assert w.fake._save_state("dom").job is None
        assert w.state() in ("running", "shutoff")
        assert w.ours_beside_disks() == [], "a file of ours was left beside the disks"
        {SUCCEEDED: self.check_succeeded, ROLLED_BACK: self.check_rolled_back,
         PARTIALLY_ROLLED_BACK: self.check_partially_rolled_back}[rec["status"]](w, rec)

    def check_succeeded(self, w: World, rec: dict) -> None:
        raise NotImplementedError

    def check_rolled_back(self, w: World, rec: dict) -> None:
        raise NotImplementedError

    def check_partially_rolled_back(self, w: World, rec: dict) -> None:
        raise AssertionError(f"no effect of {self.strategy} should stand after a rollback: {rec['result']}")


class ManagedSave(Scenario):
    strategy = "managed-save"

    def check_succeeded(self, w, rec):
        assert w.state() == "shutoff" and w.fake.has_managed_save_image("dom")
        assert_memory_continues(w.fake._save_state("dom").managed, self.memory_before)

    def check_rolled_back(self, w, rec):
        assert w.state() == "running" and not w.fake.has_managed_save_image("dom")
        assert_memory_continues(w.fake.memory_of("dom"), self.memory_before)


class ManagedSaveRestore(Scenario):
    strategy = "managed-save-restore"

    def setup(self, w):
        w.fake.managed_save("dom")
        self.memory_before = dict(w.fake._save_state("dom").managed)
        self.disks_before = w.disks()

    def check_succeeded(self, w, rec):
        assert w.state() == "running" and not w.fake.has_managed_save_image("dom")
        assert_memory_continues(w.fake.memory_of("dom"), self.memory_before)

    def check_rolled_back(self, w, rec):
        assert w.state() == "shutoff" and w.fake.has_managed_save_image("dom")
        assert_memory_continues(w.fake._save_state("dom").managed, self.memory_before)


class Save(Scenario):
    strategy = "save"

    def submit(self, w):
        w.submit("save", target=str(w.target), **self.params)

    def check_succeeded(self, w, rec):
        assert w.state() == "running"
        assert_memory_continues(w.fake.memory_of("dom"), w.at_save["memory"])
        assert_save_capture(w, rec)
        assert rec["result"]["downtime_s"] is not None and rec["result"]["memory_image_bytes"] > 0

    def check_rolled_back(self, w, rec):
        assert w.state() == "running", "the guest was left off"
        assert_memory_continues(w.fake.memory_of("dom"), self.memory_before)
        assert w.capture_dirs() == [], f"rollback left {w.capture_dirs()}"


class SaveKeepStopped(Save):
    params = {"keep_stopped": True}

    def check_succeeded(self, w, rec):
        assert w.state() == "shutoff"
        assert_save_capture(w, rec)
        assert rec["result"]["downtime_s"] is None and rec["result"]["domain_state"] == "shutoff"


class SaveRestore(Scenario):
    """A save capture, then the guest writes and runs on; then the rewind."""

    strategy = "save-restore"
    keep_stopped = False

    def setup(self, w):
        w.submit("save", target=str(w.target), **({"keep_stopped": True} if self.keep_stopped else {}))
        assert not w.run("setup")
        self.capture = w.store.load(w.wf).to_dict()
        assert self.capture["status"] == SUCCEEDED
        self.captured = {"disks": w.at_save["disks"], "memory": w.at_save["memory"]}
        if not self.keep_stopped:
            w.fake.guest_tick("dom", 50)
            w.fake.guest_write("dom", "vda", *POST_CAPTURE_WRITE)
        self.memory_before = w.fake.memory_of("dom")
        self.disks_before = w.disks()
        self.capture_files = {k: open(v["path"], "rb").read() for k, v in self.capture["result"]["files"].items()}
        w.crasher = Crasher()

    def submit(self, w):
        w.submit("save-restore", **{"from": self.capture["id"]})

    def reset(self, w):
        """Back to just after the set-up: the same disk bytes, a fresh domain with the same memory."""
        for t, data in self.disks_before.items():
            with open(w.paths[t], "wb") as f:
                f.write(data)
        for leftover in w.ours_beside_disks():
            os.unlink(w.dir / leftover)
        w.fake = FakeHypervisor()
        w.fake.add_domain("dom", w.paths, agent=True, state="running" if self.memory_before else "shutoff")
        w.fake._save_state("dom").memory = dict(self.memory_before) if self.memory_before else None
        w.fake.hook = w._hv_hook

    def check(self, w, rec):
        super().check(w, rec)
        files = self.capture["result"]["files"]
        assert {k: open(v["path"], "rb").read() for k, v in files.items()} == self.capture_files, \
            "the capture was changed"

    def check_succeeded(self, w, rec):
        self.check_rewound(w)
        assert rec["result"]["downtime_s"] is not None

    def check_partially_rolled_back(self, w, rec):
        """Past its commit a rewind cannot be undone: the guest stays rewound, and the record says so."""
        assert rec["data"]["committed"]
        (standing,) = rec["result"]["effects_standing"]
        assert f"to capture {self.capture['id']} was committed" in standing and "cannot be undone" in standing
        self.check_rewound(w)

    def check_rewound(self, w, rec=None):
        assert w.state() == "running"
        assert w.disks() == self.captured["disks"], "the disks were not rewound"
        assert_memory_continues(w.fake.memory_of("dom"), self.captured["memory"])
        assert w.fake.memory_of("dom")["ticks"] < self.captured["memory"]["ticks"] + 40, "memory was not rewound"

    def check_rolled_back(self, w, rec):
        assert w.disks() == self.disks_before, "the original disks did not come back"
        if self.memory_before is None:
            assert w.state() == "shutoff"
        else:
            assert w.state() == "running", "the guest was left off"
            assert_memory_continues(w.fake.memory_of("dom"), self.memory_before)


class SaveRestoreFromShutoff(SaveRestore):
    keep_stopped = True


SCENARIOS = {"managed-save": ManagedSave, "managed-save-restore": ManagedSaveRestore, "save": Save,
             "save-keep-stopped": SaveKeepStopped, "save-restore": SaveRestore,
             "save-restore-from-shutoff": SaveRestoreFromShutoff}


_POOL: dict[tuple[str, str], tuple[World, SaveRestore]] = {}


def fresh(tmp_path, store, name: str) -> tuple[World, Scenario]:
    """A world set up for scenario ``name`` with its workflow submitted.

    A rewind's set-up (a whole save capture) is made once per test and the
    world reset to just after it for every crash point: the capture's files
    are only ever read, and the disks and the domain are put back.
    """
    sc = SCENARIOS[name]()
    key = (str(store.prefix), name)
    if isinstance(sc, SaveRestore) and key in _POOL:
        w, sc = _POOL[key]
        sc.reset(w)
    else:
        w = World(tmp_path, store)
        sc.setup(w)
        if isinstance(sc, SaveRestore):
            _POOL[key] = (w, sc)
    w.crasher = Crasher()  # the set-up's own libvirt calls are not crash points
    sc.submit(w)
    return w, sc


def dry_points(tmp_path, store, name: str) -> list[tuple[str, int]]:
    w, sc = fresh(tmp_path / "dry", store, name)
    assert not w.run()
    rec = store.load(w.wf).to_dict()
    assert rec["status"] == SUCCEEDED, rec["error"]
    sc.check(w, rec)
    return w.crasher.seen


def test_dry_runs_pass_every_kind_of_boundary(tmp_path, store):
    expected = {
        "managed-save": ["saved:managed-save-intent:saving", "hv-after:managed_save", "executed:saving"],
        "managed-save-restore": ["saved:start-intent:starting", "hv-after:start", "executed:starting"],
        "save": ["saved:save-intent:saving", "hv-before:save", "hv-after:save", "saved:copy-intent:copying",
                 "saved:progress:copying", "saved:restore-intent:restoring", "hv-after:restore",
                 "saved:memory-checksummed:finalizing", "executed:finalizing"],
        "save-restore": ["saved:stage-intent:staging", "saved:safety-save-intent:stopping", "hv-after:save",
                         "saved:set-aside-intent:swapping", "save:swap-intent:swapping",
                         "saved:swap-intent:swapping", "hv-after:restore", "saved:commit:committing"],
    }
    for name, labels in expected.items():
        seen = {label for label, _ in dry_points(tmp_path / name, store, name)}
        missing = [x for x in labels if x not in seen]
        assert not missing, (name, missing)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_crash_point_resumes_or_rolls_back_cleanly(tmp_path, store, name):
    points = dry_points(tmp_path, store, name)
    outcomes: collections.Counter = collections.Counter()
    for i, point in enumerate(points):
        w, sc = fresh(tmp_path / f"p{i}", store, name)
        w.crasher.target = point
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        sc.check(w, rec)
        outcomes[rec["status"]] += 1
    # Every crash point resumes: nothing in these sequences needs a rollback.
    assert outcomes == {SUCCEEDED: len(points)}, outcomes


ROLLBACK_FROM = {
    "managed-save": [("executed:saving", 1)],
    "managed-save-restore": [("executed:starting", 1)],
    "save": [("executed:saving", 1), ("saved:progress:copying", 1), ("executed:restoring", 1)],
    "save-keep-stopped": [("probed:restoring", 1)],
    "save-restore": [("executed:stopping", 1), ("save:swap-intent:swapping", 1), ("executed:restoring", 1),
                     ("saved:commit:committing", 1)],
    "save-restore-from-shutoff": [("executed:swapping", 1)],
}


@pytest.mark.parametrize("name, first", [(n, p) for n, ps in ROLLBACK_FROM.items() for p in ps])
def test_every_crash_point_of_an_operator_rollback(tmp_path, store, name, first):
    def crashed_then_rollback(sub) -> tuple[World, Scenario]:
        w, sc = fresh(tmp_path / sub, store, name)
        w.crasher.target = first
        assert w.run(), f"no crash at {first}"
        w.between()
        w.captures.rollback(w.wf)
        return w, sc

    w, sc = crashed_then_rollback("rb-dry")
    w.crasher = Crasher()
    assert not w.run()
    rec = store.load(w.wf).to_dict()
    # a rewind that committed stays rewound (its way back is gone): partially_rolled_back, never rolled_back
    committed = bool(rec["data"].get("committed"))
    assert committed is ((name, first) == ("save-restore", ("saved:commit:committing", 1)))
    expected = PARTIALLY_ROLLED_BACK if committed else ROLLED_BACK
    assert rec["status"] == expected
    sc.check(w, rec)
    for i, point in enumerate(w.crasher.seen):
        w, sc = crashed_then_rollback(f"r{i}")
        w.crasher = Crasher(point)
        assert w.run(), f"no crash at {point}"
        rec = w.drive_to_end()
        assert rec["status"] == expected, point
        sc.check(w, rec)


def test_the_rewind_is_exact_and_repeatable(tmp_path, store):
    """Rewind twice to the same capture: the capture is never consumed."""
    w, sc = fresh(tmp_path, store, "save-restore")
    assert not w.run()
    assert store.load(w.wf).status == SUCCEEDED
    sc.check(w, store.load(w.wf).to_dict())
    w.fake.guest_tick("dom", 100)
    w.fake.guest_write("dom", "vdb", *POST_CAPTURE_WRITE)
    sc.submit(w)
    assert not w.run()
    rec = store.load(w.wf).to_dict()
    assert rec["status"] == SUCCEEDED
    assert w.disks() == sc.captured["disks"]
    assert w.fake.memory_of("dom") == sc.captured["memory"]


# -- bad input: one clear line, nothing recorded, nothing created ---------------------------------
def _refused(w: World, strategy: str, exc_type, message: str, **params) -> None:
    before = (w.store.ids(), w.capture_dirs(), w.ours_beside_disks(), w.state(), w.disks())
    with pytest.raises(exc_type) as info:
        w.captures.submit(strategy, "dom", "fake:///default", params)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2
    assert (w.store.ids(), w.capture_dirs(), w.ours_beside_disks(), w.state(), w.disks()) == before


def test_bad_input_is_refused_before_anything_happens(tmp_path, store):
    w = World(tmp_path, store)
    _refused(w, "save", InputError, "--target is required")
    _refused(w, "save", InputError, "does not exist", target=str(tmp_path / "absent"))
    _refused(w, "save-restore", InputError, "--from is required")
    _refused(w, "save-restore", RecordNotFound, "no workflow with id", **{"from": "0123456789abcdef"})
    _refused(w, "managed-save-restore", InputError, "is running; only a shut off domain")
    w.fake._save_state("dom").persistent = False
    _refused(w, "managed-save", InputError, "is transient")
    w.fake._save_state("dom").persistent = True
    # a capture of another strategy, a capture that did not succeed, a capture of another domain
    w.submit("managed-save")
    assert not w.run()
    _refused(w, "save-restore", InputError, "is a managed-save workflow", **{"from": w.wf})
    w.fake.start("dom")
    other_disk = str(w.dir / "other.qcow2")
    open(other_disk, "wb").write(b"o" * 4096)
    w.fake.add_domain("other", {"vda": other_disk})
    queued = w.captures.submit("save", "other", "fake:///default", {"target": str(w.target)}).id
    _refused(w, "save-restore", InputError, f"capture {queued} is queued; only a succeeded", **{"from": queued})
    w.submit("save", target=str(w.target))
    assert not w.run()
    w.fake.add_domain("third", {"vda": other_disk})
    with pytest.raises(InputError, match="is of domain dom, not third"):
        w.captures.submit("save-restore", "third", "fake:///default", {"from": w.wf})
    # a capture file that changed size is refused; so is a domain whose disks moved
    mem = w.store.load(w.wf).result["files"]["memory"]["path"]
    with open(mem, "ab") as f:
        f.write(b"x")
    _refused(w, "save-restore", InputError, "has changed size", **{"from": w.wf})


def test_a_save_libvirtd_still_runs_is_waited_for_not_repeated(tmp_path, store):
    """The worker died after asking for the save; libvirtd goes on with it, the guest paused."""
    w, sc = fresh(tmp_path, store, "save")
    w.crasher.target = ("hv-before:save", 1)
    assert w.run()
    path = store.load(w.wf).artifacts["memory"]["path"]
    w.fake.domains["dom"].state = "paused"
    polls = {"left": 4}
    real_job = w.fake.get_active_job

    def job(name: str):
        if polls["left"]:
            polls["left"] -= 1
            if not polls["left"]:  # libvirtd finishes the save it was running
                w.fake.domains["dom"].state = "running"
                w.fake.hook = None
                w.fake.save("dom", path)
                w.fake.hook = w._hv_hook
                return None
            return "save"
        return real_job(name)
    w.fake.get_active_job = job  # type: ignore[method-assign]
    w.at_save_locked, w.at_save = True, {"disks": w.disks(), "memory": w.fake.memory_of("dom")}
    rec = w.drive_to_end()
    sc.check(w, rec)
    assert rec["status"] == SUCCEEDED
    # libvirtd's save was waited for and taken as the capture (sc.check compared its memory), not repeated
    intents = [e for e in store.history(w.wf) if e["event"] == "save-intent"]
    assert len(intents) == 1, "the save was started a second time"


def test_a_guest_shut_off_without_our_image_is_left_to_an_operator(tmp_path, store):
    """Rollback never guesses: no complete image of ours, no restore, a clear instruction."""
    w, sc = fresh(tmp_path, store, "save")
    w.crasher.target = ("executed:saving", 1)
    assert w.run()
    path = store.load(w.wf).artifacts["memory"]["path"]
    os.unlink(path)  # the image is lost (or was never complete)
    w.captures.rollback(w.wf)
    w.crasher = Crasher()
    assert not w.run()
    rec = store.load(w.wf)
    assert rec.status == "needs_attention" and w.state() == "shutoff"
    assert "is not a complete save image" in rec.attention["reason"]
    assert rec.attention["command"] == f"domcapture rollback {w.wf}"
    # the operator starts the guest, then continues the rollback: it ends cleanly
    w.fake.start("dom")
    w.captures.rollback(w.wf)
    assert not w.run()
    assert store.load(w.wf).status == ROLLED_BACK and w.capture_dirs() == []
