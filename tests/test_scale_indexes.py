"""Indexes, counters and compaction on a real Redis: the views cost a page, whatever the store holds.

Every assertion reads Redis itself (the sorted sets, the counters), the CLI's output or the
metrics text, and compares it with the truth computed from the records written.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from workers.metrics import StoreCollector
from workflows.indexes import HISTORY_CAP
from workflows.record import FAILED, NEEDS_ATTENTION, QUEUED, ROLLED_BACK, RUNNING, SUCCEEDED, Record
from workflows.store import Store

pytestmark = pytest.mark.real

HOSTS = ["qemu+ssh://h1.example/system", "qemu+ssh://h2.example/system", "qemu:///system"]


def _rec(i: int, strategy: str = "snapshot-backup") -> Record:
    return Record(id=f"{i:016x}", strategy=strategy, definition_version=1, domain=f"dom-{i}",
                  uri=HOSTS[i % 3], params={}, state="preflight", created_at=1_700_000_000 + i * 0.5)


def _finish(store: Store, rec: Record, status: str, nbytes: int = 0, events: int = 0) -> None:
    lease = store.acquire_lease(rec.id, "t", 30)
    assert lease is not None
    for k in range(events):
        rec.progress = {"bytes_done": nbytes * (k + 1) // max(events, 1), "state": rec.state}
        store.save(rec, "progress", epoch=lease.epoch, n=k)
    rec.status = status
    rec.progress = {"bytes_done": nbytes}
    store.save(rec, "ended", epoch=lease.epoch)
    lease.release()


def _seed(store: Store, n: int) -> dict[str, Record]:
    rng = random.Random(7)
    out = {}
    for i in range(n):
        rec = _rec(i, rng.choice(["snapshot-backup", "direct-backup"]))
        store.create(rec)
        status = rng.choice([QUEUED, RUNNING, SUCCEEDED, SUCCEEDED, ROLLED_BACK, FAILED])
        if status != QUEUED:
            _finish(store, rec, status, nbytes=1000 + i)
        out[rec.id] = rec
    return out


def _members(r, key: str) -> set[str]:
    return {m.decode() for m in r.zrange(key, 0, -1)}


def test_indexes_and_counters_follow_every_write(store: Store, redis_client, prefix: str) -> None:
    recs = _seed(store, 120)
    for status in (QUEUED, RUNNING, SUCCEEDED, ROLLED_BACK, FAILED):
        assert _members(redis_client, f"{prefix}:ix:status:{status}") == \
            {i for i, r in recs.items() if r.status == status}, status
    assert _members(redis_client, f"{prefix}:ix:host:h1.example") == \
        {i for i, r in recs.items() if r.uri == HOSTS[0]}
    assert _members(redis_client, f"{prefix}:ix:host:localhost") == \
        {i for i, r in recs.items() if r.uri == HOSTS[2]}
    assert _members(redis_client, f"{prefix}:ix:domain:{HOSTS[1]}|dom-4") == {f"{4:016x}"}
    assert _members(redis_client, f"{prefix}:ix:domain:{HOSTS[0]}|dom-4") == set()
    stats = store.indexes.stats()
    by = Counter(f"wf|{r.strategy}|{r.status}|{'localhost' if r.uri == HOSTS[2] else r.uri.split('/')[2]}"
                 for r in recs.values())
    assert {k: int(v) for k, v in stats.items() if k.startswith("wf|") and v} == dict(by)
    for strategy in ("snapshot-backup", "direct-backup"):
        assert stats[f"bytes|{strategy}"] == sum(1000 + int(i, 16) for i, r in recs.items()
                                                 if r.strategy == strategy and r.status != QUEUED)


def test_pages_newest_first_with_a_cursor_and_filters(store: Store) -> None:
    recs = _seed(store, 150)
    newest_first = sorted(recs.values(), key=lambda r: r.created_at, reverse=True)
    seen, cursor, pages = [], None, 0
    while True:
        pg = store.indexes.page(limit=40, cursor=cursor)
        seen += [r.id for r in pg.entries if isinstance(r, Record)]
        pages += 1
        if not pg.cursor:
            break
        cursor = pg.cursor
    assert seen == [r.id for r in newest_first] and pages == 4
    running = store.indexes.page(status=RUNNING, limit=1000).entries
    assert [r.id for r in running if isinstance(r, Record)] == [r.id for r in newest_first if r.status == RUNNING]
    # two filters: one index read, the other checked on each entry's summary
    both = store.indexes.page(status=SUCCEEDED, host="h2.example", limit=1000).entries
    assert [r.id for r in both if isinstance(r, Record)] == \
        [r.id for r in newest_first if r.status == SUCCEEDED and r.uri == HOSTS[1]]
    sub = store.indexes.page(match=lambda m: "dom-3" in m[4], limit=5)
    assert [r.id for r in sub.entries if isinstance(r, Record)] == \
        [r.id for r in newest_first if "dom-3" in r.domain][:5] and sub.cursor


def test_records_written_before_indexes_are_indexed_once(store: Store, redis_client, prefix: str) -> None:
    """A store written by a build without indexes: the first view builds them, counters seeded from histories."""
    legacy = []
    for i in range(30):
        rec = _rec(i)
        rec.status = SUCCEEDED if i % 2 else FAILED
        rec.progress = {"bytes_done": 10}
        events = [{"ts": 1.0, "event": "step-started", "step": "copying"},
                  {"ts": 3.5, "event": "step-done", "step": "copying"},
                  {"ts": 4.0, "event": "recovered", "decision": "resume"}]
        redis_client.hset(f"{prefix}:wf:{rec.id}", mapping={"rev": 3, "data": json.dumps(rec.to_dict())})
        redis_client.rpush(f"{prefix}:wf:{rec.id}:history", *[json.dumps(e) for e in events])
        redis_client.zadd(f"{prefix}:index", {rec.id: rec.created_at})
        legacy.append(rec)
    assert not redis_client.exists(f"{prefix}:ix:ready")
    pg = store.indexes.page(status=FAILED, limit=100)  # the lazy upgrade
    assert {r.id for r in pg.entries if isinstance(r, Record)} == {r.id for r in legacy if r.status == FAILED}
    assert redis_client.get(f"{prefix}:ix:ready") == b"1"
    first = store.indexes.stats()
    assert first["recovery|resume"] == 30 and first["lease|snapshot-backup"] == 30
    assert first["dur|snapshot-backup|copying"] == 30 and first["dursum|snapshot-backup|copying"] == 75.0
    assert store.indexes.reindex() == 30  # again: idempotent, nothing counted twice
    assert store.indexes.stats() == first


def test_finished_history_is_compacted_failed_kept_whole(store: Store, redis_client, prefix: str) -> None:
    done, stopped = _rec(1), _rec(2)
    store.create(done)
    store.create(stopped)
    _finish(store, done, SUCCEEDED, nbytes=5, events=HISTORY_CAP + 100)
    _finish(store, stopped, NEEDS_ATTENTION, nbytes=5, events=HISTORY_CAP + 100)
    hist = store.history(done.id)
    assert len(hist) == HISTORY_CAP
    marker = [e for e in hist if e["event"] == "compacted"]
    assert marker and marker[0]["dropped"] == (HISTORY_CAP + 102) - (HISTORY_CAP - 1)
    assert hist[0]["event"] == "submitted" and hist[-1]["event"] == "ended"
    assert not redis_client.exists(f"{prefix}:wf:{done.id}:history")
    assert store.load(done.id).status == SUCCEEDED  # read back from its compressed form
    assert int(redis_client.memory_usage(f"{prefix}:wf:{done.id}")) < 6000
    assert len(store.history(stopped.id)) == HISTORY_CAP + 102  # kept whole for the operator
    # a later write to a finished record (a verification) is read whole, then compacted again
    lease = store.acquire_lease(done.id, "v", 30)
    assert lease is not None
    rec = store.load(done.id)
    rec.result = {"verified": True}
    store.save(rec, "verified", epoch=lease.epoch)
    assert store.load(done.id).result == {"verified": True}
    assert store.history(done.id)[-1]["event"] == "verified"


def test_metrics_from_counters_match_the_records(store: Store) -> None:
    recs = _seed(store, 60)
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, f"{store.prefix}-q"))
    text = generate_latest(registry).decode()
    for status in (SUCCEEDED, FAILED, RUNNING):
        n = sum(1 for r in recs.values() if r.status == status and r.strategy == "direct-backup"
                and r.uri == HOSTS[0])
        assert (f'domcapture_workflows{{host="h1.example",status="{status}",strategy="direct-backup"}} {float(n)}'
                in text), status
    total = sum(1000 + int(i, 16) for i, r in recs.items() if r.strategy == "snapshot-backup" and r.status != QUEUED)
    assert f'domcapture_bytes_copied_total{{strategy="snapshot-backup"}} {float(total)}' in text


def test_list_cli_pages_and_refuses_a_bad_cursor(cluster, store: Store) -> None:
    recs = _seed(store, 25)
    newest = sorted(recs.values(), key=lambda r: r.created_at, reverse=True)
    out = cluster.cli("list", "--limit", "10", "--json")
    assert [d["id"] for d in json.loads(out.stdout)] == [r.id for r in newest[:10]]
    cursor = out.stderr.split("--cursor ")[1].split(")")[0]
    out = cluster.cli("list", "--limit", "10", "--cursor", cursor, "--json")
    assert [d["id"] for d in json.loads(out.stdout)] == [r.id for r in newest[10:20]]
    before = store.r.hgetall(f"{store.prefix}:stats")
    for bad in (["--cursor", "x:y;z"], ["--limit", "0"], ["--limit", "abc"]):
        res = cluster.cli("list", *bad, check=False)
        assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert store.r.hgetall(f"{store.prefix}:stats") == before
    assert json.loads(cluster.cli("reindex", "--json").stdout)["indexed"] == 25
