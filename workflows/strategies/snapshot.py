"""A snapshot the user keeps (virDomainSnapshotCreateXML with libvirt metadata).

internal: inside the qcow2 images; of a running domain it is a full system
checkpoint (memory + disks, the guest paused meanwhile), of a shut-off
domain the disks.  external: each disk moves onto a new overlay file (the
original images stop changing); disk-only by default, ``--memory`` saves the
memory to a file as well.  A disk-only external snapshot of a running guest
is quiesced through the Freeze / Thaw states.  Every step probes libvirt
(``snapshotLookupByName``) so a crash in any state resumes; rollback deletes
the snapshot this workflow created and leaves the domain on its original
images (see snapshot_common.delete_snapshot).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from .. import naming, quiesce
from ..definition import RESUME, Definition
from ..errors import InputError, StepFailed
from ..filecopy import sha256_file
from ..effects import Inspect
from ..hypervisor.base import Hypervisor
from ..record import Artifact, Record
from ..steps import Step, StepContext
from ..verify import verify_files
from . import common, snapshot_common
from . import overlays as ovl

NAME = "snapshot"
VERSION = 1

STATES = ["preflight", "freezing", "snapshotting", "thawing", "finalizing"]

TRANSITIONS = [
    # trigger     source           dest
    ["advance",  "preflight",     "freezing"],
    ["advance",  "freezing",      "snapshotting"],
    ["refreeze", "snapshotting",  "freezing"],     # the freeze was lost in a crash
    ["advance",  "snapshotting",  "thawing"],
    ["advance",  "thawing",       "finalizing"],
    ["advance",  "finalizing",    "succeeded"],
]


def _memory_bytes(hv: Hypervisor, domain: str) -> int:
    m = re.search(r"<memory unit='(\w+)'>(\d+)</memory>", hv.domain_xml(domain))
    if not m:
        return 0
    return int(m.group(2)) * {"KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "b": 1, "bytes": 1}.get(m.group(1), 1024)


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    kind = common.check_choice("kind", params.get("kind") or "internal", snapshot_common.KINDS)
    name = snapshot_common.check_name(params.get("name"), required=False)
    target = params.get("target")
    if target:
        target = common.check_target_dir(target)
        if kind == "internal":
            raise InputError("--target applies to --kind external (internal snapshots live inside the images)")
    state = snapshot_common.domain_state(hv, domain)
    memory = bool(params.get("memory"))
    if state == "shutoff" and memory:
        raise InputError(f"domain {domain} is shut off: there is no memory to capture (drop --memory)")
    if kind == "internal":
        memory = state == "running"  # QEMU captures memory + disks of a running domain, disks of a shut-off one
    disk_only_live = kind == "external" and not memory and state == "running"
    quiesce = params.get("quiesce")
    if quiesce in (None, ""):
        quiesce = "try" if disk_only_live else "off"
    common.check_choice("quiesce", quiesce, common.QUIESCE_MODES)
    if quiesce != "off" and not disk_only_live:
        raise InputError("--quiesce applies to disk-only external snapshots of a running domain; a snapshot "
                         "with memory restores the guest exactly as it was (a frozen guest would come back frozen)")
    out = {
        "kind": kind, "memory": memory, "name": name, "target": target, "quiesce": quiesce,
        "domain_state": state,
        "on_error": common.parse_on_error(params),
        "freeze_deadline": common.parse_seconds("freeze_deadline", params.get("freeze_deadline"),
                                                common.DEFAULT_FREEZE_DEADLINE),
        "commit_timeout": common.parse_seconds("commit_timeout", params.get("commit_timeout"),
                                               ovl.DEFAULT_COMMIT_TIMEOUT),
    }
    if name is not None and hv.lookup_snapshot(domain, name) is not None:
        raise InputError(f"domain {domain} already has a snapshot named {name!r}")
    disks = common.capture_disks(hv, domain)
    if kind == "internal":
        raw = [d.target for d in disks if d.format != "qcow2"]
        if raw:
            raise InputError(f"internal snapshots need qcow2 disks; {', '.join(raw)} of {domain} is raw "
                             "(use --kind external)")
    if kind == "external" and memory:
        folder = target or os.path.dirname(disks[0].source or "")
        common.check_space(folder, _memory_bytes(hv, domain), "memory state")
    return out


class Preflight(Step):
    description = "check the domain is as submitted; name the snapshot and every file before anything exists"

    def execute(self, ctx: StepContext) -> None:
        state = ctx.hv.domain_state(ctx.domain)
        if state != ctx.params["domain_state"]:
            raise StepFailed(f"domain {ctx.domain} is {state} now, it was {ctx.params['domain_state']} when "
                             "the snapshot was submitted; submit it again")
        disks = common.capture_disks(ctx.hv, ctx.domain)
        ctx.data["disks"] = [{"target": d.target, "source": d.source, "format": d.format} for d in disks]
        snap = ctx.params.get("name") or naming.snapshot_name(ctx.rec.id)
        ctx.rec.plan_artifact(Artifact("snapshot", "snapshot", snap))
        if ctx.params["kind"] == "external":
            target = ctx.params.get("target")
            for d in disks:
                folder = target or os.path.dirname(d.source or "")
                ctx.rec.plan_artifact(Artifact(f"overlay:{d.target}", "overlay",
                                               naming.snapshot_overlay_path(folder, ctx.rec.id, d.target), d.target))
            if ctx.params["memory"]:
                folder = target or os.path.dirname(disks[0].source or "")
                art = ctx.rec.plan_artifact(Artifact("memory", "memory-file",
                                                     naming.snapshot_memory_path(folder, ctx.rec.id)))
                art["remove"] = True
        ctx.data["snapshot"] = snap


class Snapshot(Step):
    description = "virDomainSnapshotCreateXML (atomic; libvirt keeps the metadata)"

    def redirect(self, ctx: StepContext) -> str | None:
        return "refreeze" if not self.probe(ctx) and common.needs_refreeze(ctx) else None

    def probe(self, ctx: StepContext) -> bool:
        snapshot_common.wait_idle(ctx)
        info = ctx.hv.lookup_snapshot(ctx.domain, ctx.data["snapshot"])
        if info is None:
            return False
        if not snapshot_common.is_ours(info, ctx.rec.id):
            raise StepFailed(f"domain {ctx.domain} has a snapshot named {info.name!r} that this workflow did "
                             "not create")
        return True

    def execute(self, ctx: StepContext) -> None:
        overlays = ovl.overlays(ctx) if ctx.params["kind"] == "external" else None
        memory = next((a["path"] for a in ctx.rec.artifacts_of("memory-file")), None)
        using = {d.source for d in ctx.hv.disks(ctx.domain)}
        for path in list((overlays or {}).values()) + ([memory] if memory else []):
            # left by an attempt libvirt refused (it removes what it created, but be sure)
            if path not in using:
                ctx.fx.files.remove_owned(path)
        ctx.data["snapshot_started_at"] = time.time()
        ctx.save("snapshot-intent", snapshot=ctx.data["snapshot"], overlays=overlays, memory_file=memory)
        ctx.hv.create_snapshot(ctx.domain, ctx.data["snapshot"], description=snapshot_common.marker(ctx.rec.id),
                               memory=ctx.params["memory"], overlays=overlays, memory_file=memory)
        ctx.data["snapshot_at"] = time.time()
        ctx.data["snapshot_seconds"] = round(ctx.data["snapshot_at"] - ctx.data["snapshot_started_at"], 3)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.set_artifact("snapshot", status="present")
        for art in ctx.rec.artifacts_of("overlay") + ctx.rec.artifacts_of("memory-file"):
            art["status"] = "present"
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        if quiesce.frozen_info(ctx.rec):  # an operator's rollback of a dead worker's freeze: thaw before any commit
            quiesce.thaw(ctx.hv, ctx.rec, by="rollback")
            ctx.save("thawed", reason="rolling back")
        how = snapshot_common.delete_snapshot(ctx, ctx.data.get("snapshot") or ctx.rec.artifacts["snapshot"]["path"],
                                              owner=ctx.rec.id)
        ctx.data["deleted_by"] = how
        ctx.rec.set_artifact("snapshot", status="deleted")


class Finalize(Step):
    description = "record what the snapshot holds (and the memory file's checksum)"

    def execute(self, ctx: StepContext) -> None:
        info = ctx.hv.lookup_snapshot(ctx.domain, ctx.data["snapshot"])
        if info is None or not snapshot_common.is_ours(info, ctx.rec.id):
            raise StepFailed(f"snapshot {ctx.data['snapshot']} of {ctx.domain} vanished before it was recorded")
        files = {}
        for art in ctx.rec.artifacts_of("memory-file"):
            if not art.get("checksum"):
                art["checksum"], art["size"] = f"sha256:{sha256_file(art['path'])}", os.path.getsize(art["path"])
            files["memory"] = {"path": art["path"], "size": art["size"], "checksum": art["checksum"]}
        ctx.rec.result = {
            "snapshot": info.name, "kind": ctx.params["kind"], "state": info.state, "memory": info.memory,
            "memory_file": info.memory_file, "overlays": info.overlays, "parent": info.parent,
            "quiesced": bool(ctx.data.get("quiesced")) and not ctx.data.get("freeze_broken"),
            "snapshot_seconds": ctx.data.get("snapshot_seconds"), "freeze_seconds": ctx.data.get("downtime_s"),
            # the guest stops for the whole call when memory is saved; a quiesced one for the freeze
            "downtime_s": ctx.data.get("snapshot_seconds") if info.has_memory else ctx.data.get("downtime_s"),
            "files": files,
        }


def verify(rec: Record, look: Inspect) -> list[dict[str, Any]]:
    """The snapshot is still there and ours; its overlays exist; its memory file is unchanged."""
    hv = look.hv
    name = rec.result["snapshot"]
    info = hv.lookup_snapshot(rec.domain, name)
    checks: list[dict[str, Any]] = [{"item": "snapshot", "path": name, "ok": info is not None and
                                     snapshot_common.is_ours(info, rec.id),
                                     **({} if info is not None else {"error": "missing from libvirt"})}]
    for target, path in sorted((rec.result.get("overlays") or {}).items()):
        checks.append({"item": f"overlay:{target}", "path": path, "ok": os.path.exists(path),
                       **({} if os.path.exists(path) else {"error": "missing"})})
    checks.extend(verify_files(rec))
    return checks


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "freezing": common.Freeze(),
    "snapshotting": Snapshot(),
    "thawing": common.Thaw(),
    "finalizing": Finalize(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, verify=verify,
                        options=(snapshot_common.OPT_KIND, snapshot_common.OPT_MEMORY, snapshot_common.OPT_NAME,
                                 common.OPT_TARGET, common.OPT_QUIESCE, common.OPT_ON_ERROR,
                                 common.OPT_FREEZE_DEADLINE, common.OPT_COMMIT_TIMEOUT),
                        summary="a kept libvirt snapshot: internal (memory + disks when running) or external "
                                "(overlays, disk-only or with memory)")
