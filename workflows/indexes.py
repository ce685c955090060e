"""Secondary indexes, counters and compaction: what lets a view cost a page, not a scan.

The record scripts of ``store.py`` are wrapped (``wrap``): after a write succeeds, the
same Lua script reads the record it just wrote and keeps, in that one atomic step:

- ``P:ix:status:<status>``, ``P:ix:strategy:<strategy>``, ``P:ix:host:<host>``,
  ``P:ix:domain:<uri>|<name>``: sorted sets of workflow ids by creation time
  (``host`` is the URI's host name, ``localhost`` for a local URI, as the metrics say);
- ``P:ix:domains``: every ``<name>\\t<uri>`` ever seen, in name order (the console's
  domains page);
- ``P:ix:meta``: id -> ``[status, strategy, host, uri, domain, bytes]``, what the
  previous write indexed (so a status change moves the id, and counts follow);
- ``P:ix:expiry``: ids of expiring records by the time they expire (``trim_index``);
- ``P:stats``: counters for ``/metrics``: workflows per strategy/status/host, bytes
  copied, step durations, recovery actions, lease losses, retries, freeze and
  downtime histograms; ``P:lastok``: the last success per domain and strategy;
- ``P:ix:ready``: set once every record is indexed (a new deployment's first record,
  or the end of ``domcapture reindex``).  Records written by a build without indexes
  are indexed by ``reindex``, which the views also run by themselves the first time
  they find the mark missing.

A finished workflow (succeeded, rolled back) is compacted right after its final write
(``compact``): its record JSON and its history are stored zlib-compressed in the record's
hash (``dataz``, ``histz``), and a history longer than ``HISTORY_CAP`` events keeps its
first ``HISTORY_HEAD`` and last events with a ``compacted`` event saying how many were
dropped.  Failed and needs_attention workflows are never compacted: their full history
stays for the operator.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import DomcaptureError, InputError, RecordNotFound
from .record import FINAL_STATUSES, SUCCEEDED, Record

if TYPE_CHECKING:
    from .store import Store

FREEZE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
DOWNTIME_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
HISTORY_CAP = 200  # events kept in a compacted history
HISTORY_HEAD = 20  # of which the first ones
SCAN_BUDGET = 20_000  # index entries a filtered page looks at before it returns what it found (and a cursor)

_LUA_PRELUDE = """
local function fmt(x) return string.format('%.17g', x) end
local function num(x) if type(x) == 'number' then return x end return nil end
local function tab(x) if type(x) == 'table' then return x end return {} end
local function host_of(uri)
  local auth = string.match(uri, '^[%a][%w+.-]*://([^/?#]*)')
  if not auth or auth == '' then return 'localhost' end
  auth = string.gsub(auth, '^.*@', '')
  local h = string.match(auth, '^%[([^%]]*)%]') or string.match(auth, '^([^:]*)')
  if not h or h == '' then return 'localhost' end
  return string.lower(h)
end
local function hist(st, name, strat, v, buckets)
  for _, b in ipairs(buckets) do
    if v <= b then redis.call('HINCRBY', st, name .. '|' .. strat .. '|' .. fmt(b), 1) end
  end
  redis.call('HINCRBY', st, name .. '|' .. strat .. '|+Inf', 1)
  redis.call('HINCRBYFLOAT', st, name .. '|' .. strat .. '|sum', v)
