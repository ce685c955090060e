"""Freeze bookkeeping shared by the freeze/thaw steps, the engine and recovery.

The record's ``data["frozen"]`` is written *before* the guest is frozen and
holds the thaw deadline; it is cleared only after a thaw succeeded.  Whoever
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
    try:
        count = hv.fs_thaw(rec.domain)
        outcome: dict[str, Any] = {"thawed_filesystems": count}
    except AgentUnavailable as exc:
        outcome = {"thawed_filesystems": 0, "agent": str(exc)}
    except DomcaptureError as exc:
        if hv.domain_state(rec.domain) in ("running", "paused"):
            raise
        # QEMU is gone (the guest powered off, or was killed): nothing is frozen any more
        outcome = {"thawed_filesystems": 0, "domain_down": str(exc)}
    now = time.time()
    outcome.update({"by": by, "at": now})
    if info.get("since"):
        outcome["frozen_seconds"] = round(now - info["since"], 3)
    rec.data["frozen"] = None
    rec.data["last_thaw"] = outcome
    return outcome
