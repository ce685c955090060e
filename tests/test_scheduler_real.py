"""Two ``domcapture scheduler`` processes and one SIGKILLed mid-pass, on real Redis, libvirtd and QEMU.

A policy takes three running QEMU domains every minute.  Scheduler A runs
alone and is SIGKILLed (fault injection) right after it submitted the first
domain of the first slot, before the rest and before its cursor moved.  Then
A again and a second scheduler B run side by side with a worker of the
policy's host.  Every domain of that slot must be captured exactly once (no
slot lost, none twice), each capture a real backup that succeeded.

The schedulers here submit batches of one domain (``DOMCAPTURE_SCHEDULER_BATCH=1``), so the
kill lands between two domains and the three batches are shared between A and B; a kill in
the middle of a larger batch is in ``test_scheduler.py``.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from workflows.filecopy import sha256_file
from workflows.record import SUCCEEDED
from workflows.store import Store

pytestmark = pytest.mark.real


def _records_of_slots(store: Store, names: set[str]):
    return [r for r in store.records() if r.domain in names and r.data.get("slot")]


def test_two_schedulers_and_one_killed_mid_pass_submit_each_slot_exactly_once(cluster, disk_domain, tmp_path,
                                                                              redis_client, prefix):
    doms = [disk_domain(sizes_mib={"vda": 8}, fill_mib=1) for _ in range(3)]
    names = {d.name for d in doms}
    target = tmp_path / "backups"
    target.mkdir()
    policy = tmp_path / "minutely.toml"
    policy.write_text(f"""\
name = "minutely"
strategy = "direct-backup"
target = "{target}"
domains = [{", ".join(f'"{n}"' for n in sorted(names))}]
[hosts]
hv1 = "{cluster.env['LIBVIRT_DEFAULT_URI']}"
[options]
mode = "push"
quiesce = "off"
[schedule]
cron = "* * * * *"
timezone = "UTC"
""")
    cluster.cli("policy", "apply", str(policy))
    cluster.env["DOMCAPTURE_SCHEDULER_BATCH"] = "1"
    store = Store(redis_client, prefix)
    while not 5 <= time.time() % 60 < 45:  # first sight well before a minute starts (the schedule begins there)
        time.sleep(0.5)
    a = cluster._spawn(["scheduler", "--interval", "0.5"],
                       {**cluster.env, "DOMCAPTURE_FAULT": "kill-at:submitted:*"})
    assert a.wait(timeout=90) == -9, cluster.log_of(a)
    assert "fault injection: SIGKILL at submitted:hv1|" in cluster.log_of(a)
    first = _records_of_slots(store, names)
    assert len(first) == 1  # A died after its first submission: one capture, the cursor still behind
    at = first[0].data["slot"]["at"]

    a2 = cluster._spawn(["scheduler", "--interval", "0.5"], cluster.env)
    b = cluster._spawn(["scheduler", "--interval", "0.5"], cluster.env)
    cluster.workers += [a2, b]  # stopped with the workers at the end
    cluster.start_worker(host="hv1")
    deadline = time.time() + 180
    while True:
        of_slot = [r for r in _records_of_slots(store, names) if r.data["slot"]["at"] == at]
        if len(of_slot) == 3 and all(r.status == SUCCEEDED for r in of_slot):
            break
        assert time.time() < deadline, [(r.domain, r.status, r.error) for r in of_slot]
        time.sleep(0.5)
    for p in (a2, b):
        cluster.kill(p)
    every = _records_of_slots(store, names)
    # no (domain, slot) twice over every slot the schedulers handled; the killed one's slot has all three
    assert max(Counter((r.domain, r.data["slot"]["at"]) for r in every).values()) == 1
    assert sorted(r.domain for r in every if r.data["slot"]["at"] == at) == sorted(names)
    slots = {member: value for member, _, value in store.slots("minutely")}
    for r in every:
        assert slots[f"hv1|{r.domain}|{int(r.data['slot']['at'])}|capture"] == r.id
    for r in (r for r in every if r.data["slot"]["at"] == at):  # each a real backup: its files, as recorded
        for info in r.result["files"].values():
            assert f"sha256:{sha256_file(info['path'])}" == info["checksum"]
    # the two domains A left were submitted by exactly one of the two schedulers, each exactly once
    logs = cluster.log_of(a2) + cluster.log_of(b)
    for r in every:
        if r.data["slot"]["at"] == at and r.id != first[0].id:
            assert logs.count(f"minutely hv1|{r.domain}|{int(at)}|capture: submitted:{r.id}") == 1, logs