end
local FREEZE = {__FREEZE__}
local DOWN = {__DOWN__}
-- index the record 'rec' (a decoded record) under id; returns the previous meta (or nil)
local function ix_apply(p, id, rec, score)
  local mk = p .. ':ix:meta'
  local raw = redis.call('HGET', mk, id)
  local old = nil
  if raw then old = cjson.decode(raw) end
  local st = p .. ':stats'
  local new = {rec.status, rec.strategy, host_of(rec.uri), rec.uri, rec.domain,
               num(tab(rec.progress).bytes_done) or 0}
  local dkey = new[4] .. '|' .. new[5]
  if old then
    if old[1] ~= new[1] then redis.call('ZREM', p .. ':ix:status:' .. old[1], id) end
    if old[2] ~= new[2] then redis.call('ZREM', p .. ':ix:strategy:' .. old[2], id) end
    if old[3] ~= new[3] then redis.call('ZREM', p .. ':ix:host:' .. old[3], id) end
    if old[4] .. '|' .. old[5] ~= dkey then redis.call('ZREM', p .. ':ix:domain:' .. old[4] .. '|' .. old[5], id) end
    redis.call('HINCRBY', st, 'wf|' .. old[2] .. '|' .. old[1] .. '|' .. old[3], -1)
  end
  redis.call('ZADD', p .. ':ix:status:' .. new[1], score, id)
  redis.call('ZADD', p .. ':ix:strategy:' .. new[2], score, id)
  redis.call('ZADD', p .. ':ix:host:' .. new[3], score, id)
  redis.call('ZADD', p .. ':ix:domain:' .. dkey, score, id)
  redis.call('ZADD', p .. ':ix:domains', 0, new[5] .. '\\t' .. new[4])
  redis.call('HINCRBY', st, 'wf|' .. new[2] .. '|' .. new[1] .. '|' .. new[3], 1)
  local delta = new[6] - ((old and num(old[6])) or 0)
  -- bytes_copied is the sum of each workflow's latest copy phase (what it always meant)
  if delta ~= 0 then redis.call('HINCRBY', st, 'bytes|' .. new[2], string.format('%d', delta)) end
  redis.call('HSET', mk, id, cjson.encode(new))
  return old
end
-- counters of one history event and of the record it was written with
local function ev_stats(p, rkey, rec, raw_ev, oldstatus)
  local st = p .. ':stats'
  local strat = rec.strategy
  if raw_ev and raw_ev ~= '' then
    local ok, ev = pcall(cjson.decode, raw_ev)
    if ok and type(ev) == 'table' then
      local name, step = ev.event, ev.step
      if name == 'step-started' and type(step) == 'string' and num(ev.ts) then
        redis.call('HSET', rkey, 'ss', step .. '\\t' .. fmt(ev.ts))
      elseif name == 'step-done' and type(step) == 'string' and num(ev.ts) then
        local ss = redis.call('HGET', rkey, 'ss')
        if ss then
          local s, t = string.match(ss, '^(.*)\\t(.*)$')
          if s == step then
            redis.call('HINCRBYFLOAT', st, 'dursum|' .. strat .. '|' .. step, ev.ts - tonumber(t))
            redis.call('HINCRBY', st, 'dur|' .. strat .. '|' .. step, 1)
            redis.call('HDEL', rkey, 'ss')
          end
        end
      elseif name == 'recovered' then
        local d = ev.decision
        if type(d) ~= 'string' or d == '' then d = 'unknown' end
        redis.call('HINCRBY', st, 'recovery|' .. d, 1)
        redis.call('HINCRBY', st, 'lease|' .. strat, 1)
      elseif name == 'reenqueued' then
        redis.call('HINCRBY', st, 'recovery|re-enqueue', 1)
      elseif name == 'step-retry' then
        redis.call('HINCRBY', st, 'retry|' .. strat .. '|step', 1)
      elseif name == 'revert-retry' then
        redis.call('HINCRBY', st, 'retry|' .. strat .. '|revert', 1)
      end
      if name == 'thawed' then
        if type(ev.by) == 'string' and string.sub(ev.by, 1, 8) == 'recovery' then
          redis.call('HINCRBY', st, 'recovery|thaw', 1)
        end
        if num(ev.frozen_seconds) then
          hist(st, 'freeze', strat, ev.frozen_seconds, FREEZE)
          redis.call('HSET', rkey, 'lt', fmt(ev.frozen_seconds))
        end
      end
    end
  end
  local lt = num(tab(tab(rec.data).last_thaw).frozen_seconds)
  if lt and redis.call('HGET', rkey, 'lt') ~= fmt(lt) then
    hist(st, 'freeze', strat, lt, FREEZE)
    redis.call('HSET', rkey, 'lt', fmt(lt))
  end
  if rec.status == 'succeeded' then
    if oldstatus ~= 'succeeded' then
      local down = num(tab(rec.result).downtime_s)
      if down then hist(st, 'down', strat, down, DOWN) end
    end
    local lk = strat .. '|' .. rec.uri .. '|' .. rec.domain
    local prev = tonumber(redis.call('HGET', p .. ':lastok', lk) or '0')
    if num(rec.updated_at) and rec.updated_at > prev then
      redis.call('HSET', p .. ':lastok', lk, fmt(rec.updated_at))
    end
  end
