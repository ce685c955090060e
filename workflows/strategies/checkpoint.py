"""Checkpoints on their own: create, delete, redefine (virDomainCheckpointCreateXML and friends).

A checkpoint captures no data: it starts tracking which blocks of each disk
change from now on (a bitmap in each qcow2 image).  Every action first
redefines the checkpoints libvirt lost, from our store, parents first and
validated (a checkpoint libvirt refuses is marked broken, with its
descendants); ``--action redefine`` does only that.

- create: ``domcapture-<id>``, written pending in our store, created in
  libvirt, committed (no data to wait for).  Rollback deletes it from both.
- delete: libvirt deletes it (its bitmap merges into its parent's; children
  are re-parented, or deleted too with ``--children``), then our store
  follows libvirt.  A delete is not undone: its effect is the point.

No quiescing: a checkpoint without a backup has no data to make consistent.
List them with ``domcapture checkpoints --domain D``.
"""

from __future__ import annotations

import time
from typing import Any

from .. import naming
from ..checkpoints import COMMITTED, KIND_PLAIN, PENDING, Checkpoint, restore_chain
from ..definition import RESUME, Definition, Option
from ..errors import InputError
from ..effects import Inspect
from ..record import Artifact, Record
from ..steps import Step, StepContext
from . import backup_common as bc
from . import common

NAME = "checkpoint"
VERSION = 1

STATES = ["preflight", "redefining", "applying"]

TRANSITIONS = [
    # trigger    source         dest
    ["advance", "preflight",   "redefining"],
    ["advance", "redefining",  "applying"],     # redefine what libvirt lost (REDEFINE_VALIDATE)
    ["advance", "applying",    "succeeded"],    # create | delete
]

ACTIONS = ("create", "delete", "redefine")
OPT_ACTION = Option("action", "checkpoint: create | delete | redefine (the ones libvirt lost, from our store)",
                    choices=ACTIONS)
OPT_CHECKPOINT = Option("checkpoint", "checkpoint --action delete: the checkpoint's name")
OPT_CHILDREN = Option("children", "checkpoint --action delete: delete its descendants too", flag=True)


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    action = common.check_choice("action", params.get("action") or "create", ACTIONS)
    out: dict[str, Any] = {"action": action, "children": bool(params.get("children")),
                           "on_error": common.parse_on_error(params)}
    bc.require_active(hv, domain)  # validation of redefined bitmaps needs a running domain
    bc.bitmap_disks(hv, domain)
    name = params.get("checkpoint")
    if action == "delete":
        if not name:
            raise InputError("--checkpoint is required with --action delete: the checkpoint's name")
        known = {c.name for c in hv.list_checkpoints(domain)}
        ours = {c.name for c in look.checkpoints.all(hv.canonical_uri(), domain)}
        if name not in known and name not in ours:
            raise InputError(f"domain {domain} has no checkpoint named {name!r}")
        out["checkpoint"] = name
    elif name:
        raise InputError(f"--checkpoint names the checkpoint to delete; --action {action} does not take one")
    elif out["children"]:
        raise InputError(f"--children applies to --action delete, not {action}")
    return out


class Preflight(Step):
    description = "inspect the disks; name the checkpoint to create"

    def execute(self, ctx: StepContext) -> None:
        bc.require_active(ctx.hv, ctx.domain)
        ctx.data["disks"] = [d.target for d in bc.bitmap_disks(ctx.hv, ctx.domain)]
        if ctx.params["action"] == "create":
            ctx.rec.plan_artifact(Artifact("checkpoint", "checkpoint", naming.checkpoint_name(ctx.rec.id)))


class Redefine(Step):
    description = "redefine the checkpoints libvirt lost, from our store, parents first, validated"

    def execute(self, ctx: StepContext) -> None:
        ctx.data["chain"] = restore_chain(ctx.hv, ctx.fx.checkpoints, ctx.rec, check=ctx.guard)


