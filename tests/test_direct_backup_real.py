"""direct-backup, checkpoint and restore on the real guest, with real worker and recovery processes.

One guest serves the whole module (its checkpoint chain grows from test to
test, as a real domain's does), with one store prefix and one recovery
process.  Outcomes are read where an operator would read them: ``virsh
domjobinfo`` / ``checkpoint-list``, the agent's freeze status, the backup
files (``qemu-img``), the guest's ``counter.log`` inside restored images
(``e2fsck -fn``, ``debugfs``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from types import SimpleNamespace

import pytest

from workflows import nbdio
from workflows.checkpoints import COMMITTED, CheckpointStore
from workflows.store import Store
from workflows.verify import verify_files

from .conftest import REDIS_URL
from .realenv import ENDED, GuestDomain, WorkerCluster, counter_in_image, is_gapless_prefix, run

pytestmark = pytest.mark.real

MIB = 1024 * 1024
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="module")
def w(libvirt_uri, guest_image, redis_client, tmp_path_factory):
    base = tmp_path_factory.mktemp("direct-backup")
    guest = GuestDomain.create(libvirt_uri, base / "guest")
    prefix = f"dct-{uuid.uuid4().hex[:8]}"
    cluster = WorkerCluster(REDIS_URL, libvirt_uri, prefix, base / "logs")
    cluster.start_recovery()
    target = base / "backups"
    target.mkdir()
    world = SimpleNamespace(guest=guest, cluster=cluster, target=target, base=base, uri=libvirt_uri,
                            store=Store(redis_client, prefix), defined=[])
    yield world
    cluster.stop()
    for name in world.defined:
        run("virsh", "-c", libvirt_uri, "destroy", name, check=False)
        run("virsh", "-c", libvirt_uri, "undefine", name, check=False)
    guest.destroy()
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)
    if FIGURES:
        print("\ndirect-backup figures:", json.dumps(FIGURES, indent=1, sort_keys=True))


def fresh_worker(w, fault: str | None = None):
    """Stop the workers a test left, start one (doomed when ``fault`` is given)."""
    for p in list(w.cluster.workers):
        w.cluster.kill(p)
        w.cluster.workers.remove(p)
    return w.cluster.start_worker(fault=fault)


def show(w, wf: str) -> dict:
    doc = w.store.load(wf).to_dict()
    doc["history"] = w.store.history(wf)
    return doc


def wait_final(w, wf: str, timeout: float = 120) -> dict:
    """Like WorkerCluster.wait_final, read from the store (no CLI process per poll)."""
    deadline = time.time() + timeout
    while True:
        doc = show(w, wf)
        if doc["status"] in ENDED:
            return doc
        assert time.time() < deadline, f"timed out; workflow is {doc['status']}/{doc['state']}"
        time.sleep(0.1)


def submit(w, strategy: str, *args: str) -> str:
    out = w.cluster.cli("submit", strategy, "--domain", w.guest.name, "--json", *args)
    return json.loads(out.stdout)["id"]


def backup(w, *args: str, worker: bool = True, wait: bool = True) -> dict:
    if worker:
        fresh_worker(w)
    wf = submit(w, "direct-backup", "--target", str(w.target), *args)
    if not wait:
        return {"id": wf}
    doc = wait_final(w, wf)
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    return doc


def guest_writes(w, mib: int) -> None:
    w.guest.sh(f"rm -f /mnt/vdb/blob; dd if=/dev/urandom of=/mnt/vdb/blob bs=1M count={mib} conv=fsync 2>/dev/null")


def virsh(w, *args: str, check: bool = True) -> str:
    return w.guest.virsh(*args, check=check)


def libvirt_checkpoints(w) -> list[str]:
    return virsh(w, "checkpoint-list", w.guest.name, "--name", "--topological").split()


def assert_clean(w) -> None:
    """No backup job, no frozen guest, no stray checkpoint or helper process, disks unchanged."""
    info = virsh(w, "domjobinfo", w.guest.name)
    assert "Job type:         None" in info, info
    assert not w.guest.frozen()
    assert w.guest.on_original_disks()
    ours = {c.name: c for c in CheckpointStore(w.store).all(w.uri, w.guest.name)}
    for name in libvirt_checkpoints(w):
        assert name in ours and ours[name].state == COMMITTED, f"libvirt has {name}; the store does not commit it"
    assert [c.name for c in ours.values() if c.state != COMMITTED] == []
    procs = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    assert str(w.target) not in procs, procs
    assert not [p for p in w.target.rglob("*") if p.name.endswith((".partial", ".scratch"))]


def restore(w, backup_id: str, *extra: str) -> dict:
    fresh_worker(w)
    out = w.base / f"restored-{backup_id}"
    out.mkdir()
    wf = submit(w, "restore", "--from", backup_id, "--target", str(out), *extra)
    doc = wait_final(w, wf)
    assert doc["status"] == "succeeded", doc["error"]
    return doc


# -- success paths ------------------------------------------------------------------------------------------
def test_full_push_quiesced_then_restore_is_clean_and_gapless(w):
    time.sleep(1)  # the writer writes a few lines
    t0 = time.time()
    doc = backup(w, "--quiesce", "require")
    FIGURES["full_push_seconds"] = round(time.time() - t0, 2)
    r = doc["result"]
    assert r["kind"] == "full" and r["mode"] == "push" and r["quiesced"] is True
    assert r["checkpoint"] in libvirt_checkpoints(w)
    FIGURES["freeze_window_s_full"] = r["downtime_s"]
    FIGURES["full_push"] = {"bytes_read": r["bytes_read"], "transfer_s": r["transfer_seconds"],
                            "workflow_s": round(doc["updated_at"] - doc["created_at"], 2)}
    assert 0 < r["downtime_s"] < 5
    assert w.cluster.cli("verify", doc["id"]).returncode == 0
    assert_clean(w)

    name = f"dctest-r{uuid.uuid4().hex[:7]}"
    w.defined.append(name)
    rdoc = restore(w, doc["id"], "--define", name)
    vdb = rdoc["result"]["files"]["vdb"]["path"]
    numbers, verdict = counter_in_image(vdb, w.base / "scratch", replay_journal=False)
    assert verdict.startswith("rc=0"), verdict  # quiesced: clean without a journal replay
    assert numbers and is_gapless_prefix(numbers)
    assert w.guest.last_counter() > numbers[-1]
    blk = run("virsh", "-c", w.uri, "domblklist", name).stdout
    assert rdoc["result"]["files"]["vda"]["path"] in blk and vdb in blk
    assert "restored by domcapture workflow" in run("virsh", "-c", w.uri, "desc", name).stdout
    assert w.cluster.cli("verify", rdoc["id"]).returncode == 0
    w.full = doc


@pytest.mark.parametrize("mib", [8])
def test_incremental_push_reads_about_what_the_guest_wrote(w, mib):
    guest_writes(w, mib)
    t0 = time.time()
    doc = backup(w, "--incremental", "--quiesce", "require")
    seconds = round(time.time() - t0, 2)
    r = doc["result"]
    assert r["kind"] == "incremental" and r["fallback"] is None
    assert r["parent_backup"] is not None
    # the guest wrote N MiB of data (plus its writer's lines and ext4 metadata)
    assert mib * MIB <= r["bytes_read"] <= 3 * mib * MIB, r["bytes_read"]
    assert r["bytes_written"] <= 3 * mib * MIB
    FIGURES[f"incremental_push_{mib}MiB"] = {"bytes_read": r["bytes_read"], "bytes_written": r["bytes_written"],
                                              "seconds": seconds, "freeze_window_s": r["downtime_s"],
                                              "workflow_s": round(doc["updated_at"] - doc["created_at"], 2),
                                              "transfer_s": r["transfer_seconds"]}
    assert_clean(w)


def test_pull_full_and_incremental_chain_restores_the_disk_exactly(w):
    t0 = time.time()
    full = backup(w, "--mode", "pull", "--quiesce", "require")
    FIGURES["full_pull"] = {"bytes_read": full["result"]["bytes_read"], "seconds": round(time.time() - t0, 2),
                            "workflow_s": round(full["updated_at"] - full["created_at"], 2),
                            "transfer_s": full["result"]["transfer_seconds"]}
    assert full["result"]["kind"] == "full" and full["result"]["mode"] == "pull"
    assert full["result"]["bytes_read"] < 64 * MIB  # only the allocated extents of vdb (64 MiB) and vda
    guest_writes(w, 4)
    # hold the guest still, so the disk at the instant of the backup can be read afterwards
    virsh(w, "suspend", w.guest.name)
    try:
        t0 = time.time()
        inc = backup(w, "--mode", "pull", "--incremental", "--quiesce", "off")
        FIGURES["incremental_pull_4MiB"] = {"bytes_read": inc["result"]["bytes_read"],
                                            "seconds": round(time.time() - t0, 2),
                                            "workflow_s": round(inc["updated_at"] - inc["created_at"], 2),
                                            "transfer_s": inc["result"]["transfer_seconds"]}
        r = inc["result"]
        assert r["kind"] == "incremental" and r["parent_backup"] == full["id"]
        assert 4 * MIB <= r["bytes_read"] <= 3 * 4 * MIB, r["bytes_read"]
        rdoc = restore(w, inc["id"])
        assert rdoc["result"]["chain"][-2:] == [full["id"], inc["id"]]
        xml = virsh(w, "dumpxml", w.guest.name)
        alias = xml.split("<target dev='vdb'", 1)[1].split("<alias name='", 1)[1].split("'", 1)[0]
        qdev = f"/machine/peripheral/{alias}/virtio-backend"
        virsh(w, "qemu-monitor-command", w.guest.name, "--hmp", f'qemu-io -d {qdev} "flush"')
        same = run("qemu-img", "compare", "-U", rdoc["result"]["files"]["vdb"]["path"],
                   str(w.guest.disks["vdb"]), check=False)
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        virsh(w, "resume", w.guest.name)
    assert_clean(w)


def test_pull_compressed_with_zstd_is_read_by_plain_qemu_img_and_restores_exactly(w):
    guest_writes(w, 8)
    virsh(w, "suspend", w.guest.name)  # the disk at the instant of the backup stays readable afterwards
    try:
        full = backup(w, "--mode", "pull", "--quiesce", "off", "--compress", "zstd")
        backup_file = full["result"]["files"]["vdb"]["path"]
        info = json.loads(run("qemu-img", "info", "--output=json", "-U", backup_file).stdout)
        assert info["format-specific"]["data"]["compression-type"] == "zstd"
        xml = virsh(w, "dumpxml", w.guest.name)
        alias = xml.split("<target dev='vdb'", 1)[1].split("<alias name='", 1)[1].split("'", 1)[0]
        virsh(w, "qemu-monitor-command", w.guest.name, "--hmp",
              f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "flush"')
        same = run("qemu-img", "compare", "-U", backup_file, str(w.guest.disks["vdb"]), check=False)
        assert same.returncode == 0, same.stdout + same.stderr  # plain qemu-img reads the compressed clusters
        rdoc = restore(w, full["id"])
        same = run("qemu-img", "compare", "-U", rdoc["result"]["files"]["vdb"]["path"],
                   str(w.guest.disks["vdb"]), check=False)
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        virsh(w, "resume", w.guest.name)
    assert_clean(w)


def test_pull_encrypted_with_luks_needs_its_key_to_be_read_and_restored(w, redis_client):
    passphrase = f"pass-{uuid.uuid4().hex}"
    key = w.base / "backup.key"
    key.write_text(passphrase)
    key.chmod(0o600)
    wrong = w.base / "wrong.key"
    wrong.write_text("not the passphrase")
    guest_writes(w, 4)
    virsh(w, "suspend", w.guest.name)  # the disk at the instant of the backup stays readable afterwards
    try:
        full = backup(w, "--mode", "pull", "--quiesce", "off", "--encrypt-key-file", str(key))
        backup_file = full["result"]["files"]["vdb"]["path"]
        info = json.loads(run("qemu-img", "info", "--output=json", "-U", backup_file).stdout)
        assert info["encrypted"] and info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        assert run("qemu-img", "compare", "-U", backup_file, str(w.guest.disks["vdb"]), check=False).returncode != 0
        xml = virsh(w, "dumpxml", w.guest.name)
        alias = xml.split("<target dev='vdb'", 1)[1].split("<alias name='", 1)[1].split("'", 1)[0]
        virsh(w, "qemu-monitor-command", w.guest.name, "--hmp",
              f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "flush"')
        unlocked = {"driver": "qcow2", "file": {"driver": "file", "filename": backup_file},
                    "encrypt": {"key-secret": "k"}}
        same = run("qemu-img", "compare", "-U", "--object", f"secret,id=k,file={key},format=raw",
                   "json:" + json.dumps(unlocked), str(w.guest.disks["vdb"]), check=False)
        assert same.returncode == 0, same.stdout + same.stderr  # plain qemu-img reads it with the key
        for extra, fragment in (((), "is encrypted: give its key with --encrypt-key-file"),
                                (("--encrypt-key-file", str(wrong)), "the key does not unlock it")):
            refused = w.cluster.cli("submit", "restore", "--domain", w.guest.name, "--from", full["id"],
                                    "--target", str(w.target), *extra, check=False)
            assert refused.returncode == 2 and fragment in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1 and not refused.stdout
        # mount and instant-restore read a backup in place, without a key: refused in one line
        folder = w.target / "mnt"
        folder.mkdir()
        for what, argv in (("mount", ["mount", full["id"], "--disk", "vdb", str(folder)]),
                           ("instant-restore", ["submit", "instant-restore", "--domain", w.guest.name, "--from",
                                                full["id"], "--define", f"{w.guest.name}-ir", "--target",
                                                str(w.target)])):
            refused = w.cluster.cli(*argv, check=False)
            assert refused.returncode == 2, (argv, refused.stderr)
            assert f"backup {full['id']} is encrypted; {what} reads only unencrypted backups" in refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1 and not refused.stdout
        assert not os.path.ismount(folder) and list(folder.iterdir()) == []
        rdoc = restore(w, full["id"], "--encrypt-key-file", str(key))
        same = run("qemu-img", "compare", "-U", rdoc["result"]["files"]["vdb"]["path"],
                   str(w.guest.disks["vdb"]), check=False)
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        virsh(w, "resume", w.guest.name)
    # the passphrase is in no record, history or queue entry: only the key file's path is
    for name in redis_client.scan_iter(f"{w.cluster.env['DOMCAPTURE_PREFIX']}*"):
        kind = redis_client.type(name)
        dump = redis_client.dump(name) or b""
        assert passphrase.encode() not in dump, (name, kind)
    assert_clean(w)


def test_lost_checkpoints_are_redefined_and_the_next_incremental_works(w):
    before = libvirt_checkpoints(w)
    assert len(before) >= 3
    virsh(w, "checkpoint-delete", w.guest.name, before[0], "--children", "--metadata")
    assert libvirt_checkpoints(w) == []
    listed = json.loads(w.cluster.cli("checkpoints", "--domain", w.guest.name, "--json").stdout)
    assert {c["name"] for c in listed["checkpoints"] if not c["in_libvirt"]} == set(before)
    guest_writes(w, 2)
    doc = backup(w, "--incremental", "--quiesce", "require")
    assert doc["result"]["kind"] == "incremental", doc["result"]
    assert doc["result"]["redefined"] == before  # parents first
    assert libvirt_checkpoints(w) == before + [doc["result"]["checkpoint"]]
    # the same through the checkpoint strategy
    virsh(w, "checkpoint-delete", w.guest.name, before[0], "--children", "--metadata")
    fresh_worker(w)
    cp = wait_final(w, submit(w, "checkpoint", "--action", "redefine"))
    assert cp["status"] == "succeeded" and cp["result"]["redefined"] == before + [doc["result"]["checkpoint"]]
    assert_clean(w)


def test_checkpoint_create_and_delete(w):
    fresh_worker(w)
    made = wait_final(w, submit(w, "checkpoint", "--action", "create"))
    assert made["status"] == "succeeded"
    name = made["result"]["checkpoint"]
    assert libvirt_checkpoints(w)[-1] == name
    gone = wait_final(w, submit(w, "checkpoint", "--action", "delete", "--checkpoint", name))
    assert gone["status"] == "succeeded" and gone["result"]["deleted"] == [name]
    assert name not in libvirt_checkpoints(w)
    table = w.cluster.cli("checkpoints", "--domain", w.guest.name).stdout
    assert name not in table and "committed" in table
    assert_clean(w)


def test_a_broken_chain_falls_back_to_full_and_says_so(w):
    names = libvirt_checkpoints(w)
    newest = names[-1]
    virsh(w, "checkpoint-delete", w.guest.name, names[0], "--children", "--metadata")
    nodes = json.loads(virsh(w, "qemu-monitor-command", w.guest.name,
                             json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}})))
    node = next(n["node-name"] for n in nodes["return"]
                if n["drv"] == "qcow2" and n["file"] == str(w.guest.disks["vdb"]))
    virsh(w, "qemu-monitor-command", w.guest.name,
          json.dumps({"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": newest}}))
    doc = backup(w, "--incremental", "--quiesce", "require")
    r = doc["result"]
    assert r["kind"] == "full" and "broken" in r["fallback"] and newest in r["fallback"], r
    assert "missing or broken bitmap" in r["fallback"]
    manifest = json.load(open(r["manifest"]))
    assert manifest["kind"] == "full" and manifest["fallback"] == r["fallback"] and manifest["parent"] is None
    listed = json.loads(w.cluster.cli("checkpoints", "--domain", w.guest.name, "--json").stdout)
    assert [c["broken"] for c in listed["checkpoints"] if c["name"] == newest][0]
    # the next incremental starts from the new full
    guest_writes(w, 1)
    nxt = backup(w, "--incremental", "--mode", "pull", "--quiesce", "require")
    assert nxt["result"]["kind"] == "incremental" and nxt["result"]["parent_backup"] == doc["id"]
    assert_clean(w)


# -- crashes -------------------------------------------------------------------------------------------------
# push full: every state; pull incremental: the states whose work differs in pull mode
KILL_POINTS = [("push", p) for p in (
    "executed:preflight", "executed:checking_chain", "executed:freezing", "executed:beginning",
    "saved:step-started:thawing", "saved:step-started:transferring", "saved:step-started:ending",
    "executed:committing", "executed:finalizing")] + [("pull", p) for p in (
        "saved:backup-intent:beginning", "saved:transfer-intent:transferring", "saved:backup-end-intent:ending")]


@pytest.mark.parametrize("mode, point", KILL_POINTS)
def test_sigkill_in_every_state(w, mode, point):
    """push: a full backup; pull: an incremental one (the guest's writer keeps changing blocks)."""
    args = ["--mode", mode, "--quiesce", "require", "--freeze-deadline", "30"]
    if mode == "pull":
        args.append("--incremental")
    doomed = fresh_worker(w, fault=f"kill-at:{point}")
    wf = backup(w, *args, worker=False, wait=False)["id"]
    while w.store.load(wf).status == "queued":  # the doomed worker took it: the next one may start now
        time.sleep(0.05)
    w.cluster.start_worker()
    doomed.wait(timeout=120)
    assert doomed.returncode == -signal.SIGKILL
    doc = wait_final(w, wf)
    # every state resumes (as on the fake, where every crash point is tried): a kill never costs the backup
    assert doc["status"] == "succeeded", (doc["status"], doc["error"])
    assert [e["decision"] for e in doc["history"] if e["event"] == "recovered"] == ["resume"]
    r = doc["result"]
    assert r["checkpoint"] in libvirt_checkpoints(w)
    assert all(c["ok"] for c in verify_files(w.store.load(wf)))
    for f in r["files"].values():
        nbdio.check_image(f["path"])
    assert r["kind"] == ("incremental" if mode == "pull" else "full")
    assert_clean(w)


def test_operator_rollback_of_a_crashed_pull_backup(w):
    w.cluster.kill(w.cluster.recovery)  # nothing resumes it: the operator decides
    try:
        doomed = fresh_worker(w, fault="kill-at:saved:transfer-intent:transferring")
        guest_writes(w, 1)
        wf = backup(w, "--mode", "pull", "--incremental", "--quiesce", "require", worker=False, wait=False)["id"]
        doomed.wait(timeout=120)
        assert "Backup" in virsh(w, "domjobinfo", w.guest.name)  # the pull job serves on, nobody reads
        time.sleep(2.5)  # the dead worker's lease expires
        assert "rolling back" in w.cluster.cli("rollback", wf).stdout
        w.cluster.start_worker()
        doc = wait_final(w, wf)
        assert doc["status"] == "rolled_back"
        assert f"domcapture-{wf}" not in libvirt_checkpoints(w)
        assert not os.path.exists(os.path.join(w.target, f"domcapture-{w.guest.name}-{wf}"))
        assert w.cluster.cli("resume", wf, check=False).returncode == 3
    finally:
        w.cluster.start_recovery()
    assert_clean(w)
    # the chain still works after the rollback
    assert backup(w, "--incremental", "--quiesce", "require")["result"]["kind"] == "incremental"


def test_bad_input_is_refused_and_changes_nothing(w):
    before = (json.loads(w.cluster.cli("list", "--json").stdout), libvirt_checkpoints(w),
              sorted(os.listdir(w.target)))
    cases = [
        (["direct-backup", "--target", str(w.target), "--mode", "sideways"], "--mode must be one of push, pull"),
        (["restore", "--target", str(w.target), "--from", "0123456789abcdef"], "no workflow with id"),
        (["checkpoint", "--action", "delete"], "--checkpoint is required"),
        (["checkpoint", "--action", "delete", "--checkpoint", "nope"], "has no checkpoint named 'nope'"),
    ]
    for args, message in cases:
        out = w.cluster.cli("submit", args[0], "--domain", w.guest.name, *args[1:], check=False)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and out.stderr.strip().count("\n") == 0, (args, out.stderr)
    # a restore of something that is not a direct backup
    other = [r["id"] for r in before[0] if r["strategy"] == "checkpoint"][0]
    out = w.cluster.cli("submit", "restore", "--domain", w.guest.name, "--from", other, "--target", str(w.target),
                        check=False)
    assert out.returncode == 2 and "--from needs a direct-backup" in out.stderr, out.stderr
    out = w.cluster.cli("checkpoints", "--domain", "dctest-no-such-domain", check=False)
    assert out.returncode == 2 and "is not defined" in out.stderr, out.stderr
    after = (json.loads(w.cluster.cli("list", "--json").stdout), libvirt_checkpoints(w),
             sorted(os.listdir(w.target)))
    assert [r["id"] for r in after[0]] == [r["id"] for r in before[0]] and after[1:] == before[1:]