end
local function prefix_of(rkey, id) return string.sub(rkey, 1, #rkey - #id - 4) end
""".replace("__FREEZE__", ", ".join(map(repr, FREEZE_BUCKETS))).replace(
    "__DOWN__", ", ".join(map(repr, DOWNTIME_BUCKETS)))

# create: KEYS[1] record, KEYS[3] the id index; ARGV[1] id, ARGV[2] data, ARGV[3] event, ARGV[4] created_at
_CREATE_TAIL = """
if res[1] == 'ok' then
  local p = prefix_of(KEYS[1], ARGV[1])
  local rec = cjson.decode(ARGV[2])
  ix_apply(p, ARGV[1], rec, ARGV[4])
  ev_stats(p, KEYS[1], rec, ARGV[3], nil)
  if redis.call('ZCARD', KEYS[3]) == 1 then redis.call('SET', p .. ':ix:ready', '1') end
end
return res
"""

# save: KEYS[1] record; ARGV[1] id, ARGV[4] data, ARGV[5] event, ARGV[6] final, ARGV[7] expire_s
_SAVE_TAIL = """
if res[1] == 'ok' then
  local p = prefix_of(KEYS[1], ARGV[1])
  local rec = cjson.decode(ARGV[4])
  local score = redis.call('ZSCORE', p .. ':index', ARGV[1]) or fmt(num(rec.created_at) or 0)
  local old = ix_apply(p, ARGV[1], rec, score)
  ev_stats(p, KEYS[1], rec, ARGV[5], old and old[1])
  redis.call('HDEL', KEYS[1], 'dataz')
  if ARGV[6] == '1' and ARGV[7] ~= '0' then
    local now = tonumber(redis.call('TIME')[1])
    redis.call('ZADD', p .. ':ix:expiry', now + tonumber(ARGV[7]), ARGV[1])
  end
end
return res
"""

# reindex one record if it is still at revision ARGV[2] (KEYS: record, history)
_REINDEX = _LUA_PRELUDE + """
if redis.call('HGET', KEYS[1], 'rev') ~= ARGV[2] then return 0 end
local p = prefix_of(KEYS[1], ARGV[1])
local rec = cjson.decode(ARGV[3])
local seen = redis.call('HEXISTS', p .. ':ix:meta', ARGV[1]) == 1
ix_apply(p, ARGV[1], rec, ARGV[4])
if not seen and ARGV[5] == '1' then
  -- first sight of a record written before indexes: its history's counters
  for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do ev_stats(p, KEYS[1], rec, e, nil) end
  if rec.status == 'succeeded' then ev_stats(p, KEYS[1], rec, '', nil) end
end
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('ZADD', p .. ':ix:expiry', tonumber(redis.call('TIME')[1]) + ttl, ARGV[1]) end
return 1
"""

# drop an expired record's index entries (KEYS: record; ARGV: id); nothing if the record is back
_UNINDEX = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local p = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1] - 4)
redis.call('ZREM', p .. ':index', ARGV[1])
redis.call('ZREM', p .. ':ix:expiry', ARGV[1])
local raw = redis.call('HGET', p .. ':ix:meta', ARGV[1])
if raw then
  local m = cjson.decode(raw)
  redis.call('ZREM', p .. ':ix:status:' .. m[1], ARGV[1])
  redis.call('ZREM', p .. ':ix:strategy:' .. m[2], ARGV[1])
  redis.call('ZREM', p .. ':ix:host:' .. m[3], ARGV[1])
  redis.call('ZREM', p .. ':ix:domain:' .. m[4] .. '|' .. m[5], ARGV[1])
  redis.call('HINCRBY', p .. ':stats', 'wf|' .. m[2] .. '|' .. m[1] .. '|' .. m[3], -1)
  if type(m[6]) == 'number' and m[6] ~= 0 then
    redis.call('HINCRBY', p .. ':stats', 'bytes|' .. m[2], string.format('%d', -m[6]))
  end
  redis.call('HDEL', p .. ':ix:meta', ARGV[1])
end
return 1
"""

# compact a finished record at revision ARGV[1] whose history list holds ARGV[2] events
# (KEYS: record, history; ARGV: rev, history length, dataz, histz)
_COMPACT = """
if redis.call('HGET', KEYS[1], 'rev') ~= ARGV[1] then return 0 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'dataz', ARGV[3], 'histz', ARGV[4])
redis.call('HDEL', KEYS[1], 'data', 'ss', 'lt')
redis.call('DEL', KEYS[2])
return 1
"""


def wrap(body: str, tail: str) -> str:
    """``body`` (a record script of store.py, unchanged) followed, on success, by ``tail``."""
    return _LUA_PRELUDE + "local function body()\n" + body + "\nend\nlocal res = body()\n" + tail


CREATE_TAIL, SAVE_TAIL = _CREATE_TAIL, _SAVE_TAIL


def pack(obj: Any) -> bytes:
    return zlib.compress(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(), 6)


def unpack(raw: bytes) -> Any:
    return json.loads(zlib.decompress(raw))


def cap_history(events: list[bytes]) -> list[bytes]:
    """At most HISTORY_CAP events: the first HISTORY_HEAD, a ``compacted`` marker, the newest ones."""
    if len(events) <= HISTORY_CAP:
        return events
    tail = HISTORY_CAP - HISTORY_HEAD - 1
    dropped = len(events) - HISTORY_HEAD - tail
    marker = json.dumps({"event": "compacted", "dropped": dropped,
                         "reason": f"history of a finished workflow capped at {HISTORY_CAP} events"}).encode()
    return events[:HISTORY_HEAD] + [marker] + events[-tail:]


# -- cursors -------------------------------------------------------------------------------------
_CURSOR = re.compile(r"^(\d{1,12}(?:\.\d{1,9})?(?:e[+-]?\d{1,3})?):([0-9a-f]{16}|[\w.-]{1,64})$")


def parse_cursor(cursor: str | None, name: str = "--cursor") -> tuple[float, str] | None:
    """A cursor as ``page`` hands it out (``<score>:<id>``); InputError otherwise."""
    if cursor is None or cursor == "":
        return None
    m = _CURSOR.match(cursor)
    if not m:
        raise InputError(f"{name} {cursor[:40]!r} is not a cursor this command printed (SCORE:ID)")
    return float(m.group(1)), m.group(2)


def make_cursor(score: float, wf_id: str) -> str:
    return f"{score!r}:{wf_id}"


@dataclass
class Page:
    entries: list[Record | tuple[str, str]]  # a record, or (id, reason) for one this build cannot read
    cursor: str | None  # where the next page starts; None: this was the last


Meta = list[Any]  # [status, strategy, host, uri, domain, bytes]


class Indexes:
    """Pages of workflows, domains and counters, from the indexes the record scripts keep."""

    def __init__(self, store: "Store") -> None:
        self.store = store
        self.p = store.prefix
        self.r = store.r
        self._reindex = store.r.register_script(_REINDEX)
        self._unindex = store.r.register_script(_UNINDEX)
        self._compact = store.r.register_script(_COMPACT)

    # -- upkeep ---------------------------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self.store._call(self.r.exists, f"{self.p}:ix:ready")) or \
            not self.store._call(self.r.zcard, f"{self.p}:index")

    def ensure(self) -> None:
        """Build the indexes once if records written before them are in the store (lazy upgrade)."""
        if not self.ready():
            self.reindex()

    def reindex(self, batch: int = 500, progress: Callable[[int], None] | None = None) -> int:
        """Index every record (idempotent; counters seeded from a record's history on its first sight only).

        ZSCAN returns every id that stays in the index for the whole scan; one created meanwhile
        is indexed by its own create script."""
        first = not self.store._call(self.r.exists, f"{self.p}:ix:ready")
        done, scan = 0, 0
        while True:
            scan, items = self.store._call(self.r.zscan, f"{self.p}:index", scan, count=batch)
            done += self._reindex_chunk([(m.decode(), s) for m, s in items], first)
            if progress:
                progress(done)
            if not scan:
                break
        self.store._call(self.r.set, f"{self.p}:ix:ready", "1")
        return done

    def _reindex_chunk(self, chunk: list[tuple[str, float]], first: bool) -> int:
        pipe = self.r.pipeline(transaction=False)
        for wf_id, _ in chunk:
            pipe.hgetall(self.store._k(wf_id))
        raws = self.store._call(pipe.execute, raise_on_error=False)
        done = 0
        for (wf_id, score), raw in zip(chunk, raws, strict=True):
            if isinstance(raw, Exception) or not raw or b"rev" not in raw:
                continue
            try:
                rec = self.store._parse(wf_id, raw)
            except DomcaptureError:  # unreadable: listed as such, never indexed
                continue
            done += int(self.store._call(self._reindex, keys=[self.store._k(wf_id), self.store._k(wf_id, ":history")],
                                         args=[wf_id, str(rec.rev), json.dumps(rec.to_dict()), repr(score),
                                               "1" if first else "0"]))
        return done

    def trim(self, now: float | None = None, batch: int = 1000) -> int:
        """Drop the index entries of records that expired; returns how many."""
        now = time.time() if now is None else now
        gone = 0
        due = [m.decode() for m in self.store._call(self.r.zrangebyscore, f"{self.p}:ix:expiry", "-inf", now)]
        for wf_id in due:
            gone += int(self.store._call(self._unindex, keys=[self.store._k(wf_id)], args=[wf_id]))
        return gone

    def unindex(self, wf_id: str) -> bool:
        """Drop one gone record's index entries (False when the record exists)."""
        return bool(self.store._call(self._unindex, keys=[self.store._k(wf_id)], args=[wf_id]))

    def compact(self, rec: Record) -> bool:
        """Store a finished record and its history compressed (see module doc); False if it changed meanwhile."""
        if rec.status not in FINAL_STATUSES:
            return False
        key, hkey = self.store._k(rec.id), self.store._k(rec.id, ":history")
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(key, "histz")
        pipe.lrange(hkey, 0, -1)
        old, events = self.store._call(pipe.execute)
        merged = ([json.dumps(e, sort_keys=True, separators=(",", ":")).encode() for e in unpack(old)]
                  if old else []) + list(events)
        kept = cap_history(merged)
        histz = pack([json.loads(e) for e in kept])
        return bool(self.store._call(self._compact, keys=[key, hkey],
                                     args=[str(rec.rev), len(events), pack(rec.to_dict()), histz]))

    # -- pages ----------------------------------------------------------------------------------
    def page(self, *, status: str | None = None, strategy: str | None = None, host: str | None = None,
             domain: tuple[str, str] | None = None, match: Callable[[Meta], bool] | None = None,
             limit: int = 50, cursor: str | None = None) -> Page:
        """Up to ``limit`` workflows, newest first, from ``cursor`` on (as the previous page returned it)."""
        self.ensure()
        after = parse_cursor(cursor)
        # the most selective index given is read; the other filters are checked on P:ix:meta
        if domain is not None:
            key, implied = f"{self.p}:ix:domain:{domain[0]}|{domain[1]}", ""
        elif status is not None:
            key, implied = f"{self.p}:ix:status:{status}", "status"
        elif host is not None:
            key, implied = f"{self.p}:ix:host:{host}", "host"
        elif strategy is not None:
            key, implied = f"{self.p}:ix:strategy:{strategy}", "strategy"
        else:
            key, implied = f"{self.p}:index", ""
        filtered = match is not None or any(value is not None and name != implied for name, value in
                                            (("status", status), ("strategy", strategy), ("host", host)))

        def wanted(meta: Meta | None) -> bool:
            if meta is None:
                return False
            return ((status is None or meta[0] == status) and (strategy is None or meta[1] == strategy) and
                    (host is None or meta[2] == host) and (match is None or match(meta)))

        out: list[Record | tuple[str, str]] = []
        hi: Any = "+inf" if after is None else repr(after[0])
        offset, looked = 0, 0
        edge: tuple[float, str] | None = None  # the last index entry looked at
        found: list[tuple[str, float]] = []
        exhausted = False
        while len(found) <= limit:
            if looked >= SCAN_BUDGET:
                break
            n = max((limit + 1) * 2, 100) if filtered else limit + 9
            raw = self.store._call(self.r.zrevrangebyscore, key, hi, "-inf", offset, n, withscores=True)
            offset += len(raw)
            looked += len(raw)
            cand = [(m.decode(), s) for m, s in raw]
            if after is not None:
                cand = [(i, s) for i, s in cand if s < after[0] or (s == after[0] and i < after[1])]
            if cand:
                edge = (cand[-1][1], cand[-1][0])
            if filtered and cand:
                metas = self.store._call(self.r.hmget, f"{self.p}:ix:meta", [i for i, _ in cand])
                cand = [c for c, m in zip(cand, metas, strict=True) if wanted(json.loads(m) if m else None)]
            found += cand
            if len(raw) < n:
                exhausted = True
                break
        if len(found) > limit:
            found = found[:limit]
            nxt: tuple[float, str] | None = (found[-1][1], found[-1][0])
        else:  # a short page: the end of the index, or the scan budget (go on from where it stopped)
            nxt = None if exhausted else edge
        for wf_id, rec in self.store._load_many([i for i, _ in found]):
            if isinstance(rec, RecordNotFound):
                continue
            if isinstance(rec, Exception):
                if status is None:
                    out.append((wf_id, str(rec)))
                continue
            out.append(rec)
        return Page(out, make_cursor(*nxt) if nxt else None)

    def iter_all(self, **filters: Any) -> Iterator[Record | tuple[str, str]]:
        cursor = None
        while True:
            pg = self.page(limit=500, cursor=cursor, **filters)
            yield from pg.entries
            if not pg.cursor:
                return
            cursor = pg.cursor

    def domains(self, *, limit: int = 100, after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """A page of domains in name order: count, last workflow, last success, holder."""
        self.ensure()
        lo = "-" if not after else "(" + after
        members = [m.decode() for m in self.store._call(self.r.zrangebylex, f"{self.p}:ix:domains", lo, "+",
                                                        0, limit + 1)]
        more = len(members) > limit
        members = members[:limit]
        rows: list[dict[str, Any]] = []
        pipe = self.r.pipeline(transaction=False)
        pairs = [(m.split("\t", 1)[0], m.split("\t", 1)[-1]) for m in members]
        for name, uri in pairs:
            k = f"{self.p}:ix:domain:{uri}|{name}"
            pipe.zcard(k)
            pipe.zrevrange(k, 0, 0)
            pipe.get(self.store.domain_key(uri, name))
        res = self.store._call(pipe.execute)
        for i, (name, uri) in enumerate(pairs):
            count, newest, holder = res[3 * i], res[3 * i + 1], res[3 * i + 2]
            if not count:
                continue
            rows.append({"domain": name, "uri": uri, "count": int(count),
                         "last_id": newest[0].decode() if newest else None,
                         "holder": holder.decode() if holder else None})
        ids = [r["last_id"] for r in rows if r["last_id"]]
        recs = {i: r for i, r in self.store._load_many(ids) if isinstance(r, Record)}
        oks = self._last_ok([(r["uri"], r["domain"]) for r in rows])
        for row in rows:
            row["last"] = recs.get(row["last_id"])
            row["last_ok"] = oks.get((row["uri"], row["domain"]))
        return rows, (members[-1] if more and members else None)

    def _last_ok(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], Record]:
        """The newest succeeded workflow of each domain (looked for among its 50 newest)."""
        pipe = self.r.pipeline(transaction=False)
        for uri, name in pairs:
            pipe.zrevrange(f"{self.p}:ix:domain:{uri}|{name}", 0, 49)
        lists = self.store._call(pipe.execute)
        want: dict[str, tuple[str, str]] = {}
        for pair, ids in zip(pairs, lists, strict=True):
            if not ids:
                continue
            metas = self.store._call(self.r.hmget, f"{self.p}:ix:meta", ids)
            for i, m in zip(ids, metas, strict=True):
                if m and json.loads(m)[0] == SUCCEEDED:
                    want[i.decode()] = pair
                    break
        return {want[i]: r for i, r in self.store._load_many(list(want)) if isinstance(r, Record)}

    # -- counters -------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        self.ensure()
        return {k.decode(): float(v) for k, v in self.store._call(self.r.hgetall, f"{self.p}:stats").items()}

    def last_ok(self) -> dict[tuple[str, str, str], float]:
        """(domain, uri, strategy) -> when its last success was written."""
        out = {}
        for k, v in self.store._call(self.r.hgetall, f"{self.p}:lastok").items():
            strategy, rest = k.decode().split("|", 1)
            uri, _, domain = rest.rpartition("|")
            out[(domain, uri, strategy)] = float(v)
        return out


__all__ = ["Indexes", "Page", "wrap", "CREATE_TAIL", "SAVE_TAIL", "parse_cursor", "make_cursor", "pack", "unpack",
           "FREEZE_BUCKETS", "DOWNTIME_BUCKETS", "HISTORY_CAP"]
