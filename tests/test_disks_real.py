"""Disk kinds on real services (libvirtd + QEMU, redis, real worker processes).

- selection: a domain with a cdrom, a read-only disk and a shareable disk;
  ``--exclude``; unknown targets refused at submit.
- a template clone (a qcow2 over a shared base): the backup is one standalone
  image equal to the flattened chain, the shared base keeps every byte, the
  guest's writes made while on our overlay land in the clone's own image.

Every capture is crashed (SIGKILL) once mid-way and resumed, and direct-backup
output is restored and compared with ``qemu-img compare``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import json
import signal
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .realenv import DiskDomain, image_has_pattern, images_identical, kvm_usable, run

pytestmark = pytest.mark.real

MIB = 1024 * 1024
WRITE_ON_OVERLAY = (0x6B, 20, 1)  # pattern, offset MiB, length MiB: a guest write while the capture runs
CLONE_WRITE = (0x3C, 8, 2)  # written into the clone before the capture


def sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def define_and_start(uri: str, workdir: Path, disks_xml: str, disks: dict[str, Path]) -> DiskDomain:
    name = f"dctest-{uuid.uuid4().hex[:8]}"
    dom = DiskDomain(uri, name, workdir, disks=dict(disks))
    vtype = "kvm" if kvm_usable() else "qemu"
    xml = (f"<domain type='{vtype}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
           f"<devices>{disks_xml}<controller type='usb' model='none'/><memballoon model='none'/>"
           "</devices></domain>")
    path = workdir / f"{name}.xml"
    path.write_text(xml)
    out = run("virsh", "-c", uri, "define", str(path), check=False)
    assert out.returncode == 0, out.stderr
    dom.virsh("start", name)
    return dom


def filled_image(path: Path, size_mib: int, pattern: int, fmt: str = "qcow2") -> None:
    raw = path.with_suffix(".fill")
    with open(raw, "wb") as f:
        f.truncate(size_mib * MIB)
        f.write(bytes([pattern]) * 4 * MIB)
        f.seek(size_mib // 2 * MIB)
        f.write(bytes([pattern + 1]) * MIB)
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path))
    raw.unlink()


def file_disk(target: str, path: Path, fmt: str = "qcow2", extra: str = "", device: str = "disk") -> str:
    bus = "ide" if device == "cdrom" else "virtio"
    return (f"<disk type='file' device='{device}'><driver name='qemu' type='{fmt}'/><source file='{path}'/>"
            f"<target dev='{target}' bus='{bus}'/>{extra}</disk>")


@pytest.fixture
def made(libvirt_uri):
    doms: list[DiskDomain] = []
    yield doms
    for d in doms:
        d.destroy()


def clone_domain(uri: str, tmp: Path, made: list) -> tuple[DiskDomain, Path]:
    """vda: a clone (qcow2) over a shared template base; vdb: a plain qcow2; hdc: a cdrom."""
    work = tmp / "dom"
    work.mkdir()
    base = work / "template-base.qcow2"
    filled_image(base, 64, 0x21)
    clone = work / "clone-vda.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(clone))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {CLONE_WRITE[0]} {CLONE_WRITE[1]}M {CLONE_WRITE[2]}M", str(clone))
    vdb = work / "data-vdb.qcow2"
    filled_image(vdb, 32, 0x44)
    iso = work / "media.iso"
    iso.write_bytes(b"\x01" * MIB)
    xml = (file_disk("vda", clone) + file_disk("vdb", vdb)
           + file_disk("hdc", iso, "raw", "<readonly/>", device="cdrom"))
    dom = define_and_start(uri, work, xml, {"vda": clone, "vdb": vdb})
    made.append(dom)
    return dom, base


def flattened(src: Path, out: Path) -> Path:
    run("qemu-img", "convert", "-U", "-O", "qcow2", str(src), str(out))
    return out


def submit(cluster, strategy: str, dom, target, *extra: str) -> str:
    out = cluster.cli("submit", strategy, "--domain", dom.name, "--target", str(target), "--json", *extra)
    return json.loads(out.stdout)["id"]


def chain_of(dom: DiskDomain, target: str) -> list[str]:
    for d in dom.xml().findall("./devices/disk"):
        if d.find("target").get("dev") == target:  # type: ignore[union-attr]
            out: list[str] = []
            node: ET.Element | None = d
            while node is not None and node.find("source") is not None:
                out.append(node.find("source").get("file") or "")  # type: ignore[union-attr]
                node = node.find("backingStore")
            return out
    raise KeyError(target)


# -- selection ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["snapshot-backup", "direct-backup"])
def test_unknown_target_refused_in_one_line_and_nothing_recorded(cluster, made, libvirt_uri, tmp_path, strategy):
    dom, _ = clone_domain(libvirt_uri, tmp_path, made)
    target = tmp_path / "bk"
    target.mkdir()
    out = cluster.cli("submit", strategy, "--domain", dom.name, "--target", str(target), "--disks", "vda,vdz",
                      check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"domcapture: error: --disks: domain {dom.name} has no disk vdz "
                                  "(its disks: vda, vdb, hdc)"), out.stderr
    assert cluster.cli("list", "--json").stdout.strip() in ("[]", "")
    assert list(target.iterdir()) == []


# -- a template clone ---------------------------------------------------------------------------------------
def test_snapshot_backup_of_a_clone_flattens_and_never_touches_the_base(cluster, made, libvirt_uri, tmp_path):
    dom, base = clone_domain(libvirt_uri, tmp_path, made)
    base_sum = sha256(base)
    at_capture = {"vda": flattened(dom.disks["vda"], tmp_path / "ref-vda.qcow2"),
                  "vdb": flattened(dom.disks["vdb"], tmp_path / "ref-vdb.qcow2")}
    target = tmp_path / "bk"
    target.mkdir()
    doomed = cluster.start_worker(fault="kill-at:executed:copying")  # on our overlays, copies done
    cluster.start_recovery()
    wf = submit(cluster, "snapshot-backup", dom, target, "--quiesce", "off")
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    assert chain_of(dom, "vda")[1:] == [str(dom.disks["vda"]), str(base)]  # our overlay over the clone
    dom.guest_write("vda", *WRITE_ON_OVERLAY)
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert chain_of(dom, "vda") == [str(dom.disks["vda"]), str(base)]
    assert dom.block_jobs() == {} and dom.leftover_overlays() == []
    assert sha256(base) == base_sum, "the template's base image changed"
    assert image_has_pattern(dom.disks["vda"], *WRITE_ON_OVERLAY), "the write on the overlay was lost"
    assert not image_has_pattern(base, *WRITE_ON_OVERLAY)
    files = doc["result"]["files"]
    for t, ref in at_capture.items():
        assert images_identical(files[t]["path"], ref), f"backup of {t} is not the disk at capture time"
    info = json.loads(run("qemu-img", "info", "--output=json", files["vda"]["path"]).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info  # standalone
    assert files["vda"]["checksum"] == f"sha256:{sha256(files['vda']['path'])}"
    assert doc["result"]["skipped_disks"] == [{"target": "hdc", "reason": "cdrom (removable media)"}]


def test_direct_backup_of_a_clone_full_then_incremental_restores_the_chain(cluster, made, libvirt_uri, tmp_path):
    dom, base = clone_domain(libvirt_uri, tmp_path, made)
    base_sum = sha256(base)
    target = tmp_path / "bk"
    target.mkdir()
    doomed = cluster.start_worker(fault="kill-at:saved:step-started:transferring")
    cluster.start_recovery()
    full = submit(cluster, "direct-backup", dom, target, "--quiesce", "off", "--exclude", "vdb")
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    cluster.start_worker()
    doc = cluster.wait_final(full)
    assert doc["status"] == "succeeded", doc["error"]
    assert set(doc["result"]["files"]) == {"vda"}
    assert {s["target"] for s in doc["result"]["skipped_disks"]} == {"vdb", "hdc"}
    dom.guest_write("vda", *WRITE_ON_OVERLAY)
    at_inc = flattened(dom.disks["vda"], tmp_path / "ref-inc.qcow2")
    inc = submit(cluster, "direct-backup", dom, target, "--quiesce", "off", "--exclude", "vdb", "--incremental")
    idoc = cluster.wait_final(inc)
    assert idoc["status"] == "succeeded", idoc["error"]
    assert idoc["result"]["kind"] == "incremental", idoc["result"].get("fallback")
    assert sha256(base) == base_sum, "the template's base image changed"
    out = tmp_path / "restored"
    out.mkdir()
    new_name = f"{dom.name}-restored"
    try:
        rid = json.loads(cluster.cli("submit", "restore", "--domain", dom.name, "--from", inc, "--target",
                                     str(out), "--define", new_name, "--json").stdout)["id"]
        rdoc = cluster.wait_final(rid)
        assert rdoc["status"] == "succeeded", rdoc["error"]
        restored = rdoc["result"]["files"]["vda"]
        path = restored["path"] if isinstance(restored, dict) else restored
        assert images_identical(path, at_inc), "the restored disk is not the clone at incremental time"
        # the new domain: the restored vda, the cdrom as it was, and no vdb (left out: never shared)
        xml = run("virsh", "-c", libvirt_uri, "dumpxml", new_name).stdout
        got = {}
        for d in ET.fromstring(xml).findall("./devices/disk"):
            got[d.find("target").get("dev")] = d.find("source").get("file")  # type: ignore[union-attr]
        assert got == {"vda": path, "hdc": str(tmp_path / "dom" / "media.iso")}, got
    finally:
        run("virsh", "-c", libvirt_uri, "undefine", new_name, check=False)


# -- a block device (a loop device standing in for an LVM volume) ----------------------------------------------
@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 32 MiB raw file of known content; detached in teardown."""
    backing = tmp_path / "lv-backing.raw"
    with open(backing, "wb") as f:
        f.truncate(32 * MIB)
        f.write(bytes([0x55]) * 4 * MIB)
        f.seek(16 * MIB)
        f.write(os.urandom(2 * MIB))
    dev = run("losetup", "-f", "--show", str(backing)).stdout.strip()
    ref = tmp_path / "lv-reference.raw"
    shutil.copyfile(backing, ref)
    yield dev, ref
    run("losetup", "-d", dev, check=False)


