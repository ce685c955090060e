"""The control state behind Sentinel: three redis-servers and three sentinels of our own (loopback),
the real ``domcapture worker`` and ``recovery`` processes on a ``redis+sentinel://`` URL, real QEMU domains.

- The primary's machine dies (SIGKILL, data folder removed) while a snapshot-backup and a direct-backup
  copy: a replica is promoted, every process finds it, both captures end ``succeeded`` and verify.
- Both replicas stopped: a capture's intent reaches no replica, so its effect does not start (no
  overlay, no snapshot, no hold mark, no change to the domain XML); continued, the capture goes on.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
import uuid

import pytest

from workers.chaos.services import SentinelSet
from workflows.store import Store

from .realenv import WorkerCluster

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory):
    if shutil.which("redis-sentinel") is None:
        pytest.fail("redis-sentinel is not installed (scripts/setup.sh installs it)")
    s = SentinelSet(tmp_path_factory.mktemp("redis-ha"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def sentinels(sentinel_set):
    """The module's set, settled: a primary, both replicas in sync, the sentinels agreeing."""
    sentinel_set.wait_for(sentinel_set.settled, "the set to settle", timeout=60)
    return sentinel_set


@pytest.fixture
def ha_cluster(sentinels, libvirt_uri, tmp_path):
    c = WorkerCluster(sentinels.url, libvirt_uri, f"dcha-{uuid.uuid4().hex[:6]}", tmp_path / "logs", lease_ttl=5.0)
    yield c
    c.stop()


def submit(cluster: WorkerCluster, strategy: str, dom, target, *extra: str) -> str:
    out = cluster.cli("submit", strategy, "--domain", dom.name, "--target", str(target), "--quiesce", "off",
                      "--json", *extra)
    return str(__import__("json").loads(out.stdout)["id"])


def copying(doc: dict) -> bool:
    return doc["status"] == "running" and (doc.get("progress") or {}).get("bytes_done", 0) > 0


def test_a_primary_lost_mid_copy_fails_over_and_both_captures_succeed(sentinels, ha_cluster, disk_domain, tmp_path):
    # random data, compressed on the way: the direct-backup (which has no bandwidth cap) is still copying
    snap_dom = disk_domain(random_mib=16)
    direct_dom = disk_domain(sizes_mib={"vda": 256, "vdb": 16}, random_mib=192)
    targets = {}
    for name in ("snap", "direct"):
        targets[name] = tmp_path / name
        targets[name].mkdir()
    for _ in range(2):
        ha_cluster.start_worker()
    ha_cluster.start_recovery()
    snap = submit(ha_cluster, "snapshot-backup", snap_dom, targets["snap"], "--bandwidth", "8M")
    direct = submit(ha_cluster, "direct-backup", direct_dom, targets["direct"], "--mode", "pull",
                    "--compress", "zstd")
    ha_cluster.wait(snap, copying, timeout=60)
    ha_cluster.wait(direct, copying, timeout=60)

    killed_at = time.monotonic()
    dead = sentinels.kill_primary()
    promoted = sentinels.wait_promoted(dead)
    # every process finds the new primary by itself: the CLI, on a fresh connection, right away
    assert ha_cluster.show(snap)["status"] in ("running", "queued", "succeeded")
    answered = time.monotonic() - killed_at
    assert answered < 20, f"the CLI found the new primary only after {answered:.1f} s"

    docs = {wf: ha_cluster.wait_final(wf, timeout=180) for wf in (snap, direct)}
    for wf, doc in docs.items():
        assert doc["status"] == "succeeded", (wf, doc["status"], doc.get("error"))
        assert ha_cluster.cli("verify", wf).returncode == 0
    assert snap_dom.on_original_disks() and direct_dom.on_original_disks()
    assert snap_dom.block_jobs() == {} and direct_dom.block_jobs() == {}
    # the workers and recovery lived through it (none exited)
    assert all(p.poll() is None for p in ha_cluster.workers) and ha_cluster.recovery.poll() is None

    sentinels.restart(dead)  # the machine replaced: back as a replica of the new primary
    sentinels.wait_for(sentinels.settled, "the replaced node to rejoin as a replica")
    assert sentinels.primary() != dead
    print(f"failover: promoted {promoted:.2f} s after the kill; CLI answered after {answered:.2f} s")


def test_an_intent_no_replica_holds_starts_no_effect(sentinels, ha_cluster, disk_domain, tmp_path):
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    before = dom.virsh("dumpxml", dom.name)
    wf = submit(ha_cluster, "snapshot-backup", dom, target)  # a submit, too, returns once a replica holds it
    replicas = sentinels.replicas()
    for i in replicas:
        sentinels.signal_node(i, signal.SIGSTOP)
    try:
        worker = ha_cluster.start_worker()
        # the worker has tried (and been refused) at least twice: the wait is the outcome, not a guess
        deadline = time.monotonic() + 30
        while len(re.findall("no replica acknowledged", ha_cluster.log_of(worker))) < 2:
            assert time.monotonic() < deadline, ha_cluster.log_of(worker)[-2000:]
            time.sleep(0.1)
        doc = ha_cluster.show(wf)
        assert doc["status"] == "running"
        assert dom.virsh("dumpxml", dom.name) == before  # no hold mark, no overlay, no disk change
        assert dom.on_original_disks() and dom.block_jobs() == {}
        assert dom.virsh("snapshot-list", dom.name, "--name").strip() == ""
        assert dom.leftover_overlays() == [] and list(target.iterdir()) == []
    finally:
        for i in replicas:
            sentinels.signal_node(i, signal.SIGCONT)
    doc = ha_cluster.wait_final(wf, timeout=120)
    assert doc["status"] == "succeeded", doc.get("error")
    assert ha_cluster.cli("verify", wf).returncode == 0
    assert dom.on_original_disks() and dom.leftover_overlays() == []


def test_a_sentinel_naming_a_replica_never_serves_a_read(sentinels):
    """A sentinel that has not learnt of a failover names the old primary; back on its address as an empty
    replica, it must not answer reads (a record would look missing and be quarantined)."""
    primary, replica = sentinels.primary(), sentinels.replicas()[0]
    store = Store.from_url(sentinels.url, f"dcstale-{uuid.uuid4().hex[:6]}")
    sentinels.cli(sentinels.ports[replica], "replicaof", "127.0.0.1", "1")  # cut off: it misses what follows
    try:
        store.r.set(f"{store.prefix}:k", "on-the-primary")
        answers = iter([("127.0.0.1", sentinels.ports[replica])])
        pool = store.r.connection_pool
        proxy = pool.proxy  # type: ignore[attr-defined]  # what a new connection asks for the primary
        real = proxy.get_master_address
        proxy.get_master_address = lambda: next(answers, None) or real()
        pool.disconnect()
        assert store.r.get(f"{store.prefix}:k") == b"on-the-primary"
        conn = pool.get_connection()
        assert conn.port == sentinels.ports[primary]
        pool.release(conn)
    finally:
        sentinels.cli(sentinels.ports[replica], "replicaof", "127.0.0.1", str(sentinels.ports[primary]))
