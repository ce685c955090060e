"""Disk selection for snapshot-backup and direct-backup, on the in-memory hypervisor.

``--disks`` / ``--exclude`` pick the disks; cdrom, floppy, read-only and
shareable disks are left out unless named, and every disk left out is listed
in the result with its reason.  Bad selections are refused at submit with one
line, and nothing is recorded.
"""

from __future__ import annotations

import os

import pytest

from workflows.errors import InputError
from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import SUCCEEDED
from workflows.service import Captures

from .crashkit import run_once

KIB = 1024


class World:
    def __init__(self, tmp_path, store) -> None:
        self.store = store
        (tmp_path / "disks").mkdir()
        (tmp_path / "bk").mkdir()
        self.target = str(tmp_path / "bk")
        self.paths = {t: str(tmp_path / "disks" / f"{t}.img") for t in ("vda", "vdb", "vdc", "hdc", "vdd", "vde")}
        for p in self.paths.values():
            with open(p, "wb") as f:
                f.write(os.urandom(64 * KIB))
        self.uri = f"fake:///{os.path.basename(str(tmp_path))}-{os.urandom(4).hex()}"
        self.fake = FakeHypervisor(self.uri)
        self.fake.add_domain("dom", {t: self.paths[t] for t in ("vda", "vdb", "vdc")}, agent=True)
        self.fake.add_disk("dom", "hdc", self.paths["hdc"], device="cdrom", readonly=True, fmt="raw")
        self.fake.add_disk("dom", "vdd", self.paths["vdd"], readonly=True)
        self.fake.add_disk("dom", "vde", self.paths["vde"], shareable=True, fmt="raw")
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: None)

    def submit(self, strategy: str, **extra):
        return self.captures.submit(strategy, "dom", self.uri, {"target": self.target, "quiesce": "off", **extra})

    def run(self, strategy: str, **extra) -> dict:
        rec = self.submit(strategy, **extra)
        assert not run_once(self.store, self.fake, rec.id, None)
        done = self.store.load(rec.id)
        assert done.status == SUCCEEDED, done.error
        return done.to_dict()


STRATEGIES = ["snapshot-backup", "direct-backup"]
DEFAULT_SKIPPED = {"hdc": "cdrom", "vdd": "read-only", "vde": "shareable"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_default_skips_cdrom_readonly_and_shareable_and_lists_them(tmp_path, store, strategy):
    w = World(tmp_path, store)
    doc = w.run(strategy)
    assert set(doc["result"]["files"]) == {"vda", "vdb", "vdc"}
    skipped = {s["target"]: s["reason"] for s in doc["result"]["skipped_disks"]}
    assert set(skipped) == set(DEFAULT_SKIPPED)
    for target, word in DEFAULT_SKIPPED.items():
        assert skipped[target].startswith(word), skipped
    names = sorted(os.listdir(doc["result"]["backup_dir"]))
    assert not any(t in n for n in names for t in DEFAULT_SKIPPED), names


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_disks_and_exclude_choose_exactly(tmp_path, store, strategy):
    w = World(tmp_path, store)
    doc = w.run(strategy, disks="vdb")
    assert set(doc["result"]["files"]) == {"vdb"}
    skipped = {s["target"]: s["reason"] for s in doc["result"]["skipped_disks"]}
    assert skipped["vda"] == skipped["vdc"] == "not named by --disks"
    assert set(skipped) == {"vda", "vdc", "hdc", "vdd", "vde"}

    doc = w.run(strategy, exclude="vda,vdc")
    assert set(doc["result"]["files"]) == {"vdb"}
    skipped = {s["target"]: s["reason"] for s in doc["result"]["skipped_disks"]}
    assert skipped["vda"] == skipped["vdc"] == "excluded by --exclude"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("extra,message", [
    ({"disks": "vda,vdz"}, "--disks: domain dom has no disk vdz (its disks: vda, vdb, vdc, hdc, vdd, vde)"),
    ({"exclude": "sdq"}, "--exclude: domain dom has no disk sdq"),
    ({"disks": "vda,hdc"}, "--disks names hdc of dom, a cdrom disk; it cannot be captured"),
    ({"disks": "vde"}, "--disks names vde of dom, a shareable disk; it cannot be captured"),
    ({"disks": "vda", "exclude": "vda"}, "--exclude names vda, which --disks asks for"),
    ({"disks": "vda,,vdb"}, "--disks: '' is not a disk target"),
    ({"disks": "vda,vda"}, "--disks names vda twice"),
    ({"exclude": "vda,vdb,vdc"}, "domain dom has no disks to capture (vda: excluded by --exclude;"),
])
def test_bad_selection_is_refused_at_submit_and_records_nothing(tmp_path, store, strategy, extra, message):
    w = World(tmp_path, store)
    with pytest.raises(InputError) as err:
        w.submit(strategy, **extra)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert store.ids() == []
    assert os.listdir(w.target) == []
