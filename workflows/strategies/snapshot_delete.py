"""Delete one of a domain's snapshots (virDomainSnapshotDelete), safely.

Internal: libvirt deletes it from the qcow2 images.  External (libvirt 9.0):
only a snapshot without children whose overlays are the domain's active
images is accepted; libvirt merges each overlay into the image below (an
active blockcommit + pivot on a running domain) and removes the overlays.
Where libvirt refuses (an internal parent, for one) and the domain runs,
the same is done by hand: blockcommit --active + pivot, then
DELETE_METADATA_ONLY, then the overlay files.  A memory file is removed
only when a domcapture snapshot workflow named it.  A crash resumes (every
part probes libvirt); a rollback aborts commits that did not pivot yet, and
once a disk left its overlay it completes the delete instead (a half-deleted
snapshot is the one state not to leave).
"""

from __future__ import annotations

import os
import time
from typing import Any

from .. import naming
from ..definition import RESUME, Definition
from ..errors import InputError, StepFailed
from ..effects import Inspect
from ..hypervisor.base import Hypervisor
from ..hypervisor.snapshot_info import SnapshotInfo
from ..record import Artifact
from ..steps import Step, StepContext
from . import common, snapshot_common
from . import overlays as ovl

NAME = "snapshot-delete"
VERSION = 1

STATES = ["preflight", "deleting"]

TRANSITIONS = [
    # trigger    source        dest
    ["advance", "preflight",  "deleting"],
    ["advance", "deleting",   "succeeded"],
]


def _check_external(hv: Hypervisor, domain: str, info: SnapshotInfo) -> None:
    if info.children:
        raise InputError(f"snapshot {info.name!r} is external and has {info.children} child snapshot(s); "
                         "libvirt 9.0 deletes only an external snapshot without children: delete those first")
    sources = {d.target: d.source for d in hv.disks(domain)}
    for target, path in info.overlays.items():
        if sources.get(target) != path:
            raise InputError(f"snapshot {info.name!r} is external and disk {target} of {domain} is not on its "
                             f"overlay {path} (it uses {sources.get(target)}); only the snapshot the domain runs "
                             "on can be deleted safely")
        if target not in info.base:
            raise InputError(f"snapshot {info.name!r} does not say which image disk {target} had before it")


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    name = snapshot_common.check_name(params.get("name"), required=True)
    assert name is not None
    info = snapshot_common.existing(hv, domain, name)
    if info.external:
        snapshot_common.domain_state(hv, domain)
        _check_external(hv, domain, info)
    return {"name": name,
            "on_error": common.parse_on_error(params),
            "commit_timeout": common.parse_seconds("commit_timeout", params.get("commit_timeout"),
                                                   ovl.DEFAULT_COMMIT_TIMEOUT)}


class Preflight(Step):
    description = "name the snapshot's overlays, the images below them and its memory file"

    def execute(self, ctx: StepContext) -> None:
        snapshot_common.wait_idle(ctx)
        info = ctx.hv.lookup_snapshot(ctx.domain, ctx.params["name"])
        if info is None:
            raise StepFailed(f"snapshot {ctx.params['name']} of {ctx.domain} no longer exists")
        ctx.data.update(snapshot=info.name, kind="external" if info.external else "internal",
                        disks=[{"target": t, "source": info.base[t]} for t in info.overlays])
        if info.external:
            try:
                _check_external(ctx.hv, ctx.domain, info)
            except InputError as exc:
                raise StepFailed(str(exc)) from exc
        for target, path in info.overlays.items():
            ctx.rec.plan_artifact(Artifact(f"overlay:{target}", "overlay", path, target, status="present"))
        if info.memory_file:
            art = ctx.rec.plan_artifact(Artifact("memory", "memory-file", info.memory_file, status="present"))
            # only a memory file a domcapture snapshot workflow named is ours to remove
            art["remove"] = os.path.basename(info.memory_file).startswith(f"{naming.PREFIX}-")


def _gone(ctx: StepContext) -> bool:
    if ctx.hv.lookup_snapshot(ctx.domain, ctx.data["snapshot"]) is not None or ovl.on_overlay(ctx):
        return False
    return not any(os.path.exists(a["path"]) for a in ctx.rec.artifacts_of("overlay")) and not any(
        a.get("remove") and os.path.exists(a["path"]) for a in ctx.rec.artifacts_of("memory-file"))


class Delete(Step):
    description = "virDomainSnapshotDelete; for an external snapshot libvirt refuses: commit + pivot by hand"

    def probe(self, ctx: StepContext) -> bool:
        snapshot_common.wait_idle(ctx)
        return _gone(ctx)

    def execute(self, ctx: StepContext) -> None:
        started = time.time()
        ctx.data.setdefault("delete_started_at", started)
        ctx.data["deleted_by"] = snapshot_common.delete_snapshot(ctx, ctx.data["snapshot"])
        ctx.data["delete_seconds"] = round(time.time() - started, 3)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.result = {"snapshot": ctx.data["snapshot"], "kind": ctx.data["kind"],
                          "deleted_by": ctx.data.get("deleted_by"), "delete_seconds": ctx.data.get("delete_seconds"),
                          "removed": sorted(a["path"] for a in ctx.rec.artifacts.values() if a["status"] == "deleted"),
                          "kept": sorted(a["path"] for a in ctx.rec.artifacts_of("memory-file")
                                         if not a.get("remove"))}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        if "delete_started_at" not in ctx.data:
            return
        snapshot_common.wait_idle(ctx)
        planned = ovl.overlays(ctx)
        on = ovl.on_overlay(ctx)
        if ctx.hv.lookup_snapshot(ctx.domain, ctx.data["snapshot"]) is not None and len(on) == len(planned):
            views = ovl.views(ctx)
            for target in on:  # commits of ours started by hand that never pivoted: the snapshot stays whole
                if views[target].job is not None and ovl.is_ours(ctx, views[target]):
                    ctx.save("abort-intent", disk=target)
                    ctx.hv.block_job_abort(ctx.domain, target)
            return
        snapshot_common.delete_snapshot(ctx, ctx.data["snapshot"])
        reason = f"the delete of {ctx.data['snapshot']} had taken effect; the rollback completed it"
        ctx.effect_stands(reason)


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "deleting": Delete(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate,
                        verify=lambda rec, look: [{"item": "snapshot", "path": rec.result["snapshot"],
                                                 "ok": look.hv.lookup_snapshot(rec.domain,
                                                                               rec.result["snapshot"]) is None}],
                        options=(snapshot_common.OPT_NAME, common.OPT_ON_ERROR, common.OPT_COMMIT_TIMEOUT),
                        summary="delete a snapshot; external ones are merged back (libvirt, or commit + pivot)")