def block_domain(uri: str, tmp: Path, made: list, dev: str) -> DiskDomain:
    work = tmp / "dom"
    work.mkdir()
    vda = work / "os-vda.qcow2"
    filled_image(vda, 32, 0x31)
    xml = (file_disk("vda", vda) + "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
           f"<source dev='{dev}'/><target dev='vdb' bus='virtio'/></disk>")
    dom = define_and_start(uri, work, xml, {"vda": vda})
    made.append(dom)
    return dom


def test_snapshot_backup_of_a_block_device_keeps_overlays_out_of_dev(cluster, made, libvirt_uri, tmp_path,
                                                                      loop_device):
    dev, reference = loop_device
    dom = block_domain(libvirt_uri, tmp_path, made, dev)
    vda_ref = flattened(dom.disks["vda"], tmp_path / "ref-vda.qcow2")
    overlay_dir = tmp_path / "overlays"
    target = tmp_path / "bk"
    target.mkdir()
    dev_before = set(os.listdir("/dev"))
    doomed = cluster.start_worker(fault="kill-at:executed:copying")
    cluster.start_recovery()
    wf = submit(cluster, "snapshot-backup", dom, target, "--quiesce", "off", "--overlay-dir", str(overlay_dir))
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    on = chain_of_any(dom, "vdb")
    assert on[0].startswith(str(overlay_dir) + "/") and on[1] == dev, on  # overlay in the folder, over the device
    assert sorted(os.listdir(overlay_dir)) == sorted(f"domcapture-{wf}-{t}.overlay.qcow2" for t in ("vda", "vdb"))
    dom.guest_write("vdb", *WRITE_ON_OVERLAY)
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert chain_of_any(dom, "vdb") == [dev]
    assert dom.block_jobs() == {} and os.listdir(overlay_dir) == []
    assert set(os.listdir("/dev")) - dev_before == set()
    assert image_has_pattern(dev, *WRITE_ON_OVERLAY, fmt="raw"), "the write on the overlay was lost"
    files = doc["result"]["files"]
    assert images_identical(files["vdb"]["path"], reference), "backup of the device is not its content at capture"
    assert images_identical(files["vda"]["path"], vda_ref)
    assert files["vdb"]["path"].endswith(".qcow2")


