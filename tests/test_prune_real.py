"""prune for real: direct backups of a QEMU domain over simulated days, then a retention, with SIGKILLs.

Each test makes four direct backups of a fresh domain (a full, then three
incrementals; QEMU writes a new pattern before each) through the real CLI and
worker processes, then gives them the calendar of two weeks, Mon and Tue of
each: the test sets each backup's ``result["taken_at"]`` through the store,
under the backup record's own lease (the data is taken now; only the dates
the retention counts are the test's).  ``prune --keep-weekly 2`` must keep the
two Tuesdays exactly: the first becomes a synthetic full, the second is rebased
onto it.  A worker SIGKILLed at a boundary of each prune state is replaced;
the prune must end the same way.  Then every kept backup verifies
(``domcapture verify``) and restores (``submit restore``) to exactly the disk it
was taken from, libvirt's checkpoints (``virsh checkpoint-list``) are the
store's, and the next incremental starts from the newest kept backup.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from workflows.checkpoints import COMMITTED, CheckpointStore
from workflows.store import Store

from .conftest import REDIS_URL
from .realenv import ENDED, WorkerCluster, run
from .test_prune_fake import set_taken_at

pytestmark = pytest.mark.real

DAYS = ["2024-01-01T01:00", "2024-01-02T01:00", "2024-01-08T01:00", "2024-01-09T01:00"]
EVERY_POINT = [None, "saved:prune-plan:preflight", "saved:consolidate-sealed:consolidating",
               "saved:consolidated:consolidating", "saved:checkpoint-delete-intent:deleting",
               "saved:backup-deleted:deleting", "executed:finalizing"]
# one kill in each prune state by default (each run makes four real backups first);
# DOMCAPTURE_CRASH_EVERY_POINT=1 takes all six
KILL_POINTS = EVERY_POINT if os.environ.get("DOMCAPTURE_CRASH_EVERY_POINT") == "1" else \
    [None, "saved:prune-plan:preflight", "saved:consolidate-sealed:consolidating",
     "saved:checkpoint-delete-intent:deleting", "executed:finalizing"]


def wait_final(store: Store, wf: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while True:
        doc = store.load(wf).to_dict()
        if doc["status"] in ENDED:
            return doc
        assert time.time() < deadline, f"workflow {wf} is still {doc['status']}/{doc['state']}"
        time.sleep(0.1)


def submit(c: WorkerCluster, *args: str) -> str:
    return json.loads(c.cli("submit", *args, "--json").stdout)["id"]


@pytest.fixture
def world(libvirt_uri, disk_domain, redis_client, tmp_path):
    prefix = f"dcprune-{uuid.uuid4().hex[:8]}"
    c = WorkerCluster(REDIS_URL, libvirt_uri, prefix, tmp_path / "logs")
    c.start_recovery()
    dom = disk_domain(sizes_mib={"vda": 16}, fill_mib=2)
    target = tmp_path / "backups"
    target.mkdir()
    yield c, dom, target, Store(redis_client, prefix), tmp_path
    c.stop()
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


def checkpoints(dom) -> set[str]:
    return set(dom.virsh("checkpoint-list", dom.name, "--name").split())


@pytest.mark.parametrize("point", KILL_POINTS)
def test_prune_keeps_exactly_the_retention_and_survives_sigkill(world, point):
    c, dom, target, store, tmp = world
    c.start_worker()
    ids: list[str] = []
    refs: dict[str, str] = {}
    for i, day in enumerate(DAYS):
        if i:
            dom.guest_write("vda", 0x40 + i, 3 + i, 1)
        ref = tmp / f"ref-{i}.raw"  # the disk as the backup takes it (no write in between)
        run("qemu-img", "convert", "-U", "-O", "raw", str(dom.disks["vda"]), str(ref))
        args = ["direct-backup", "--domain", dom.name, "--target", str(target), "--quiesce", "off"]
        wf = submit(c, *args, *(["--incremental"] if i else []))
        doc = wait_final(store, wf)
        assert doc["status"] == "succeeded" and doc["result"]["kind"] == ("incremental" if i else "full"), doc
        set_taken_at(store, wf, day)
        ids.append(wf)
        refs[wf] = str(ref)
    b0, b1, b2, b3 = ids

    if point:
        for p in list(c.workers):
            c.kill(p)
            c.workers.remove(p)
        doomed = c.start_worker(fault=f"kill-at:{point}")
    if point is None:  # the retention of a stored policy, as the scheduler's prunes use it
        policy = tmp / "policy.toml"
        policy.write_text(f'name = "weekly-{dom.name}"\nstrategy = "direct-backup"\ntarget = "{target}"\n'
                          f'domains = ["{dom.name}"]\n[hosts]\nhere = "{dom.uri}"\n'
                          '[schedule]\ncron = "0 1 * * *"\ntimezone = "UTC"\n[retention]\nkeep_weekly = 2\n')
        c.cli("policy", "apply", str(policy))  # maps the URI to host "here": its jobs go to its queue
        c.start_worker(host="here", uri=dom.uri)
        wf = submit(c, "prune", "--domain", dom.name, "--policy", f"weekly-{dom.name}")
    else:
        wf = submit(c, "prune", "--domain", dom.name, "--keep-weekly", "2")
    if point:
        doomed.wait(timeout=120)
        assert doomed.returncode == -signal.SIGKILL
        c.start_worker()
    doc = wait_final(store, wf)
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    r = doc["result"]
    assert r["kept"] == [b3, b1] and sorted(r["removed"]) == sorted([b0, b2])
    assert r["consolidated"] == [{"id": b1, "onto": None}, {"id": b3, "onto": b1}]

    listed = json.loads(c.cli("backups", "--domain", dom.name, "--json").stdout)["backups"]
    assert {b["workflow"]: (b["kind"], b["parent"], b["chain"], b["state"]) for b in listed} == {
        b1: ("full", None, [b1], "good"), b3: ("incremental", b1, [b1, b3], "good")}
    every = json.loads(c.cli("backups", "--domain", dom.name, "--all", "--json").stdout)["backups"]
    assert {b["workflow"] for b in every if b["state"] == "deleted"} == {b0, b2}
    for gone in (b0, b2):
        assert not (target / f"domcapture-{dom.name}-{gone}").exists()

    live = checkpoints(dom)
    ours = {cp.name: cp for cp in CheckpointStore(store).all(store.load(b3).uri, dom.name)}
    assert live == set(ours) == {f"domcapture-{b1}", f"domcapture-{b3}"}
    assert all(cp.state == COMMITTED for cp in ours.values())

    assert c.cli("verify", wf).returncode == 0
    for kept in (b1, b3):
        assert c.cli("verify", kept).returncode == 0
        out = tmp / f"restored-{kept}"
        out.mkdir()
        rid = submit(c, "restore", "--domain", dom.name, "--from", kept, "--target", str(out))
        rdoc = wait_final(store, rid)
        assert rdoc["status"] == "succeeded", rdoc["error"]
        image = rdoc["result"]["files"]["vda"]["path"]
        assert run("qemu-img", "compare", "-F", "raw", image, refs[kept], check=False).returncode == 0, \
            f"the restore of {kept} differs from the disk it was taken from"
    refused = c.cli("submit", "restore", "--domain", dom.name, "--from", b0, "--target", str(tmp), check=False)
    assert refused.returncode == 2 and f"backup {b0} is deleted" in refused.stderr

    nxt = submit(c, "direct-backup", "--domain", dom.name, "--target", str(target), "--quiesce", "off",
                 "--incremental")
    ndoc = wait_final(store, nxt)
    assert ndoc["status"] == "succeeded"
    assert ndoc["result"]["kind"] == "incremental" and ndoc["result"]["parent_backup"] == b3
