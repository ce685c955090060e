"""RQ job entry points: one job advances one workflow as far as it can."""

from __future__ import annotations

import logging

from workflows import strategies
from workflows.engine import Engine

from .runtime import Runtime
from .settings import Settings, process_id

log = logging.getLogger("domcapture.jobs")


def run_workflow(wf_id: str) -> str:
    settings = Settings.from_env()
    rt = Runtime(settings)
    engine = Engine(rt.store, strategies.DEFINITIONS, rt.hypervisor, process_id(), lease_ttl=settings.lease_ttl)
    outcome = engine.run(wf_id)
    log.info("workflow %s: %s", wf_id, outcome)
    return outcome
