"""The engine: advances one workflow, step by step, under a lease.

For each forward state: record the attempt, ``probe`` (already done?),
``execute`` if not, fire the step's trigger, persist.  Errors decide:
retryable ones are retried with back-off, permanent ones start the rollback
(or stop the workflow as ``failed`` when it was submitted with
``on_error=stop``).  Rollback reverts every state that was entered, newest
first; a revert that cannot proceed leaves the workflow ``needs_attention``
with the reason and the command that continues it.

Every record write is fenced by the lease's epoch: a process that lost its
lease (it was stopped, the lease expired, recovery took over) gets LeaseLost
on its next write or its next hypervisor call, and stops.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Callable

from . import holds, quiesce
from .backups import BackupRecords
from .checkpoints import CheckpointStore
from .definition import ROLLING_BACK, SUCCEEDED, Definition
from .effects import Effects, HostCommands, OfflineImages, OwnedFiles
from .errors import (AgentUnavailable, Cancelled, DomcaptureError, LeaseLost, NeedsAttention, NotDurable,
                     RecordUnreadable, StepFailed)
from .hypervisor.base import CANCEL_EXEMPT, Hypervisor, fenced
from .record import (FAILED, FINAL_STATUSES, FORWARD, NEEDS_ATTENTION, PARTIALLY_ROLLED_BACK, QUEUED, ROLLBACK,
                     ROLLED_BACK, RUNNING, STOPPED_STATUSES, Record)
from .steps import StepContext
from .store import Lease, Store

log = logging.getLogger("domcapture.engine")

# Hook for crash tests: called with a label at every persistence and effect
# boundary; raising from it stops the engine exactly there.
CrashHook = Callable[[str], None]


def error_dict(exc: BaseException, state: str) -> dict[str, Any]:
    if isinstance(exc, DomcaptureError):
        out = exc.to_dict()
    else:
        out = {"type": type(exc).__name__, "message": str(exc), "retryable": False,
               "traceback": traceback.format_exc(limit=8)}
    out["state"] = state
    out["at"] = time.time()
    return out


class Heartbeat(threading.Thread):
    """Renews the lease on its own thread, whatever the step is doing.

    It does nothing else: renewal never waits on the guest agent or libvirt
    (the freeze deadline has its own thread, ``FreezeWatchdog``).
    """

    def __init__(self, lease: Lease) -> None:
        super().__init__(name=f"heartbeat-{lease.wf_id}", daemon=True)
        self.lease = lease
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = self.lease.ttl / 3
        while not self._stop_event.wait(interval):
            try:
                if not self.lease.renew():
                    log.warning("lease lost on %s", self.lease.wf_id)
                    return
            except Exception:  # a Redis blip: try again next tick, the TTL covers it
                log.exception("heartbeat tick failed")

    def stop(self) -> None:
        self._stop_event.set()


class FreezeWatchdog(threading.Thread):
    """Thaws a guest still frozen past the deadline written in the record, once.

    The main thread hands it the record's freeze mark after every save
    (``observe``); it never reads or writes the record itself.  It talks to
    libvirt through its own connection, so a hung agent call here cannot stop
    the lease renewals, and a hung step cannot stop the thaw.  Each thaw is
    appended to the workflow's history at once (fenced by the epoch) and
    folded into the record by the main thread (``absorb``).
    """

    def __init__(self, store: Store, rec_id: str, domain: str, lease: Lease,
                 hypervisor: Callable[[], Hypervisor], poll: float = 0.2) -> None:
        super().__init__(name=f"freeze-watchdog-{rec_id}", daemon=True)
        self.store, self.rec_id, self.domain, self.lease = store, rec_id, domain, lease
        self._hypervisor = hypervisor
        self._poll = poll
        self._lock = threading.Lock()
        self._mark: dict[str, Any] | None = None
        self._thawed: dict[str, Any] | None = None
        self._stop_event = threading.Event()

    def observe(self, mark: dict[str, Any] | None) -> None:
        with self._lock:
            self._mark = dict(mark) if mark else None

    def absorb(self, rec: Record) -> None:
        """Main thread: fold a thaw done here into the record (no I/O)."""
        with self._lock:
            thawed, self._thawed = self._thawed, None
        info = quiesce.frozen_info(rec)
        if thawed and info and info.get("since") == thawed["since"]:
            rec.data["frozen"] = None
            rec.data["last_thaw"] = thawed
            rec.data["freeze_broken"] = "thawed at its deadline by the freeze watchdog"

    def run(self) -> None:
        hv: Hypervisor | None = None
        try:
            while not self._stop_event.wait(self._poll):
                with self._lock:
                    mark = self._mark
                if not mark or time.time() <= mark["until"]:
                    continue
                if not self._still_ours():
                    # Another worker may hold the workflow now, and its freeze is its own: thawing it would
                    # make its capture claim a quiesce it does not have.  That worker's watchdog (or
                    # recovery, which thaws before it takes over) owns the deadline from here.
                    log.warning("workflow %s: lease lost; the freeze watchdog stops", self.rec_id)
                    return
                log.warning("workflow %s: guest frozen past its deadline; thawing", self.rec_id)
                count, again = 0, False
                for domain in mark.get("domains", [self.domain]):  # a consistency group's mark names each member
                    try:
                        hv = hv or self._hypervisor()
                        count += hv.fs_thaw(domain)
                    except AgentUnavailable:
                        pass  # an agent that is gone holds nothing frozen
                    except DomcaptureError as exc:
                        if self._domain_active(hv, domain):
                            log.error("workflow %s: thaw of %s at deadline failed: %s; trying again", self.rec_id,
                                      domain, exc)
                            again = True
                        # else QEMU is gone: nothing is frozen any more
                if again:
                    continue
                now = time.time()
                outcome = {"by": "freeze-watchdog", "at": now, "since": mark["since"], "thawed_filesystems": count,
                           "frozen_seconds": round(now - mark["since"], 3)}
                with self._lock:
                    self._thawed, self._mark = outcome, None
                try:
                    self.store.append_event(self.rec_id, "thawed-at-deadline", epoch=self.lease.epoch, **outcome)
                except DomcaptureError:
                    log.exception("workflow %s: could not record the thaw", self.rec_id)
        finally:
            if hv is not None:
                hv.close()

    def _still_ours(self) -> bool:
        """The lease, judged right before a thaw: its local clock, then Redis.  Redis unreachable: the
        local clock decides (within the TTL nobody else can have taken the lease)."""
        try:
            self.lease.check()
        except LeaseLost:
            return False
        except DomcaptureError:
            return not self.lease.lost and time.monotonic() - self.lease.renewed_at <= self.lease.ttl
        return True

    def _domain_active(self, hv: Hypervisor | None, domain: str) -> bool:
        try:
            return hv is not None and hv.domain_state(domain) in ("running", "paused")
        except DomcaptureError:
            return True  # unknown: keep trying to thaw

    def stop(self) -> None:
        self._stop_event.set()


class Engine:
    def __init__(self, store: Store, definitions: dict[str, Definition],
                 hypervisor_factory: Callable[[str], Hypervisor], worker_id: str, *,
                 lease_ttl: float = 5.0, retry_delays: tuple[float, ...] = (0.5, 1, 2, 4),
                 crash_hook: CrashHook | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.definitions = definitions
        self.hypervisor_factory = hypervisor_factory
        self.worker_id = worker_id
        self.lease_ttl = lease_ttl
        self.retry_delays = retry_delays
        self.crash_hook = crash_hook
        self.sleep = sleep
        self._watchdog: FreezeWatchdog | None = None
        self._waits = 0  # consecutive saves no replica acknowledged (their back-off)

    def _point(self, label: str) -> None:
        if self.crash_hook:
            self.crash_hook(label)

    # -- public ----------------------------------------------------------------
    def run(self, wf_id: str) -> str:
        """Advance ``wf_id`` until it ends, stops, or this process loses its lease.

        Returns the record's status, ``"lease-held"`` when another process
        holds the workflow, or ``"lease-lost"``.
        """
        return self._run(wf_id)

    def _run(self, wf_id: str) -> str:
        lease = self.store.acquire_lease(wf_id, self.worker_id, self.lease_ttl)
        if lease is None:
            return "lease-held"
        hv: Hypervisor | None = None
        heartbeat: Heartbeat | None = None
        watchdog: FreezeWatchdog | None = None
        try:
            try:
                rec = self.store.load(wf_id)
            except RecordUnreadable as exc:
                self.store.quarantine(wf_id, str(exc), by=self.worker_id)
                log.error("workflow %s: quarantined: %s", wf_id, exc)
                return "quarantined"
            if rec.status in FINAL_STATUSES or rec.status in STOPPED_STATUSES:
                return rec.status
            problem = definition_problem(self.definitions, rec)
            if problem:
                # Before any step: a record this build's definition cannot follow stops here, once.
                rec.worker = self.worker_id
                stop_for_definition(rec, problem)
                self._save(rec, lease, "needs-attention", error=problem)
                return rec.status
            defn = self.definitions[rec.strategy]
            hv = self.hypervisor_factory(rec.uri)
            heartbeat = Heartbeat(lease)
            heartbeat.start()
            uri = rec.uri
            watchdog = FreezeWatchdog(self.store, rec.id, rec.domain, lease, lambda: self.hypervisor_factory(uri))
            watchdog.observe(quiesce.frozen_info(rec))
            watchdog.start()
            self._watchdog = watchdog
            resumed = rec.status == RUNNING or rec.attempts
            rec.status, rec.worker = RUNNING, self.worker_id
            # the hold mark: recorded with the start, then written on the domain, or on each member of a group
            held = defn.members(rec.params) if defn.members else [rec.domain] if defn.holds_domain else []
            if held:  # (workflows/holds.py)
                rec.data["hold"] = holds.new_mark(rec, self.worker_id, self.store.prefix)
            # the hold mark is an effect on the domain: its intent must reach a replica first
            self._save_until_durable(rec, lease, "resumed" if resumed else "started", durable=defn.holds_domain)
            ctx = self._context(rec, hv, lease)
            for domain in held:
                holds.place(ctx.hv, self.store, rec, lease.epoch, domain)
            while rec.status == RUNNING:
                if rec.mode == FORWARD:
                    self._forward(defn, rec, ctx, lease)
                else:
                    self._revert(defn, rec, ctx, lease)
            for domain in held if rec.status in FINAL_STATUSES else []:
                holds.lift(ctx.hv, self.store, rec, lease.epoch, domain)
            return rec.status
        except LeaseLost as exc:
            log.warning("workflow %s: %s; stopping without further changes", wf_id, exc)
            return "lease-lost"
        finally:
            self._watchdog = None
            if watchdog:
                watchdog.stop()
            if heartbeat:
                heartbeat.stop()
            lease.release()
            if hv is not None:
                hv.close()

    # -- plumbing ----------------------------------------------------------------
    def _guard(self, lease: Lease, rec: Record | None = None, call: str | None = None) -> None:
        """Right before an effect: the lease is ours, and (going forward) no abort was asked.

        Safety calls (a thaw, ending a job) are exempt from the cancel check.
        """
        if rec is not None and self._watchdog is not None:
            self._watchdog.absorb(rec)
        lease.check()
        if rec is not None and rec.mode == FORWARD and call not in CANCEL_EXEMPT:
            reason = self.store.cancel_requested(rec.id)
            if reason:
                raise Cancelled(reason)

    def _save(self, rec: Record, lease: Lease, event: str | None, durable: bool = False, **detail: Any) -> None:
        label = f"{event or 'progress'}:{rec.state}"
        self._point(f"save:{label}")
        if self._watchdog is not None:
            self._watchdog.absorb(rec)
        self.store.save(rec, event, epoch=lease.epoch, durable=durable, **detail)
        if durable:
            self._waits = 0
        if self._watchdog is not None:
            self._watchdog.observe(quiesce.frozen_info(rec))
        self._point(f"saved:{label}")

    def _context(self, rec: Record, hv: Hypervisor, lease: Lease) -> StepContext:
        fx = Effects(hv=fenced(hv, lambda call: self._guard(lease, rec, call)),
                     files=OwnedFiles(rec, lambda: self._guard(lease, rec, "file")),
                     checkpoints=CheckpointStore(self.store),
                     host=HostCommands(lambda: self._guard(lease, rec, "host")),
                     images=OfflineImages(lambda: self._guard(lease, rec, "images")),
                     backups=BackupRecords(self.store, rec, lambda: self._guard(lease, rec, "backups")))
        return StepContext(rec, fx,
                           # a step's evented save is its intent (or outcome) record: durable; progress is not
                           save=lambda event=None, **d: self._save(rec, lease, event, durable=event is not None, **d),
                           guard=lambda: self._guard(lease, rec, "guard"),
                           cancelled=lambda: self.store.cancel_requested(rec.id),
                           sleep=self.sleep)

    # -- forward -------------------------------------------------------------------
    def _forward(self, defn: Definition, rec: Record, ctx: StepContext, lease: Lease) -> None:
        state = rec.state
        step = defn.steps[state]
        try:
            ctx.check_cancel()
            attempt = rec.attempts.get(state, 0) + 1
            if attempt > defn.max_attempts + len(self.retry_delays):
                raise StepFailed(f"state {state} was attempted {attempt - 1} times without completing")
            rec.attempts[state] = attempt
            self._save(rec, lease, "step-started", step=state, attempt=attempt)
            redirect = step.redirect(ctx)
            if redirect:
                trigger, done = redirect, None
            else:
                done = step.probe(ctx)
                self._point(f"probed:{state}")
                if not done:
                    step.execute(ctx)
                    self._point(f"executed:{state}")
                trigger = step.next_trigger(ctx)
            rec.state = defn.fire(state, trigger)
            if rec.state == SUCCEEDED:
                rec.status = SUCCEEDED
                rec.error = None
            self._save(rec, lease, "step-done", step=state, trigger=trigger, already_done=bool(done))
        except LeaseLost:
            raise
        except NotDurable as exc:
            self._await_replicas(rec, lease, state, state, exc)
        except Cancelled as exc:
            self._begin_rollback(defn, rec, ctx, lease, exc, state)
        except NeedsAttention as exc:
            self._stop_for_attention(rec, ctx, lease, exc, state)
        except DomcaptureError as exc:
            if exc.retryable and rec.attempts.get(state, 0) <= len(self.retry_delays):
                delay = self.retry_delays[rec.attempts[state] - 1]
                rec.error = error_dict(exc, state)
                self._save(rec, lease, "step-retry", step=state, delay=delay, error=str(exc))
                self.sleep(delay)
                return
            self._fail(defn, rec, ctx, lease, exc, state)
        except Exception as exc:  # a bug or an OS error: never leave the workflow running
            log.exception("workflow %s: step %s raised", rec.id, state)
            self._fail(defn, rec, ctx, lease, exc, state)

    def _await_replicas(self, rec: Record, lease: Lease, state: str, attempt_key: str, exc: NotDurable) -> None:
        """An intent no replica acknowledged: its effect did not run.  Not an attempt of the step (the
        step is not at fault): wait, then the loop runs the state again (probe first) once a replica is back."""
        rec.attempts[attempt_key] = max(0, rec.attempts.get(attempt_key, 1) - 1)
        self._waits += 1
        delay = self.retry_delays[min(self._waits, len(self.retry_delays)) - 1] if self.retry_delays else 1.0
        log.warning("workflow %s: %s: %s; trying again in %gs", rec.id, state, exc, delay)
        self._save(rec, lease, "replica-wait", step=state, delay=delay, error=str(exc))
        self.sleep(delay)

    def _save_until_durable(self, rec: Record, lease: Lease, event: str, durable: bool) -> None:
        while True:
            try:
                self._save(rec, lease, event, durable=durable)
                return
            except NotDurable as exc:
                self._waits += 1
                delay = self.retry_delays[min(self._waits, len(self.retry_delays)) - 1] if self.retry_delays else 1.0
                log.warning("workflow %s: %s; trying again in %gs", rec.id, exc, delay)
                self.sleep(delay)
                lease.check()

    def _fail(self, defn: Definition, rec: Record, ctx: StepContext, lease: Lease,
              exc: BaseException, state: str) -> None:
        if rec.params.get("on_error") == "stop":
            self._thaw_if_frozen(rec, ctx, lease)
            rec.error = error_dict(exc, state)
            rec.status = FAILED
            rec.attention = {"reason": f"{state} failed: {exc}",
                             "command": f"domcapture resume {rec.id}  (or: domcapture rollback {rec.id})"}
            self._save(rec, lease, "failed", step=state, error=str(exc))
            return
        self._begin_rollback(defn, rec, ctx, lease, exc, state)

    def _stop_for_attention(self, rec: Record, ctx: StepContext, lease: Lease, exc: NeedsAttention,
                            state: str) -> None:
        """Someone else's change stands in the way: keep the state, thaw, stop with the reason and command."""
        self._thaw_if_frozen(rec, ctx, lease)
        rec.error = error_dict(exc, state)
        rec.status = NEEDS_ATTENTION
        rec.attempts.pop(state, None)  # a resume starts the state afresh
        rec.attention = {"reason": f"{state}: {exc}", "command": f"domcapture {exc.command} {rec.id}",
                         "hint": exc.hint or "remove the cause shown in 'reason', then run the command"}
        self._save(rec, lease, "needs-attention", step=state, error=str(exc))

    def _thaw_if_frozen(self, rec: Record, ctx: StepContext, lease: Lease) -> None:
        if quiesce.frozen_info(rec):
            quiesce.thaw(ctx.hv, rec, by=self.worker_id)
            self._save(rec, lease, "thawed", reason="stopping while frozen")

    def _begin_rollback(self, defn: Definition, rec: Record, ctx: StepContext, lease: Lease,
                        exc: BaseException | None, state: str) -> None:
        if exc is not None:
            rec.error = error_dict(exc, state)
        begin_rollback(defn, rec)
        self._save(rec, lease, "rollback-started", reason=str(exc) if exc else "requested")
        # A frozen guest is thawed first, before any revert that may take long.
        self._thaw_if_frozen(rec, ctx, lease)

    # -- rollback -------------------------------------------------------------------
    def _revert(self, defn: Definition, rec: Record, ctx: StepContext, lease: Lease) -> None:
        if not rec.revert_queue:
            standing = rec.data.get("effects_standing") or []
            if standing:
                rec.state = defn.fire(rec.state, "reverted_partially")
                rec.status = PARTIALLY_ROLLED_BACK
                rec.result = {**rec.result, "effects_standing": list(standing)}
            else:
                rec.state = defn.fire(rec.state, "reverted")
                rec.status = ROLLED_BACK
            rec.attention = None
            self.store.clear_cancel(rec.id)
            self._save(rec, lease, "partially-rolled-back" if standing else "rolled-back",
                       effects_standing=standing)
            return
        state = rec.revert_queue[0]
        key = f"revert:{state}"
        try:
            rec.attempts[key] = rec.attempts.get(key, 0) + 1
            self._save(rec, lease, "revert-started", step=state, attempt=rec.attempts[key])
            defn.steps[state].revert(ctx)
            self._point(f"reverted:{state}")
            rec.revert_queue.pop(0)
            self._save(rec, lease, "reverted", step=state)
        except LeaseLost:
            raise
        except NotDurable as exc:
            self._await_replicas(rec, lease, state, key, exc)
        except Exception as exc:
            retryable = isinstance(exc, DomcaptureError) and exc.retryable
            if retryable and rec.attempts[key] <= len(self.retry_delays):
                delay = self.retry_delays[rec.attempts[key] - 1]
                self._save(rec, lease, "revert-retry", step=state, delay=delay, error=str(exc))
                self.sleep(delay)
                return
            log.exception("workflow %s: revert of %s failed", rec.id, state)
            rec.status = NEEDS_ATTENTION
            rec.attention = {"reason": f"rollback could not revert {state}: {exc}",
                             "command": f"domcapture rollback {rec.id}",
                             "hint": "fix the cause shown in 'reason', then run the command to continue the rollback"}
            rec.error = error_dict(exc, state)
            self._save(rec, lease, "needs-attention", step=state, error=str(exc))