class Apply(Step):
    description = "create the checkpoint (pending, created, committed) | delete it from libvirt, then our store"

    def probe(self, ctx: StepContext) -> bool:
        action = ctx.params["action"]
        if action == "create":
            cp = ctx.fx.checkpoints.get(ctx.rec.uri, ctx.domain, naming.checkpoint_name(ctx.rec.id))
            return cp is not None and cp.state == COMMITTED
        if action == "delete":
            return self._doomed_in_store(ctx) == [] and \
                ctx.hv.lookup_checkpoint(ctx.domain, ctx.params["checkpoint"]) is None
        return True

    def execute(self, ctx: StepContext) -> None:
        if ctx.params["action"] == "create":
            self._create(ctx)
        else:
            self._delete(ctx)

    def _create(self, ctx: StepContext) -> None:
        cps, name = ctx.fx.checkpoints, naming.checkpoint_name(ctx.rec.id)
        info = ctx.hv.lookup_checkpoint(ctx.domain, name)
        if info is None:
            cps.put(ctx.rec, Checkpoint(name=name, workflow=ctx.rec.id, kind=KIND_PLAIN, state=PENDING,
                                        disks=list(ctx.data["disks"])))
            ctx.save("checkpoint-intent", checkpoint=name)
            info = ctx.hv.checkpoint_create(ctx.domain, name, list(ctx.data["disks"]))
        cp = cps.get(ctx.rec.uri, ctx.domain, name) or Checkpoint(name=name, workflow=ctx.rec.id, kind=KIND_PLAIN)
        cp.parent, cp.xml, cp.disks, cp.state = info.parent, info.xml, info.disks, COMMITTED
        cp.committed_at = cp.committed_at or time.time()
        cps.put(ctx.rec, cp)
        ctx.rec.set_artifact("checkpoint", status="present")

    def _doomed_in_store(self, ctx: StepContext) -> list[str]:
        """Our store's entries the delete removes: the checkpoint, and its descendants with --children."""
        cps = ctx.fx.checkpoints.all(ctx.rec.uri, ctx.domain)
        doomed = {ctx.params["checkpoint"]}
        for cp in cps:
            if ctx.params["children"] and cp.parent in doomed:
                doomed.add(cp.name)
        return [c.name for c in cps if c.name in doomed]

    def _doomed(self, ctx: StepContext) -> list[str]:
        """What the delete removes, in libvirt or our store: the checkpoint (and its descendants)."""
        doomed = [ctx.params["checkpoint"]]
        if ctx.params["children"]:
            for cp in ctx.hv.list_checkpoints(ctx.domain):  # parents first
                if cp.parent in doomed:
                    doomed.append(cp.name)
        return doomed + [n for n in self._doomed_in_store(ctx) if n not in doomed]

    def _delete(self, ctx: StepContext) -> None:
        name = ctx.params["checkpoint"]
        if "deleting" not in ctx.data:
            ctx.data["deleting"] = self._doomed(ctx)
            ctx.save("checkpoint-delete-intent", checkpoint=name, children=ctx.params["children"],
                     deleting=ctx.data["deleting"])
        if ctx.hv.lookup_checkpoint(ctx.domain, name) is not None:
            ctx.hv.checkpoint_delete(ctx.domain, name, children=ctx.params["children"])
        self._forget_deleted(ctx)

    def _forget_deleted(self, ctx: StepContext) -> None:
        """Once libvirt's delete is done: our store drops the same checkpoints and follows the re-parenting."""
        cps = ctx.fx.checkpoints
        doomed = set(ctx.data["deleting"]) | set(self._doomed_in_store(ctx))
        for cp in reversed(cps.all(ctx.rec.uri, ctx.domain)):  # children first
            if cp.name in doomed:
                cps.remove(ctx.rec, cp.name)
        # libvirt re-parented the children: our store follows
        restore_chain(ctx.hv, cps, ctx.rec, check=ctx.guard)

    def next_trigger(self, ctx: StepContext) -> str:
        action = ctx.params["action"]
        chain = ctx.data.get("chain") or {}
        ctx.rec.result = {"action": action, "redefined": chain.get("redefined", []),
                          "broken": sorted(chain.get("broken", {}))}
        if action == "create":
            ctx.rec.result["checkpoint"] = naming.checkpoint_name(ctx.rec.id)
        elif action == "delete":
            ctx.rec.result.update(checkpoint=ctx.params["checkpoint"], deleted=ctx.data.get("deleting", []))
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        action = ctx.params["action"]
        if action == "delete":
            name = ctx.params["checkpoint"]
            if "deleting" in ctx.data and ctx.hv.lookup_checkpoint(ctx.domain, name) is None:
                ctx.effect_stands(f"checkpoint {name} (with {', '.join(ctx.data['deleting'])}) was deleted; "
                                  "a deleted checkpoint's bitmaps cannot be brought back")
                self._forget_deleted(ctx)  # the store says what libvirt has: no entry for a deleted one
            return
        if action == "redefine":
            redefined = (ctx.data.get("chain") or {}).get("redefined") or []
            if redefined:
                ctx.effect_stands(f"checkpoints {', '.join(redefined)} were redefined in libvirt from the store; "
                                  "they stay (they describe bitmaps that exist)")
            return
        cps, name = ctx.fx.checkpoints, naming.checkpoint_name(ctx.rec.id)
        if ctx.hv.lookup_checkpoint(ctx.domain, name) is not None:
            ctx.save("checkpoint-delete-intent", checkpoint=name)
            ctx.hv.checkpoint_delete(ctx.domain, name)
        cp = cps.get(ctx.rec.uri, ctx.domain, name)
        if cp is not None and cp.workflow == ctx.rec.id:
            cps.remove(ctx.rec, name)
        if "checkpoint" in ctx.rec.artifacts:
            ctx.rec.set_artifact("checkpoint", status="deleted")


def verify(rec: Record, look: Inspect) -> list[dict[str, Any]]:
    """What the action left is still what libvirt and our store say."""
    hv = look.hv
    present = {c.name for c in hv.list_checkpoints(rec.domain)}
    cps = look.checkpoints
    checks = []
    if rec.params["action"] == "create":
        name = rec.result["checkpoint"]
        cp = cps.get(rec.uri, rec.domain, name)
        checks.append({"item": name, "ok": name in present and cp is not None and cp.state == COMMITTED,
                       "in_libvirt": name in present, "in_store": cp.state if cp else None})
    elif rec.params["action"] == "delete":
        for name in rec.result.get("deleted", []):
            gone = name not in present and cps.get(rec.uri, rec.domain, name) is None
            checks.append({"item": name, "ok": gone, "deleted": gone})
    for cp in cps.all(rec.uri, rec.domain):
        if cp.usable and rec.params["action"] == "redefine":
            checks.append({"item": cp.name, "ok": cp.name in present, "in_libvirt": cp.name in present})
    return checks


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "redefining": Redefine(),
    "applying": Apply(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, verify=verify,
                        options=(OPT_ACTION, OPT_CHECKPOINT, OPT_CHILDREN, common.OPT_ON_ERROR),
                        summary="create, delete or redefine checkpoints (incremental tracking, no data)")