def checkpoint_disks(uri: str, domain: str, checkpoint: str) -> dict[str, str]:
    """disk -> its checkpoint mode (bitmap | no), as libvirt holds the checkpoint."""
    xml = run("virsh", "-c", uri, "checkpoint-dumpxml", domain, checkpoint, "--no-domain").stdout
    return {d.get("name", ""): d.get("checkpoint", "") for d in ET.fromstring(xml).findall("./disks/disk")}


def backing_of(path: str) -> str | None:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)
    return info.get("backing-filename")


def test_direct_backup_takes_a_block_device_whole_and_the_qcow2_disk_incrementally(cluster, made, libvirt_uri,
                                                                                     tmp_path, loop_device):
    dev, _ = loop_device
    dom = block_domain(libvirt_uri, tmp_path, made, dev)
    target = tmp_path / "bk"
    target.mkdir()
    cluster.start_recovery()
    worker = cluster.start_worker()
    full = submit(cluster, "direct-backup", dom, target, "--quiesce", "off")
    doc = cluster.wait_final(full)
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["result"]["kind"] == "full"
    assert {t: f["kind"] for t, f in doc["result"]["files"].items()} == {"vda": "full", "vdb": "full"}
    assert checkpoint_disks(libvirt_uri, dom.name, doc["result"]["checkpoint"]) == {"vda": "bitmap", "vdb": "no"}

    refs: list[dict[str, Path]] = []
    steps: list[str] = []
    for n, (mode, pattern) in enumerate([("pull", 0x6B), ("push", 0x7C)]):
        dom.guest_write("vda", pattern, 20 + n, 1)
        dom.guest_write("vdb", pattern + 1, 8 + n, 1)
        with open(dev, "r+b") as f:  # the host writes to the device too (QEMU shares its page cache)
            f.seek((24 + n) * MIB)
            f.write(bytes([pattern + 2]) * MIB)
            os.fsync(f.fileno())
        refs.append({"vda": flattened(dom.disks["vda"], tmp_path / f"ref{n}-vda.qcow2"),
                     "vdb": flattened(Path(dev), tmp_path / f"ref{n}-vdb.qcow2")})
        if mode == "pull":  # a SIGKILL after the first disk was read: the second is read on resume
            cluster.kill(worker)  # idle: the doomed worker alone takes the job
            doomed = cluster.start_worker(fault="kill-at:saved:pulled:transferring")
        wf = submit(cluster, "direct-backup", dom, target, "--quiesce", "off", "--incremental", "--mode", mode)
        if mode == "pull":
            doomed.wait(timeout=90)
            assert doomed.returncode == -signal.SIGKILL
            worker = cluster.start_worker()
        idoc = cluster.wait_final(wf)
        assert idoc["status"] == "succeeded", idoc["error"]
        res = idoc["result"]
        assert res["kind"] == "incremental", res.get("fallback")
        assert {t: f["kind"] for t, f in res["files"].items()} == {"vda": "incremental", "vdb": "full"}
        manifest = json.loads(Path(res["manifest"]).read_text())
        assert {f["disk"]: f["kind"] for f in manifest["files"]} == {"vda": "incremental", "vdb": "full"}
        assert checkpoint_disks(libvirt_uri, dom.name, res["checkpoint"]) == {"vda": "bitmap", "vdb": "no"}
        assert backing_of(res["files"]["vdb"]["path"]) is None  # whole: it stands alone
        assert backing_of(res["files"]["vda"]["path"]) is not None  # over its parent backup's file
        assert images_identical(res["files"]["vdb"]["path"], refs[n]["vdb"])
        steps.append(wf)

    out = tmp_path / "restored"
    out.mkdir()
    rid = json.loads(cluster.cli("submit", "restore", "--domain", dom.name, "--from", steps[-1], "--target",
                                 str(out), "--json").stdout)["id"]
    rdoc = cluster.wait_final(rid)
    assert rdoc["status"] == "succeeded", rdoc["error"]
    for disk in ("vda", "vdb"):
        restored = rdoc["result"]["files"][disk]
        path = restored["path"] if isinstance(restored, dict) else restored
        assert images_identical(path, refs[-1][disk]), f"the restored {disk} is not the disk at backup time"


