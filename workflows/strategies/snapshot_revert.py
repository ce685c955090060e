"""Revert a domain to one of its snapshots (virDomainRevertToSnapshot).

The domain's disks (and, for a snapshot with memory, its running state)
return to the snapshot's; the state it leaves is discarded, so a revert
cannot be undone.  A crash resumes: the probe waits for any revert libvirtd
is still running, then asks whether the snapshot became the current one
(when it already was, it cannot tell, and reverting again is harmless: the
domain ends at the snapshot either way).  Rollback is possible until the
revert is issued; after that it has nothing it could restore, and says so
in the workflow's history ("effect-stands"); the workflow ends `partially_rolled_back`.
"""

from __future__ import annotations

import time
from typing import Any

from ..definition import RESUME, Definition
from ..errors import InputError, StepFailed
from ..effects import Inspect
from ..steps import Step, StepContext
from . import common, snapshot_common

NAME = "snapshot-revert"
VERSION = 1

STATES = ["preflight", "reverting"]

TRANSITIONS = [
    # trigger    source         dest
    ["advance", "preflight",   "reverting"],
    ["advance", "reverting",   "succeeded"],
]


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    name = snapshot_common.check_name(params.get("name"), required=True)
    state = hv.domain_state(domain)
    if state not in ("running", "paused", "shutoff"):
        raise InputError(f"domain {domain} is {state}; it can be reverted when running, paused or shut off")
    assert name is not None
    info = snapshot_common.existing(hv, domain, name)
    version = hv.get_library_version()
    if info.external and version < snapshot_common.EXTERNAL_REVERT_SINCE:
        raise InputError(f"snapshot {name!r} is external; libvirt {version // 1_000_000}.{version // 1000 % 1000}"
                         f".{version % 1000} reverts only to internal snapshots (external needs 9.7 or later)")
    return {"name": name,
            "on_error": common.parse_on_error(params)}


class Preflight(Step):
    description = "note where the domain is before the revert (state, current snapshot)"

    def execute(self, ctx: StepContext) -> None:
        snapshot_common.wait_idle(ctx)
        info = ctx.hv.lookup_snapshot(ctx.domain, ctx.params["name"])
        if info is None:
            raise StepFailed(f"snapshot {ctx.params['name']} of {ctx.domain} no longer exists")
        ctx.data.update(snapshot=info.name, snapshot_state=info.state, snapshot_memory=info.memory,
                        state_before=ctx.hv.domain_state(ctx.domain),
                        current_before=ctx.hv.get_current_snapshot(ctx.domain))


def _reverted(ctx: StepContext) -> bool:
    """True only when libvirt shows the revert happened (the snapshot became current)."""
    snap: str = ctx.data["snapshot"]
    return ctx.data.get("current_before") != snap and ctx.hv.get_current_snapshot(ctx.domain) == snap


class Revert(Step):
    description = "virDomainRevertToSnapshot (disks, and memory when the snapshot has it)"

    def probe(self, ctx: StepContext) -> bool:
        snapshot_common.wait_idle(ctx)
        return _reverted(ctx)

    def execute(self, ctx: StepContext) -> None:
        started = time.time()
        ctx.data["revert_started_at"] = started
        ctx.save("revert-intent", snapshot=ctx.data["snapshot"])
        ctx.hv.revert_to_snapshot(ctx.domain, ctx.data["snapshot"])
        ctx.data["revert_seconds"] = round(time.time() - started, 3)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.result = {"snapshot": ctx.data["snapshot"], "revert_seconds": ctx.data.get("revert_seconds"),
                          "state_before": ctx.data.get("state_before"),
                          "state": ctx.hv.domain_state(ctx.domain),
                          "memory_restored": ctx.data.get("snapshot_memory") != "no",
                          "current": ctx.hv.get_current_snapshot(ctx.domain)}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        if "revert_started_at" not in ctx.data:
            return  # never issued: nothing changed
        snapshot_common.wait_idle(ctx)
        reason = (f"the revert of {ctx.domain} to {ctx.data['snapshot']} was issued and may have taken effect; "
                  "a revert discards the state it replaces, so it cannot be undone")
        ctx.data["reverted"] = _reverted(ctx)
        ctx.effect_stands(reason)


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "reverting": Revert(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate,
                        verify=lambda rec, look: [{"item": "current", "path": rec.result["snapshot"],
                                                 "ok": look.hv.get_current_snapshot(rec.domain)
                                                 == rec.result["snapshot"]}],
                        options=(snapshot_common.OPT_NAME, common.OPT_ON_ERROR),
                        summary="revert the domain to one of its snapshots (internal on libvirt 9.0)")
