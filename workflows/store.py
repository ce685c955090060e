"""Workflow records in Redis: atomic compare-and-set, history, leases, fencing.

Keys (``P`` is the configurable prefix, ``dc`` by default):

- ``P:wf:<id>``          hash: ``rev`` and ``data`` (the record's JSON)
- ``P:wf:<id>:history``  list of JSON events, appended by the same script
                         that writes the record
- ``P:wf:<id>:epoch``    fencing epoch, bumped by every lease acquisition
- ``P:wf:<id>:lease``    ``<epoch>|<owner>`` with a TTL, renewed by a heartbeat
- ``P:wf:<id>:cancel``   set by ``abort``; read by the running worker
- ``P:domain:<uri>|<name>``  id of the workflow that holds the domain
- ``P:index``            sorted set of every id by creation time
- ``P:active``           ids whose status is not final
- ``P:slot:<policy>:<member>``  a scheduled slot: the workflow id it submitted, or
                         why it submitted none (``skipped:busy:<id>``, ``coalesced:<t>``, ...)
- ``P:slots:<policy>``   sorted set of the policy's slot members by slot time
- ``P:changes``          stream of every record write (``wf``, ``rev``, ``status``, ``event``:
                         the history event or ''), appended by the same script that
                         writes the record; bounded to about ``CHANGES_MAXLEN``
                         entries; the HTTP API's event stream reads it from a cursor
- ``P:quarantine``       ids of records this build cannot read (moved out of
                         ``P:active``; the record's bytes stay in ``P:wf:<id>``
                         with the reason in its ``quarantined`` field)

A record that ends rolled back (or partially) expires ``finished_ttl`` seconds
(30 days by default) after its last write, with its history and epoch, in
that same write; ``trim_index`` then drops its id from ``P:index`` (the
recovery process runs it hourly).  A succeeded record stays: it is the
catalogue entry of a backup, and goes when the prune strategy deletes it.

Every record write runs one Lua script that checks the revision the writer
read and the writer's fencing epoch, writes the record, appends the history
event, and maintains the index, the active set and the domain lock.  A writer
whose epoch is stale (it lost its lease, e.g. after SIGSTOP/SIGCONT) changes
nothing.
"""

from __future__ import annotations

import json
import time
import zlib
import dataclasses
from typing import Any, Callable, Iterator, ParamSpec, TypeVar, cast

import redis
from redis.commands.core import Script

from . import redisconn
from .errors import (ConflictError, DomainBusy, LeaseLost, NotDurable, RecordNotFound, RecordUnreadable, SlotTaken,
                     StoreError, StoreUnavailable)
from .indexes import CREATE_TAIL, SAVE_TAIL, Indexes, unpack, wrap
from .record import FINAL_STATUSES, PARTIALLY_ROLLED_BACK, ROLLED_BACK, Record, Slot

P = ParamSpec("P")
T = TypeVar("T")

_CREATE = """
-- KEYS: record, history, index, active, domainlock [, slot, slot index], changes (always last)
-- ARGV: id, data, event, created_at, changes maxlen [, slot member, slot score, skipped-note]
-- With a slot (a scheduled run): the slot's key is claimed in this same step, so a
-- slot is either submitted once (its value is the workflow id) or recorded skipped.
if #KEYS > 6 then
  local taken = redis.call('GET', KEYS[6])
  if taken then return {'slot', taken} end
end
local holder = redis.call('GET', KEYS[5])
if holder and holder ~= ARGV[1] then
  if #KEYS > 6 then
    redis.call('SET', KEYS[6], ARGV[8] .. holder)
    redis.call('ZADD', KEYS[7], ARGV[7], ARGV[6])
  end
  return {'busy', holder}
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ARGV[1]} end
if #KEYS > 6 then
  redis.call('SET', KEYS[6], ARGV[1])
  redis.call('ZADD', KEYS[7], ARGV[7], ARGV[6])
end
redis.call('SET', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[1], 'rev', 1, 'data', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', ARGV[5], '*', 'wf', ARGV[1], 'rev', '1', 'event', ARGV[3],
             'status', cjson.decode(ARGV[2]).status)
return {'ok', '1'}
"""

