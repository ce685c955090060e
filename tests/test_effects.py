"""The effects port: declared hypervisor calls, fenced; owned files only, never through a symlink.

These run on real files in a temporary folder, the in-memory hypervisor and the
real libvirt adapter's class (for the declaration check).
"""

from __future__ import annotations

import inspect
import os
import stat

import pytest

from workflows.effects import NotOurs, OwnedFiles
from workflows.errors import Cancelled, LeaseLost
from workflows.hypervisor.base import (CANCEL_EXEMPT, MUTATING, READ_ONLY, Hypervisor, UndeclaredCall, fenced,
                                       read_only)
from workflows.hypervisor.fake import FakeHypervisor
from workflows.hypervisor.libvirt_adapter import LibvirtHypervisor
from workflows.record import Artifact, Record


def _public(cls: type) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def test_every_protocol_method_is_declared_once_and_both_implementations_have_it():
    protocol = _public(Hypervisor)
    assert protocol == READ_ONLY | MUTATING
    assert not READ_ONLY & MUTATING
    assert CANCEL_EXEMPT <= MUTATING
    for impl in (LibvirtHypervisor, FakeHypervisor):
        missing = protocol - _public(impl)
        assert not missing, (impl.__name__, missing)


def _record(tmp_path) -> Record:
    rec = Record(id="0123456789abcdef", strategy="snapshot-backup", definition_version=1, domain="d",
                 uri="fake:///", params={}, state="preflight")
    folder = tmp_path / "domcapture-d-0123456789abcdef"
    rec.plan_artifact(Artifact("folder", "folder", str(folder)))
    rec.plan_artifact(Artifact("backup:vda", "backup-file", str(folder / "vda.qcow2"), "vda"))
    rec.plan_artifact(Artifact("manifest", "manifest", str(folder / "manifest.json")))
    return rec


def test_a_symlink_planted_at_the_partial_path_is_not_followed(tmp_path):
    rec = _record(tmp_path)
    files = OwnedFiles(rec, lambda: None)
    files.make_folder(rec.artifacts["folder"]["path"])
    victim = tmp_path / "shadow"
    victim.write_text("secret\n")
    partial = rec.artifacts["backup:vda"]["path"] + ".partial"
    os.symlink(victim, partial)
    source = tmp_path / "disk.img"
    source.write_bytes(b"\x01" * 4096 + b"\x00" * 4096)
    files.copy_resumable(str(source), partial, rec.artifacts["backup:vda"]["path"], offset=0,
                         on_progress=lambda *_: None, on_durable=lambda _: None, check=lambda: None)
    assert victim.read_text() == "secret\n"  # untouched
    out = rec.artifacts["backup:vda"]["path"]
    assert open(out, "rb").read() == source.read_bytes()
    assert not os.path.islink(out) and stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_a_resumed_copy_through_a_symlink_is_refused(tmp_path):
    rec = _record(tmp_path)
    files = OwnedFiles(rec, lambda: None)
    files.make_folder(rec.artifacts["folder"]["path"])
    victim = tmp_path / "victim"
    victim.write_text("x" * 100)
    partial = rec.artifacts["backup:vda"]["path"] + ".partial"
    os.symlink(victim, partial)
    with pytest.raises(NotOurs):
        files.copy_resumable(str(victim), partial, rec.artifacts["backup:vda"]["path"], offset=50,
                             on_progress=lambda *_: None, on_durable=lambda _: None, check=lambda: None)
    assert victim.read_text() == "x" * 100


def test_write_atomic_is_private_and_exclusive(tmp_path):
    rec = _record(tmp_path)
    files = OwnedFiles(rec, lambda: None)
    folder = rec.artifacts["folder"]["path"]
    files.make_folder(folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    files.write_atomic(rec.artifacts["manifest"]["path"], {"workflow": rec.id})
    path = rec.artifacts["manifest"]["path"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and '"workflow"' in open(path).read()
    assert not os.path.exists(path + ".partial")


def test_only_paths_the_record_names_can_be_deleted(tmp_path):
    rec = _record(tmp_path)
    files = OwnedFiles(rec, lambda: None)
    files.make_folder(rec.artifacts["folder"]["path"])
    other = tmp_path / "domcapture-d-0123456789abcdef" / "vdb.qcow2"  # carries the id, but was never planned
    other.write_text("keep")
    with pytest.raises(NotOurs):
        files.remove_owned(str(other))
    with pytest.raises(NotOurs):
        files.remove_owned(str(tmp_path / "domcapture-d-0123456789abcdef"))
    assert other.read_text() == "keep"
    planned = rec.artifacts["backup:vda"]["path"]
    open(planned, "w").close()
    assert files.remove_owned(planned) is True and not os.path.exists(planned)
    assert files.remove_owned(planned) is False


def test_a_folder_someone_else_made_writable_is_refused(tmp_path):
    rec = _record(tmp_path)
    folder = rec.artifacts["folder"]["path"]
    os.mkdir(folder)
    os.chmod(folder, 0o777)
    with pytest.raises(NotOurs):
        OwnedFiles(rec, lambda: None).make_folder(folder)
    os.rmdir(folder)
    os.symlink(tmp_path, folder)
    with pytest.raises(NotOurs):
        OwnedFiles(rec, lambda: None).make_folder(folder)


def test_file_operations_run_the_guard_before_the_effect(tmp_path):
    rec = _record(tmp_path)
    lost = {"now": False}

    def guard() -> None:
        if lost["now"]:
            raise LeaseLost("lease lost")
    files = OwnedFiles(rec, guard)
    files.make_folder(rec.artifacts["folder"]["path"])
    lost["now"] = True
    with pytest.raises(LeaseLost):
        files.write_atomic(rec.artifacts["manifest"]["path"], {"x": 1})
    assert os.listdir(rec.artifacts["folder"]["path"]) == []


def test_fenced_hypervisor_checks_before_mutating_and_refuses_undeclared_calls(tmp_path):
    inner = FakeHypervisor()
    base = tmp_path / "vda.img"
    base.write_bytes(b"\0" * 4096)
    inner.add_domain("d", {"vda": str(base)}, agent=True)
    seen: list[str] = []

    def guard(call: str) -> None:
        seen.append(call)
        if call not in CANCEL_EXEMPT:
            raise Cancelled("aborted by operator")
    hv = fenced(inner, guard)
    assert hv.domain_state("d") == "running" and seen == []  # looking is not fenced
    with pytest.raises(Cancelled):
        hv.snapshot_disk_only("d", {"vda": str(tmp_path / "ov.qcow2")})
    assert not (tmp_path / "ov.qcow2").exists() and inner.disks("d")[0].source == str(base)
    assert hv.fs_thaw("d") == 0  # a thaw passes even after an abort
    assert seen == ["snapshot_disk_only", "fs_thaw"]
    with pytest.raises(UndeclaredCall):
        hv.guest_write("d", "vda", 0, b"x")  # type: ignore[attr-defined]
    with pytest.raises(UndeclaredCall):
        read_only(inner).fs_freeze("d")
    assert inner.domains["d"].frozen is False
