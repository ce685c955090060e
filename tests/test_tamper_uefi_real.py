"""Tamper evidence and UEFI/TPM guests, on a real libvirtd + QEMU with Debian's OVMF and swtpm.

One UEFI domain (OVMF code read-only, its own NVRAM copied from the 4M
template, a TPM 2.0 emulated by swtpm) serves the module.  Backups must
carry the NVRAM and TPM state in the folder and in the manifest; the record
holds the manifest's sha256; ``verify`` and ``restore`` refuse a folder
changed behind our back (domain.xml, a disk byte, the manifest itself, an
extra file, a bad signature), naming the file, and define nothing.  A
restored domain gets its own NVRAM and its own copy of the captured TPM state
(in swtpm's folder for its new UUID, with the modes and owner of the
source's); rolling the restore back removes the domain, that copy and that
state only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from workflows.store import Store

from .conftest import REDIS_URL
from .realenv import ENDED, WorkerCluster, edit_record, run

pytestmark = pytest.mark.real

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def virsh(uri: str, *args: str, check: bool = True) -> str:
    return run("virsh", "-c", uri, *args, check=check).stdout


def define_uefi_domain(uri: str, workdir: Path) -> SimpleNamespace:
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"dctest-uefi-{uuid.uuid4().hex[:8]}"
    disk = workdir / f"{name}-vda.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(disk), "16M")
    run("qemu-io", "-c", "write -P 0x5a 0 4M", str(disk))
    nvram = workdir / f"{name}_VARS.fd"
    shutil.copyfile(OVMF_VARS, nvram)
    # TCG: OVMF's pflash stops a nested KVM guest at once; the firmware need not boot anything
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='q35'>hvm</type>"
           f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
           f"<nvram template='{OVMF_VARS}'>{nvram}</nvram></os><features><acpi/></features>"
           f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
           "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
           "<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>")
    path = workdir / f"{name}.xml"
    path.write_text(xml)
    virsh(uri, "define", str(path))
    virsh(uri, "start", name)
    dom_uuid = virsh(uri, "domuuid", name).strip()
    return SimpleNamespace(name=name, disk=disk, nvram=nvram, tpm=Path(f"/var/lib/libvirt/swtpm/{dom_uuid}"))


@pytest.fixture(scope="module")
def w(libvirt_uri, redis_client, tmp_path_factory):
    base = tmp_path_factory.mktemp("tamper-uefi")
    dom = define_uefi_domain(libvirt_uri, base / "dom")
    prefix = f"dct-tamper-{uuid.uuid4().hex[:8]}"
    cluster = WorkerCluster(REDIS_URL, libvirt_uri, prefix, base / "logs")
    cluster.env.pop("DOMCAPTURE_MANIFEST_KEY_FILE", None)
    cluster.start_recovery()
    cluster.start_worker()
    target = base / "backups"
    target.mkdir()
    world = SimpleNamespace(dom=dom, cluster=cluster, target=target, base=base, uri=libvirt_uri,
                            store=Store(redis_client, prefix), defined=[])
    yield world
    cluster.stop()
    for name in [*world.defined, dom.name]:
        virsh(libvirt_uri, "destroy", name, check=False)
        virsh(libvirt_uri, "undefine", name, "--nvram", "--tpm", "--checkpoints-metadata", check=False)
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


def wait_final(w, wf: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while True:
        rec = w.store.load(wf)
        if rec.status in ENDED:
            return rec.to_dict()
        assert time.time() < deadline, f"timed out; workflow is {rec.status}/{rec.state}"
        time.sleep(0.1)


def submit(w, strategy: str, *args: str, check: bool = True):
    out = w.cluster.cli("submit", strategy, "--domain", w.dom.name, "--json", *args, check=check)
    return json.loads(out.stdout)["id"] if check else out


def backup(w, strategy: str, *args: str) -> dict:
    wf = submit(w, strategy, "--target", str(w.target), "--quiesce", "off", *args)
    doc = wait_final(w, wf)
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    return doc


def contents(doc: dict) -> dict[str, dict]:
    with open(doc["result"]["manifest"]) as f:
        return {e["name"]: e for e in json.load(f)["contents"]}


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def domains(w) -> list[str]:
    return virsh(w.uri, "list", "--all", "--name").split()


def tpm_tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each folder and state file of a swtpm state folder (swtpm's lock left out): mode, uid, gid."""
    out = {}
    for p in [folder, *sorted(folder.rglob("*"))]:
        if p.name != ".lock":
            st = p.lstat()
            out[str(p.relative_to(folder))] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def tpm_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def direct(w) -> dict:
    return backup(w, "direct-backup")