def test_raw_file_disks_snapshot_backup_resumes_and_direct_backup_takes_them_whole(cluster, made, libvirt_uri,
                                                                                   tmp_path):
    """Raw files, the commonest disk after qcow2: snapshot-backup SIGKILLed on our overlays resumes and
    commits back into the raw images; direct-backup has no bitmap to keep on them, so every backup
    (an --incremental too, and the record says why) holds them whole and restores to the disk."""
    dom = DiskDomain.create(libvirt_uri, tmp_path / "raw", fmt="raw", random_mib=4)
    made.append(dom)
    target = tmp_path / "bk"
    target.mkdir()
    at_capture = {t: flattened(p, tmp_path / f"ref-{t}.qcow2") for t, p in dom.disks.items()}
    doomed = cluster.start_worker(fault="kill-at:executed:copying")  # copies done, the disks on our overlays
    cluster.start_recovery()
    wf = submit(cluster, "snapshot-backup", dom, target, "--quiesce", "off")
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    assert [chain_of(dom, t)[1] for t in dom.disks] == [str(p) for p in dom.disks.values()]  # on our overlays
    dom.guest_write("vda", *WRITE_ON_OVERLAY)
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert {t: chain_of(dom, t) for t in dom.disks} == {t: [str(p)] for t, p in dom.disks.items()}
    assert dom.block_jobs() == {} and dom.leftover_overlays() == []
    assert image_has_pattern(dom.disks["vda"], *WRITE_ON_OVERLAY, fmt="raw"), "the write on the overlay was lost"
    for t, ref in at_capture.items():
        assert images_identical(doc["result"]["files"][t]["path"], ref), f"backup of {t} is not the disk"

    for n, extra in enumerate([(), ("--incremental",)]):
        dom.guest_write("vdb", 0x3C + n, 10 + n, 1)
        refs = {t: flattened(p, tmp_path / f"ref{n}-{t}.qcow2") for t, p in dom.disks.items()}
        wf = submit(cluster, "direct-backup", dom, target, "--quiesce", "off", "--mode", "push", *extra)
        res = cluster.wait_final(wf)
        assert res["status"] == "succeeded", res["error"]
        result = res["result"]
        assert result["kind"] == "full"
        assert {t: f["kind"] for t, f in result["files"].items()} == {"vda": "full", "vdb": "full"}
        assert checkpoint_disks(libvirt_uri, dom.name, result["checkpoint"]) == {"vda": "no", "vdb": "no"}
        for t, ref in refs.items():
            assert backing_of(result["files"][t]["path"]) is None
            assert images_identical(result["files"][t]["path"], ref), f"backup {n} of {t} is not the disk"
    assert result["fallback"] == ("incremental requested, taking a full backup: "
                                  "no disk can hold a bitmap (raw, block or network disks only)")
    out = tmp_path / "restored"
    out.mkdir()
    rid = json.loads(cluster.cli("submit", "restore", "--domain", dom.name, "--from", wf, "--target", str(out),
                                 "--json").stdout)["id"]
    rdoc = cluster.wait_final(rid)
    assert rdoc["status"] == "succeeded", rdoc["error"]
    for t, ref in refs.items():
        restored = rdoc["result"]["files"][t]
        assert images_identical(restored["path"] if isinstance(restored, dict) else restored, ref)


