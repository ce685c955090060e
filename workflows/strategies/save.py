"""Save (virDomainSave): the guest's memory to a file the user owns, plus
copies of its disks taken while it is stopped, so the pair can be rewound to
later (``save-restore --from ID``).

preflight -> saving -> copying -> restoring -> finalizing -> succeeded.
The guest is down from the save until the restore: that is the save, the
disk copies and the restore (the guide: potentially long downtime; measured
in ``result["downtime_s"]``).  libvirt writes the memory image itself, so its
path is recorded before the call and a probe accepts it only when libvirt
reads it back as a complete image of this domain.  A crash in any state
resumes; rollback restores the guest from its image (a guest stopped by this
workflow is never left off), then deletes the image and the copies.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .. import naming
from ..definition import RESUME, Definition
from ..errors import StepFailed
from ..filecopy import sha256_file
from ..effects import Inspect
from ..record import Artifact
from ..steps import Step, StepContext
from . import common, save_common

NAME = "save"
VERSION = 1

STATES = ["preflight", "saving", "copying", "restoring", "finalizing"]

TRANSITIONS = [
    # trigger    source         dest
    ["advance", "preflight",   "saving"],
    ["advance", "saving",      "copying"],
    ["advance", "copying",     "restoring"],
    ["advance", "restoring",   "finalizing"],
    ["advance", "finalizing",  "succeeded"],
]


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    out: dict[str, Any] = {
        "target": common.check_target_dir(params.get("target")),
        "keep_stopped": bool(params.get("keep_stopped")),
        "on_error": common.parse_on_error(params),
        "bandwidth": common.parse_bandwidth(params.get("bandwidth")),
    }
    common.require_running(hv, domain)
    disks = common.capture_disks(hv, domain)
    needed = hv.get_memory_bytes(domain) + sum(os.path.getsize(common.source_of(d)) for d in disks)
    common.check_space(out["target"], needed, "save target")
    return out


def _memory(ctx: StepContext) -> dict[str, Any]:
    return ctx.rec.artifacts["memory"]


class Preflight(Step):
    description = "inspect the domain and its disks; name the memory image and every copy before anything exists"

    def execute(self, ctx: StepContext) -> None:
        common.require_running(ctx.hv, ctx.domain)
        disks = common.capture_disks(ctx.hv, ctx.domain)
        target = ctx.params["target"]
        memory = ctx.hv.get_memory_bytes(ctx.domain)
        common.check_space(target, memory + sum(os.path.getsize(common.source_of(d)) for d in disks), "save target")
        ctx.data["uuid"] = ctx.hv.get_uuid(ctx.domain)
        ctx.data["memory_bytes"] = memory
        ctx.data["disks"] = [{"target": d.target, "source": d.source, "format": d.format,
                              "size": os.path.getsize(common.source_of(d))} for d in disks]
        ctx.rec.plan_artifact(Artifact("memory", "memory-image",
                                       naming.memory_image_path(target, ctx.domain, ctx.rec.id)))
        for d in disks:
            ctx.rec.plan_artifact(Artifact(f"disk:{d.target}", "disk-copy",
                                           naming.backup_file(target, ctx.domain, ctx.rec.id, d.target,
                                                              d.format or "raw"), d.target))
        ctx.rec.plan_artifact(Artifact("manifest", "manifest", naming.manifest_path(target, ctx.domain, ctx.rec.id)))

    def revert(self, ctx: StepContext) -> None:
        """The last revert to run: removes the capture folder once it is empty."""
        common.remove_capture_folder(ctx)


class Save(Step):
    description = "virDomainSave: memory to the recorded file, then the guest stops"

    def probe(self, ctx: StepContext) -> bool:
        return save_common.saved_to(ctx, _memory(ctx)["path"])

    def execute(self, ctx: StepContext) -> None:
        path = _memory(ctx)["path"]
        common.make_capture_folder(ctx)
        ctx.data["save_seconds"] = save_common.save_to(ctx, path, "save")
        ctx.data["saved_at"] = time.time()
        ctx.rec.set_artifact("memory", status="present")

    def revert(self, ctx: StepContext) -> None:
        """A guest this workflow stopped runs again from its image; then the image goes."""
        path = _memory(ctx)["path"]
        save_common.wait_no_job(ctx)
        if ctx.hv.domain_state(ctx.domain) == "shutoff":
            if not save_common.image_is_ours(ctx.hv, path, ctx.data["uuid"]):
                if "save_started_at" not in ctx.data.get("timing", {}):
                    return  # shut off before this workflow did anything to it
                raise StepFailed(f"domain {ctx.domain} is shut off but {path} is not a complete save image of "
                                 f"it; start the domain (virsh start {ctx.domain}), then continue the rollback")
            ctx.data["rollback_restore_seconds"] = save_common.restore_from(ctx, path, "rollback-restore")
        ctx.fx.files.remove_owned(path)
        ctx.rec.set_artifact("memory", status="deleted")


class CopyDisks(Step):
    description = "copy each disk image (the guest is stopped: they match the memory image) with checksums"

    def probe(self, ctx: StepContext) -> bool:
        return common.copies_present(ctx, "disk-copy")

    def execute(self, ctx: StepContext) -> None:
        state = ctx.hv.domain_state(ctx.domain)
        if state != "shutoff":
            raise StepFailed(f"domain {ctx.domain} is {state}: its disks no longer match the saved memory")
        started = time.time()
        common.copy_disks(ctx, "disk")
        ctx.data["copy_seconds"] = round(ctx.data.get("copy_seconds", 0) + time.time() - started, 3)

    def revert(self, ctx: StepContext) -> None:
        common.remove_copies(ctx, "disk-copy")


class Restore(Step):
    description = "virDomainRestore from the memory image: the guest runs on (skipped with --keep-stopped)"

    def probe(self, ctx: StepContext) -> bool:
        if ctx.params.get("keep_stopped"):
            return True
        save_common.wait_no_job(ctx)
        return ctx.hv.domain_state(ctx.domain) == "running" and "restore_started_at" in ctx.data.get("timing", {})

    def execute(self, ctx: StepContext) -> None:
        ctx.data.setdefault("timing", {})["restore_started_at"] = time.time()
        seconds = save_common.restore_from(ctx, _memory(ctx)["path"], "restore")
        if seconds is None:
            raise StepFailed(f"domain {ctx.domain} was started by someone else while its disks were copied")
        ctx.data["restore_seconds"] = seconds
        ctx.data["running_again_at"] = time.time()

    def next_trigger(self, ctx: StepContext) -> str:
        if "running_again_at" not in ctx.data and "restore_started_at" in ctx.data.get("timing", {}):
            # restored before a crash that lost the time: the moment it was found running bounds it
            ctx.data["running_again_at"] = time.time()
            ctx.data["downtime_is_upper_bound"] = True
        return "advance"


class Finalize(Step):
    description = "checksum the memory image, write the manifest; the capture is complete only now"

    def _manifest(self, ctx: StepContext) -> str:
        path: str = ctx.rec.artifacts["manifest"]["path"]
        return path

    def probe(self, ctx: StepContext) -> bool:
        if not _memory(ctx).get("checksum"):
            return False
        try:
            with open(self._manifest(ctx)) as f:
                same: bool = json.load(f).get("workflow") == ctx.rec.id
                return same
        except (OSError, ValueError):
            return False

    def execute(self, ctx: StepContext) -> None:
        mem = _memory(ctx)
        ctx.progress("checksum", 0, os.path.getsize(mem["path"]), force=True)
        ctx.rec.set_artifact("memory", checksum=f"sha256:{sha256_file(mem['path'])}",
                             size=os.path.getsize(mem["path"]))
        ctx.progress("checksum", mem["size"], mem["size"])
        ctx.save("memory-checksummed")
        manifest = {"format": "domcapture-save", "version": 1, "workflow": ctx.rec.id, "strategy": NAME,
                    "domain": ctx.domain, "uri": ctx.rec.uri, "uuid": ctx.data["uuid"],
                    "saved_at": ctx.data.get("saved_at"), "files": self._files(ctx)}
        ctx.fx.files.write_atomic(self._manifest(ctx), manifest)

    @staticmethod
    def _files(ctx: StepContext) -> dict[str, Any]:
        files = {"memory": {**save_common.file_info(_memory(ctx)), "kind": "memory"}}
        for a in ctx.rec.artifacts_of("disk-copy"):
            disk = next(d for d in ctx.data["disks"] if d["target"] == a["disk"])
            files[a["disk"]] = {**save_common.file_info(a), "kind": "disk", "format": disk["format"],
                                "source": disk["source"]}
        return files

    def next_trigger(self, ctx: StepContext) -> str:
        ctx.rec.set_artifact("manifest", status="present")
        timing = ctx.data.get("timing", {})
        running_again = ctx.data.get("running_again_at")
        ctx.rec.result = {
            "capture_dir": os.path.dirname(self._manifest(ctx)), "manifest": self._manifest(ctx),
            "files": {k: save_common.file_info(v) for k, v in self._files(ctx).items()},
            "memory_image_bytes": _memory(ctx)["size"], "saved_at": ctx.data.get("saved_at"),
            "save_seconds": ctx.data.get("save_seconds"), "copy_seconds": ctx.data.get("copy_seconds"),
            "restore_seconds": ctx.data.get("restore_seconds"),
            "downtime_s": round(running_again - timing["save_started_at"], 3) if running_again else None,
            "downtime_is_upper_bound": bool(ctx.data.get("downtime_is_upper_bound")),
            "domain_state": "shutoff" if ctx.params.get("keep_stopped") else "running",
            "rewind_with": f"domcapture submit save-restore --domain {ctx.domain} --from {ctx.rec.id}",
        }
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        path = self._manifest(ctx)
        for p in (path, naming.partial_of(path)):
            ctx.fx.files.remove_owned(p)
        ctx.rec.set_artifact("manifest", status="deleted")


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "saving": Save(),
    "copying": CopyDisks(),
    "restoring": Restore(),
    "finalizing": Finalize(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate,
                        options=(common.OPT_TARGET, save_common.OPT_KEEP_STOPPED, common.OPT_ON_ERROR,
                                 common.OPT_BANDWIDTH),
                        summary="virDomainSave to a file + copies of the stopped disks; restore; rewind later")