_SAVE = """
-- KEYS: record, history, epoch, active, domainlock, changes
-- ARGV: id, expected_rev, writer_epoch, data, event (or ''), final ('1'/'0'), expire_s ('0': keep), changes maxlen,
--       status
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then return {'missing', ''} end
local epoch = redis.call('GET', KEYS[3]) or '0'
if epoch ~= ARGV[3] then return {'stale', epoch} end
if rev ~= ARGV[2] then return {'conflict', rev} end
local newrev = tonumber(rev) + 1
redis.call('HSET', KEYS[1], 'rev', newrev, 'data', ARGV[4])
if ARGV[5] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[5]) end
if ARGV[6] == '1' then
  redis.call('SREM', KEYS[4], ARGV[1])
  if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
  if ARGV[7] ~= '0' then
    redis.call('EXPIRE', KEYS[1], ARGV[7])
    redis.call('EXPIRE', KEYS[2], ARGV[7])
    redis.call('EXPIRE', KEYS[3], ARGV[7])
  end
else
  redis.call('SADD', KEYS[4], ARGV[1])
end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'wf', ARGV[1], 'rev', tostring(newrev), 'event', ARGV[5],
             'status', ARGV[9])
return {'ok', tostring(newrev)}
"""

_ACQUIRE = """
-- KEYS: lease, epoch   ARGV: owner, ttl_ms
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('GET', KEYS[1])} end
local e = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], tostring(e) .. '|' .. ARGV[1], 'PX', ARGV[2])
return {e, ''}
"""

_RENEW = """
-- KEYS: lease   ARGV: value, ttl_ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
return 0
"""

_EVENT = """
-- KEYS: history, epoch   ARGV: writer_epoch, event
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
"""

_QUARANTINE = """
-- KEYS: record, history, active, quarantine   ARGV: id, reason, event
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
if redis.call('TYPE', KEYS[1]).ok == 'hash' then redis.call('HSET', KEYS[1], 'quarantined', ARGV[2]) end
local ht = redis.call('TYPE', KEYS[2]).ok
if ht == 'list' or ht == 'none' then redis.call('RPUSH', KEYS[2], ARGV[3]) end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Lease:
    """A held lease: the owner, its fencing epoch, and when it was last renewed."""

    def __init__(self, store: "Store", wf_id: str, owner: str, epoch: int, ttl: float) -> None:
        self.store, self.wf_id, self.owner, self.epoch, self.ttl = store, wf_id, owner, epoch, ttl
        self.renewed_at = time.monotonic()
        self.lost = False

    @property
    def value(self) -> str:
        return f"{self.epoch}|{self.owner}"

    def renew(self) -> bool:
        if self.lost:
            return False
        # Judged on the monotonic clock first: a process that was stopped longer
        # than the TTL has lost the lease, whatever Redis would answer now.
        if time.monotonic() - self.renewed_at > self.ttl:
            self.lost = True
            return False
        # The local clock is stamped with the moment the renewal was *sent*: the
        # TTL runs in Redis from some instant after it, never before.
        sent = time.monotonic()
        ok = self.store.renew_lease(self.wf_id, self.value, self.ttl)
        if ok:
            self.renewed_at = sent
        else:
            self.lost = True
        return ok

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours (local clock + Redis)."""
        if self.lost or time.monotonic() - self.renewed_at > self.ttl:
            self.lost = True
            raise LeaseLost(f"lease on workflow {self.wf_id} (epoch {self.epoch}) lost")
        if self.store.lease_value(self.wf_id) != self.value:
            self.lost = True
            raise LeaseLost(f"lease on workflow {self.wf_id} (epoch {self.epoch}) taken over")

    def release(self) -> None:
        self.store.release_lease(self.wf_id, self.value)


#: Final records that expire (``Store.finished_ttl``): a rollback leaves nothing to
#: restore from.  A succeeded capture is a backup's catalogue entry and stays until
#: the prune strategy deletes the backup; a stopped one waits for an operator.
EXPIRING_STATUSES = (ROLLED_BACK, PARTIALLY_ROLLED_BACK)
FINISHED_TTL = 30 * 24 * 3600
LIST_BATCH = 500  # records read per round trip by ``listing``
CHANGES_MAXLEN = 100_000  # entries kept in ``P:changes`` (approximately: XADD MAXLEN ~)