def test_direct_backup_of_a_shut_off_domain_refuses_a_block_device_in_one_line(cluster, made, libvirt_uri,
                                                                             tmp_path, loop_device):
    dom = block_domain(libvirt_uri, tmp_path, made, loop_device[0])
    dom.virsh("destroy", dom.name)
    target = tmp_path / "bk"
    target.mkdir()
    out = cluster.cli("submit", "direct-backup", "--domain", dom.name, "--target", str(target), check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"domcapture: error: disk vdb of {dom.name} is a raw block device; a shut-off domain's direct backup "
        "needs qcow2 images (start the domain, use snapshot-backup, or --exclude the disk)"), out.stderr
    assert list(target.iterdir()) == []


def chain_of_any(dom: DiskDomain, target: str) -> list[str]:
    """The disk's chain, top first, file or device paths alike."""
    for d in dom.xml().findall("./devices/disk"):
        if d.find("target").get("dev") == target:  # type: ignore[union-attr]
            out: list[str] = []
            node: ET.Element | None = d
            while node is not None and node.find("source") is not None:
                src = node.find("source")
                out.append(src.get("file") or src.get("dev") or "")  # type: ignore[union-attr]
                node = node.find("backingStore")
            return out
    raise KeyError(target)


# -- a network disk (NBD served by nbdkit, standing in for RBD / iSCSI) --------------------------------------
@pytest.fixture
def nbd_export(tmp_path):
    """nbdkit serving a 32 MiB raw file of known content on a local TCP port; stopped in teardown."""
    image = tmp_path / "remote-volume.raw"
    with open(image, "wb") as f:
        f.truncate(32 * MIB)
        f.write(bytes([0x77]) * 3 * MIB)
        f.seek(12 * MIB)
        f.write(os.urandom(2 * MIB))
    ref = tmp_path / "remote-reference.raw"
    shutil.copyfile(image, ref)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pidfile = tmp_path / "nbdkit.pid"
    run("nbdkit", "-i", "127.0.0.1", "-p", str(port), "-P", str(pidfile),
        "file", f"file={image}")
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    yield port, image, ref
    os.kill(pid, signal.SIGTERM)