def definition_problem(definitions: dict[str, Definition], rec: Record) -> str | None:
    """Why this build cannot advance ``rec`` (unknown strategy, another definition version), or None.

    Such a record is never run nor rolled back here: its states may mean
    something else in this build's table.
    """
    defn = definitions.get(rec.strategy)
    if defn is None:
        return f"workflow {rec.id} follows strategy {rec.strategy!r}, which this build does not have"
    if defn.version != rec.definition_version:
        return (f"workflow {rec.id} follows {rec.strategy} v{rec.definition_version}; this build has "
                f"v{defn.version}")
    return None


def stop_for_definition(rec: Record, problem: str) -> None:
    """The documented outcome of a definition mismatch (no I/O): needs_attention, with what would move it."""
    rec.status = NEEDS_ATTENTION
    rec.error = {"type": "DefinitionMismatch", "message": problem, "retryable": False, "state": rec.state,
                 "at": time.time()}
    rec.attention = {"reason": problem,
                     "command": f"domcapture resume {rec.id}",
                     "hint": f"run the command where the workers have {rec.strategy} "
                             f"v{rec.definition_version} (the build that submitted it)"}


def begin_rollback(defn: Definition, rec: Record) -> None:
    """Switch a record to rollback mode (no I/O): the states to revert, newest first."""
    if rec.state != ROLLING_BACK:
        rec.revert_queue = list(reversed(defn.states_through(rec.state)))
        rec.data["rollback_from"] = rec.state
        rec.state = defn.fire(rec.state, "rollback")
    rec.mode = ROLLBACK


def requeue(rec: Record) -> None:
    """Mark a record for a new job (no I/O)."""
    rec.status = QUEUED
    rec.worker = None
    rec.enqueues += 1