class Store:
    def __init__(self, client: redis.Redis[bytes], prefix: str = "dc", finished_ttl: float = FINISHED_TTL, *,
                 replica_acks: int = 0, ack_timeout: float = 1.0) -> None:
        self.r = client
        self.prefix = prefix
        self.finished_ttl = finished_ttl
        # a durable save (an intent before an effect) returns once this many replicas hold it (WAIT);
        # 0: a single redis-server, nothing to wait for (docs/redis-ha.md)
        self.replica_acks = replica_acks
        self.ack_timeout = ack_timeout
        # the record scripts keep the indexes and counters in the same atomic step (workflows/indexes.py)
        self._create = client.register_script(wrap(_CREATE, CREATE_TAIL))
        self._save = client.register_script(wrap(_SAVE, SAVE_TAIL))
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._event = client.register_script(_EVENT)
        self._quarantine = client.register_script(_QUARANTINE)
        self.indexes = Indexes(self)

    @classmethod
    def from_url(cls, url: str, prefix: str = "dc", *, password: str | None = None,
                 username: str | None = None, lease_ttl: float = 5.0, sentinel_password: str | None = None,
                 replica_acks: int = 0, ack_timeout: float = 1.0, failover_wait: float = 20.0) -> "Store":
        """A store on ``url`` (one server, or a Sentinel set's primary: ``workflows.redisconn``).  Every
        socket wait is shorter than the lease TTL (four fifths of it): a worker blocked on a dead Redis
        gets an error before its lease could have been taken over, and its lease clock (stamped when a
        renewal is sent) has already judged it lost."""
        creds: dict[str, Any] = {}
        if password is not None:
            creds["password"] = password
        if username is not None:
            creds["username"] = username
        timeout = max(0.5, lease_ttl * 0.8)
        client = redisconn.connect(url, timeout=timeout, creds=creds, sentinel_password=sentinel_password,
                                   failover_wait=failover_wait)
        return cls(client, prefix, replica_acks=replica_acks, ack_timeout=ack_timeout)

    # -- keys ----------------------------------------------------------------
    def _k(self, wf_id: str, suffix: str = "") -> str:
        return f"{self.prefix}:wf:{wf_id}{suffix}"

    @property
    def changes_key(self) -> str:
        return f"{self.prefix}:changes"

    def domain_key(self, uri: str, domain: str) -> str:
        return f"{self.prefix}:domain:{uri}|{domain}"

    def _call(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        try:
            return fn(*args, **kw)
        except redis.AuthenticationError as exc:
            raise StoreUnavailable(f"redis refused the credentials: {exc} (see DOMCAPTURE_REDIS_PASSWORD_FILE)") \
                from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"redis unreachable: {exc}") from exc
        except redis.ResponseError as exc:
            if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise StoreUnavailable(f"redis refused: {exc}") from exc
            raise StoreError(f"redis refused a command: {exc}") from exc

    def ping(self) -> None:
        self._call(self.r.ping)

    # -- records -------------------------------------------------------------
    @staticmethod
    def event(rec: Record, event: str, **detail: Any) -> dict[str, Any]:
        return {"ts": time.time(), "event": event, "state": rec.state, "status": rec.status,
                "mode": rec.mode, "worker": rec.worker, "epoch": rec.epoch, **detail}

    def create(self, rec: Record, event: str = "submitted", slot: Slot | None = None, **detail: Any) -> None:
        """Write a new record and take its domain; with ``slot``, claim the slot in the same step.

        A slot already claimed raises SlotTaken; a busy domain records the slot as skipped
        (``skipped:busy:<holder>``) and raises DomainBusy.
        """
        rec.rev = 1
        data = _dumps(rec.to_dict())
        keys = [self._k(rec.id), self._k(rec.id, ":history"), f"{self.prefix}:index",
                f"{self.prefix}:active", self.domain_key(rec.uri, rec.domain)]
        args: list[Any] = [rec.id, data, _dumps(self.event(rec, event, **detail)), rec.created_at, CHANGES_MAXLEN]
        if slot is not None:
            keys += [self.slot_key(slot), self.slot_index(slot.policy)]
            args += [slot.member, slot.at, "skipped:busy:"]
        keys.append(self.changes_key)
        # durable: a submit acknowledged only once a replica holds it (with replicas; docs/redis-ha.md)
        res = self._call(self._script, self._create, True, keys=keys, args=args)
        tag, val = res[0].decode(), res[1].decode()
        if tag == "slot":
            raise SlotTaken(f"slot {slot.member if slot else ''} of policy {slot.policy if slot else ''} "
                            f"is already {val}")
        if tag == "busy":
            raise DomainBusy(f"domain {rec.domain!r} is busy with workflow {val}; "
                             f"wait for it, or see 'domcapture show {val}'")
        if tag != "ok":
            raise ConflictError(f"workflow {rec.id} already exists")

    def create_many(self, recs: list[tuple[Record, Slot]], event: str = "submitted",
                    **detail: Any) -> list[tuple[str, str]]:
        """``create`` of many scheduled records in one round trip: (tag, value) per record.

        Each record runs the same create script as ``create``, so each slot is still claimed in the
        step that writes its record: ``ok``, ``slot`` (taken, value: its outcome), ``busy`` (recorded
        skipped, value: the holder) or ``exists``.  A pipeline, not a transaction: a crash part way leaves
        some slots claimed and the rest free, each whole.  With replicas, one WAIT covers the batch.
        """
        if not recs:
            return []
        pipe = self.r.pipeline(transaction=False)
        for rec, slot in recs:
            rec.rev = 1
            keys = [self._k(rec.id), self._k(rec.id, ":history"), f"{self.prefix}:index",
                    f"{self.prefix}:active", self.domain_key(rec.uri, rec.domain), self.slot_key(slot),
                    self.slot_index(slot.policy), self.changes_key]
            # the fields as they are (a new record holds only JSON values): what to_dict() would write,
            # without its deep copy, the largest cost of a batch on the scheduler's CPU
            data = _dumps({f: getattr(rec, f) for f in _RECORD_FIELDS})
            args: list[Any] = [rec.id, data, _dumps(self.event(rec, event, **detail)),
                               rec.created_at, CHANGES_MAXLEN, slot.member, slot.at, "skipped:busy:"]
            self._create(keys=keys, args=args, client=pipe)
        if self.replica_acks > 0:
            pipe.wait(self.replica_acks, max(1, int(self.ack_timeout * 1000)))
        res = self._call(pipe.execute)
        out = [(r[0].decode(), r[1].decode()) for r in res[:len(recs)]]
        if self.replica_acks > 0 and int(res[-1]) < self.replica_acks and any(t == "ok" for t, _ in out):
            raise NotDurable(f"no replica acknowledged the batch within {self.ack_timeout:g} s "
                             f"({res[-1]} of {self.replica_acks}); its slots are claimed, their jobs wait")
        return out

    def load(self, wf_id: str) -> Record:
        """The record, or RecordNotFound, or RecordUnreadable with the reason (never another error)."""
        key = self._k(wf_id)
        try:
            raw = self._call(self.r.hgetall, key)
        except StoreError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            kind = self._call(self.r.type, key).decode()
            raise RecordUnreadable(f"workflow {wf_id}: {key} is a Redis {kind}, not a workflow record") from None
        return self._parse(wf_id, raw)

    @staticmethod
    def _parse(wf_id: str, raw: dict[bytes, bytes]) -> Record:
        if not raw:
            raise RecordNotFound(f"no workflow with id {wf_id!r}")
        if b"quarantined" in raw:
            raise RecordUnreadable(f"workflow {wf_id} is quarantined: "
                                   f"{raw[b'quarantined'].decode(errors='replace')}")
        try:
            doc = json.loads(raw[b"data"]) if b"data" in raw or b"dataz" not in raw else unpack(raw[b"dataz"])
            rev = int(raw[b"rev"])
        except KeyError as exc:
            raise RecordUnreadable(f"workflow {wf_id}: record has no {exc.args[0].decode()!r} field") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordUnreadable(f"workflow {wf_id}: damaged record ({type(exc).__name__}: {exc})") from None
        rec = Record.from_dict(doc)
        if rec.id != wf_id:
            raise RecordUnreadable(f"workflow {wf_id}: the record inside says id {rec.id!r}")
        rec.rev = rev
        return rec

    def _load_many(self, ids: list[str]) -> Iterator[tuple[str, Record | Exception]]:
        """``load`` for many ids in one round trip; a record the pipeline cannot read goes through ``load``."""
        pipe = self.r.pipeline(transaction=False)
        for wf_id in ids:
            pipe.hgetall(self._k(wf_id))
        for wf_id, raw in zip(ids, self._call(pipe.execute, raise_on_error=False), strict=True):
            try:
                yield wf_id, (self.load(wf_id) if isinstance(raw, Exception) else self._parse(wf_id, raw))
            except (RecordNotFound, RecordUnreadable) as exc:
                yield wf_id, exc

    def quarantine(self, wf_id: str, reason: str, by: str = "") -> None:
        """Move an unreadable record out of the active set; its bytes stay, with the reason beside them.

        It keeps its domain claim: nothing knows what it left on the domain.
        """
        ev = {"ts": time.time(), "event": "quarantined", "state": "-", "status": "quarantined", "mode": "-",
              "worker": by or None, "epoch": 0, "reason": reason}
        self._call(self._quarantine, keys=[self._k(wf_id), self._k(wf_id, ":history"), f"{self.prefix}:active",
                                           f"{self.prefix}:quarantine"], args=[wf_id, reason, _dumps(ev)])

    def quarantined(self) -> dict[str, str]:
        """id -> reason, for every quarantined record."""
        out = {}
        for raw in self._call(self.r.smembers, f"{self.prefix}:quarantine"):
            wf_id = raw.decode()
            why = self._call(self.r.hget, self._k(wf_id), "quarantined") if \
                self._call(self.r.type, self._k(wf_id)).decode() == "hash" else None
            out[wf_id] = why.decode(errors="replace") if why else "unreadable"
        return out

    def save(self, rec: Record, event: str | None, *, epoch: int, durable: bool = False, **detail: Any) -> None:
        """Compare-and-set the record (and append ``event`` to its history).

        Refused with LeaseLost when ``epoch`` is not the current fencing epoch,
        with ConflictError when the record changed since it was loaded.  ``durable``
        (an intent before an effect): with ``replica_acks``, NotDurable unless that many
        replicas hold the write (the record is then written, at its new revision).
        """
        rec.updated_at = time.time()
        rec.epoch = epoch
        expected = rec.rev
        rec.rev = expected + 1
        ev = _dumps(self.event(rec, event, **detail)) if event else ""
        res = self._call(self._script, self._save, durable,
                         keys=[self._k(rec.id), self._k(rec.id, ":history"), self._k(rec.id, ":epoch"),
                               f"{self.prefix}:active", self.domain_key(rec.uri, rec.domain), self.changes_key],
                         args=[rec.id, expected, epoch, _dumps(rec.to_dict()), ev,
                               "1" if rec.status in FINAL_STATUSES else "0",
                               int(self.finished_ttl) if rec.status in EXPIRING_STATUSES else 0, CHANGES_MAXLEN,
                               rec.status])
        tag, val = res[0].decode(), res[1].decode()
        if tag == "ok":
            if rec.status in FINAL_STATUSES:
                self._compact(rec)
            return
        rec.rev = expected
        if tag == "stale":
            raise LeaseLost(f"workflow {rec.id}: write with epoch {epoch} refused, current epoch is {val}")
        if tag == "conflict":
            raise ConflictError(f"workflow {rec.id}: revision {expected} is stale (now {val})")
        raise RecordNotFound(f"no workflow with id {rec.id!r}")

    def _script(self, script: Script, durable: bool, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``; when ``durable`` and replicas are configured, WAIT for them on the same
        connection (WAIT counts the replicas that hold this connection's last write), one round trip."""
        if not durable or self.replica_acks <= 0:
            return script(keys=keys, args=args)
        known = cast(Any, script)  # redis-py's Script: .sha and .script (not in the stubs)
        for _ in range(2):
            pipe = self.r.pipeline(transaction=False)
            pipe.evalsha(known.sha, len(keys), *keys, *args)
            pipe.wait(self.replica_acks, max(1, int(self.ack_timeout * 1000)))
            res, acks = pipe.execute(raise_on_error=False)
            if isinstance(res, redis.exceptions.NoScriptError):  # a new primary has not seen the script yet
                cast(Any, self.r).script_load(known.script)
                continue
            if isinstance(res, Exception):
                raise res
            if res[0] == b"ok" and int(acks) < self.replica_acks:
                raise NotDurable(f"no replica acknowledged the write within {self.ack_timeout:g} s "
                                 f"({acks} of {self.replica_acks}); the effect waits until one does")
            return res
        raise StoreError("redis does not keep the store's scripts (SCRIPT LOAD did not hold)")

    def append_event(self, wf_id: str, event: str, *, epoch: int, **detail: Any) -> bool:
        """Append an event to a workflow's history without touching the record (fenced by ``epoch``)."""
        ev = _dumps({"ts": time.time(), "event": event, "epoch": epoch, **detail})
        return bool(self._call(self._event, keys=[self._k(wf_id, ":history"), self._k(wf_id, ":epoch")],
                               args=[epoch, ev]))

    def _compact(self, rec: Record) -> None:
        """A finished workflow's record and history, compressed (workflows/indexes.py); best effort: a
        record left whole is still read whole."""
        try:
            self.indexes.compact(rec)
        except StoreError:
            pass

    def history(self, wf_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self._k(wf_id), "histz")  # a finished workflow's compacted history, then what came after
        pipe.lrange(self._k(wf_id, ":history"), 0, -1)
        packed, events = self._call(pipe.execute, raise_on_error=False)
        if isinstance(events, Exception):
            raise StoreError(f"redis refused a command: {events}")
        if packed and not isinstance(packed, Exception):
            try:
                out += [ev for ev in unpack(packed) if isinstance(ev, dict)]
            except (ValueError, zlib.error) as exc:
                out.append({"event": "unreadable", "raw": f"compacted history: {exc}"})
        for x in events:
            try:
                ev = json.loads(x)
                if not isinstance(ev, dict):
                    raise ValueError("not an object")
            except ValueError:
                ev = {"event": "unreadable", "raw": x.decode(errors="replace")[:200]}
            out.append(ev)
        return out

    def changes(self, after: str = "0", count: int = 100, block_ms: int | None = None) -> list[dict[str, Any]]:
        """Record writes after the stream id ``after`` (``0``: from the oldest kept), oldest first:
        ``{"cursor", "wf", "rev", "event", "status"}`` (the record's status after that write); with
        ``block_ms``, wait that long for one to come."""
        raw = self._call(self.r.xread, {self.changes_key: after}, count=count, block=block_ms)
        out = []
        for _key, entries in raw or []:
            for entry_id, fields in entries:
                ev = fields.get(b"event", b"")
                try:
                    event = json.loads(ev) if ev else None
                except ValueError:
                    event = None
                out.append({"cursor": entry_id.decode(), "wf": fields.get(b"wf", b"").decode(errors="replace"),
                            "rev": int(fields.get(b"rev", b"0") or 0), "event": event,
                            "status": fields.get(b"status", b"").decode(errors="replace") or None})
        return out

    def changes_oldest(self) -> str | None:
        """The id of the oldest change still kept (None: none kept)."""
        first = self._call(self.r.xrange, self.changes_key, "-", "+", count=1)
        return first[0][0].decode() if first else None

    def changes_newest(self) -> str | None:
        """The id of the newest change (None: none kept)."""
        last = self._call(self.r.xrevrange, self.changes_key, "+", "-", count=1)
        return last[0][0].decode() if last else None

    def trim_index(self, batch: int = 1000) -> int:
        """Drop from the indexes the ids whose record expired (``P:ix:expiry`` says which); returns how many."""
        return self.indexes.trim(batch=batch)

    def ids(self) -> list[str]:
        return [x.decode() for x in self._call(self.r.zrange, f"{self.prefix}:index", 0, -1)]

    def active_ids(self) -> list[str]:
        return sorted(x.decode() for x in self._call(self.r.smembers, f"{self.prefix}:active"))

    def records(self, status: str | None = None) -> Iterator[Record]:
        """Every readable record (unreadable ones: see ``listing``)."""
        for entry in self.listing(status):
            if isinstance(entry, Record):
                yield entry

    def listing(self, status: str | None = None) -> Iterator[Record | tuple[str, str]]:
        """Every record, or ``(id, reason)`` for one this build cannot read (status ``quarantined``)."""
        ids = self.ids()
        for i in range(0, len(ids), LIST_BATCH):
            for wf_id, rec in self._load_many(ids[i:i + LIST_BATCH]):
                if isinstance(rec, RecordNotFound):
                    continue
                if isinstance(rec, Exception):
                    if status in (None, "quarantined"):
                        yield wf_id, str(rec)
                    continue
                if status is None or rec.status == status:
                    yield rec

    # -- scheduled slots ------------------------------------------------------------
    def slot_key(self, slot: Slot) -> str:
        return f"{self.prefix}:slot:{slot.policy}:{slot.member}"

    def slot_index(self, policy: str) -> str:
        return f"{self.prefix}:slots:{policy}"

    def mark_slot(self, slot: Slot, outcome: str) -> bool:
        """Record a slot that submits nothing (skipped, coalesced, refused); False if it was taken already."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.slot_key(slot), outcome, nx=True)
        pipe.zadd(self.slot_index(slot.policy), {slot.member: slot.at}, nx=True)
        res = self._call(pipe.execute)
        return bool(res[0])

    def mark_slots(self, marks: list[tuple[Slot, str]]) -> list[bool]:
        """``mark_slot`` of many slots in one round trip (one MULTI): True where the slot was free."""
        if not marks:
            return []
        pipe = self.r.pipeline(transaction=True)
        for slot, outcome in marks:
            pipe.set(self.slot_key(slot), outcome, nx=True)
            pipe.zadd(self.slot_index(slot.policy), {slot.member: slot.at}, nx=True)
        res = self._call(pipe.execute)
        return [bool(x) for x in res[0::2]]

    def slot_claims(self, slots: list[Slot], uri: str) -> list[tuple[str | None, str | None]]:
        """Per slot, in one round trip: its recorded outcome, and the workflow holding its domain on ``uri``."""
        if not slots:
            return []
        keys = [self.slot_key(s) for s in slots] + [self.domain_key(uri, s.domain) for s in slots]
        vals = [v.decode() if v is not None else None for v in self._call(self.r.mget, keys)]
        return list(zip(vals[:len(slots)], vals[len(slots):], strict=True))

    def slot_value(self, slot: Slot) -> str | None:
        val = self._call(self.r.get, self.slot_key(slot))
        return val.decode() if val else None

    def slots(self, policy: str, since: float = 0.0) -> list[tuple[str, float, str]]:
        """(member, slot time, outcome) of every recorded slot of ``policy`` from ``since`` on."""
        members = self._call(self.r.zrangebyscore, self.slot_index(policy), since, "+inf", withscores=True)
        keys = [f"{self.prefix}:slot:{policy}:{m.decode()}" for m, _ in members]
        values = self._call(self.r.mget, keys) if keys else []
        return [(m.decode(), float(at), v.decode() if v else "?") for (m, at), v in zip(members, values, strict=True)]

    def domain_holder(self, uri: str, domain: str) -> str | None:
        val = self._call(self.r.get, self.domain_key(uri, domain))
        return val.decode() if val else None

    # -- leases and fencing --------------------------------------------------------
    def acquire_lease(self, wf_id: str, owner: str, ttl: float) -> Lease | None:
        res = self._call(self._acquire, keys=[self._k(wf_id, ":lease"), self._k(wf_id, ":epoch")],
                         args=[owner, int(ttl * 1000)])
        epoch = int(res[0])
        if epoch == 0:
            return None
        return Lease(self, wf_id, owner, epoch, ttl)

    def renew_lease(self, wf_id: str, value: str, ttl: float) -> bool:
        return bool(self._call(self._renew, keys=[self._k(wf_id, ":lease")], args=[value, int(ttl * 1000)]))

    def release_lease(self, wf_id: str, value: str) -> None:
        self._call(self._release, keys=[self._k(wf_id, ":lease")], args=[value])

    def lease_value(self, wf_id: str) -> str | None:
        val = self._call(self.r.get, self._k(wf_id, ":lease"))
        return val.decode() if val else None

    def lease_ttl(self, wf_id: str) -> float | None:
        ms = self._call(self.r.pttl, self._k(wf_id, ":lease"))
        return ms / 1000 if ms and ms > 0 else None

    # -- cancellation -----------------------------------------------------------------
    def request_cancel(self, wf_id: str, reason: str) -> None:
        self._call(self.r.set, self._k(wf_id, ":cancel"), reason)

    def cancel_requested(self, wf_id: str) -> str | None:
        val = self._call(self.r.get, self._k(wf_id, ":cancel"))
        return val.decode() if val else None

    def clear_cancel(self, wf_id: str) -> None:
        self._call(self.r.delete, self._k(wf_id, ":cancel"))