def test_snapshot_backup_of_an_nbd_disk_reads_through_qemu(cluster, made, libvirt_uri, tmp_path, nbd_export):
    port, image, reference = nbd_export
    work = tmp_path / "dom"
    work.mkdir()
    vda = work / "os-vda.qcow2"
    filled_image(vda, 32, 0x31)
    xml = (file_disk("vda", vda) + "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
           f"<source protocol='nbd'><host name='127.0.0.1' port='{port}'/></source>"
           "<target dev='vdb' bus='virtio'/></disk>")
    dom = define_and_start(libvirt_uri, work, xml, {"vda": vda})
    made.append(dom)
    overlay_dir = tmp_path / "overlays"
    target = tmp_path / "bk"
    target.mkdir()
    doomed = cluster.start_worker(fault="kill-at:saved:flatten-intent:copying")  # mid-copy of the network disk
    cluster.start_recovery()
    wf = submit(cluster, "snapshot-backup", dom, target, "--quiesce", "off", "--overlay-dir", str(overlay_dir),
                "--disks", "vdb")
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    dom.guest_write("vdb", *WRITE_ON_OVERLAY)
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    intents = [e for e in doc["history"] if e["event"] == "flatten-intent"]
    assert [e["disk"] for e in intents] == ["vdb", "vdb"]  # killed once, converted again
    assert dom.block_jobs() == {} and os.listdir(overlay_dir) == []
    assert image_has_pattern(image, *WRITE_ON_OVERLAY, fmt="raw"), "the write on the overlay was lost"
    backup = doc["result"]["files"]["vdb"]["path"]
    assert images_identical(backup, reference), "backup of the NBD disk is not its content at capture"
    assert doc["result"]["skipped_disks"] == [{"target": "vda", "reason": "not named by --disks"}]


# -- shut-off and paused domains ------------------------------------------------------------------------------
def test_direct_backup_takes_an_nbd_disk_whole_beside_an_incremental_qcow2_disk(cluster, made, libvirt_uri,
                                                                                 tmp_path, nbd_export):
    port, image, _ = nbd_export
    work = tmp_path / "dom"
    work.mkdir()
    vda = work / "os-vda.qcow2"
    filled_image(vda, 32, 0x31)
    xml = (file_disk("vda", vda) + "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
           f"<source protocol='nbd'><host name='127.0.0.1' port='{port}'/></source>"
           "<target dev='vdb' bus='virtio'/></disk>")
    dom = define_and_start(libvirt_uri, work, xml, {"vda": vda})
    made.append(dom)
    target = tmp_path / "bk"
    target.mkdir()
    worker = cluster.start_worker()
    cluster.start_recovery()
    full = submit(cluster, "direct-backup", dom, target, "--quiesce", "off", "--mode", "pull")
    doc = cluster.wait_final(full)
    assert doc["status"] == "succeeded", doc["error"]
    assert checkpoint_disks(libvirt_uri, dom.name, doc["result"]["checkpoint"]) == {"vda": "bitmap", "vdb": "no"}
    dom.guest_write("vda", 0x5A, 4, 1)
    dom.guest_write("vdb", 0x5B, 20, 1)
    refs = {"vda": flattened(vda, tmp_path / "ref-vda.qcow2"), "vdb": flattened(image, tmp_path / "ref-vdb.qcow2")}
    cluster.kill(worker)  # idle: the doomed worker alone takes the job
    doomed = cluster.start_worker(fault="kill-at:saved:step-started:transferring")  # QEMU's push job running
    inc = submit(cluster, "direct-backup", dom, target, "--quiesce", "off", "--incremental")
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    cluster.start_worker()
    idoc = cluster.wait_final(inc)
    assert idoc["status"] == "succeeded", idoc["error"]
    assert idoc["result"]["kind"] == "incremental", idoc["result"].get("fallback")
    assert {t: f["kind"] for t, f in idoc["result"]["files"].items()} == {"vda": "incremental", "vdb": "full"}
    out = tmp_path / "restored"
    out.mkdir()
    rid = json.loads(cluster.cli("submit", "restore", "--domain", dom.name, "--from", inc, "--target",
                                 str(out), "--json").stdout)["id"]
    rdoc = cluster.wait_final(rid)
    assert rdoc["status"] == "succeeded", rdoc["error"]
    for disk in ("vda", "vdb"):
        restored = rdoc["result"]["files"][disk]
        path = restored["path"] if isinstance(restored, dict) else restored
        assert images_identical(path, refs[disk]), f"the restored {disk} is not the disk at backup time"


