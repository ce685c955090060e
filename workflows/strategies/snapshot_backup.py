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
from ..errors import DomainNotRunning, DomcaptureError, StepFailed
from ..effects import Inspect
from ..record import Artifact
from ..steps import Step, StepContext
from . import common, evidence
from . import overlays as ovl

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
                                               ovl.DEFAULT_COMMIT_TIMEOUT),
        "bandwidth": common.parse_bandwidth(params.get("bandwidth")),
    }
    out.update(common.parse_hooks(params))
    out.update(common.parse_disk_selection(params))
    out["overlay_dir"] = common.parse_overlay_dir(params)
    state = require_capturable(hv, domain)
    common.check_quiesce_state(domain, state, out["quiesce"])
    disks, _ = common.choose_disks(hv, domain, out, backing_ok=True, block_ok=True,
                                     network_ok=True)
    common.check_space(out["target"], sum(common.chain_size(d, hv, domain) for d in disks), "backup target")
    return out


class Preflight(Step):
    description = "inspect the disks; name every overlay and backup file before anything exists"

    def execute(self, ctx: StepContext) -> None:
        ctx.data["offline"] = require_capturable(ctx.hv, ctx.domain) == "shutoff"
        ctx.data["targets_at_start"] = sorted(d.target for d in ctx.hv.disks(ctx.domain))
        disks, ctx.data["skipped_disks"] = common.choose_disks(ctx.hv, ctx.domain, ctx.params, backing_ok=True,
                                                               block_ok=True, network_ok=True)
        target = ctx.params["target"]
        common.check_space(target, sum(common.chain_size(d, ctx.hv, ctx.domain) for d in disks), "backup target")
        ctx.data["disks"] = [{"target": d.target, "source": d.source, "format": d.format, "type": d.type, "url": d.url,
                              "size": common.chain_size(d, ctx.hv, ctx.domain), "backing": d.backing,
                              "flatten": common.flattens(d) or ctx.data["offline"],
                              "backup_format": "qcow2" if ctx.data["offline"] else common.backup_format(d)}
                             for d in disks]
        for d in disks:
            fmt = "qcow2" if ctx.data["offline"] else common.backup_format(d)
            ctx.rec.plan_artifact(Artifact(f"backup:{d.target}", "backup-file",
                                           naming.backup_file(target, ctx.domain, ctx.rec.id, d.target, fmt),
                                           d.target))
            if ctx.data["offline"]:
                continue  # a shut-off domain's images are read as they are: no overlay
            ctx.rec.plan_artifact(Artifact(f"overlay:{d.target}", "overlay",
                                           common.overlay_for(d, ctx.rec.id, ctx.params.get("overlay_dir")),
                                           d.target))
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
        if ctx.data.get("offline"):
            return True  # a shut-off domain: its images are read directly
        on = ovl.on_overlay(ctx)
        if on and len(on) != len(ovl.overlays(ctx)):
            raise StepFailed(f"only disks {on} are on their overlays: the snapshot was not atomic")
        return bool(on)

    def execute(self, ctx: StepContext) -> None:
        planned = ovl.overlays(ctx)
        for path in planned.values():  # left by an attempt that never switched the domain
            ctx.fx.files.remove_owned(path)
        for folder in {os.path.dirname(p) for p in planned.values()}:
            if not os.path.isdir(folder):  # the overlay folder (--overlay-dir), made 0700 on first use
                ctx.fx.files.make_shared_folder(folder)
        ctx.data["snapshot_started_at"] = time.time()
        ctx.save("snapshot-intent", overlays=planned)
        ctx.hv.snapshot_disk_only(ctx.domain, planned)
        ctx.data["snapshot_at"] = time.time()
        ctx.data["snapshot_seconds"] = round(ctx.data["snapshot_at"] - ctx.data["snapshot_started_at"], 3)
        for target in planned:
            ctx.rec.set_artifact(f"overlay:{target}", status="present")

    def revert(self, ctx: StepContext) -> None:
        ovl.get_off_overlays(ctx)


class CopyBackingFiles(Step):
    description = "copy each original (now read-only backing) image to the target"

    def probe(self, ctx: StepContext) -> bool:
        return common.copies_present(ctx, "backup-file")

    def execute(self, ctx: StepContext) -> None:
        if ctx.data.get("offline"):
            self._offline(ctx)
            return
        on = ovl.on_overlay(ctx)
        if len(on) != len(ctx.data["disks"]):
            raise StepFailed("the domain left its overlays before the copy finished; the images are not frozen")
        common.make_capture_folder(ctx)
        common.copy_disks(ctx, "backup")

    def _offline(self, ctx: StepContext) -> None:
        """A shut-off domain: qemu-img reads each image under its read lock, so a start behind our back
        fails on QEMU's image lock while a disk is being read; a start between two disks (or before the
        first) is caught by the state and image signatures checked around the copies, and the capture
        rolls back."""
        if ctx.hv.domain_state(ctx.domain) != "shutoff":
            raise StepFailed(f"{ctx.domain} was started before its offline copy; nothing was copied")
        before = ctx.data.setdefault("offline_signature", image_signature(ctx))
        common.make_capture_folder(ctx)
        common.copy_disks(ctx, "backup")
        state, after = ctx.hv.domain_state(ctx.domain), image_signature(ctx)
        if state != "shutoff" or after != before:
            why = f"is {state}" if state != "shutoff" else "had its images written"
            raise StepFailed(f"{ctx.domain} {why} during the offline copy: the copies are not of one instant")

    def revert(self, ctx: StepContext) -> None:
        common.remove_copies(ctx, "backup-file")


