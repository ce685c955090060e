"""Records this build cannot read or run, on a real Redis and the in-memory hypervisor.

- a damaged record is quarantined (out of the active set, its bytes and the
  reason kept, an event in its history) by whoever meets it first;
- a definition this build does not have stops as ``needs_attention`` before
  any step, both in a worker and in recovery;
- rollback has the crash-loop cap of forward mode, and the command it names
  continues the rollback;
- leases are released on the early ways out.
"""

from __future__ import annotations

import json

import pytest

from workflows.errors import InvalidOperation, RecordUnreadable
from workflows.hypervisor.fake import FakeHypervisor
from workflows.record import NEEDS_ATTENTION, QUEUED, ROLLED_BACK, RUNNING, Record, new_id
from workflows.service import Captures

from .crashkit import Crasher, make_engine, run_once

pytestmark = pytest.mark.real  # a real redis-server


def _raw(store, wf_id: str, data: bytes) -> None:
    """A record as a writer this build does not know would leave it."""
    store.r.hset(store._k(wf_id), mapping={"rev": 1, "data": data})
    store.r.zadd(f"{store.prefix}:index", {wf_id: 1.0})
    store.r.sadd(f"{store.prefix}:active", wf_id)


def _record(wf_id: str, **kw) -> dict:
    rec = Record(id=wf_id, strategy="snapshot-backup", definition_version=1, domain="dom", uri="fake:///default",
                 params={}, state="copying", status=RUNNING)
    doc = rec.to_dict()
    doc.update(kw)
    return doc


@pytest.mark.parametrize("data, reason", [
    (b'{"id": "x", "strategy": ', "damaged record (JSONDecodeError"),
    (None, "schema version 2; this build reads version 1 (written by a newer build)"),
    (b"[1, 2]", "record is a JSON list, not an object"),
    (b'{"schema_version": 1, "id": "q"}', "field 'strategy' is missing"),
    (b"\xff\xfe", "damaged record"),
])
def test_unreadable_record_is_quarantined_with_its_bytes(store, data, reason):
    wf = new_id()
    data = data if data is not None else json.dumps(_record(wf, schema_version=2)).encode()
    _raw(store, wf, data)
    with pytest.raises(RecordUnreadable, match=reason.replace("(", r"\(").replace(")", r"\)")):
        store.load(wf)
    [(listed, why)] = list(store.listing())
    assert listed == wf and reason.split(" (")[0] in why
    store.quarantine(wf, f"unreadable: {reason}", by="test")
    assert wf not in store.active_ids()
    assert store.r.sismember(f"{store.prefix}:quarantine", wf)
    assert store.r.hget(store._k(wf), "data") == data  # the bytes are kept for an operator
    assert store.quarantined() == {wf: f"unreadable: {reason}"}
    assert store.history(wf)[-1]["event"] == "quarantined"
    with pytest.raises(RecordUnreadable, match="is quarantined: unreadable"):
        store.load(wf)
    [(listed, why)] = list(store.listing())
    assert listed == wf and "quarantined" in why


def test_a_key_of_another_type_is_unreadable_not_a_redis_error(store):
    wf = new_id()
    store.r.set(store._k(wf), "hello")
    with pytest.raises(RecordUnreadable, match="is a Redis string, not a workflow record"):
        store.load(wf)


def test_damaged_history_entries_do_not_break_history(store):
    rec = Record(id=new_id(), strategy="snapshot-backup", definition_version=1, domain="d", uri="u", params={},
                 state="preflight")
    store.create(rec)
    store.r.rpush(store._k(rec.id, ":history"), b"{not json")
    events = store.history(rec.id)
    assert [e["event"] for e in events] == ["submitted", "unreadable"]


def test_engine_quarantines_an_unreadable_record_and_releases_its_lease(store):
    wf = new_id()
    _raw(store, wf, b"{damaged")
    assert run_once(store, FakeHypervisor(), wf, None) is False
    assert make_engine(store, FakeHypervisor(), None).run(wf) == "quarantined"
    assert store.lease_value(wf) is None
    assert wf not in store.active_ids() and store.r.sismember(f"{store.prefix}:quarantine", wf)


def _fake_world(tmp_path):
    disk = tmp_path / "vda.img"
    disk.write_bytes(b"\x01" * 65536)
    hv = FakeHypervisor()
    hv.add_domain("dom", {"vda": str(disk)})
    (tmp_path / "bk").mkdir()
    return hv, str(tmp_path / "bk")


