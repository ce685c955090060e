"""Policies and the durable scheduler, over simulated days on real Redis and the in-memory hypervisor.

Every workflow a tick submits is run to its end by the engine (direct-backup on
the fake writes real files), so the store holds what a night really leaves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from workflows.backups import GOOD as GOOD_BACKUP
from workflows.backups import catalog
from workflows.errors import HypervisorUnavailable, InputError, RecordNotFound
from workflows.hypervisor.fake import FakeHypervisor
from workflows.policy import TAG_NS, Policy, PolicyError, PolicyStore, domain_tags, parse
from workflows.record import SUCCEEDED, Slot
from workflows.scheduler import Scheduler
from workflows.service import Captures
from workflows.store import Store

from .crashkit import run_once

PARIS = ZoneInfo("Europe/Paris")

GOOD = """\
name = "nightly"
strategy = "direct-backup"
target = "{target}"
domains = ["web-*"]
tags = ["nightly"]

[hosts]
hv1 = "{uri}"

[options]
mode = "push"
quiesce = "try"

[full]
weekday = "sun"
every = 3

[schedule]
cron = "0 2 * * *"
timezone = "Europe/Paris"

[retention]
keep_daily = 7
keep_weekly = 4

[limits]
per_host = 2
"""


def test_a_good_policy_parses_with_every_field():
    p = parse(GOOD.format(target="/srv/bk", uri="qemu:///system"), known_strategies=lambda s: s == "direct-backup")
    assert (p.name, p.strategy, p.target, p.hosts) == ("nightly", "direct-backup", "/srv/bk",
                                                        {"hv1": "qemu:///system"})
    assert (p.full_weekday, p.full_every, p.per_host, p.per_target) == ("sun", 3, 2, None)
    assert p.retention == {"keep_daily": 7, "keep_weekly": 4}
    def nights(start: datetime, cron: str) -> list[str]:
        slots = p.slots_between(start.timestamp(), start.timestamp() + 3 * 86400, cron)
        return [datetime.fromtimestamp(t, PARIS).strftime("%d %H:%M %Z") for t in slots]
    # 02:00 does not exist the night Paris moves to summer time: that night runs at 03:00, once
    assert nights(datetime(2026, 3, 28, 12, tzinfo=PARIS), p.cron) == \
        ["29 03:00 CEST", "30 02:00 CEST", "31 02:00 CEST"]
    # 02:30 happens twice the night it moves back: it runs once
    assert nights(datetime(2026, 10, 24, 12, tzinfo=PARIS), "30 2 * * *") == \
        ["25 02:30 CEST", "26 02:30 CET", "27 02:30 CET"]


@pytest.mark.parametrize("change,message", [
    (("timezone = \"Europe/Paris\"", "timezone = \"Mars/Olympus\""), "policy.toml:20: schedule.timezone: unknown"),
    (("cron = \"0 2 * * *\"", "cron = \"0 25 * * *\""), "policy.toml:19: schedule.cron: not a cron expression"),
    (("keep_daily = 7", "keep_daly = 7"), "policy.toml:23: retention.keep_daly: unknown field"),
    (("keep_daily = 7", "keep_daily = -1"), "policy.toml:23: retention.keep_daily: must be a whole number"),
    (("every = 3", "every = \"3\""), "policy.toml:16: full.every: must be a whole number"),
    (("strategy = \"direct-backup\"", "strategy = \"tape\""), "policy.toml:2: strategy: unknown strategy 'tape'"),
    (("target = \"/srv/bk\"", "target = \"bk\""), "policy.toml:3: target: must be an absolute path"),
    (("[hosts]\nhv1 = \"qemu:///system\"\n", ""), "policy.toml:1: hosts: is required"),
    (("per_host = 2", "per_host = 0"), "policy.toml:27: limits.per_host: must be a whole number from 1"),
    (("name = \"nightly\"", "name = \"night ly\""), "policy.toml:1: name: letters, digits"),
    (("mode = \"push\"", "mode = \"push"), "policy.toml: not TOML"),
])
def test_a_bad_policy_is_refused_with_its_line_and_field(change, message):
    text = GOOD.format(target="/srv/bk", uri="qemu:///system").replace(*change)
    with pytest.raises(PolicyError) as err:
        parse(text, "policy.toml", known_strategies=lambda s: s == "direct-backup")
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_tags_come_from_the_domain_metadata():
    xml = f"<domain><name>x</name><metadata><dc:tags xmlns:dc='{TAG_NS}'>nightly, db</dc:tags></metadata></domain>"
    assert domain_tags(xml) == {"nightly", "db"}
    assert domain_tags("<domain><metadata><other/></metadata></domain>") == set()


def test_policies_are_stored_versioned(store: Store):
    ps = PolicyStore(store.r, store.prefix)
    p = parse(GOOD.format(target="/srv/bk", uri="qemu:///system"))
    assert ps.apply(p) == 1
    p.per_host = 3
    assert ps.apply(p) == 2
    assert ps.names() == ["nightly"]
    assert (ps.get("nightly").version, ps.get("nightly").per_host) == (2, 3)
    assert [v["per_host"] for v in ps.versions("nightly")] == [2, 3]
    ps.delete("nightly")
    assert ps.names() == [] and not store.r.exists(f"{store.prefix}:policy:nightly")


class Fleet:
    """One fake host with three matching domains (two by glob, one by tag) and one that is not."""

    def __init__(self, tmp_path, store: Store) -> None:
        self.store = store
        self.uri = f"fake:///sched-{os.urandom(4).hex()}"
        self.fake = FakeHypervisor(self.uri)
        tagged = f"<metadata><dc:tags xmlns:dc='{TAG_NS}'>nightly</dc:tags></metadata>"
        for name, meta in (("web-1", ""), ("web-2", ""), ("db1", tagged), ("scratch", "")):
            d = tmp_path / name
            d.mkdir()
            (d / "vda.img").write_bytes(os.urandom(64 * 1024))
            self.fake.add_domain(name, {"vda": str(d / "vda.img")}, agent=True, metadata=meta)
        (tmp_path / "bk").mkdir()
        self.policies = PolicyStore(store.r, store.prefix)
        self.policy: Policy = parse(GOOD.format(target=tmp_path / "bk", uri=self.uri), check_uri=None)
        self.policies.apply(self.policy)
        self.queue: list[str] = []
        self.captures = Captures(store, lambda uri: self.fake, lambda rec: self.queue.append(rec.id))
        self.now = datetime(2026, 3, 2, 12, tzinfo=PARIS).timestamp()  # a Monday, noon

    def scheduler(self, name: str, batch: int = 500) -> Scheduler:
        return Scheduler(self.captures, self.policies, clock=lambda: self.now, owner=name, batch=batch)

    def run_queue(self) -> None:
        while self.queue:
            run_once(self.store, self.fake, self.queue.pop(0), None)

    def captures_of(self, domain: str, strategy: str = "direct-backup") -> list:
        return sorted((r for r in self.store.records() if r.domain == domain and r.strategy == strategy),
                      key=lambda r: r.created_at)


def test_two_schedulers_over_simulated_days_submit_each_slot_once(tmp_path, store: Store):
    f = Fleet(tmp_path, store)
    a, b = f.scheduler("a"), f.scheduler("b")
    a.tick()  # first sight: the schedule starts now
    for _ in range(8 * 24):  # eight days, hour by hour, both schedulers every hour
        f.now += 3600
        a.tick()
        b.tick()
        f.run_queue()
    for domain in ("web-1", "web-2", "db1"):
        recs = f.captures_of(domain)
        assert len(recs) == 8 and all(r.status == SUCCEEDED for r in recs), domain
        days = [datetime.fromtimestamp(r.data["slot"]["at"], PARIS) for r in recs]
        assert [(d.day, d.hour) for d in days] == [(d, 2) for d in range(3, 11)]
        # full first (no chain), then every 3 incrementals, and on Sunday the 8th
        assert [r.params["incremental"] for r in recs] == [False, True, True, True, False, False, True, True]
    assert f.captures_of("scratch") == []
    slots = store.slots("nightly")
    # each night's capture, then its prune (the policy has a retention): each slot once, each naming its workflow
    assert Counter(member.rsplit("|", 1)[1] for member, _, _ in slots) == Counter({"capture": 24, "prune": 24})
    assert all(v.startswith(tuple("0123456789abcdef")) for _, _, v in slots)
    for domain in ("web-1", "web-2", "db1"):
        assert len(f.captures_of(domain, "prune")) == 8


def test_a_busy_domain_is_recorded_skipped_and_missed_nights_coalesce(tmp_path, store: Store):
    f = Fleet(tmp_path, store)
    s = f.scheduler("a")
    s.tick()
    manual = f.captures.submit("direct-backup", "web-1", f.uri, {"target": str(tmp_path / "bk")})
    f.queue.clear()  # its worker has not picked it up yet: web-1 is busy at 02:00
    f.now += 15 * 3600  # 03:00 Tuesday
    first = {o.slot.domain: o.what for o in s.tick()}
    assert first["web-1"] == f"skipped:busy:{manual.id}"
    assert store.slot_value(Slot("nightly", "hv1", "web-1", f.now - 3600)) == f"skipped:busy:{manual.id}"
    run_once(store, f.fake, manual.id, None)
    f.run_queue()
    f.now += 3 * 86400  # the scheduler was down for three nights
    out = s.tick()
    assert [o.what for o in out if o.slot.kind == "catch-up"] == \
        [f"coalesced:2 missed slot(s) from {int(f.now - 3 * 86400 + 82800)} into {int(f.now - 3600)}"]
    assert sorted(o.slot.domain for o in out if o.what.startswith("submitted")) == ["db1", "web-1", "web-2"]
    assert s.tick() == []


def test_a_crash_between_create_and_the_cursor_loses_and_doubles_nothing(tmp_path, store: Store):
    f = Fleet(tmp_path, store)
    crashing = Captures(store, lambda uri: f.fake, lambda rec: (_ for _ in ()).throw(SystemExit("killed")))
    dying = Scheduler(crashing, f.policies, clock=lambda: f.now, owner="dying", batch=2, batch_ttl=0.5)
    dying.tick()
    f.now += 15 * 3600
    with pytest.raises(SystemExit):
        dying.tick()  # died right after its first batch's creates (db1, web-1), before their enqueues and the cursor
    assert sorted(r.domain for r in store.records()) == ["db1", "web-1"]
    other = f.scheduler("b", batch=2)
    out = other.tick()  # the dead one's batch is still leased: the other batch goes, the cursor waits
    assert [(o.slot.domain, o.what.split(":")[0]) for o in out] == [("web-2", "submitted")]
    deadline = time.monotonic() + 10
    while not (out := other.tick()):  # until the dead one's lease lapses and its batch is taken over
        assert time.monotonic() < deadline
    assert [(o.slot.domain, o.what) for o in out] == [("db1", "taken"), ("web-1", "taken")]
    assert other.tick() == []  # the cursor moved on
    assert Counter(r.domain for r in store.records()) == Counter({"web-1": 1, "web-2": 1, "db1": 1})
    at = out[0].slot.at
    for r in store.records():
        assert store.slot_value(Slot("nightly", "hv1", r.domain, at)) == r.id


def test_a_host_lost_between_its_listing_and_its_batch_is_recorded_and_the_others_go_on(tmp_path, store: Store):
    f = Fleet(tmp_path, store)
    opened: list[str] = []

    def factory(uri: str) -> FakeHypervisor:
        opened.append(uri)
        if len(opened) == 2:  # the batch's connection, after the listing's
            raise HypervisorUnavailable(f"cannot connect to {uri}")
        return f.fake
    s = Scheduler(Captures(store, factory, lambda rec: f.queue.append(rec.id)), f.policies, clock=lambda: f.now)
    s.tick()
    f.now += 15 * 3600
    out = s.tick()
    assert [(o.slot.member, o.what) for o in out] == \
        [(f"hv1|*|{int(f.now - 3600)}|capture", f"refused:host hv1 unreachable: cannot connect to {f.uri}")]
    assert store.slot_value(out[0].slot) == out[0].what and f.policies.errors() == {}
    assert list(store.records()) == [] and s.tick() == []  # the slot is over: the next night goes on


# A scheduler process on its own in-memory hypervisor (the same fleet in every process): argv is the Redis
# URL, the prefix, the owner, the domain count, the clock, a fault (kill-at:<label glob> or -), then it ticks
# until the slot's cursor moved and prints its outcomes as JSON lines.
SCHEDULER_PROCESS = """
import json, os, sys, time
from workers.jobs import fault_hook
from workflows.hypervisor.fake import FakeHypervisor
from workflows.policy import PolicyStore
from workflows.scheduler import Scheduler
from workflows.service import Captures
from workflows.store import Store
url, prefix, owner, n, now, fault, disk = sys.argv[1:8]
store = Store.from_url(url, prefix)
fake = FakeHypervisor("fake:///many")
for i in range(int(n)):
    fake.add_domain(f"d{i:04d}", {"vda": disk}, agent=True)
