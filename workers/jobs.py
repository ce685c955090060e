"""RQ job entry points: one job advances one workflow as far as it can."""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
from typing import Callable

from workflows import strategies
from workflows.engine import Engine

from .runtime import Runtime
from .settings import Settings, process_id

log = logging.getLogger("domcapture.jobs")


def fault_hook(spec: str | None) -> Callable[[str], None] | None:
    """Fault injection for chaos and crash tests: ``DOMCAPTURE_FAULT=kill-at:<pattern>``.

    The worker SIGKILLs itself at the first engine boundary whose label
    matches the glob pattern (labels look like ``saved:snapshot-intent:snapshotting``,
    ``executed:committing``; ``domcapture show`` lists the events).
    """
    if not spec:
        return None
    kind, _, pattern = spec.partition(":")
    if kind != "kill-at" or not pattern:
        raise ValueError(f"DOMCAPTURE_FAULT must look like kill-at:<pattern>, got {spec!r}")

    def hook(label: str) -> None:
        if fnmatch.fnmatchcase(label, pattern):
            log.warning("fault injection: SIGKILL at %s", label)
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def run_workflow(wf_id: str) -> str:
    settings = Settings.from_env()
    rt = Runtime(settings)
    engine = Engine(rt.store, strategies.DEFINITIONS, rt.hypervisor, process_id(), lease_ttl=settings.lease_ttl,
                    crash_hook=fault_hook(os.environ.get("DOMCAPTURE_FAULT")))
    outcome = engine.run(wf_id)
    log.info("workflow %s: %s", wf_id, outcome)
    return outcome
