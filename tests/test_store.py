"""The workflow store on a real Redis: CAS, history, fencing, leases, domain lock."""

from __future__ import annotations

import socket
import time

import pytest
import redis

from workflows.errors import ConflictError, DomainBusy, LeaseLost, RecordNotFound, RecordUnreadable
from workflows.record import SCHEMA_VERSION, Record, new_id
from workflows.store import Store


def make(domain="d1", **kw) -> Record:
    return Record(id=new_id(), strategy="snapshot-backup", definition_version=1, domain=domain,
                  uri="qemu:///system", params={"target": "/tmp"}, state="preflight", **kw)


def test_record_round_trips_as_versioned_json(store):
    rec = make()
    store.create(rec)
    raw = store.r.hget(f"{store.prefix}:wf:{rec.id}", "data")
    assert raw.startswith(b"{") and f'"schema_version":{SCHEMA_VERSION}'.encode() in raw
    loaded = store.load(rec.id)
    assert loaded.to_dict() == {**rec.to_dict(), "rev": 1}


def test_unknown_schema_version_is_refused(store):
    rec = make()
    rec.schema_version = 99
    store.create(rec)
    with pytest.raises(RecordUnreadable, match="schema version 99"):
        store.load(rec.id)


def test_save_is_compare_and_set_and_appends_history(store):
    rec = make()
    store.create(rec)
    lease = store.acquire_lease(rec.id, "w1", 5)
    a, b = store.load(rec.id), store.load(rec.id)
    a.state = "freezing"
    store.save(a, "step-done", epoch=lease.epoch)
    b.state = "snapshotting"
    with pytest.raises(ConflictError):
        store.save(b, "step-done", epoch=lease.epoch)
    assert store.load(rec.id).state == "freezing"
    events = [e["event"] for e in store.history(rec.id)]
    assert events == ["submitted", "step-done"]


def test_stale_epoch_changes_nothing(store):
    rec = make()
    store.create(rec)
    old = store.acquire_lease(rec.id, "w1", 0.3)
    time.sleep(0.4)  # the lease expires: another process takes over
    new = store.acquire_lease(rec.id, "w2", 5)
    assert new is not None and new.epoch == old.epoch + 1
    zombie = store.load(rec.id)
    zombie.state = "copying"
    with pytest.raises(LeaseLost):
        store.save(zombie, "step-done", epoch=old.epoch)
    assert store.load(rec.id).state == "preflight"
    assert len(store.history(rec.id)) == 1
    with pytest.raises(LeaseLost):
        old.check()
    assert not old.renew()


def test_lease_is_exclusive_until_released_or_expired(store):
    rec = make()
    store.create(rec)
    a = store.acquire_lease(rec.id, "w1", 5)
    assert store.acquire_lease(rec.id, "w2", 5) is None
    assert a.renew()
    a.release()
    b = store.acquire_lease(rec.id, "w2", 5)
    assert b is not None and b.epoch == a.epoch + 1
    assert not store.renew_lease(rec.id, a.value, 5)


def test_local_clock_notices_a_stopped_process(store):
    rec = make()
    store.create(rec)
    lease = store.acquire_lease(rec.id, "w1", 0.2)
    lease.renewed_at -= 1.0  # as if the process had been stopped for a second
    with pytest.raises(LeaseLost):
        lease.check()


def test_the_lease_clock_starts_when_the_renewal_is_sent(store):
    """A renewal whose answer is slow: the local clock counts from the moment it was sent (the TTL
    runs in Redis from an instant after that), never from the answer."""
    rec = make()
    store.create(rec)
    lease = store.acquire_lease(rec.id, "w1", 5)
    real = store.renew_lease

    def slow(*args, **kw):
        time.sleep(0.3)
        return real(*args, **kw)
    store.renew_lease = slow  # type: ignore[method-assign]
    before = time.monotonic()
    assert lease.renew()
    after = time.monotonic()
    assert after - before >= 0.3
    assert before <= lease.renewed_at < before + 0.1 < after


def test_a_redis_that_never_answers_fails_a_call_within_the_lease_ttl():
    """Every socket wait is shorter than the lease TTL: a worker blocked on a silent Redis gets an
    error before its lease could have been taken over."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the connection; nothing ever answers
    try:
        ttl = 3.0
        store = Store.from_url(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", "dc-silent", lease_ttl=ttl)
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            store.r.get("dc-silent:anything")
        elapsed = time.monotonic() - started
        assert ttl * 0.7 <= elapsed < ttl, elapsed
    finally:
        silent.close()


def test_one_workflow_per_domain_until_final(store):
    first = make("busy-dom")
    store.create(first)
    with pytest.raises(DomainBusy, match=first.id):
        store.create(make("busy-dom"))
    assert store.domain_holder(first.uri, "busy-dom") == first.id
    lease = store.acquire_lease(first.id, "w", 5)
    rec = store.load(first.id)
    rec.status = "succeeded"
    store.save(rec, "done", epoch=lease.epoch)
    assert store.domain_holder(first.uri, "busy-dom") is None
    assert first.id not in store.active_ids()
    store.create(make("busy-dom"))


def test_missing_record(store):
    with pytest.raises(RecordNotFound):
        store.load("nope")


def test_rolled_back_records_expire_and_leave_the_index_succeeded_ones_stay(redis_client, prefix):
    from workflows.record import ROLLED_BACK, SUCCEEDED
    store = Store(redis_client, prefix, finished_ttl=1)
    recs = {}
    for status in (ROLLED_BACK, SUCCEEDED):
        rec = Record(id=f"exp-{status}", strategy="snapshot", definition_version=1, domain=f"d-{status}",
                     uri="qemu:///system", params={}, state="x")
        store.create(rec)
        lease = store.acquire_lease(rec.id, "w", 5)
        rec.status = status
        store.save(rec, "ended", epoch=lease.epoch)
        recs[status] = rec
    assert 0 < redis_client.pttl(f"{prefix}:wf:exp-{ROLLED_BACK}") <= 1000
    # a finished workflow's history is compacted into its record: it expires with it
    assert not redis_client.exists(f"{prefix}:wf:exp-{ROLLED_BACK}:history")
    assert [e["event"] for e in store.history(f"exp-{ROLLED_BACK}")] == ["submitted", "ended"]
    assert redis_client.pttl(f"{prefix}:wf:exp-{SUCCEEDED}") == -1
    time.sleep(1.2)
    assert store.trim_index() == 1
    assert store.ids() == [f"exp-{SUCCEEDED}"]
    assert not redis_client.zcard(f"{prefix}:ix:status:{ROLLED_BACK}")
    assert not redis_client.hexists(f"{prefix}:ix:meta", f"exp-{ROLLED_BACK}")
    assert redis_client.zrange(f"{prefix}:ix:status:{SUCCEEDED}", 0, -1) == [f"exp-{SUCCEEDED}".encode()]
