"""RQ job entry points: one job advances one workflow as far as it can."""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
from typing import Callable

from workflows import strategies
from workflows.engine import Engine
from workflows.limits import Limits

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
    rec = rt.store.load(wf_id)
    wanted = {f"{kind}:{name}": int(n) for kind, (name, n) in rec.data.get("limits", {}).items()}
    if not wanted or rec.final:
        outcome = engine.run(wf_id)
    else:
        # Taken before the first step of this run, so never waited on between a freeze and its thaw.
        note = f"{rt.settings.prefix}:wf:{wf_id}:waiting"
        limits = Limits(rt.store.r, rt.settings.prefix, ttl=max(5.0, 2 * settings.lease_ttl))

        def waiting(name: str) -> None:
            rt.store.r.set(note, f"waiting for limit {name} (at most {wanted[name]} at once)", ex=10)

        with limits.held(wf_id, wanted, waiting=waiting):
            rt.store.r.delete(note)
            outcome = engine.run(wf_id)
    log.info("workflow %s: %s", wf_id, outcome)
    return outcome
