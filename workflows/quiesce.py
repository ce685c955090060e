"""Freeze bookkeeping shared by the freeze/thaw steps, the engine and recovery.

The record's ``data["frozen"]`` is written *before* the guest is frozen and
holds the thaw deadline (a consistency group's mark names every member in
``domains``); it is cleared only after a thaw succeeded.  Whoever
finds it set on a workflow nobody runs (recovery), or past its deadline (the
worker's heartbeat), thaws the guest.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import AgentUnavailable, DomcaptureError
from .hypervisor.base import Hypervisor
from .record import Record


def mark_freezing(rec: Record, deadline_s: float, now: float | None = None) -> None:
    now = time.time() if now is None else now
    rec.data["frozen"] = {"since": now, "until": now + deadline_s}


def frozen_info(rec: Record) -> dict[str, Any] | None:
    return rec.data.get("frozen")


def thaw(hv: Hypervisor, rec: Record, by: str) -> dict[str, Any]:
    """Thaw the guest unconditionally (even if the freeze seemed to fail) and record it.

    An agent that is gone cannot hold the guest frozen either, so
    AgentUnavailable counts as thawed.  Other errors propagate: the freeze
    mark stays so the next attempt thaws again.
    """
    info = rec.data.get("frozen") or {}
    if "domains" in info:  # a consistency group's freeze: every member it names, each tried before any error
        per: dict[str, Any] = {}
        failed: DomcaptureError | None = None
        for domain in info["domains"]:
            try:
                per[domain] = thaw_domain(hv, domain)
            except DomcaptureError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        outcome: dict[str, Any] = {"thawed_filesystems": sum(o["thawed_filesystems"] for o in per.values()),
                                   "members": per}
    else:
        outcome = thaw_domain(hv, rec.domain)
    now = time.time()
    outcome.update({"by": by, "at": now})
    if info.get("since"):
        outcome["frozen_seconds"] = round(now - info["since"], 3)
    rec.data["frozen"] = None
    rec.data["last_thaw"] = outcome
    return outcome


def thaw_domain(hv: Hypervisor, domain: str) -> dict[str, Any]:
    """Thaw one guest; an agent that is gone, or a QEMU that is gone, holds nothing frozen."""
    try:
        return {"thawed_filesystems": hv.fs_thaw(domain)}
    except AgentUnavailable as exc:
        return {"thawed_filesystems": 0, "agent": str(exc)}
    except DomcaptureError as exc:
        if hv.domain_state(domain) in ("running", "paused"):
            raise
        # QEMU is gone (the guest powered off, or was killed): nothing is frozen any more
        return {"thawed_filesystems": 0, "domain_down": str(exc)}
