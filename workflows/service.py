"""What callers do with workflows: submit, inspect, resume, roll back, abort, recover.

This is the library's front door; the CLI and the RQ runtime call it with
typed values.  It never imports ``rq``: enqueueing is a callable handed in by
the runtime, and a record is always written *before* its job is enqueued, so
a crash in between leaves a ``queued`` record that recovery enqueues again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import holds, quiesce, strategies
from .definition import Definition
from .checkpoints import CheckpointStore
from .effects import Inspect
from .engine import begin_rollback, definition_problem, requeue, stop_for_definition
from .errors import DomainBusy, DomcaptureError, InvalidOperation, SlotTaken, StoreUnavailable
from .hypervisor.base import Hypervisor, read_only
from .record import FINAL_STATUSES, FORWARD, NEEDS_ATTENTION, QUEUED, RUNNING, Record, Slot, new_id
from .store import Lease, Store
from .strategies import foreign
from .verify import outcome, verify_files

Enqueue = Callable[[Record], None]


@dataclass(frozen=True)
class SlotSubmission:
    """One scheduled slot of a batch: its slot, the capture's parameters and the record's data."""

    slot: Slot
    params: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)


class Captures:
    def __init__(self, store: Store, hypervisor_factory: Callable[[str], Hypervisor], enqueue: Enqueue, *,
                 definitions: dict[str, Definition] | None = None, lease_ttl: float = 5.0,
                 enqueue_new: Callable[[list[Record]], None] | None = None) -> None:
        self.store = store
        self.hypervisor_factory = hypervisor_factory
        self.enqueue = enqueue
        # the first jobs of a batch of records just created, at once (the runtime: one RQ pipeline)
        self.enqueue_new = enqueue_new or self._enqueue_each
        self.definitions = definitions or strategies.DEFINITIONS
        self.lease_ttl = lease_ttl
        # who asks when a call names nobody: the CLI sets its OS user and host, the console passes ``by``
        self.requester = "operator"

    def _enqueue_each(self, recs: list[Record]) -> None:
        for rec in recs:
            self.enqueue(rec)

    def definition(self, name: str) -> Definition:
        if name not in self.definitions:
            return strategies.get(name)  # raises UnknownStrategy with the list of names
        return self.definitions[name]

    def _inspect(self, hv: Hypervisor) -> Inspect:
        """What validation and verification may use: a hypervisor refusing every change, the checkpoints."""
        return Inspect(read_only(hv), CheckpointStore(self.store))

    # -- submit --------------------------------------------------------------------
    def submit(self, strategy: str, domain: str, uri: str, params: dict[str, Any], *,
               slot: Slot | None = None, data: dict[str, Any] | None = None, by: str | None = None) -> Record:
        """Validate everything, then record and enqueue.  Bad input changes nothing.

        With ``slot`` (a scheduled run) the slot is claimed in the record's own create:
        SlotTaken if it was already; a busy domain or a refused submission is recorded
        on the slot (skipped / refused) before the error is raised, so it is never lost.
        """
        defn = self.definition(strategy)
        self.store.ping()
        if slot is not None and self.store.slot_value(slot) is not None:
            raise SlotTaken(f"slot {slot.member} of policy {slot.policy} is already {self.store.slot_value(slot)}")
        hv = self.hypervisor_factory(uri)
        try:
            canonical = hv.canonical_uri()
            holder = self.store.domain_holder(canonical, domain)
            if holder:
                if slot is not None:
                    self.store.mark_slot(slot, f"skipped:busy:{holder}")
                raise DomainBusy(f"domain {domain!r} is busy with workflow {holder}; "
                                 f"see 'domcapture show {holder}'")
            try:
                normalised = self._checked(defn, hv, canonical, domain, params)
            except DomcaptureError as exc:
                if slot is not None and not isinstance(exc, StoreUnavailable):
                    self.store.mark_slot(slot, f"refused:{type(exc).__name__}: {exc}")
                raise
        finally:
            hv.close()
        rec = self._record(defn, domain, canonical, normalised, slot, data)
        self.store.create(rec, slot=slot, by=by or self.requester)
        self.enqueue(rec)
        return rec

    def _checked(self, defn: Definition, hv: Hypervisor, canonical: str, domain: str,
                 params: dict[str, Any]) -> dict[str, Any]:
        """The submission's parameters, validated against the domain; DomcaptureError when refused."""
        raw = dict(params)
        if defn.holds_domain:  # another actor's hold mark or block job: refused before anything else
            foreign.refuse_held(read_only(hv), domain, self.store.prefix, holds.store_status(self.store))
        if defn.resolve is not None:
            raw = defn.resolve(self.store.load, raw)
        normalised = defn.validate(self._inspect(hv), domain, raw)
        for member in defn.members(normalised) if defn.members else []:
            holder = self.store.domain_holder(canonical, member)
            if holder:
                raise DomainBusy(f"group member {member!r} is busy with workflow {holder}; "
                                 f"see 'domcapture show {holder}'")
            foreign.refuse_held(read_only(hv), member, self.store.prefix, holds.store_status(self.store))
        return normalised

    @staticmethod
    def _record(defn: Definition, domain: str, canonical: str, normalised: dict[str, Any], slot: Slot | None,
                data: dict[str, Any] | None) -> Record:
        rec = Record(id=new_id(), strategy=defn.name, definition_version=defn.version, domain=domain,
                     uri=canonical, params=normalised, state=defn.initial, status=QUEUED, enqueues=1)
        rec.data.update(data or {})
        if slot is not None:
            rec.data["host"] = slot.host
            rec.data["slot"] = {"policy": slot.policy, "host": slot.host, "at": slot.at, "kind": slot.kind}
        return rec

    def submit_slots(self, strategy: str, uri: str, batch: list[SlotSubmission], *,
                     boundary: Callable[[str], None] | None = None) -> list[str]:
        """Submit a batch of scheduled slots of one host in a few round trips; one outcome per slot.

        Outcomes: ``submitted:<id>``, ``taken`` (claimed already), ``skipped:busy:<holder>``,
        ``refused:<why>``.  The slot keys and domain locks of the batch are read at once, each domain is
        validated on the hypervisor, then every record is created in one pipeline of the store's create
        script: each slot is claimed in the step that writes its record, exactly as ``submit`` does, so a
        batch re-run by another scheduler (or after a crash part way) submits no slot twice.  Jobs are
        enqueued after the records, all at once (a crash in between leaves ``queued`` records that recovery
        enqueues).
        ``boundary`` is called with ``batch-created:<first member>`` and ``submitted:<member>`` (fault
        injection).
        """
        defn = self.definition(strategy)
        out: dict[int, str] = {}
        hv = self.hypervisor_factory(uri)
        try:
            canonical = hv.canonical_uri()
            seen = self.store.slot_claims([s.slot for s in batch], canonical)
            marks: list[tuple[int, Slot, str]] = []
            ready: list[tuple[int, Record, Slot]] = []
            for i, sub in enumerate(batch):
                taken, holder = seen[i]
                if taken is not None:
                    out[i] = "taken"
                    continue
                if holder is not None:
                    marks.append((i, sub.slot, f"skipped:busy:{holder}"))
                    continue
                try:
                    normalised = self._checked(defn, hv, canonical, sub.slot.domain, sub.params)
                except StoreUnavailable:
                    raise
                except DomcaptureError as exc:
                    marks.append((i, sub.slot, f"refused:{type(exc).__name__}: {exc}"))
                    continue
                ready.append((i, self._record(defn, sub.slot.domain, canonical, normalised, sub.slot, sub.data),
                              sub.slot))
        finally:
            hv.close()
        for (i, _, what), free in zip(marks, self.store.mark_slots([(s, w) for _, s, w in marks]), strict=True):
            out[i] = what if free else "taken"
        results = self.store.create_many([(rec, slot) for _, rec, slot in ready], by=self.requester)
        if boundary is not None and ready:
            boundary(f"batch-created:{ready[0][2].member}")
        self.enqueue_new([rec for (_, rec, _), (tag, _) in zip(ready, results, strict=True) if tag == "ok"])
        for (i, rec, slot), (tag, val) in zip(ready, results, strict=True):
            if tag == "ok":
                out[i] = f"submitted:{rec.id}"
                if boundary is not None:
                    boundary(f"submitted:{slot.member}")
            elif tag == "busy":
                out[i] = f"skipped:busy:{val}"
            elif tag == "slot":
                out[i] = "taken"
            else:
                out[i] = f"refused:workflow id {val} exists already"
        return [out[i] for i in range(len(batch))]

    # -- operator commands ------------------------------------------------------------
    def _take(self, wf_id: str, owner: str) -> tuple[Record, Lease]:
        rec = self.store.load(wf_id)
        if rec.final:
            raise InvalidOperation(f"workflow {wf_id} is {rec.status}; nothing to do")
        lease = self.store.acquire_lease(wf_id, owner, self.lease_ttl)
        if lease is None:
            ttl = self.store.lease_ttl(wf_id)
            raise InvalidOperation(f"workflow {wf_id} is running ({self.store.lease_value(wf_id)}, lease "
                                   f"{ttl or 0:.1f}s left); use 'domcapture abort {wf_id}' to stop it")
        try:
            rec = self.store.load(wf_id)
        except BaseException:
            lease.release()
            raise
        rec.worker = owner
        return rec, lease

    def _requeue(self, rec: Record, lease: Lease, event: str, **detail: Any) -> Record:
        requeue(rec)
        rec.attention = None
        self.store.save(rec, event, epoch=lease.epoch, **detail)
        lease.release()
        self.enqueue(rec)
        return rec

    def resume(self, wf_id: str, *, by: str | None = None) -> Record:
        rec, lease = self._take(wf_id, "operator:resume")
        try:
            # A fresh start for the state that stopped: its attempt count restarts.
            rec.attempts.pop(rec.state, None)
            return self._requeue(rec, lease, "resume-requested", mode=rec.mode, by=by or self.requester)
        except BaseException:
            lease.release()
            raise

    def rollback(self, wf_id: str, reason: str = "rollback requested by operator", *,
                 by: str | None = None) -> Record:
        rec, lease = self._take(wf_id, "operator:rollback")
        try:
            problem = definition_problem(self.definitions, rec)
            if problem:
                raise InvalidOperation(f"{problem}: roll it back where the workers have that definition")
            if rec.mode == FORWARD:
                begin_rollback(self.definition(rec.strategy), rec)
                rec.error = rec.error or {"type": "Cancelled", "message": reason, "retryable": False}
            rec.attempts = {k: v for k, v in rec.attempts.items() if not k.startswith("revert:")}
            return self._requeue(rec, lease, "rollback-requested", reason=reason, by=by or self.requester)
        except BaseException:
            lease.release()
            raise

    def abort(self, wf_id: str, *, by: str | None = None) -> tuple[Record, str]:
        """Stop the workflow and roll it back, whether or not a worker runs it now."""
        rec = self.store.load(wf_id)
        if rec.final:
            raise InvalidOperation(f"workflow {wf_id} is {rec.status}; nothing to abort")
        self.store.request_cancel(wf_id, "aborted by operator")
        try:
            return self.rollback(wf_id, reason="aborted by operator", by=by), "rolling back"
        except InvalidOperation:
            # A live worker holds it: it sees the cancel at its next check and rolls back.
            return self.store.load(wf_id), "cancel requested; the running worker will roll back"

    def verify(self, wf_id: str, *, by: str | None = None) -> list[dict[str, Any]]:
        """Re-read a succeeded capture and check it against its record; the outcome joins its history."""
        rec = self.store.load(wf_id)
        if rec.status != "succeeded":
            raise InvalidOperation(f"workflow {wf_id} is {rec.status}; only a succeeded capture can be verified")
        defn = self.definition(rec.strategy)
        if defn.verify is None:
            checks = verify_files(rec)
        else:
            hv = self.hypervisor_factory(rec.uri)
            try:
                checks = defn.verify(rec, self._inspect(hv))
            finally:
                hv.close()
        if not checks:
            raise InvalidOperation(f"workflow {wf_id} recorded nothing to verify")
        lease = self.store.acquire_lease(wf_id, "operator:verify", self.lease_ttl)
        if lease is not None:
            try:
                rec = self.store.load(wf_id)
                ok = all(c["ok"] for c in checks)
                rec.data.setdefault("verifications", []).append({"at": time.time(), "ok": ok,
                                                                 "outcome": outcome(checks)})
                self.store.save(rec, "verified", epoch=lease.epoch, ok=ok,
                                failed=[c["item"] for c in checks if not c["ok"]], by=by or self.requester)
            finally:
                lease.release()
        return checks

    # -- recovery ------------------------------------------------------------------------
    def recover(self, wf_id: str, owner: str = "recovery") -> str | None:
        """Take over a ``running`` workflow whose lease expired: thaw, then resume or roll back.

        Returns what was decided, or None when there was nothing to do.  The
        lease taken here is released on every way out.
        """
        rec = self.store.load(wf_id)
        if rec.status != RUNNING:
            return None
        lease = self.store.acquire_lease(wf_id, owner, self.lease_ttl)
        if lease is None:
            return None
        try:
            return self._recover(wf_id, owner, lease)
        finally:
            lease.release()  # a no-op when _requeue released it already (the value is compared)

    def _recover(self, wf_id: str, owner: str, lease: Lease) -> str | None:
        rec = self.store.load(wf_id)
        if rec.status != RUNNING:
            return None
        lost_worker, rec.worker = rec.worker, owner
        if quiesce.frozen_info(rec):
            hv = self.hypervisor_factory(rec.uri)
            try:
                outcome = quiesce.thaw(hv, rec, by=owner)
            finally:
                hv.close()
            rec.data["freeze_broken"] = "thawed by recovery after the worker died"
            self.store.save(rec, "thawed", epoch=lease.epoch, **outcome)
        problem = definition_problem(self.definitions, rec)
        if problem:
            stop_for_definition(rec, problem)
            self._note_recovery(rec, lost_worker, "needs attention")
            self.store.save(rec, "needs-attention", epoch=lease.epoch, error=problem, lost_worker=lost_worker)
            return "needs attention: " + problem
        defn = self.definitions[rec.strategy]
        decision = "resume"
        if rec.mode == FORWARD:
            tries = rec.attempts.get(rec.state, 0)
            if defn.crash_policy(rec.state) == "rollback":
                decision = "rollback"
            elif tries >= defn.max_attempts:
                decision = "rollback"
                rec.error = {"type": "CrashLoop", "retryable": False, "state": rec.state, "at": time.time(),
                             "message": f"the worker died {tries} times in state {rec.state}"}
            if decision == "rollback":
                begin_rollback(defn, rec)
        else:
            decision = "continue rollback"
            head = rec.revert_queue[0] if rec.revert_queue else None
            tries = rec.attempts.get(f"revert:{head}", 0) if head else 0
            if head and tries >= defn.max_attempts:
                # The same cap as forward mode: a revert that kills its worker every time stops here.
                reason = f"the worker died {tries} times while reverting {head}"
                rec.status = NEEDS_ATTENTION
                rec.error = {"type": "CrashLoop", "retryable": False, "state": head, "at": time.time(),
                             "message": reason}
                rec.attention = {"reason": f"rollback stopped: {reason}",
                                 "command": f"domcapture rollback {rec.id}",
                                 "hint": "find why the worker dies (its log), then run the command: it "
                                         "continues the rollback with a fresh attempt count"}
                self._note_recovery(rec, lost_worker, "needs attention")
                self.store.save(rec, "needs-attention", epoch=lease.epoch, error=reason, lost_worker=lost_worker)
                return "needs attention: " + reason
        self._note_recovery(rec, lost_worker, decision)
        self._requeue(rec, lease, "recovered", decision=decision, lost_worker=lost_worker)
        return decision

    @staticmethod
    def _note_recovery(rec: Record, lost_worker: str | None, decision: str) -> None:
        rec.data.setdefault("recoveries", []).append({"at": time.time(), "lost_worker": lost_worker,
                                                      "state": rec.state, "decision": decision})

    def reenqueue(self, wf_id: str, owner: str = "recovery") -> bool:
        """A ``queued`` record whose job vanished from the queue gets a new job."""
        lease = self.store.acquire_lease(wf_id, owner, self.lease_ttl)
        if lease is None:
            return False
        try:
            rec = self.store.load(wf_id)
            if rec.status != QUEUED:
                return False
            self._requeue(rec, lease, "reenqueued", reason="its job was lost from the queue")
            return True
        finally:
            lease.release()


def summary(rec: Record) -> dict[str, Any]:
    return {"id": rec.id, "strategy": rec.strategy, "domain": rec.domain, "uri": rec.uri,
            "status": rec.status, "state": rec.state, "mode": rec.mode, "progress": rec.progress,
            "error": rec.error, "attention": rec.attention, "result": rec.result,
            "created_at": rec.created_at, "updated_at": rec.updated_at}


def is_final(rec: Record) -> bool:
    return rec.status in FINAL_STATUSES
