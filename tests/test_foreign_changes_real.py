"""Other actors change a domain's disks in the middle of a snapshot-backup, on real libvirt + QEMU.

Each test stops the capture at a known point (its worker is SIGKILLed there), acts as an admin or
another tool would (an external snapshot, a block pull, an unplug, an undefine...), writes as the guest
would, then lets a new worker and the recovery process carry the workflow on.  Afterwards the domain is
stopped and started again where it still exists: its chain must be whole, no file of ours may remain in
any chain, and every write made during the capture must be on its disks.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .realenv import counter_in_image, image_has_pattern, images_identical, run

pytestmark = pytest.mark.real

PARKED = "kill-at:saved:copy-intent:copying"  # the guest runs on our overlays, the copy has not begun


def park(cluster, dom, target: Path, *extra: str, point: str = PARKED) -> str:
    """Submit a snapshot-backup and stop its worker at ``point`` (SIGKILL)."""
    doomed = cluster.start_worker(fault=point)
    out = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target),
                      "--quiesce", "off", "--json", *extra)
    wf = json.loads(out.stdout)["id"]
    doomed.wait(timeout=90)
    return wf


def carry_on(cluster, wf: str, timeout: float = 180) -> dict:
    cluster.start_worker()
    if cluster.recovery is None:
        cluster.start_recovery()
    return cluster.wait_final(wf, timeout=timeout)


def chain(dom, target: str, inactive: bool = False) -> list[str]:
    """The disk's chain, top first, as ``virsh dumpxml`` shows it."""
    root = ET.fromstring(dom.virsh("dumpxml", *(["--inactive"] if inactive else []), dom.name))
    for d in root.findall("./devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == target:
            out: list[str] = []
            src, bs = d.find("source"), d.find("backingStore")
            while src is not None:
                out.append(src.get("file") or "")
                src = bs.find("source") if bs is not None else None
                bs = bs.find("backingStore") if bs is not None else None
            return out
    raise KeyError(target)


def overlay_paths(cluster, wf: str) -> list[str]:
    return [a["path"] for a in cluster.show(wf)["artifacts"].values() if a["kind"] == "overlay"]


def ours_in_any_chain(dom, paths: list[str]) -> list[str]:
    xml = dom.virsh("dumpxml", dom.name) + dom.virsh("dumpxml", "--inactive", dom.name, check=False)
    return [p for p in paths if p in xml]


def restart(dom) -> None:
    dom.virsh("destroy", dom.name)
    dom.virsh("start", dom.name)
    assert dom.state() == "running"


def job_of(dom, target: str) -> str | None:
    """The block job on ``target`` as ``virsh blockjob --info`` names it ("Block Pull", ...; None: none)."""
    out = run("virsh", "-c", dom.uri, "blockjob", dom.name, target, "--info", check=False)
    text = out.stdout + out.stderr
    if "No current block job" in text:
        return None
    return next((kind for kind in ("Block Pull", "Block Copy", "Block Commit", "Active Block Commit", "Backup")
                 if kind in text), text.strip())


def events(doc: dict) -> list[dict]:
    return doc["history"]


def test_foreign_snapshot_above_ours_is_kept_and_ours_committed_below_it(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, dom, target)
    ours = overlay_paths(cluster, wf)
    assert chain(dom, "vda")[0] in ours  # the guest is on our overlay
    dom.guest_write("vda", 0x61, 10, 1)  # lands on our overlay
    theirs = tmp_path / "theirs-vda.qcow2"
    dom.virsh("snapshot-create-as", dom.name, "theirs", "--disk-only", "--no-metadata",
              "--diskspec", f"vda,file={theirs}", "--diskspec", "vdb,snapshot=no")
    dom.guest_write("vda", 0x62, 20, 1)  # lands on their layer, above ours
    dom.guest_write("vdb", 0x63, 8, 1)   # vdb: still on our overlay

    doc = carry_on(cluster, wf)
    assert doc["status"] == "succeeded", doc["error"]
    # their layer stays the active one, now straight over the original; ours is gone from every chain
    assert chain(dom, "vda") == [str(theirs), str(dom.disks["vda"])]
    assert chain(dom, "vdb") == [str(dom.disks["vdb"])]
    assert ours_in_any_chain(dom, ours) == [] and not any(os.path.exists(p) for p in ours)
    assert dom.block_jobs() == {}
    commit = [e for e in events(doc) if e["event"] == "commit-intent" and e.get("disk") == "vda"]
    assert commit and commit[-1]["kind"] == "intermediate" and commit[-1]["below_layer"] == str(theirs)
    assert doc["result"]["foreign_layers"]["vda"]["layer"] == str(theirs)
    # the backup is the disks as they were at our snapshot
    for t, info in doc["result"]["files"].items():
        assert images_identical(info["path"], dom.references[t]), t
    # a cold start reads the chain from the images: whole, and every write of the capture is there
    restart(dom)
    assert chain(dom, "vda") == [str(theirs), str(dom.disks["vda"])]
    assert image_has_pattern(theirs, 0x61, 10, 1) and image_has_pattern(theirs, 0x62, 20, 1)
    assert image_has_pattern(dom.disks["vda"], 0x61, 10, 1)  # ours went down into the original
    assert image_has_pattern(dom.disks["vdb"], 0x63, 8, 1)


def test_real_guest_keeps_every_write_when_an_admin_snapshots_during_the_copy(cluster, guest_domain, tmp_path):
    g = guest_domain()
    g.wait_agent()
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, g, target)
    theirs = tmp_path / "theirs-vdb.qcow2"
    g.virsh("snapshot-create-as", g.name, "theirs", "--disk-only", "--no-metadata",
            "--diskspec", "vda,snapshot=no", "--diskspec", f"vdb,file={theirs}")
    before = g.last_counter()
    deadline = time.time() + 30
    while g.last_counter() < before + 5:  # the guest goes on writing, onto their layer
        assert time.time() < deadline, "the guest's writer stopped"
        time.sleep(0.5)
    doc = carry_on(cluster, wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert chain(g, "vdb") == [str(theirs), str(g.disks["vdb"])]
    last = g.last_counter()
    g.shutdown()
    g.virsh("start", g.name)  # starts again from its images: the chain is whole
    g.wait_agent()
    numbers, verdict = counter_in_image(theirs, tmp_path / "scratch")
    assert numbers[:last] == list(range(1, last + 1)), verdict  # no write made during the capture is lost
    assert ours_in_any_chain(g, overlay_paths(cluster, wf)) == []


def foreign_wait_metric(store, wf: str) -> dict[str, float]:
    """``domcapture_foreign_job_wait_seconds`` as a scrape shows it: disk/job -> seconds, for ``wf``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from workers.metrics import StoreCollector
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, "unused-queue"))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name == "domcapture_foreign_job_wait_seconds":
            for sample in family.samples:
                if sample.labels["workflow"] == wf:
                    out[f"{sample.labels['disk']}/{sample.labels['job']}"] = sample.value
    return out


def test_foreign_block_job_at_our_commit_is_waited_on_visibly_never_touched(cluster, disk_domain, tmp_path, store):
    dom = disk_domain(sizes_mib={"vda": 64, "vdb": 32}, fill_mib=40)
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, dom, target, "--commit-timeout", "4", point="kill-at:saved:step-started:committing")
    dom.guest_write("vda", 0x71, 50, 1)  # on our overlay
    # another tool pulls the chain of vda into our overlay, slowly
    dom.virsh("blockpull", dom.name, "vda", "--bandwidth", "262144", "--bytes")
    assert job_of(dom, "vda") == "Block Pull"

    cluster.start_worker()
    cluster.start_recovery()
    shown = cluster.wait(wf, lambda d: bool(d["data"].get("waiting_on")), timeout=60)
    assert shown["data"]["waiting_on"]["vda"]["job"] == "pull"
    text = cluster.cli("show", wf).stdout
    assert "blocked:   disk vda: a pull job of another tool" in text
    assert set(foreign_wait_metric(store, wf)) == {"vda/pull"}  # and in the metrics, while it waits
    doc = cluster.wait(wf, lambda d: d["status"] == "needs_attention", timeout=60)
    assert "another tool's block job" in doc["attention"]["reason"] and "vda: pull" in doc["attention"]["reason"]
    assert doc["attention"]["command"] == f"domcapture resume {wf}"
    # nothing of ours was recorded on vda, and their job runs on, untouched
    assert not [e for e in events(doc) if e["event"] == "commit-intent" and e.get("disk") == "vda"]
    assert job_of(dom, "vda") == "Block Pull"
    assert "vda" not in dom.mirrors()  # no commit of ours on vda (ours on vdb runs: that disk is free)

    dom.virsh("blockjob", dom.name, "vda", "--abort")  # the operator ends the other tool's job
    out = cluster.cli(*doc["attention"]["command"].split()[1:])  # the command the record suggests
    assert out.returncode == 0
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert dom.on_original_disks(), dom.blklist()
    assert dom.block_jobs() == {} and dom.leftover_overlays() == []
    assert image_has_pattern(dom.disks["vda"], 0x71, 50, 1)
    for t, info in doc["result"]["files"].items():
        assert images_identical(info["path"], dom.references[t]), t
    restart(dom)


def test_overlay_in_another_domains_chain_is_never_deleted(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, dom, target, point="kill-at:saved:step-started:cleaning")
    ours = sorted(overlay_paths(cluster, wf))
    vda_overlay = next(p for p in ours if "vda" in os.path.basename(p))
    # someone builds a new (shut-off) domain on top of our overlay file
    child = tmp_path / "child.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", vda_overlay, str(child))
    other = f"{dom.name}-child"
    xml = (f"<domain type='qemu'><name>{other}</name><memory unit='MiB'>64</memory><os><type arch='x86_64' "
           f"machine='pc'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' "
           f"type='qcow2'/><source file='{child}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
    (tmp_path / "child.xml").write_text(xml)
    dom.virsh("define", str(tmp_path / "child.xml"))
    try:
        cluster.start_worker()
        cluster.start_recovery()
        doc = cluster.wait(wf, lambda d: d["status"] == "needs_attention", timeout=60)
        assert f"{other} (vda, defined)" in doc["attention"]["reason"], doc["attention"]
        assert os.path.exists(vda_overlay)  # kept: it is the backing file of the other domain's disk
        run("qemu-img", "info", "-U", "--backing-chain", str(child))  # the other domain's chain is whole
    finally:
        dom.virsh("undefine", other, check=False)
    cluster.cli(*doc["attention"]["command"].split()[1:])
    doc = cluster.wait_final(wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert not any(os.path.exists(p) for p in ours)


def test_disk_unplugged_on_our_overlay_loses_no_write(cluster, disk_domain, tmp_path):
    dom = disk_domain(sizes_mib={"vda": 64, "sdb": 32})
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, dom, target)
    dom.guest_write("sdb", 0x44, 6, 2)  # on our overlay of sdb
    dom.virsh("detach-disk", dom.name, "sdb", "--live")  # the definition still names our overlay for sdb
    doc = carry_on(cluster, wf)
    # the copy needs every disk frozen: the capture rolls back, and nothing is lost on the way
    assert doc["status"] == "rolled_back", doc
    assert image_has_pattern(dom.disks["sdb"], 0x44, 6, 2)  # committed into the original
    assert chain(dom, "sdb", inactive=True)[0] == str(dom.disks["sdb"])
    assert dom.leftover_overlays() == []
    assert any(e["event"] == "unplugged-commit-intent" for e in events(doc))
    restart(dom)
    assert set(dom.blklist()) == {"vda", "sdb"} and dom.on_original_disks()


def test_disk_plugged_in_during_capture_is_reported_not_captured(cluster, disk_domain, tmp_path):
    dom = disk_domain(sizes_mib={"vda": 64, "sdb": 32})
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, dom, target)
    extra = tmp_path / "extra.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(extra), "16M")
    dom.virsh("attach-disk", dom.name, str(extra), "sdc", "--subdriver", "qcow2", "--targetbus", "scsi", "--live")
    doc = carry_on(cluster, wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert set(doc["result"]["files"]) == {"vda", "sdb"}
    assert "sdc" in doc["result"]["disks_added_during_capture"]
    assert dom.blklist()["sdc"] == str(extra) and dom.block_jobs() == {}


def test_domain_undefined_mid_capture_ends_on_its_originals(cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, dom, target)
    dom.guest_write("vda", 0x55, 12, 1)
    dom.virsh("undefine", dom.name)  # still running, now transient
    doc = carry_on(cluster, wf)
    assert doc["status"] == "succeeded", doc["error"]
    assert "Persistent:     no" in dom.virsh("dominfo", dom.name)
    assert dom.on_original_disks() and dom.leftover_overlays() == []
    assert image_has_pattern(dom.disks["vda"], 0x55, 12, 1)


def test_domain_gone_from_the_host_stops_for_an_operator_and_its_rollback_keeps_every_write(
        cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    wf = park(cluster, dom, target, point="kill-at:saved:step-started:committing")
    ours = overlay_paths(cluster, wf)
    dom.guest_write("vda", 0x66, 30, 1)
    dom.virsh("destroy", dom.name)
    dom.virsh("undefine", dom.name)
    cluster.start_worker()
    cluster.start_recovery()
    doc = cluster.wait(wf, lambda d: d["status"] == "needs_attention", timeout=60)
    assert "no longer on this host" in doc["attention"]["reason"]
    assert all(os.path.exists(p) for p in ours)  # kept until an operator says
    assert doc["attention"]["command"] == f"domcapture rollback {wf}"
    cluster.cli(*doc["attention"]["command"].split()[1:])
    doc = cluster.wait_final(wf)
    assert doc["status"] == "rolled_back", doc
    assert not any(os.path.exists(p) for p in ours)
    assert image_has_pattern(dom.disks["vda"], 0x66, 30, 1)  # the guest's write is in its original
