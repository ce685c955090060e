"""The recovery process: finds workflows nobody runs and moves them again.

Every ``interval`` seconds it looks at each active workflow:
- ``running`` with no lease: its worker died (or was stopped past its TTL).
  Thaw the guest if the record says it may be frozen, then resume or roll
  back per the strategy's crash policy, and enqueue a job.
- ``queued`` whose job is gone from RQ (lost between record and enqueue, or
  dropped by RQ) for longer than a grace period: enqueue it again.

It does not rely on RQ's own abandoned-job detection, which takes minutes.

No record can stop the sweep: one this build cannot read (damaged JSON, a
newer schema) is quarantined (``Store.quarantine``: out of the active set,
its bytes and the reason kept) and the sweep goes on; any other error on one
workflow is logged and the next workflow is looked at.
"""

from __future__ import annotations

import logging
import time

from workflows.errors import DomcaptureError, RecordNotFound, RecordUnreadable
from workflows.record import QUEUED, RUNNING

from .runtime import Runtime

log = logging.getLogger("domcapture.recovery")
TRIM_EVERY = 3600.0


class Recovery:
    def __init__(self, rt: Runtime, owner: str = "recovery", queued_grace: float | None = None) -> None:
        self.rt = rt
        self.owner = owner
        self.queued_grace = queued_grace if queued_grace is not None else 3 * rt.settings.lease_ttl

    def sweep(self) -> list[tuple[str, str]]:
        actions = []
        store = self.rt.store
        for wf_id in store.active_ids():
            try:
                rec = store.load(wf_id)
                if rec.status == RUNNING and store.lease_value(wf_id) is None:
                    decision = self.rt.captures.recover(wf_id, self.owner)
                    if decision:
                        actions.append((wf_id, decision))
                        log.warning("workflow %s: worker lost; %s", wf_id, decision)
                elif rec.status == QUEUED and time.time() - rec.updated_at > self.queued_grace:
                    if not self.rt.job_waiting(rec) and store.lease_value(wf_id) is None:
                        status = self.rt.job_status(rec)
                        if self.rt.captures.reenqueue(wf_id, self.owner):
                            actions.append((wf_id, f"re-enqueued (job {status or 'missing'}, not in the queue)"))
            except (RecordUnreadable, RecordNotFound) as exc:
                try:
                    # an id in the active set without a record is moved out too, or it would be met every sweep
                    store.quarantine(wf_id, str(exc), by=self.owner)
                    log.error("workflow %s: quarantined: %s", wf_id, exc)
                    actions.append((wf_id, f"quarantined: {exc}"))
                except DomcaptureError as exc2:
                    log.error("workflow %s: could not quarantine: %s", wf_id, exc2)
            except DomcaptureError as exc:
                log.error("workflow %s: recovery failed: %s", wf_id, exc)
                actions.append((wf_id, f"error: {exc}"))
            except Exception as exc:  # a bug must not stop every other workflow's recovery
                log.exception("workflow %s: recovery raised", wf_id)
                actions.append((wf_id, f"error: {type(exc).__name__}: {exc}"))
        return actions

    def run_forever(self, interval: float) -> None:
        log.info("recovery: sweeping every %.1fs", interval)
        trimmed_at = 0.0
        while True:
            try:
                self.sweep()
                if time.time() - trimmed_at > TRIM_EVERY:
                    # expired finished records (Store.finished_ttl) leave their id in the index
                    trimmed_at = time.time()
                    gone = self.rt.store.trim_index()
                    if gone:
                        log.info("recovery: %d expired records dropped from the index", gone)
            except DomcaptureError as exc:  # redis or libvirt away: try again next round
                log.error("recovery sweep failed: %s", exc)
            except Exception:
                log.exception("recovery sweep raised; trying again next round")
            time.sleep(interval)
