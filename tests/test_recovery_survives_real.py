"""Recovery and the CLI survive unreadable records, on real services.

Two records the build cannot read sit in the active set (damaged JSON, a
newer schema) beside a real snapshot-backup whose worker is SIGKILLed mid
copy.  ``list`` and ``show`` give one clear line for each bad record; the
recovery process quarantines them, recovers the capture, which succeeds,
and is still alive at the end.
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from workflows.record import Record, new_id

from .test_snapshot_backup_real import assert_backup_matches, assert_domain_clean, submit

pytestmark = pytest.mark.real


def _plant(r: redis.Redis, prefix: str, wf_id: str, data: bytes) -> None:
    r.hset(f"{prefix}:wf:{wf_id}", mapping={"rev": 3, "data": data})
    r.zadd(f"{prefix}:index", {wf_id: time.time()})
    r.sadd(f"{prefix}:active", wf_id)


def test_unreadable_records_do_not_stop_recovery(cluster, disk_domain, tmp_path):
    r = redis.Redis.from_url(cluster.env["DOMCAPTURE_REDIS_URL"])
    prefix = cluster.env["DOMCAPTURE_PREFIX"]
    damaged, newer = sorted([new_id(), new_id()])
    damaged_bytes = b'{"id": "' + damaged.encode() + b'", "strategy": "snapshot-backup", "sta'
    newer_doc = Record(id=newer, strategy="snapshot-backup", definition_version=1, domain="dctest-elsewhere",
                       uri=cluster.env["LIBVIRT_DEFAULT_URI"], params={}, state="copying",
                       status="running").to_dict()
    newer_doc["schema_version"] = 2
    newer_bytes = json.dumps(newer_doc).encode()
    _plant(r, prefix, damaged, damaged_bytes)
    _plant(r, prefix, newer, newer_bytes)
    dangling = new_id()  # an id in the active set with no record at all
    r.sadd(f"{prefix}:active", dangling)

    # list and show before anything quarantined them: one clear line each, exit 0
    listed = cluster.cli("list")
    assert listed.stderr == ""
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert "unreadable: workflow " + damaged + ": damaged record (JSONDecodeError" in lines[damaged]
    assert "has schema version 2; this build reads version 1 (written by a newer build)" in lines[newer]
    for wf, why in ((damaged, "damaged record"), (newer, "schema version 2")):
        shown = cluster.cli("show", wf)
        assert shown.stderr == "" and shown.stdout.count("\n") == 1 and why in shown.stdout
        doc = json.loads(cluster.cli("show", wf, "--json").stdout)
        assert doc["status"] == "unreadable" and why in doc["reason"]

    dom = disk_domain(random_mib=24)
    target = tmp_path / "backups"
    target.mkdir()
    first = cluster.start_worker()
    recovery = cluster.start_recovery()
    wf = submit(cluster, dom, target, "--bandwidth", "4M")
    cluster.wait(wf, lambda d: d["state"] == "copying" and d["data"].get("copy", {}).get("vda", {})
                 .get("offset", 0) > 0, timeout=60)
    cluster.kill(first)
    cluster.start_worker()
    doc = cluster.wait_final(wf, timeout=180)
    assert doc["status"] == "succeeded", doc["error"]
    recovered = [e for e in doc["history"] if e["event"] == "recovered"]
    assert recovered and recovered[0]["state"] == "copying", "the worker was not killed mid-copy"
    assert_domain_clean(dom)
    assert_backup_matches(doc, dom.references)

    # the bad records: quarantined with their bytes, out of the active set, still one line each
    assert r.smembers(f"{prefix}:quarantine") == {damaged.encode(), newer.encode(), dangling.encode()}
    assert not r.sismember(f"{prefix}:active", dangling)
    assert not r.sismember(f"{prefix}:active", damaged) and not r.sismember(f"{prefix}:active", newer)
    assert r.hget(f"{prefix}:wf:{damaged}", "data") == damaged_bytes
    assert r.hget(f"{prefix}:wf:{newer}", "data") == newer_bytes
    listed = cluster.cli("list").stdout.splitlines()
    assert len(listed) == 3
    bad = [line for line in listed if "unreadable" in line]
    assert len(bad) == 2 and all("is quarantined" in line for line in bad)
    assert recovery.poll() is None, "the recovery process died"
    log = next(cluster.logdir.glob("*-recovery.log")).read_text()
    assert "Traceback" not in log
    assert f"workflow {damaged}: quarantined" in log and f"workflow {newer}: quarantined" in log