def assert_copy_of(copy: Path, live: Path) -> None:
    """``copy`` holds the bytes ``live`` had: equal now, or ``live`` was written after the capture ended
    (the firmware and swtpm write their state while the guest runs).  Compared by digest: a failure
    message of two whole files would take pytest minutes to diff."""
    if sha(copy) != sha(live):  # then the live file must have been written after the copy was made
        assert live.stat().st_mtime > copy.stat().st_mtime - 0.5, f"{copy.name} differs from {live}, unchanged since"


# -- capture ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["direct-backup", "snapshot-backup"])
def test_backup_carries_nvram_tpm_and_a_manifest_of_every_file(w, direct, strategy):
    doc = direct if strategy == "direct-backup" else backup(w, strategy)
    r = doc["result"]
    folder = Path(r["backup_dir"])
    listed = contents(doc)
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(listed) == on_disk  # every file, nothing more
    assert {"vda.qcow2", "nvram.fd", "tpm.tpm2_tpm2-00.permall"} <= set(listed)
    assert ("domain.xml" in listed) == (strategy == "direct-backup")
    for name, e in listed.items():
        assert e["size"] == (folder / name).stat().st_size and e["sha256"] == sha(folder / name)
    assert_copy_of(folder / "nvram.fd", w.dom.nvram)
    assert_copy_of(folder / "tpm.tpm2_tpm2-00.permall", w.dom.tpm / "tpm2" / "tpm2-00.permall")
    assert r["manifest_sha256"] == sha(r["manifest"]) and r["manifest_version"] == 2 and not r["signed"]
    assert r["firmware"]["nvram"] == str(w.dom.nvram)
    # where each TPM copy goes back in a state folder: in the record and in the manifest
    with open(r["manifest"]) as f:
        assert json.load(f)["firmware"]["tpm_files"]["tpm.tpm2_tpm2-00.permall"] == "tpm2/tpm2-00.permall"
    assert r["firmware"]["tpm_files"] == {name: name.removeprefix("tpm.").replace("_", "/", 1)
                                          for name in listed if name.startswith("tpm.")}
    out = w.cluster.cli("verify", doc["id"])
    assert out.returncode == 0 and out.stdout.rstrip().endswith("verified"), out.stdout


