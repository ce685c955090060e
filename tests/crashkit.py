"""Crash injection for the exhaustive tests on the in-memory hypervisor.

``Crasher`` is handed to the engine (``crash_hook``) and to the fake
hypervisor (``hook``, as ``hv-before:<method>`` / ``hv-after:<method>``); it
records every boundary it sees and raises ``SimulatedCrash`` at the one it
targets.  ``SimulatedCrash`` is a BaseException, so nothing in the engine
catches it, as with SIGKILL.  ``drive_to_end`` then does what the recovery
process and the next workers do, until the workflow ends.
"""

from __future__ import annotations

import collections
from typing import Callable

from workflows import strategies
from workflows.engine import Engine
from workflows.record import FINAL_STATUSES, RUNNING
from workflows.service import Captures
from workflows.store import Store


class SimulatedCrash(BaseException):
    pass


class Crasher:
    def __init__(self, target: tuple[str, int] | None = None) -> None:
        self.target = target
        self.seen: list[tuple[str, int]] = []
        self.counts: collections.Counter = collections.Counter()

    def __call__(self, label: str) -> None:
        self.counts[label] += 1
        point = (label, self.counts[label])
        self.seen.append(point)
        if point == self.target:
            self.target = None
            raise SimulatedCrash(label)

    def hv_hook(self, when: str, method: str) -> None:
        self(f"hv-{when}:{method}")


def make_engine(store: Store, hv, crasher: Crasher | None, worker: str = "w1") -> Engine:
    return Engine(store, strategies.DEFINITIONS, lambda uri: hv, worker, retry_delays=(0, 0, 0, 0),
                  crash_hook=crasher, sleep=lambda s: None)


def run_once(store: Store, hv, wf_id: str, crasher: Crasher | None, worker: str = "w1") -> bool:
    """Run the engine on ``wf_id``; True when it 'crashed'."""
    try:
        make_engine(store, hv, crasher, worker).run(wf_id)
        return False
    except SimulatedCrash:
        return True


def drive_to_end(store: Store, captures: Captures, hv, wf_id: str, crasher: Crasher | None = None,
                 rounds: int = 20, between: Callable[[], None] | None = None) -> dict:
    """Recover and re-run until the workflow is final or stopped; returns its record."""
    for i in range(rounds):
        rec = store.load(wf_id)
        if rec.status in FINAL_STATUSES or rec.status in ("needs_attention", "failed"):
            return rec.to_dict()
        if rec.status == RUNNING:
            captures.recover(wf_id)
        if between:
            between()
        run_once(store, hv, wf_id, crasher, f"w{i + 2}")
    raise AssertionError(f"workflow did not end: {store.load(wf_id).to_dict()}")
