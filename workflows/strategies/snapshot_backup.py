"""Backup via a temporary external snapshot (the guide's first sequence).

freeze -> disk-only external snapshot of every disk -> thaw -> copy each
backing file -> active blockcommit -> wait for ready -> pivot -> delete the
overlays -> write the manifest.  A crash in any state resumes (every step
probes libvirt first); rollback commits and pivots any disk still on our
overlay, thaws, and deletes overlays and partial files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .. import hooks, naming
from ..definition import RESUME, Definition
from ..errors import StepFailed
from ..effects import Inspect
from ..record import Artifact
from ..steps import Step, StepContext
from . import common, evidence

NAME = "snapshot-backup"
VERSION = 1

STATES = ["preflight", "freezing", "snapshotting", "thawing", "copying", "committing",
          "waiting_ready", "pivoting", "cleaning", "finalizing"]

TRANSITIONS = [
    # trigger     source            dest
    ["advance",  "preflight",      "freezing"],
    ["advance",  "freezing",       "snapshotting"],
    ["refreeze", "snapshotting",   "freezing"],      # the freeze was lost in a crash
    ["advance",  "snapshotting",   "thawing"],
    ["advance",  "thawing",        "copying"],
    ["advance",  "copying",        "committing"],
    ["advance",  "committing",     "waiting_ready"],
    ["recommit", "waiting_ready",  "committing"],    # a job vanished before ready
    ["advance",  "waiting_ready",  "pivoting"],
    ["advance",  "pivoting",       "cleaning"],
    ["advance",  "cleaning",       "finalizing"],
    ["advance",  "finalizing",     "succeeded"],
]


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    out: dict[str, Any] = {
        "target": common.check_target_dir(params.get("target")),
        "quiesce": common.check_choice("quiesce", params.get("quiesce") or "try", common.QUIESCE_MODES),
        "on_error": common.parse_on_error(params),
        "freeze_deadline": common.parse_seconds("freeze_deadline", params.get("freeze_deadline"),
                                                common.DEFAULT_FREEZE_DEADLINE),
        "commit_timeout": common.parse_seconds("commit_timeout", params.get("commit_timeout"),
                                               common.DEFAULT_COMMIT_TIMEOUT),
        "bandwidth": common.parse_bandwidth(params.get("bandwidth")),
    }
    out.update(common.parse_hooks(params))
    common.require_running(hv, domain)
    disks = common.capture_disks(hv, domain)
    common.check_space(out["target"], sum(os.path.getsize(common.source_of(d)) for d in disks), "backup target")
    return out


class Preflight(Step):
    description = "inspect the disks; name every overlay and backup file before anything exists"

    def execute(self, ctx: StepContext) -> None:
        common.require_running(ctx.hv, ctx.domain)
        disks = common.capture_disks(ctx.hv, ctx.domain)
        target = ctx.params["target"]
        common.check_space(target, sum(os.path.getsize(common.source_of(d)) for d in disks), "backup target")
        ctx.data["disks"] = [{"target": d.target, "source": d.source, "format": d.format,
                              "size": os.path.getsize(common.source_of(d))} for d in disks]
        for d in disks:
            ctx.rec.plan_artifact(Artifact(f"overlay:{d.target}", "overlay",
                                           naming.overlay_path(common.source_of(d), ctx.rec.id, d.target), d.target))
            ctx.rec.plan_artifact(Artifact(f"backup:{d.target}", "backup-file",
                                           naming.backup_file(target, ctx.domain, ctx.rec.id, d.target,
                                                              d.format or "raw"), d.target))
        folder = naming.backup_dir(target, ctx.domain, ctx.rec.id)
        common.plan_capture_folder(ctx, folder)
        evidence.plan_firmware(ctx, folder)
        evidence.plan_manifest(ctx, naming.manifest_path(target, ctx.domain, ctx.rec.id))

    def revert(self, ctx: StepContext) -> None:
        """The last revert to run: removes the backup folder once it is empty."""
        common.remove_capture_folder(ctx)


class Snapshot(Step):
    description = "external disk-only snapshot of every disk at once (atomic, no metadata)"

    def redirect(self, ctx: StepContext) -> str | None:
        return "refreeze" if not self.probe(ctx) and common.needs_refreeze(ctx) else None

    def probe(self, ctx: StepContext) -> bool:
        on = common.on_overlay(ctx)
        if on and len(on) != len(common.overlays(ctx)):
            raise StepFailed(f"only disks {on} are on their overlays: the snapshot was not atomic")
        return bool(on)

    def execute(self, ctx: StepContext) -> None:
        planned = common.overlays(ctx)
        for path in planned.values():  # left by an attempt that never switched the domain
            ctx.fx.files.remove_owned(path)
        ctx.data["snapshot_started_at"] = time.time()
        ctx.save("snapshot-intent", overlays=planned)
        ctx.hv.snapshot_disk_only(ctx.domain, planned)
        ctx.data["snapshot_at"] = time.time()
        ctx.data["snapshot_seconds"] = round(ctx.data["snapshot_at"] - ctx.data["snapshot_started_at"], 3)
        for target in planned:
            ctx.rec.set_artifact(f"overlay:{target}", status="present")

    def revert(self, ctx: StepContext) -> None:
        common.get_off_overlays(ctx)


class CopyBackingFiles(Step):
    description = "copy each original (now read-only backing) image to the target"

    def probe(self, ctx: StepContext) -> bool:
        return common.copies_present(ctx, "backup-file")

    def execute(self, ctx: StepContext) -> None:
        on = common.on_overlay(ctx)
        if len(on) != len(ctx.data["disks"]):
            raise StepFailed("the domain left its overlays before the copy finished; the images are not frozen")
        common.make_capture_folder(ctx)
        common.copy_disks(ctx, "backup")

    def revert(self, ctx: StepContext) -> None:
        common.remove_copies(ctx, "backup-file")


class Commit(Step):
    description = "active blockcommit of each overlay into its original image"

    def probe(self, ctx: StepContext) -> bool:
        disks = common.disk_map(ctx)
        planned = common.overlays(ctx)
        return all(disks[t].source != p or disks[t].mirror_job for t, p in planned.items())

    def execute(self, ctx: StepContext) -> None:
        common.start_commits(ctx)


class WaitReady(Step):
    description = "wait until every commit job is ready to pivot (confirmed in the domain XML)"

    def execute(self, ctx: StepContext) -> None:
        deadline = ctx.data.setdefault("commit_deadline", time.time() + float(ctx.params["commit_timeout"]))
        ctx.data["vanished"] = common.wait_ready(ctx, deadline)

    def next_trigger(self, ctx: StepContext) -> str:
        return "recommit" if ctx.data.pop("vanished", None) else "advance"


class Pivot(Step):
    description = "pivot each disk back onto its original image"

    def probe(self, ctx: StepContext) -> bool:
        return not common.on_overlay(ctx)

    def execute(self, ctx: StepContext) -> None:
        common.pivot_all(ctx)


class Cleanup(Step):
    description = "delete the overlays"

    def probe(self, ctx: StepContext) -> bool:
        return all(not os.path.exists(a["path"]) for a in ctx.rec.artifacts_of("overlay"))

    def execute(self, ctx: StepContext) -> None:
        common.remove_overlays(ctx)


class Finalize(Step):
    description = "copy the NVRAM/TPM state; write the manifest (every file, size, sha256; signed); complete"

    def _manifest(self, ctx: StepContext) -> str:
        path: str = ctx.rec.artifacts["manifest"]["path"]
        return path

    def probe(self, ctx: StepContext) -> bool:
        path = self._manifest(ctx)
        try:
            with open(path) as f:
                same: bool = json.load(f).get("workflow") == ctx.rec.id
                return same
        except (OSError, ValueError):
            return False

    def execute(self, ctx: StepContext) -> None:
        evidence.copy_firmware(ctx)
        files = [{"disk": a["disk"], "path": a["path"], "size": a["size"], "checksum": a["checksum"],
                  "format": next(d["format"] for d in ctx.data["disks"] if d["target"] == a["disk"])}
                 for a in ctx.rec.artifacts_of("backup-file")]
        manifest = {"format": "domcapture-backup", "version": 1, "workflow": ctx.rec.id, "strategy": NAME,
                    "domain": ctx.domain, "uri": ctx.rec.uri, "snapshot_at": ctx.data.get("snapshot_at"),
                    "quiesced": bool(ctx.data.get("quiesced")) and not ctx.data.get("freeze_broken"),
                    "files": files, "firmware": ctx.data.get("firmware")}
        evidence.write_manifest(ctx, manifest)

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.set_artifact("manifest", status="present")
        ctx.rec.result = {"backup_dir": os.path.dirname(self._manifest(ctx)),
                          "manifest": self._manifest(ctx),
                          "files": {a["disk"]: {"path": a["path"], "size": a["size"], "checksum": a["checksum"]}
                                    for a in ctx.rec.artifacts_of("backup-file")},
                          "quiesced": bool(ctx.data.get("quiesced")) and not ctx.data.get("freeze_broken"),
                          "downtime_s": ctx.data.get("downtime_s"),
                          "snapshot_seconds": ctx.data.get("snapshot_seconds"),
                          **evidence.result_fields(ctx)}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        evidence.remove_manifest(ctx)
        evidence.remove_firmware(ctx)
        common.remove_capture_folder(ctx)


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "freezing": common.Freeze(),
    "snapshotting": Snapshot(),
    "thawing": common.Thaw(),
    "copying": CopyBackingFiles(),
    "committing": Commit(),
    "waiting_ready": WaitReady(),
    "pivoting": Pivot(),
    "cleaning": Cleanup(),
    "finalizing": Finalize(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate,
                        options=(common.OPT_TARGET, common.OPT_QUIESCE, common.OPT_ON_ERROR,
                                 common.OPT_FREEZE_DEADLINE, common.OPT_COMMIT_TIMEOUT, common.OPT_BANDWIDTH,
                                 *hooks.OPTIONS),
                        summary="disk-only external snapshot, copy the backing images, active commit + pivot")