def test_snapshot_backup_of_a_shut_off_domain_reads_its_images_offline(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    dom.virsh("destroy", dom.name)
    assert dom.state() == "shut off"
    target = tmp_path / "bk"
    target.mkdir()
    doomed = cluster.start_worker(fault="kill-at:saved:flatten-intent:copying")
    cluster.start_recovery()
    wf = submit(cluster, "snapshot-backup", dom, target)
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["result"]["offline"] is True and doc["result"]["quiesced"] is False
    assert dom.state() == "shut off" and dom.on_original_disks()
    assert dom.leftover_overlays() == []
    for t, ref in dom.references.items():
        assert images_identical(doc["result"]["files"][t]["path"], ref), f"offline backup of {t} differs"


def test_a_start_behind_our_back_rolls_the_offline_capture_back(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    dom.virsh("destroy", dom.name)
    target = tmp_path / "bk"
    target.mkdir()
    doomed = cluster.start_worker(fault="kill-at:saved:flatten-intent:copying")  # mid-copy
    cluster.start_recovery()
    wf = submit(cluster, "snapshot-backup", dom, target, "--quiesce", "off")
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    dom.virsh("start", dom.name)  # while nobody runs the workflow
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back", doc["status"]
    assert "during the offline copy" in doc["error"]["message"] or "before its offline copy" in \
        doc["error"]["message"], doc["error"]
    assert [p for p in target.iterdir()] == []
    assert dom.state() == "running" and dom.on_original_disks()


def test_snapshot_backup_of_a_paused_domain_skips_the_freeze_and_leaves_it_paused(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    dom.guest_write("vda", *WRITE_ON_OVERLAY)  # the disk differs from its pre-start reference
    dom.virsh("suspend", dom.name)
    target = tmp_path / "bk"
    target.mkdir()
    out = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target), "--quiesce",
                      "require", check=False)
    assert out.returncode == 2 and out.stderr.startswith(f"domcapture: error: --quiesce require: domain {dom.name} "
                                                         "is paused"), out.stderr
    cluster.start_worker()
    cluster.start_recovery()
    wf = submit(cluster, "snapshot-backup", dom, target)  # --quiesce try: a paused guest is not frozen
    doc = cluster.wait_final(wf, timeout=90)
    assert doc["status"] == "succeeded", doc["error"]
    res = doc["result"]
    assert res["paused"] is True and res["quiesced"] is False
    assert res["quiesce_skipped"] == "the domain is paused: its guest is held still, nothing was frozen"
    assert dom.state() == "paused" and dom.on_original_disks() and dom.block_jobs() == {}
    assert dom.leftover_overlays() == []
    for t, img in dom.disks.items():
        assert images_identical(res["files"][t]["path"], img), f"backup of paused {t} differs from its disk"
    assert image_has_pattern(res["files"]["vda"]["path"], *WRITE_ON_OVERLAY)
