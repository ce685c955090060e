"""direct-backup of a shut-off domain on real services (libvirtd + QEMU, redis, real worker processes).

- full of a shut-off domain (the worker SIGKILLed between its two disks, resumed), a write into
  the image offline (``qemu-io``), an incremental of the still shut-off domain, then the domain
  started, a guest write, and an online incremental that follows the offline checkpoint: each
  restored and compared with the image (``qemu-img compare``); the images hold libvirt's bitmap
  layout (one enabled bitmap per checkpoint) and libvirt's checkpoints chain in order;
- a start while the worker is dead mid offline copy rolls the backup back: no file, no
  checkpoint, no bitmap left;
- a base bitmap lost from an image makes the incremental a full one, and the record says why.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from .realenv import DiskDomain, images_identical, run

pytestmark = pytest.mark.real

OFFLINE_WRITE = (0x5A, 1, 1)  # pattern, offset MiB, length MiB: written into vda while shut off
GUEST_WRITE = (0x6C, 9, 2)  # written by the guest once started
KILL_BETWEEN_DISKS = "kill-at:saved:pulled:transferring"


def submit(cluster, *args: str) -> str:
    return json.loads(cluster.cli("submit", *args, "--json").stdout)["id"]


def backup(cluster, dom: DiskDomain, target: Path, *extra: str) -> dict:
    wf = submit(cluster, "direct-backup", "--domain", dom.name, "--target", str(target), *extra)
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    return doc


def restore_and_compare(cluster, dom: DiskDomain, backup_id: str, out: Path, images: dict[str, Path]) -> None:
    out.mkdir()
    wf = submit(cluster, "restore", "--domain", dom.name, "--from", backup_id, "--target", str(out))
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    for t, img in images.items():
        assert images_identical(doc["result"]["files"][t]["path"], img), f"restore of {backup_id} {t} differs"


def bitmaps(image: Path) -> dict[str, list[str]]:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(image)).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def checkpoint_parents(dom: DiskDomain) -> dict[str, str]:
    out = {}
    for line in dom.virsh("checkpoint-list", dom.name, "--parent").splitlines()[2:]:
        cols = line.split()
        if cols:
            out[cols[0]] = cols[4] if len(cols) == 5 else ""
    return out


def test_offline_full_and_incremental_then_online_incremental_restore_exactly(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    dom.virsh("destroy", dom.name)
    assert dom.state() == "shut off"
    target = tmp_path / "bk"
    target.mkdir()

    # full, offline, the worker killed between the two disks and resumed
    doomed = cluster.start_worker(fault=KILL_BETWEEN_DISKS)
    cluster.start_recovery()
    full_id = submit(cluster, "direct-backup", "--domain", dom.name, "--target", str(target))
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    cluster.start_worker()
    full = cluster.wait_final(full_id)
    assert full["status"] == "succeeded", full["error"]
    res = full["result"]
    assert res["offline"] is True and res["kind"] == "full" and res["quiesced"] is False
    assert dom.state() == "shut off"
    for t, img in dom.disks.items():
        assert images_identical(res["files"][t]["path"], img)
        assert bitmaps(img) == {res["checkpoint"]: ["auto"]}, "the checkpoint's bitmap, enabled, in each image"
    assert checkpoint_parents(dom) == {res["checkpoint"]: ""}

    # an offline write, an offline incremental: only the written megabyte is read
    pattern, off, length = OFFLINE_WRITE
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {off}M {length}M", str(dom.disks["vda"]))
    inc = backup(cluster, dom, target, "--incremental")
    ires = inc["result"]
    assert ires["offline"] is True and ires["kind"] == "incremental", ires["fallback"]
    assert ires["parent_backup"] == full_id
    assert ires["bytes_read"] == length * 1024 * 1024, ires
    assert checkpoint_parents(dom) == {res["checkpoint"]: "", ires["checkpoint"]: res["checkpoint"]}
    for img in dom.disks.values():
        assert bitmaps(img) == {res["checkpoint"]: ["auto"], ires["checkpoint"]: ["auto"]}
    restore_and_compare(cluster, dom, inc["id"], tmp_path / "r-offline", dom.disks)
    restore_and_compare(cluster, dom, full_id, tmp_path / "r-full", dom.references)

    # started: libvirt takes the bitmaps over; a guest write; an online incremental follows the offline one
    dom.virsh("start", dom.name)
    dom.guest_write("vdb", *GUEST_WRITE)
    online = backup(cluster, dom, target, "--incremental")
    ores = online["result"]
    assert ores["offline"] is False and ores["kind"] == "incremental", ores["fallback"]
    assert ores["parent_backup"] == inc["id"]
    assert checkpoint_parents(dom)[ores["checkpoint"]] == ires["checkpoint"]
    dom.virsh("destroy", dom.name)
    restore_and_compare(cluster, dom, online["id"], tmp_path / "r-online", dom.disks)


def test_a_start_during_the_offline_copy_rolls_the_backup_back(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    dom.virsh("destroy", dom.name)
    target = tmp_path / "bk"
    target.mkdir()
    doomed = cluster.start_worker(fault=KILL_BETWEEN_DISKS)
    cluster.start_recovery()
    wf = submit(cluster, "direct-backup", "--domain", dom.name, "--target", str(target))
    doomed.wait(timeout=90)
    assert doomed.returncode == -signal.SIGKILL
    dom.virsh("start", dom.name)  # while nobody runs the workflow
    cluster.start_worker()
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back", doc["status"]
    assert "is running before its offline copy" in doc["error"]["message"], doc["error"]
    assert list(target.iterdir()) == []
    assert checkpoint_parents(dom) == {}
    dom.virsh("destroy", dom.name)
    for img in dom.disks.values():
        assert bitmaps(img) == {}, "libvirt deleted the checkpoint's bitmap with it"


def test_an_offline_incremental_whose_base_bitmap_is_gone_falls_back_to_full(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    dom.virsh("destroy", dom.name)
    target = tmp_path / "bk"
    target.mkdir()
    cluster.start_worker()
    cluster.start_recovery()
    full = backup(cluster, dom, target)
    base = full["result"]["checkpoint"]
    run("qemu-img", "bitmap", "--remove", str(dom.disks["vdb"]), base)  # lost, as in a crash of QEMU
    again = backup(cluster, dom, target, "--incremental")
    res = again["result"]
    assert res["kind"] == "full" and res["offline"] is True
    assert f"has no bitmap {base}" in res["fallback"], res["fallback"]
    for t, img in dom.disks.items():
        assert images_identical(res["files"][t]["path"], img)
        assert res["checkpoint"] in bitmaps(img), "the new checkpoint's bitmap is in every image"
    assert checkpoint_parents(dom)[res["checkpoint"]] == base