# -- tampering ------------------------------------------------------------------------------------
def _tamper_domain_xml(folder: Path) -> None:
    xml = (folder / "domain.xml").read_text()
    (folder / "domain.xml").write_text(xml.replace(
        "</domain>", "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                     "<qemu:arg value='-monitor'/><qemu:arg value='tcp::4444,server'/></qemu:commandline></domain>"))


def _tamper_disk_byte(folder: Path) -> None:
    with open(folder / "vda.qcow2", "r+b") as f:
        f.seek(os.path.getsize(folder / "vda.qcow2") - 1)
        last = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([last[0] ^ 0xFF]))


def _tamper_manifest(folder: Path) -> None:
    doc = json.loads((folder / "manifest.json").read_text())
    doc["quiesced"] = not doc["quiesced"]
    (folder / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _extra_file(folder: Path) -> None:
    (folder / "planted.xml").write_text("<domain/>")


TAMPERING = [(_tamper_domain_xml, "domain.xml", "size 2"),  # the line goes on: "... differs from the manifest's"
             (_tamper_disk_byte, "vda.qcow2", "sha256 differs from the manifest"),
             (_tamper_manifest, "manifest.json", "does not match the checksum in the workflow record"),
             (_extra_file, "planted.xml", "not in the manifest")]


@pytest.mark.parametrize("tamper, name, why", TAMPERING, ids=[t[1] for t in TAMPERING])
def test_a_changed_folder_is_refused_by_verify_and_restore(w, direct, tamper, name, why):
    folder = Path(direct["result"]["backup_dir"])
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    tamper(folder)
    try:
        out = w.cluster.cli("verify", direct["id"], check=False)
        assert out.returncode == 1
        failed = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
        assert len(failed) == 1 and name in failed[0] and why in failed[0], out.stdout
        restored = w.base / f"restore-{name}"
        restored.mkdir()
        keys = sorted(w.store.r.scan_iter(f"{w.store.prefix}:*"))
        define = f"dctest-uefi-bad-{uuid.uuid4().hex[:6]}"
        out = submit(w, "restore", "--from", direct["id"], "--target", str(restored), "--define", define,
                     check=False)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"{folder / name}: {why}" in out.stderr, out.stderr
        assert define not in domains(w) and list(restored.iterdir()) == []
        assert sorted(w.store.r.scan_iter(f"{w.store.prefix}:*")) == keys  # nothing submitted
    finally:
        for p in folder.iterdir():
            if p.name not in saved:
                p.unlink()
        for n, data in saved.items():
            (folder / n).write_bytes(data)
    assert w.cluster.cli("verify", direct["id"]).returncode == 0


def test_a_signed_manifest_is_checked_with_the_key(w):
    key = w.base / "manifest.key"
    key.write_bytes(os.urandom(48).hex().encode())
    key.chmod(0o600)
    w.cluster.env["DOMCAPTURE_MANIFEST_KEY_FILE"] = str(key)
    try:
        for p in list(w.cluster.workers):  # the key reaches the workers through their environment
            w.cluster.kill(p)
            w.cluster.workers.remove(p)
        w.cluster.start_worker()
        doc = backup(w, "direct-backup")
        r = doc["result"]
        assert r["signed"] and Path(r["manifest"] + ".sig").read_text().startswith("hmac-sha256:")
        assert w.cluster.cli("verify", doc["id"]).returncode == 0
        key.write_bytes(os.urandom(48).hex().encode())  # another key: the signature no longer holds
        out = w.cluster.cli("verify", doc["id"], check=False)
        assert out.returncode == 1 and "manifest.json.sig" in out.stdout and "does not match" in out.stdout
        out = submit(w, "restore", "--from", doc["id"], "--target", str(w.base), check=False)
        assert out.returncode == 2 and "the signature does not match the manifest" in out.stderr, out.stderr
        key.chmod(0o644)
        out = w.cluster.cli("verify", doc["id"], check=False)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "chmod 600" in out.stderr, out.stderr
    finally:
        w.cluster.env.pop("DOMCAPTURE_MANIFEST_KEY_FILE")
        for p in list(w.cluster.workers):
            w.cluster.kill(p)
            w.cluster.workers.remove(p)
        w.cluster.start_worker()


# -- restore ---------------------------------------------------------------------------------------
def test_restore_define_gives_the_new_domain_its_own_nvram(w, direct):
    source_nvram = w.dom.nvram.read_bytes()
    captured = Path(direct["result"]["backup_dir"], "nvram.fd").read_bytes()
    name = f"dctest-uefi-r-{uuid.uuid4().hex[:6]}"
    w.defined.append(name)
    out = w.base / "restored-define"
    out.mkdir()
    wf = submit(w, "restore", "--from", direct["id"], "--target", str(out), "--define", name)
    doc = wait_final(w, wf)
    assert doc["status"] == "succeeded", doc["error"]
    xml = virsh(w.uri, "dumpxml", name, "--inactive")
    nvram = xml.split("<nvram", 1)[1].split(">", 1)[1].split("</nvram>", 1)[0]
    assert nvram != str(w.dom.nvram) and nvram == doc["result"]["nvram"]
    assert Path(nvram).read_bytes() == captured
    assert w.dom.nvram.read_bytes() == source_nvram
    assert "qemu:commandline" not in xml
    assert virsh(w.uri, "domuuid", name).strip() != virsh(w.uri, "domuuid", w.dom.name).strip()


def test_rolling_back_a_restore_removes_the_domain_and_its_nvram_copy(w, direct):
    w.cluster.kill(w.cluster.recovery)  # nothing resumes it: the operator rolls it back
    try:
        for p in list(w.cluster.workers):
            w.cluster.kill(p)
            w.cluster.workers.remove(p)
        doomed = w.cluster.start_worker(fault="kill-at:executed:defining")
        name = f"dctest-uefi-rb-{uuid.uuid4().hex[:6]}"
        w.defined.append(name)
        out = w.base / "restored-rollback"
        out.mkdir()
        wf = submit(w, "restore", "--from", direct["id"], "--target", str(out), "--define", name)
        doomed.wait(timeout=180)
        assert doomed.returncode == -signal.SIGKILL
        arts = w.store.load(wf).artifacts
        copy, state = arts["firmware:nvram"]["path"], Path(arts["tpm-folder:"]["path"])
        assert name in domains(w) and os.path.exists(copy) and state.is_dir()
        assert copy in virsh(w.uri, "dumpxml", name, "--inactive")
        time.sleep(2.5)  # the dead worker's lease expires
        w.cluster.cli("rollback", wf)
        w.cluster.start_worker()
        doc = wait_final(w, wf)
        assert doc["status"] == "rolled_back", doc["error"]
        assert name not in domains(w)
        assert not os.path.exists(copy) and list(out.iterdir()) == [] and not state.exists()
        assert w.dom.nvram.exists() and Path(direct["result"]["backup_dir"], "nvram.fd").exists()
    finally:
        w.cluster.start_recovery()


def test_restore_define_gives_the_new_domain_its_own_copy_of_the_tpm_state(w, direct):
    captured = Path(direct["result"]["backup_dir"], "tpm.tpm2_tpm2-00.permall").read_bytes()
    source = tpm_digests(w.dom.tpm)
    assert "tpm2/tpm2-00.permall" in source
    name = f"dctest-uefi-tpm-{uuid.uuid4().hex[:6]}"
    w.defined.append(name)
    out = w.base / "restored-tpm"
    out.mkdir()
    wf = submit(w, "restore", "--from", direct["id"], "--target", str(out), "--define", name)
    doc = wait_final(w, wf)
    assert doc["status"] == "succeeded", doc["error"]
    r = doc["result"]
    new_uuid = virsh(w.uri, "domuuid", name).strip()
    state = Path(f"/var/lib/libvirt/swtpm/{new_uuid}")
    assert r["uuid"] == new_uuid != w.dom.tpm.name
    assert r["tpm"]["state"] == str(state) and r["tpm"]["fresh"] is None
    assert r["tpm"]["files"]["tpm2/tpm2-00.permall"] == f"sha256:{hashlib.sha256(captured).hexdigest()}"
    # before the first start: the captured bytes, laid out, owned and protected as libvirt does for the source
    assert (state / "tpm2" / "tpm2-00.permall").read_bytes() == captured
    assert tpm_tree(state) == tpm_tree(w.dom.tpm)
    assert tpm_digests(w.dom.tpm) == source  # the source's state is only read
    virsh(w.uri, "start", name)
    try:
        assert virsh(w.uri, "domstate", name).strip() == "running"
        assert (state / "tpm2" / "tpm2-00.permall").exists() and (state / "tpm2" / ".lock").exists()
        # libvirt took the state over: no swtpm_setup run for the new domain (it ran for the source)
        logs = Path("/var/log/swtpm/libvirt/qemu")
        assert "vTPM manufacturing" in (logs / f"{w.dom.name}-swtpm.log").read_text()
        assert "vTPM manufacturing" not in (logs / f"{name}-swtpm.log").read_text()
    finally:
        virsh(w.uri, "destroy", name, check=False)
    assert tpm_digests(w.dom.tpm) == source


def test_rolling_back_a_restore_cut_after_its_tpm_state_was_written_removes_it(w, direct):
    w.cluster.kill(w.cluster.recovery)  # nothing resumes it: the operator rolls it back
    try:
        for p in list(w.cluster.workers):
            w.cluster.kill(p)
            w.cluster.workers.remove(p)
        doomed = w.cluster.start_worker(fault="kill-at:saved:tpm-written:defining")
        name = f"dctest-uefi-tb-{uuid.uuid4().hex[:6]}"
        w.defined.append(name)
        out = w.base / "restored-tpm-rollback"
        out.mkdir()
        wf = submit(w, "restore", "--from", direct["id"], "--target", str(out), "--define", name)
        doomed.wait(timeout=180)
        assert doomed.returncode == -signal.SIGKILL
        arts = w.store.load(wf).artifacts
        state = Path(arts["tpm-folder:"]["path"])
        assert state.parent == Path("/var/lib/libvirt/swtpm")
        assert (state / "tpm2" / "tpm2-00.permall").read_bytes() == \
            Path(direct["result"]["backup_dir"], "tpm.tpm2_tpm2-00.permall").read_bytes()
        assert name not in domains(w)  # cut before the define
        time.sleep(2.5)  # the dead worker's lease expires
        w.cluster.cli("rollback", wf)
        w.cluster.start_worker()
        doc = wait_final(w, wf)
        assert doc["status"] == "rolled_back", doc["error"]
        assert name not in domains(w)
        assert not state.exists() and list(out.iterdir()) == []
        assert (w.dom.tpm / "tpm2" / "tpm2-00.permall").exists()
    finally:
        w.cluster.start_recovery()


def test_a_capture_without_the_tpm_files_relative_paths_restores_with_a_fresh_tpm_and_says_so(w):
    doc = backup(w, "direct-backup")
    # a record written before the relative paths were recorded: its TPM copies, no tpm_files
    edit_record(w.store, doc["id"], "test-older-capture", lambda rec: rec.result["firmware"].pop("tpm_files"))
    assert any(k.startswith("tpm:") for k in w.store.load(doc["id"]).result["firmware"]["copies"])
    name = f"dctest-uefi-old-{uuid.uuid4().hex[:6]}"
    w.defined.append(name)
    out = w.base / "restored-older"
    out.mkdir()
    wf = submit(w, "restore", "--from", doc["id"], "--target", str(out), "--define", name)
    done = wait_final(w, wf)
    assert done["status"] == "succeeded", done["error"]
    r = done["result"]
    assert r["tpm"]["state"] is None and r["tpm"]["files"] == {}
    assert "does not record where its TPM files go" in r["tpm"]["fresh"] and "fresh TPM" in r["tpm"]["fresh"]
    state = Path(f"/var/lib/libvirt/swtpm/{r['uuid']}")
    assert not state.exists()
    assert not any(a["kind"] in ("tpm-state", "tpm-folder") for a in w.store.load(wf).artifacts.values())
    virsh(w.uri, "start", name)
    try:  # libvirt manufactures a new TPM for it
        assert "vTPM manufacturing" in Path(f"/var/log/swtpm/libvirt/qemu/{name}-swtpm.log").read_text()
        assert (state / "tpm2" / "tpm2-00.permall").read_bytes() != \
            Path(doc["result"]["backup_dir"], "tpm.tpm2_tpm2-00.permall").read_bytes()
    finally:
        virsh(w.uri, "destroy", name, check=False)


def test_a_record_naming_a_tpm_path_outside_the_state_folder_is_refused(w):
    doc = backup(w, "direct-backup")
    edit_record(w.store, doc["id"], "test-forged", lambda rec: rec.result["firmware"].update(
        tpm_files={"tpm.tpm2_tpm2-00.permall": "../../../../etc/cron.d/x"}))
    keys = sorted(w.store.r.scan_iter(f"{w.store.prefix}:*"))
    name = f"dctest-uefi-forged-{uuid.uuid4().hex[:6]}"
    out = w.base / "restored-forged"
    out.mkdir()
    res = submit(w, "restore", "--from", doc["id"], "--target", str(out), "--define", name, check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "bad relative path '../../../../etc/cron.d/x'" in res.stderr and "Traceback" not in res.stderr
    assert name not in domains(w) and list(out.iterdir()) == [] and not os.path.exists("/etc/cron.d/x")
    assert sorted(w.store.r.scan_iter(f"{w.store.prefix}:*")) == keys  # nothing submitted