@pytest.mark.parametrize("strategy, version, reason", [
    ("snapshot-backup", 99, "follows snapshot-backup v99; this build has v1"),
    ("teleport", 1, "follows strategy 'teleport', which this build does not have"),
])
def test_definition_mismatch_stops_before_any_step(store, tmp_path, strategy, version, reason):
    hv, target = _fake_world(tmp_path)
    captures = Captures(store, lambda uri: hv, lambda rec: None)
    rec = captures.submit("snapshot-backup", "dom", "fake:///default", {"target": target, "quiesce": "off"})
    raw = store.r.hget(store._k(rec.id), "data")
    doc = json.loads(raw)
    doc.update(strategy=strategy, definition_version=version)
    store.r.hset(store._k(rec.id), "data", json.dumps(doc))
    assert make_engine(store, hv, None).run(rec.id) == NEEDS_ATTENTION
    after = store.load(rec.id)
    assert after.status == NEEDS_ATTENTION and reason in after.attention["reason"]
    assert after.attention["command"] == f"domcapture resume {rec.id}"
    events = [e["event"] for e in store.history(rec.id)]
    assert events == ["submitted", "needs-attention"]  # no step was started
    assert store.lease_value(rec.id) is None
    assert hv.disks("dom")[0].source.endswith("vda.img")  # nothing touched the domain
    with pytest.raises(InvalidOperation, match="roll it back where the workers have that definition"):
        captures.rollback(rec.id)
    assert store.lease_value(rec.id) is None


def test_recovery_of_a_running_record_of_another_definition_version(store, tmp_path):
    hv, target = _fake_world(tmp_path)
    captures = Captures(store, lambda uri: hv, lambda rec: None)
    rec = captures.submit("snapshot-backup", "dom", "fake:///default", {"target": target, "quiesce": "off"})
    doc = json.loads(store.r.hget(store._k(rec.id), "data"))
    doc.update(status=RUNNING, definition_version=7)
    store.r.hset(store._k(rec.id), "data", json.dumps(doc))
    decision = captures.recover(rec.id)
    assert decision is not None and decision.startswith("needs attention: ")
    after = store.load(rec.id)
    assert after.status == NEEDS_ATTENTION and "v7; this build has v1" in after.attention["reason"]
    assert store.lease_value(rec.id) is None


def test_rollback_gets_the_crash_loop_cap_and_its_command_continues_it(store, tmp_path):
    hv, target = _fake_world(tmp_path)
    captures = Captures(store, lambda uri: hv, lambda rec: None)
    rec = captures.submit("snapshot-backup", "dom", "fake:///default", {"target": target, "quiesce": "off"})
    captures.rollback(rec.id)
    decisions = []
    for i in range(5):
        crashed = run_once(store, hv, rec.id, Crasher(("saved:revert-started:rolling_back", 1)), f"w{i}")
        assert crashed
        decisions.append(captures.recover(rec.id))
        if store.load(rec.id).status == NEEDS_ATTENTION:
            break
    assert decisions[:2] == ["continue rollback", "continue rollback"]
    assert decisions[2] == "needs attention: the worker died 3 times while reverting preflight"
    stuck = store.load(rec.id)
    assert stuck.status == NEEDS_ATTENTION and stuck.mode == "rollback"
    assert stuck.attention["command"] == f"domcapture rollback {rec.id}"
    assert store.lease_value(rec.id) is None
    # the command it names works: a fresh attempt count, and this time the worker lives
    assert captures.rollback(rec.id).status == QUEUED
    assert make_engine(store, hv, None).run(rec.id) == ROLLED_BACK


def test_reenqueue_releases_its_lease_when_there_is_nothing_to_do(store, tmp_path):
    hv, target = _fake_world(tmp_path)
    captures = Captures(store, lambda uri: hv, lambda rec: None)
    rec = captures.submit("snapshot-backup", "dom", "fake:///default", {"target": target, "quiesce": "off"})
    doc = json.loads(store.r.hget(store._k(rec.id), "data"))
    doc.update(status=RUNNING)
    store.r.hset(store._k(rec.id), "data", json.dumps(doc))
    assert captures.reenqueue(rec.id) is False
    assert store.lease_value(rec.id) is None
