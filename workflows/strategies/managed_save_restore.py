"""The way back from a managed save: start the domain, which restores the
memory libvirt kept, and wait until it runs.

preflight -> starting -> succeeded.  A crash resumes: the probe waits out a
restore libvirtd still runs and then asks whether the domain runs.  Rollback
of a start that happened puts the domain back where it was found: shut off
with a managed save image (a new managed save of the restored guest).
"""

from __future__ import annotations

import time
from typing import Any

from ..definition import RESUME, Definition
from ..errors import InputError, StepFailed
from ..effects import Inspect
from ..hypervisor.base import Hypervisor
from ..record import Record
from ..steps import Step, StepContext
from ..verify import nothing_kept
from . import common, save_common

NAME = "managed-save-restore"
VERSION = 1

STATES = ["preflight", "starting"]

TRANSITIONS = [
    # trigger    source        dest
    ["advance", "preflight",  "starting"],
    ["advance", "starting",   "succeeded"],
]


def check_restorable(hv: Hypervisor, domain: str) -> None:
    state = hv.domain_state(domain)
    if state != "shutoff":
        raise InputError(f"domain {domain} is {state}; only a shut off domain is restored from a managed save image")
    if not hv.has_managed_save_image(domain):
        raise InputError(f"domain {domain} has no managed save image; a start would boot it afresh")


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    out = {"on_error": common.parse_on_error(params)}
    check_restorable(hv, domain)
    return out


class Preflight(Step):
    description = "check the domain is shut off with a managed save image"

    def execute(self, ctx: StepContext) -> None:
        check_restorable(ctx.hv, ctx.domain)
        ctx.data["uuid"] = ctx.hv.get_uuid(ctx.domain)


class Start(Step):
    description = "virDomainCreate: libvirt restores the managed save image; wait until the domain runs"

    def probe(self, ctx: StepContext) -> bool:
        save_common.wait_no_job(ctx)
        return ctx.hv.domain_state(ctx.domain) == "running"

    def execute(self, ctx: StepContext) -> None:
        if ctx.hv.domain_state(ctx.domain) != "shutoff":
            raise StepFailed(f"domain {ctx.domain} is {ctx.hv.domain_state(ctx.domain)}, neither running nor "
                             "shut off")
        if not ctx.hv.has_managed_save_image(ctx.domain):
            raise StepFailed(f"the managed save image of {ctx.domain} is gone; a start would boot it afresh")
        started = time.time()
        ctx.data["start_started_at"] = started
        ctx.save("start-intent")
        ctx.hv.start(ctx.domain)
        save_common.wait_no_job(ctx)
        state = ctx.hv.domain_state(ctx.domain)
        if state != "running":
            raise StepFailed(f"domain {ctx.domain} is {state} after its start")
        ctx.data["restore_seconds"] = round(time.time() - started, 3)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.result = {"domain_state": "running", "restore_seconds": ctx.data.get("restore_seconds")}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        """A domain this workflow started goes back to shut off with a managed save image."""
        save_common.wait_no_job(ctx)
        if not ctx.data.get("start_started_at") or ctx.hv.domain_state(ctx.domain) != "running":
            return
        ctx.save("managed-save-intent", reason="rollback")
        ctx.hv.managed_save(ctx.domain)


def verify(rec: Record, look: Inspect) -> list[dict[str, Any]]:
    """Nothing kept: the domain was started from its managed save image and ran.  Whether it runs now says
    nothing about that start (a later stop or capture changes it), so the domain is not read."""
    return nothing_kept(rec, f"started {rec.domain} from its managed save image; it ran",
                        rec.data.get("start_started_at"))


STEPS: dict[str, Step] = {"preflight": Preflight(), "starting": Start()}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, options=(common.OPT_ON_ERROR,),
                        verify=verify,
                        summary="start a managed-saved domain: its memory is restored; wait until it runs")