captures = Captures(store, lambda uri: fake, lambda rec: None)
s = Scheduler(captures, PolicyStore(store.r, prefix), clock=lambda: float(now), owner=owner,
              crash_hook=fault_hook(None if fault == "-" else fault), batch=100, batch_ttl=2.0)
deadline = time.monotonic() + 60
while float(store.r.hget(f"{prefix}:sched:many", "cursor") or 0) != float(now):
    for o in s.tick():
        print(json.dumps([o.slot.domain, o.slot.at, o.what]), flush=True)
    assert time.monotonic() < deadline
    time.sleep(0.1)
"""


def test_two_scheduler_processes_share_a_slot_and_one_sigkilled_mid_batch_doubles_nothing(tmp_path, store: Store,
                                                                                         redis_client):
    n = 600
    disk = tmp_path / "vda.img"
    disk.write_bytes(os.urandom(64 * 1024))
    (tmp_path / "bk").mkdir()
    policy = parse(f'name = "many"\nstrategy = "direct-backup"\ntarget = "{tmp_path / "bk"}"\n'
                   f'domains = ["d*"]\n[hosts]\nhv1 = "fake:///many"\n[schedule]\ncron = "0 2 * * *"\n'
                   f'timezone = "UTC"\n', check_uri=None)
    PolicyStore(store.r, store.prefix).apply(policy)
    night = datetime(2026, 3, 3, 2, tzinfo=ZoneInfo("UTC")).timestamp()
    store.r.hset(f"{store.prefix}:sched:many", "cursor", night - 3600)  # the scheduler has seen the policy
    url = "redis://{host}:{port}/{db}".format(**redis_client.connection_pool.connection_kwargs)

    def start(owner: str, fault: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", SCHEDULER_PROCESS, url, store.prefix, owner, str(n),
                                 str(int(night)), fault, str(disk)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    # A dies at the 51st domain of the first batch it takes: that batch's records created, its lease held
    a = start("a", "kill-at:submitted:hv1|d*50|*")
    lease = f"{store.prefix}:sched:many:batch:{int(night)}:hv1:"
    deadline = time.monotonic() + 60
    while not any(store.r.get(f"{lease}{i}") == b"a" for i in range(n // 100)):  # B starts once A holds a batch
        assert a.poll() is None and time.monotonic() < deadline, a.communicate()
        time.sleep(0.01)
    b = start("b", "-")
    a_out, a_err = a.communicate(timeout=60)
    b_out, b_err = b.communicate(timeout=90)
    assert a.returncode == -signal.SIGKILL, a_err
    assert "SIGKILL at submitted:hv1|d" in a_err
    assert b.returncode == 0, b_err
    # A's batch: B took it over once A's lease lapsed, and found every slot A had claimed taken
    b_lines = [json.loads(line) for line in b_out.splitlines()]
    assert any(what == "taken" for _, _, what in b_lines)
    assert len(b_lines) == n and sum(what.startswith("submitted:") for _, _, what in b_lines) <= n - 100
    assert all(what == "taken" or what.startswith("submitted:") for _, _, what in b_lines)
    # every (domain, slot) submitted exactly once: one record each, its slot key naming it
    recs = [r for r in store.records() if r.data.get("slot", {}).get("policy") == "many"]
    assert Counter((r.domain, r.data["slot"]["at"]) for r in recs) == Counter({(f"d{i:04d}", night): 1
                                                                             for i in range(n)})
    for r in recs:
        assert store.slot_value(Slot("many", "hv1", r.domain, night)) == r.id
    assert len(store.slots("many")) == n
    assert float(store.r.hget(f"{store.prefix}:sched:many", "cursor") or 0) == night


def test_a_policy_with_a_retention_prunes_after_each_night_and_verifies_at_its_slot(tmp_path, store: Store):
    f = Fleet(tmp_path, store)
    text = GOOD.format(target=tmp_path / "bk", uri=f.uri).replace("keep_daily = 7\nkeep_weekly = 4", "keep_last = 3")
    text = text.replace("[limits]", "[verify]\ncron = \"0 12 * * *\"\n\n[limits]")
    f.policy = parse(text, check_uri=None)
    f.policies.apply(f.policy)
    s = f.scheduler("a")
    s.tick()
    verified: list[str] = []
    for _ in range(6 * 24):  # six nights; a prune follows each night's capture once it has ended
        f.now += 3600
        verified += [o.what for o in s.tick() if o.slot.kind == "verify"]
        f.run_queue()
    for domain in ("web-1", "web-2", "db1"):
        caps = f.captures_of(domain)
        assert len(caps) == 6 and all(r.status == SUCCEEDED for r in caps)
        prunes = f.captures_of(domain, "prune")
        assert prunes and all(r.status == SUCCEEDED for r in prunes), [(r.status, r.error) for r in prunes]
        good = [b.id for b in catalog(store, f.uri, domain) if b.state == GOOD_BACKUP]
        assert good == [r.id for r in caps[-3:]], (good, [r.id for r in caps])  # exactly the newest three
        for b in catalog(store, f.uri, domain):
            assert all(os.path.exists(x["path"]) for x in b.files.values())
        assert [c.name for c in f.fake.list_checkpoints(domain)][-1] == f"domcapture-{caps[-1].id}"
    # the noon verify slots re-read each domain's newest capture; every one passed
    assert len(verified) == 6 * 3 and all(w.startswith("verified:") for w in verified), verified


def test_a_prune_by_hand_takes_a_stored_policy_s_retention(tmp_path, store: Store):
    f = Fleet(tmp_path, store)
    f.policy = parse(GOOD.format(target=tmp_path / "bk", uri=f.uri).replace("keep_daily = 7\nkeep_weekly = 4",
                                                                             "keep_last = 2"), check_uri=None)
    f.policies.apply(f.policy)
    ids = []
    for i in range(4):
        rec = f.captures.submit("direct-backup", "web-1", f.uri, {"target": str(tmp_path / "bk"),
                                                                 "incremental": i > 0, "quiesce": "off"})
        f.run_queue()
        ids.append(rec.id)
    with pytest.raises(InputError, match="brings its own retention; leave out --keep-last"):
        f.captures.submit("prune", "web-1", f.uri, {"policy": "nightly", "keep_last": "1"})
    with pytest.raises(RecordNotFound, match="no policy named 'nope'"):
        f.captures.submit("prune", "web-1", f.uri, {"policy": "nope"})
    rec = f.captures.submit("prune", "web-1", f.uri, {"policy": "nightly"})
    assert rec.params["retention"] == {"keep_last": 2} and rec.params["timezone"] == "Europe/Paris"
    assert rec.params["target"] == os.path.realpath(tmp_path / "bk")
    f.run_queue()
    assert store.load(rec.id).status == SUCCEEDED
    assert [b.id for b in catalog(store, f.uri, "web-1") if b.state == GOOD_BACKUP] == ids[-2:]
