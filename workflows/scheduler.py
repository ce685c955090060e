"""The durable scheduler: turns policies into submitted workflows, each slot exactly once.

A slot is (policy, host, domain, slot time, kind).  Its Redis key is claimed in
the same Lua step that creates the workflow record (``Store.create`` with a
slot), so two schedulers, or one restarted after a crash at any point, never
submit a slot twice: the loser gets SlotTaken and moves on.  A slot that
submits nothing is recorded too: ``skipped:busy:<id>`` when another capture
holds the domain, ``refused:<why>`` when the submission was refused,
``coalesced:...`` for the windows a stopped scheduler missed.

Per policy, a cursor (``P:sched:<policy>`` field ``cursor``) holds the last
slot time handled.  A tick submits only the newest slot in ``(cursor, now]``:
a scheduler that was down for three nights submits one catch-up run per
domain, and records the missed windows as coalesced into it.  The cursor only
moves forward (a Lua max), after every domain of the slot was handled; a crash
before that re-runs the tick, and the slot keys make that harmless.

A host's domains are submitted in batches (``Captures.submit_slots``: a few
round trips per batch, each slot still claimed by its own create script).
A scheduler takes a batch with a lease (``P:sched:<policy>:batch:<t>:<host>:<n>``)
and marks it done after, so schedulers side by side share a slot's work; a
dead scheduler's batch is taken again once its lease lapses, and the cursor
waits until every batch of the slot is done.

The clock is a callable, so tests and benches advance simulated days at once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis

from .hypervisor.base import Hypervisor
from .errors import DomainBusy, DomcaptureError, HypervisorError, RecordNotFound, SlotTaken, StoreUnavailable
from .policy import Policy, PolicyStore, check_stored
from .record import FINAL_STATUSES, SUCCEEDED, Slot
from .service import Captures, SlotSubmission

log = logging.getLogger("domcapture.scheduler")

_ADVANCE = """
-- KEYS: the policy's scheduler hash   ARGV: cursor field, slot time.  Only ever forward.
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return 1 end
return 0
"""

PRUNE = "prune"
BATCH = 500  # slots submitted per batch: a handful of round trips each, whatever its size
BATCH_TTL = 30.0  # seconds a scheduler holds a batch before another may take it over
BATCH_DONE_TTL = 3 * 86400
VERIFY_ALL = "*"


@dataclass
class Outcome:
    slot: Slot
    what: str  # submitted:<id> | taken | skipped:busy:<id> | refused:<why> | coalesced:<n>
    at: float  # the clock when it was decided (the schedule lag is at - slot.at)


def _xml_of(hv: Hypervisor, name: str) -> Callable[[], str]:
    return lambda: hv.domain_xml(name)


class Scheduler:
    def __init__(self, captures: Captures, policies: PolicyStore, *, clock: Callable[[], float] = time.time,
                 owner: str = "scheduler", crash_hook: Callable[[str], None] | None = None,
                 batch: int = BATCH, batch_ttl: float = BATCH_TTL) -> None:
        self.captures = captures
        self.crash_hook = crash_hook  # fault injection: called at "submitted:<member>" and "cursor:<policy>"
        self.store = captures.store
        self.policies = policies
        self.clock = clock
        self.owner = owner
        self.batch = max(1, batch)
        self.batch_ttl = batch_ttl
        self.r = self.store.r
        self.prefix = self.store.prefix
        self._advance = self.r.register_script(_ADVANCE)

    def _k(self, policy: str, suffix: str = "") -> str:
        return f"{self.prefix}:sched:{policy}{suffix}"

    # -- one pass ---------------------------------------------------------------------
    def tick(self) -> list[Outcome]:
        """Handle every due slot of every policy, then the prunes and verifications they left.

        A policy this pass cannot evaluate (unreadable, stored before a check existed, or broken since)
        is marked errored (``PolicyStore.errors``: ``policy list``, ``domcapture_policy_errors``) and
        skipped; every other policy goes on.  Only the store itself failing stops the pass.
        """
        out: list[Outcome] = []
        for name in self.policies.names():
            try:
                policy = self.policies.get(name)
                check_stored(policy, self.captures.definitions, self.clock())
                done = self._captures(policy) + self._verifies(policy)
            except RecordNotFound:
                continue  # deleted since the names were read
            except (redis.RedisError, StoreUnavailable):
                raise
            except Exception as exc:  # one policy's fault must not stop the others
                out.append(self._errored(name, exc))
                continue
            self.policies.clear_error(name)
            out += done
        out += self._prunes()
        return out

    def _errored(self, name: str, exc: Exception) -> Outcome:
        why = str(exc) if isinstance(exc, DomcaptureError) else f"{type(exc).__name__}: {exc}"
        now = self.clock()
        if self.policies.mark_error(name, why, now):
            log.error("policy %s cannot be evaluated, skipped until it is fixed: %s", name, why)
        return Outcome(Slot(name, VERIFY_ALL, VERIFY_ALL, now, "policy"), f"error:{why}", now)

    def _cursor(self, policy: Policy, key: str = "cursor") -> float | None:
        raw = self.r.hget(self._k(policy.name), key)
        return float(raw) if raw is not None else None

    def _due(self, policy: Policy, cron: str, key: str) -> tuple[float, list[float]] | None:
        """The newest due slot time and the older ones it coalesces; None when nothing is due."""
        now = self.clock()
        cursor = self._cursor(policy, key)
        if cursor is None:
            # First sight of the policy: the schedule starts now (no backfill of its past).
            self.r.hsetnx(self._k(policy.name), key, now)
            return None
        due = policy.slots_between(cursor, now, cron)
        if not due:
            return None
        return due[-1], due[:-1]

    def _move(self, policy: Policy, key: str, to: float) -> None:
        self._advance(keys=[self._k(policy.name)], args=[key, to])

    def _domains(self, policy: Policy, host: str, uri: str) -> list[str]:
        hv = self.captures.hypervisor_factory(uri)
        try:
            return [n for n in hv.list_domains() if policy.selects(n, _xml_of(hv, n))]
        finally:
            hv.close()

    def _captures(self, policy: Policy) -> list[Outcome]:
        found = self._due(policy, policy.cron, "cursor")
        if found is None:
            return []
        at, missed = found
        out: list[Outcome] = []
        pending = False
        if missed:
            marker = Slot(policy.name, VERIFY_ALL, VERIFY_ALL, at, "catch-up")
            what = f"coalesced:{len(missed)} missed slot(s) from {int(missed[0])} into {int(at)}"
            self.store.mark_slot(marker, what)
            out.append(Outcome(marker, what, self.clock()))
        for host, uri in sorted(policy.hosts.items()):
            try:
                names = self._domains(policy, host, uri)
            except HypervisorError as exc:
                out.append(self._unreachable(policy, host, at, exc))
                continue
            done, waiting = self._batches(policy, host, uri, at, names)
            out += done
            pending = pending or waiting
        if pending:  # another scheduler holds a batch of this slot: the cursor waits until it is done
            return out
        self._move(policy, "cursor", at)
        self._boundary(f"cursor:{policy.name}")
        return out

    def _unreachable(self, policy: Policy, host: str, at: float, exc: HypervisorError) -> Outcome:
        marker = Slot(policy.name, host, VERIFY_ALL, at)
        what = f"refused:host {host} unreachable: {exc}"
        self.store.mark_slot(marker, what)
        return Outcome(marker, what, self.clock())

    def _batches(self, policy: Policy, host: str, uri: str, at: float, names: list[str]) -> tuple[list[Outcome], bool]:
        """Submit the host's domains of the slot at ``at`` batch by batch; True if another holds a batch.

        A batch is taken with a lease (``P:sched:<policy>:batch:<at>:<host>:<n>``, SET NX with a TTL)
        so schedulers running side by side share a slot's work; a batch whose lease lapsed (its scheduler
        died) is taken again, and the slot claims in the store make its re-run submit nothing twice.
        """
        out: list[Outcome] = []
        waiting = False
        names = sorted(names)
        for n in range(0, len(names), self.batch):
            key = self._k(policy.name, f":batch:{int(at)}:{host}:{n // self.batch}")
            if not self.r.set(key, self.owner, nx=True, px=int(self.batch_ttl * 1000)):
                waiting = waiting or self.r.get(key) != b"done"
                continue
            try:
                out += self._submit_captures(policy, [Slot(policy.name, host, d, at)
                                                      for d in names[n:n + self.batch]], uri)
            except HypervisorError as exc:  # the host went away after its domains were listed
                out.append(self._unreachable(policy, host, at, exc))
            self.r.set(key, "done", ex=BATCH_DONE_TTL)
        return out, waiting

    def _boundary(self, label: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(label)

    def _params(self, policy: Policy, slots: list[Slot]) -> list[dict[str, Any]]:
        base = dict(policy.options)
        if policy.target:
            base["target"] = policy.target
        if not (policy.strategy == "direct-backup" and (policy.full_weekday or policy.full_every)):
            return [dict(base) for _ in slots]
        counts = self.r.hmget(self._k(policy.name, ":incrementals"), [f"{s.host}|{s.domain}" for s in slots])
        return [{**base, "incremental": not policy.wants_full(s.at, int(raw) if raw is not None else None)}
                for s, raw in zip(slots, counts, strict=True)]

    def _limits(self, policy: Policy, host: str) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if policy.per_host:
            limits["host"] = [host, policy.per_host]
        if policy.per_target and policy.target:
            limits["target"] = [policy.target, policy.per_target]
        return {"limits": limits, "policy": policy.name, "policy_version": policy.version}

    def _submit_captures(self, policy: Policy, slots: list[Slot], uri: str) -> list[Outcome]:
        """One batch of a host's slots: submitted together, then their bookkeeping in one pipeline."""
        params = self._params(policy, slots)
        data = self._limits(policy, slots[0].host)
        whats = self.captures.submit_slots(policy.strategy, uri,
                                           [SlotSubmission(s, p, data) for s, p in zip(slots, params, strict=True)],
                                           boundary=self.crash_hook)
        pipe = self.r.pipeline(transaction=False)
        prunes = bool(policy.retention) and PRUNE in self.captures.definitions
        for slot, p, what in zip(slots, params, whats, strict=True):
            if what.startswith("refused:"):
                log.warning("slot %s of policy %s: %s", slot.member, slot.policy, what)
            if not what.startswith("submitted:"):
                continue
            wf_id = what.split(":", 1)[1]
            field = f"{slot.host}|{slot.domain}"
            if "incremental" in p:
                if p["incremental"]:
                    pipe.hincrby(self._k(policy.name, ":incrementals"), field, 1)
                else:
                    pipe.hset(self._k(policy.name, ":incrementals"), field, 0)
            pipe.hset(self._k(policy.name, ":last"), field, wf_id)
            if prunes:
                pipe.zadd(f"{self.prefix}:sched:prune-pending",
                          {json.dumps([policy.name, slot.host, slot.domain, slot.at, wf_id, uri]): slot.at})
        pipe.execute()
        now = self.clock()
        return [Outcome(slot, what, now) for slot, what in zip(slots, whats, strict=True)]

    def _submit(self, strategy: str, slot: Slot, uri: str, params: dict[str, Any], data: dict[str, Any]) -> str:
        try:
            rec = self.captures.submit(strategy, slot.domain, uri, params, slot=slot, data=data)
        except SlotTaken:
            return "taken"
        except DomainBusy:
            return self.store.slot_value(slot) or "skipped:busy"
        except DomcaptureError as exc:
            log.warning("slot %s of policy %s: %s", slot.member, slot.policy, exc)
            return self.store.slot_value(slot) or f"refused:{exc}"
        return f"submitted:{rec.id}"

    # -- after the captures -------------------------------------------------------------------
    def _prunes(self) -> list[Outcome]:
        """A policy with a retention prunes each domain once its capture of a slot has ended."""
        out: list[Outcome] = []
        key = f"{self.prefix}:sched:prune-pending"
        for raw in self.r.zrange(key, 0, -1):
            name, host, domain, at, wf_id, uri = json.loads(raw)
            try:
                rec = self.store.load(wf_id)
                policy = self.policies.get(name)
            except RecordNotFound:
                self.r.zrem(key, raw)
                continue
            except (DomcaptureError, ValueError):  # an unreadable policy (marked errored): kept for its fix
                continue
            if rec.status not in FINAL_STATUSES:
                continue
            slot = Slot(name, host, domain, at, PRUNE)
            what = self._submit(PRUNE, slot, uri, {"retention": dict(policy.retention), "target": policy.target,
                                                    "timezone": policy.timezone},
                                self._limits(policy, host))
            if what.startswith("skipped:busy"):
                self.r.delete(self.store.slot_key(slot))  # retried at the next tick: a prune is not a capture
                continue
            self.r.zrem(key, raw)
            out.append(Outcome(slot, what, self.clock()))
        return out

    def _verifies(self, policy: Policy) -> list[Outcome]:
        """At a verify slot, re-read each domain's newest succeeded capture of this policy."""
        if not policy.verify_cron:
            return []
        found = self._due(policy, policy.verify_cron, "verify_cursor")
        if found is None:
            return []
        at, _ = found
        out: list[Outcome] = []
        for field, wf_id in sorted(self.r.hgetall(self._k(policy.name, ":last")).items()):
            host, domain = field.decode().split("|", 1)
            slot = Slot(policy.name, host, domain, at, "verify")
            if not self.store.mark_slot(slot, f"verifying:{wf_id.decode()}"):
                continue
            try:
                rec = self.store.load(wf_id.decode())
                if rec.status != SUCCEEDED:
                    what = f"skipped:{rec.id} is {rec.status}"
                else:
                    checks = self.captures.verify(rec.id)
                    what = f"{'verified' if all(c['ok'] for c in checks) else 'verify-failed'}:{rec.id}"
            except DomcaptureError as exc:
                what = f"refused:{exc}"
            self.r.set(self.store.slot_key(slot), what)
            out.append(Outcome(slot, what, self.clock()))
        self._move(policy, "verify_cursor", at)
        return out

    # -- the daemon ----------------------------------------------------------------------------
    def run_forever(self, interval: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
        while True:
            for o in self.tick():
                log.info("%s %s: %s", o.slot.policy, o.slot.member, o.what)
            sleep(interval)
