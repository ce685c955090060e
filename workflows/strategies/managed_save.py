"""Managed save (virDomainManagedSave): libvirt saves the guest's memory and
keeps the image itself, then the guest stops.

preflight -> saving -> succeeded.  Memory and disks are captured together
while the guest is stopped, so there is no quiescing.  The way back is a
plain start, which restores the memory: ``managed-save-restore``.  A crash in
either state resumes (the probe asks libvirt whether the domain is shut off
with a managed save image, after waiting out a save libvirtd still runs);
rollback starts the domain from its managed save image, so the guest runs
on as before.
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
from . import common, save_common

NAME = "managed-save"
VERSION = 1

STATES = ["preflight", "saving"]

TRANSITIONS = [
    # trigger    source        dest
    ["advance", "preflight",  "saving"],
    ["advance", "saving",     "succeeded"],
]


def check_persistent(hv: Hypervisor, domain: str) -> None:
    if not hv.is_persistent(domain):
        raise InputError(f"domain {domain} is transient; libvirt keeps managed save images only for "
                         "persistent (defined) domains")


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    out = {"on_error": common.parse_on_error(params)}
    common.require_running(hv, domain)
    check_persistent(hv, domain)
    return out


class Preflight(Step):
    description = "check the domain runs and is persistent; note what it is"

    def execute(self, ctx: StepContext) -> None:
        common.require_running(ctx.hv, ctx.domain)
        check_persistent(ctx.hv, ctx.domain)
        ctx.data["uuid"] = ctx.hv.get_uuid(ctx.domain)
        ctx.data["memory_bytes"] = ctx.hv.get_memory_bytes(ctx.domain)


class ManagedSave(Step):
    description = "virDomainManagedSave: memory to libvirt's image, then the guest stops"

    def probe(self, ctx: StepContext) -> bool:
        save_common.wait_no_job(ctx)
        return ctx.hv.domain_state(ctx.domain) == "shutoff" and ctx.hv.has_managed_save_image(ctx.domain)

    def execute(self, ctx: StepContext) -> None:
        state = ctx.hv.domain_state(ctx.domain)
        if state != "running":
            raise StepFailed(f"domain {ctx.domain} is {state} without a managed save image; it was not "
                             "stopped by this workflow")
        started = time.time()
        ctx.data["save_started_at"] = started
        ctx.save("managed-save-intent")
        ctx.hv.managed_save(ctx.domain)
        ctx.data["save_seconds"] = round(time.time() - started, 3)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.result = {"managed_save_image": True, "domain_state": "shutoff",
                          "save_seconds": ctx.data.get("save_seconds"), "memory_bytes": ctx.data.get("memory_bytes"),
                          "resume_with": f"domcapture submit managed-save-restore --domain {ctx.domain}"}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        """Start the domain from its managed save image: the guest runs on where it stopped."""
        save_common.wait_no_job(ctx)
        state = ctx.hv.domain_state(ctx.domain)
        if state != "shutoff":
            return  # the save never happened (or failed, and libvirt let the guest run on)
        if not ctx.hv.has_managed_save_image(ctx.domain):
            if not ctx.data.get("save_started_at"):
                return  # shut off before this workflow did anything
            raise StepFailed(f"domain {ctx.domain} is shut off and has no managed save image: its memory "
                             f"state is gone; start it (virsh start {ctx.domain}), then continue the rollback")
        started = time.time()
        ctx.save("start-intent", reason="rollback")
        ctx.hv.start(ctx.domain)
        ctx.data["restore_seconds"] = round(time.time() - started, 3)


def verify(rec: Record, look: Inspect) -> list[dict[str, Any]]:
    hv = look.hv
    state = hv.domain_state(rec.domain)
    has_image = hv.has_managed_save_image(rec.domain)
    return [{"item": "managed-save-image", "ok": state == "shutoff" and has_image, "domain_state": state,
             "has_managed_save_image": has_image,
             **({} if has_image else {"error": "no managed save image (restored or removed since)"})}]


STEPS: dict[str, Step] = {"preflight": Preflight(), "saving": ManagedSave()}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, options=(common.OPT_ON_ERROR,), verify=verify,
                        summary="virDomainManagedSave: memory kept by libvirt, guest stopped; a start restores it")
