"""Who holds a domain: the hold mark's life in a workflow, and how any reader judges a mark.

A workflow whose strategy acts on an existing domain (``Definition.holds_domain``)
writes its mark (``workflows/hypervisor/hold.py``) right after its record says
it started, and removes it when it ends final (succeeded, rolled back,
partially rolled back).  A stopped workflow (``needs_attention``, ``failed``)
keeps it: it still holds the domain.  The mark is a notice, never a condition
of the capture: a failure to write or remove it is logged and recorded in the
workflow's history, nothing more.

A crash between the final save and the removal leaves a mark behind, so a
reader judges a mark before believing it (``judge``): one naming a workflow
of this deployment that is final, or that this deployment's store does not
know, is *stale*; one of another deployment (another prefix) is *live*, since
its store cannot be asked here; one that does not parse is *unreadable* and
is never followed.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from .errors import DomainNotFound, DomcaptureError, LeaseLost, RecordNotFound, RecordUnreadable
from .record import FINAL_STATUSES, Record

if TYPE_CHECKING:
    from .hypervisor.base import Hypervisor
    from .store import Store

log = logging.getLogger("domcapture.holds")

#: the domain states a mark is written in (another state, or no such domain: no mark)
MARKED_STATES = ("running", "paused", "shutoff")

StatusOf = Callable[[str], str | None]  # workflow id -> its status in this store, None: unknown


@dataclass(frozen=True)
class Judgement:
    kind: str  # none | unreadable | ours | stale | live
    text: str  # one line naming the holder, for an operator
    workflow: str | None = None
    status: str | None = None  # the workflow's status in this store ("other deployment": not ours to ask)


def new_mark(rec: Record, worker: str, prefix: str, now: float | None = None) -> dict[str, Any]:
    """The mark of ``rec``: its first start time is kept across resumes; the worker is the one now."""
    previous = rec.data.get("hold") or {}
    started = previous.get("started_epoch") if isinstance(previous.get("started_epoch"), (int, float)) else None
    started = float(started or (now if now is not None else time.time()))
    return {"workflow": rec.id, "strategy": rec.strategy, "prefix": prefix,
            "started": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "started_epoch": round(started, 3),
            "worker": re.sub(r"[^A-Za-z0-9_.:@/+-]", "_", worker)[:200] or "-"}


def store_status(store: "Store") -> StatusOf:
    """A workflow's status in ``store``: None when unknown (never created, or expired), "unreadable"."""
    def status(wf_id: str) -> str | None:
        try:
            return store.load(wf_id).status
        except RecordNotFound:
            return None
        except RecordUnreadable:
            return "unreadable"
    return status


def judge(mark: dict[str, Any] | None, prefix: str, status_of: StatusOf, own: str | None = None) -> Judgement:
    """What a mark read from a domain means to this deployment (``prefix``, its store's ``status_of``)."""
    if mark is None:
        return Judgement("none", "no hold mark")
    if "unreadable" in mark:
        return Judgement("unreadable", f"an unreadable domcapture hold mark ({mark['unreadable']})")
    wf, where = mark["workflow"], mark["prefix"]
    who = (f"workflow {wf} ({mark['strategy']}, deployment {where}, since {mark['started']}, "
           f"worker {mark['worker']})")
    if where != prefix:
        return Judgement("live", who, wf, "other deployment")
    if wf == own:
        return Judgement("ours", who, wf)
    status = status_of(wf)
    if status is None:
        return Judgement("stale", f"{who}, unknown to this deployment's store", wf)
    if status in FINAL_STATUSES:
        return Judgement("stale", f"{who}, {status}", wf, status)
    return Judgement("live", f"{who}, {status}", wf, status)


# -- the engine's side: never fails a capture ---------------------------------------------------------
def place(hv: "Hypervisor", store: "Store", rec: Record, epoch: int, domain: str | None = None) -> None:
    """Write ``rec.data["hold"]`` on the domain, when the domain exists in a state that keeps one; another
    live holder's mark is left as it is (and said in the history).  ``domain``: a group's member (default
    the record's domain)."""
    domain = domain or rec.domain
    mark = rec.data.get("hold")
    if not mark:
        return
    try:
        try:
            state = hv.domain_state(domain)
        except DomainNotFound:
            log.info("workflow %s: domain %s not found; no hold mark", rec.id, domain)
            return
        if state not in MARKED_STATES:
            log.info("workflow %s: domain %s is %s; no hold mark", rec.id, domain, state)
            return
        found = judge(hv.hold_mark(domain), store.prefix, store_status(store), own=rec.id)
        if found.kind == "live":
            log.warning("workflow %s: domain %s carries the hold mark of %s; left as it is", rec.id, domain,
                        found.text)
            _note(store, rec, epoch, "hold-mark-kept", action="set", holder=found.text, member=domain)
            return
        hv.set_hold_mark(domain, mark)
        log.info("workflow %s: hold mark set on %s", rec.id, domain)
    except LeaseLost:
        raise
    except DomcaptureError as exc:
        log.warning("workflow %s: could not set the hold mark on %s: %s", rec.id, domain, exc)
        _note(store, rec, epoch, "hold-mark-failed", action="set", error=str(exc), member=domain)


def lift(hv: "Hypervisor", store: "Store", rec: Record, epoch: int, domain: str | None = None) -> None:
    """Remove the mark from the domain once ``rec`` is final: ours, or a stale one; never another live
    holder's, never an unreadable one."""
    domain = domain or rec.domain
    try:
        found = judge(hv.hold_mark(domain), store.prefix, store_status(store), own=rec.id)
        if found.kind == "none":
            return
        if found.kind in ("live", "unreadable"):
            _note(store, rec, epoch, "hold-mark-kept", action="remove", holder=found.text, member=domain)
            return
        hv.set_hold_mark(domain, None)
        log.info("workflow %s: hold mark removed from %s", rec.id, domain)
    except DomainNotFound:
        log.info("workflow %s: domain %s is gone; no hold mark to remove", rec.id, domain)
    except LeaseLost:
        raise
    except DomcaptureError as exc:
        log.warning("workflow %s: could not remove the hold mark from %s: %s", rec.id, domain, exc)
        _note(store, rec, epoch, "hold-mark-failed", action="remove", error=str(exc), member=domain)


def _note(store: "Store", rec: Record, epoch: int, event: str, **detail: Any) -> None:
    try:
        store.append_event(rec.id, event, epoch=epoch, domain=rec.domain, **detail)
    except DomcaptureError:
        log.exception("workflow %s: could not record %s", rec.id, event)
