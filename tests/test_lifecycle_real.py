"""The guest's own life during a capture, on the real guest.

The guest's QEMU process is SIGKILLed (as an OOM kill would) while a
snapshot-backup copies, with the domain on our overlays.  The workflow must
finish on its own: the overlays are committed offline (``qemu-img commit``),
the persistent definition points at the original images again, the backup is
complete, and every line the guest fsynced (and mirrored to the host) is in
the original image.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .realenv import COUNTER_LINE, counter_in_image, is_gapless_prefix, run

pytestmark = pytest.mark.real


def qemu_pid(name: str) -> int:
    with open(f"/run/libvirt/qemu/{name}.pid") as f:
        return int(f.read().strip())


def inactive_sources(guest) -> dict[str, str]:
    out = {}
    for line in guest.virsh("domblklist", guest.name, "--inactive").splitlines()[2:]:
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[0]] = parts[1].strip()
    return out


def test_guest_qemu_killed_mid_copy_finishes_on_original_images(cluster, guest_domain, tmp_path):
    guest = guest_domain()
    target = tmp_path / "backups"
    target.mkdir()
    time.sleep(1)  # the writer has written (and mirrored) some lines
    cluster.start_worker()
    out = cluster.cli("submit", "snapshot-backup", "--domain", guest.name, "--target", str(target),
                      "--quiesce", "off", "--bandwidth", "256K", "--json")
    wf = json.loads(out.stdout)["id"]
    cluster.wait(wf, lambda d: d["state"] == "copying" and d["progress"].get("percent", 0) > 2, timeout=120)
    assert set(guest.blklist().values()) != {str(p) for p in guest.disks.values()}, "not on overlays yet"
    os.kill(qemu_pid(guest.name), signal.SIGKILL)
    doc = cluster.wait_final(wf, timeout=300)
    assert doc["status"] == "succeeded", (doc["error"], [(e["event"], e["state"]) for e in doc["history"]])
    assert doc["data"]["offline_commit"]["disks"] == ["vda", "vdb"]
    assert guest.state() == "shut off"
    # the definition is back on the original images, with no overlay left anywhere
    assert inactive_sources(guest) == {t: str(p) for t, p in guest.disks.items()}
    assert not [f for f in os.listdir(guest.workdir) if f.startswith("domcapture-")]
    for t, p in guest.disks.items():
        info = json.loads(run("qemu-img", "info", "--output=json", "-U", str(p)).stdout)
        assert "backing-filename" not in info, (t, info)
    # every line the guest fsynced before it died is in the original data image
    mirrored = [int(m.group(1)) for m in map(COUNTER_LINE.match, guest.writer_log.read_text().splitlines()) if m]
    assert mirrored, "the writer mirrored nothing"
    numbers, _ = counter_in_image(guest.disks["vdb"], tmp_path / "scratch")
    assert set(mirrored) <= set(numbers), sorted(set(mirrored) - set(numbers))[:10]
    # the backup is complete: the image at snapshot time, whose log is a gapless prefix
    backed_up, verdict = counter_in_image(doc["result"]["files"]["vdb"]["path"], tmp_path / "scratch")
    assert backed_up and is_gapless_prefix(backed_up), verdict
    assert cluster.cli("verify", wf).returncode == 0
    # and the domain starts again from its own images
    guest.virsh("start", guest.name)
    guest.wait_agent()
    assert guest.last_counter() >= max(mirrored)