def require_capturable(hv: Any, domain: str) -> str:
    """Running or paused (overlay, copy, commit; a paused one is not frozen) or shut off (images read
    offline)."""
    state: str = hv.domain_state(domain)
    if state not in ("running", "paused", "shutoff"):
        raise DomainNotRunning(f"domain {domain} is {state}; snapshot-backup captures a running, paused or "
                               "shut-off domain")
    return state


def image_signature(ctx: StepContext) -> dict[str, list[int]]:
    """(mtime_ns, size) of every local image file of the captured disks and their backing files."""
    out: dict[str, list[int]] = {}
    for d in ctx.data["disks"]:
        for path in [d["source"], *d.get("backing", [])]:
            if path and d.get("type", "file") == "file" and os.path.exists(path):
                st = os.stat(path)
                out[path] = [st.st_mtime_ns, st.st_size]
    return out


class Commit(Step):
    description = ("blockcommit of each overlay into its original image: active, or below another tool's "
                   "layer; never on another tool's job")

    def probe(self, ctx: StepContext) -> bool:
        if ovl.domain_state(ctx) not in ovl.ACTIVE:
            return not ovl.on_overlay(ctx)
        planned = ovl.overlays(ctx)
        return all(v.place(planned[t]) == ovl.ABSENT or (v.job is not None and ovl.is_ours(ctx, v))
                   for t, v in ovl.views(ctx).items())

    def execute(self, ctx: StepContext) -> None:
        ovl.commit_unplugged(ctx)
        deadline = ctx.data.setdefault("commit_deadline", time.time() + float(ctx.params["commit_timeout"]))
        while blocked := ovl.start_commits(ctx):
            ovl.note_foreign(ctx, blocked)
            if time.time() > deadline:
                raise ovl.foreign_deadline(ctx, blocked)
            ctx.check_cancel()
            ctx.sleep(ovl.POLL)
        ovl.clear_foreign(ctx)


class WaitReady(Step):
    description = "wait until every commit job is ready to pivot (confirmed in the domain XML)"

    def execute(self, ctx: StepContext) -> None:
        deadline = ctx.data.setdefault("commit_deadline", time.time() + float(ctx.params["commit_timeout"]))
        ctx.data["vanished"] = ovl.wait_ready(ctx, deadline)

    def next_trigger(self, ctx: StepContext) -> str:
        return "recommit" if ctx.data.pop("vanished", None) else "advance"


class Pivot(Step):
    description = "pivot each disk back onto its original image"

    def probe(self, ctx: StepContext) -> bool:
        return not ovl.on_overlay(ctx)

    def execute(self, ctx: StepContext) -> None:
        ovl.pivot_all(ctx)


class Cleanup(Step):
    description = "delete the overlays, once no domain's chain holds them"

    def probe(self, ctx: StepContext) -> bool:
        return all(not os.path.exists(a["path"]) for a in ctx.rec.artifacts_of("overlay"))

    def execute(self, ctx: StepContext) -> None:
        ovl.commit_unplugged(ctx)
        ovl.remove_overlays(ctx)


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
                  "format": next(d.get("backup_format") or d["format"] for d in ctx.data["disks"]
                                 if d["target"] == a["disk"])}
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
                          "skipped_disks": ctx.data.get("skipped_disks", []),
                          "offline": bool(ctx.data.get("offline")),
                          "paused": bool(ctx.data.get("paused")),
                          "quiesce_skipped": None if ctx.data.get("quiesced") else ctx.data.get("quiesce_error"),
                          **changes_by_others(ctx),
                          **evidence.result_fields(ctx)}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        evidence.remove_manifest(ctx)
        evidence.remove_firmware(ctx)
        common.remove_capture_folder(ctx)


def changes_by_others(ctx: StepContext) -> dict[str, Any]:
    """What other actors did to the domain's disks during the capture, as the result reports it."""
    out: dict[str, Any] = {}
    if ctx.data.get("foreign_layers"):
        out["foreign_layers"] = {t: {"layer": layer, "handled": "our overlay was committed into the original "
                                                                 "below it; the layer is now backed by the original"}
                                 for t, layer in ctx.data["foreign_layers"].items()}
    if ctx.data.get("unplugged"):
        out["unplugged_disks"] = {t: {**u, "handled": "unplugged during the capture; our overlay was committed "
                                                      "into its original offline"}
                                  for t, u in ctx.data["unplugged"].items()}
    start = ctx.data.get("targets_at_start")
    if start is not None:
        try:
            added = sorted({d.target for d in ctx.hv.disks(ctx.domain)} - set(start))
        except DomcaptureError:
            added = []
        if added:
            out["disks_added_during_capture"] = {t: "plugged in during the capture: not in this backup"
                                                 for t in added}
    return out


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
                                 common.OPT_DISKS, common.OPT_EXCLUDE, common.OPT_OVERLAY_DIR,
                                 *hooks.OPTIONS),
                        summary="disk-only external snapshot, copy the backing images, active commit + pivot")
