"""Direct backup (the guide's second sequence), full or incremental, push or pull.

preflight -> restore the checkpoint chain (redefine what libvirt lost) ->
freeze -> backup begin (creates checkpoint ``domcapture-<id>`` in the same
call; incremental from the last committed checkpoint of our store) -> thaw
-> push: wait for libvirt's job to complete | pull: read the extents over NBD
-> backup end -> commit the checkpoint in our store -> write the manifest.

A shut-off domain has no backup job: the same checkpoint and bitmaps are made
offline and its images read through qemu-nbd (``direct_offline``).

The domain definition is never touched.  A crash in any state resumes: the
backup job lives in libvirtd (a push keeps writing, a pull keeps serving), and
every step asks libvirt first.  Rollback ends our job, deletes the files, the
libvirt checkpoint we created and its pending entry in our store, and thaws.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, cast

from .. import datapath, hooks, naming, nbdio, qcow2, quiesce
from ..checkpoints import COMMITTED, KIND_BACKUP, PENDING, Checkpoint, backup_base, owned_pending, restore_chain
from ..definition import RESUME, Definition, Option
from ..errors import (CheckpointInconsistent, CheckpointNotFound, DeadlineExceeded, DomainNotRunning, InputError,
                      OperationFailed, StepFailed)
from ..filecopy import CHECK_INTERVAL, CheckCadence
from ..effects import Inspect
from ..hypervisor.backup_types import BackupJob
from ..record import Artifact
from ..steps import Step, StepContext
from . import backup_common as bc
from . import common, direct_offline, evidence

log = logging.getLogger(__name__)

NAME = "direct-backup"
VERSION = 1

STATES = ["preflight", "checking_chain", "freezing", "beginning", "thawing", "transferring", "ending",
          "committing", "finalizing"]

TRANSITIONS = [
    # trigger     source             dest
    ["advance",  "preflight",       "checking_chain"],
    ["advance",  "checking_chain",  "freezing"],
    ["advance",  "freezing",        "beginning"],       # virDomainFSFreeze()
    ["refreeze", "beginning",       "freezing"],        # the freeze was lost in a crash
    ["advance",  "beginning",       "thawing"],         # virDomainBackupBegin() + checkpoint
    ["advance",  "thawing",         "transferring"],    # virDomainFSThaw()
    ["advance",  "transferring",    "ending"],          # wait for push | pull over NBD
    ["advance",  "ending",          "committing"],      # virDomainBackupEnd() (abortJob)
    ["advance",  "committing",      "finalizing"],      # the checkpoint counts from now on
    ["advance",  "finalizing",      "succeeded"],
]

MODES = ("push", "pull")
DEFAULT_BACKUP_TIMEOUT = 3600.0
POLL = 0.02  # a finished push job is seen within 20 ms (each poll is one libvirt call; the lease and cancel
# checks, Redis round trips, go by filecopy.CheckCadence: 50 ms apart, further when Redis is slow)

OPT_MODE = Option("mode", "direct-backup: push (libvirt writes the files) | pull (read over NBD); default push",
                  choices=MODES)
OPT_INCREMENTAL = Option("incremental", "direct-backup: only what changed since the last committed checkpoint "
                                        "(full when there is none, and the record says why)", flag=True)
COMPRESSIONS = ("zstd",)
OPT_COMPRESS = Option("compress", "direct-backup --mode pull: write qcow2 compressed clusters (zstd); "
                                  "plain qemu-img and restore read them", choices=COMPRESSIONS)
OPT_ENCRYPT_KEY_FILE = Option("encrypt_key_file", "direct-backup --mode pull: encrypt the backup at rest (qcow2 LUKS) "
                                                  "with the passphrase in this file (read by QEMU, never copied)")
OPT_BACKUP_TIMEOUT = Option("backup_timeout", "direct-backup: seconds a push backup job may take (default 3600)")


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    out: dict[str, Any] = {
        "target": common.check_target_dir(params.get("target")),
        "mode": common.check_choice("mode", params.get("mode") or "push", MODES),
        "incremental": bool(params.get("incremental")),
        "quiesce": common.check_choice("quiesce", params.get("quiesce") or "try", common.QUIESCE_MODES),
        "on_error": common.parse_on_error(params),
        "freeze_deadline": common.parse_seconds("freeze_deadline", params.get("freeze_deadline"),
                                                common.DEFAULT_FREEZE_DEADLINE),
        "backup_timeout": common.parse_seconds("backup_timeout", params.get("backup_timeout"),
                                               DEFAULT_BACKUP_TIMEOUT),
    }
    if params.get("compress"):
        out["compress"] = common.check_choice("compress", params["compress"], COMPRESSIONS)
        if out["mode"] != "pull":  # libvirt's push job has no compression setting: QEMU writes plain clusters
            raise InputError("--compress needs --mode pull (libvirt's push job writes uncompressed clusters)")
    if params.get("encrypt_key_file"):
        out["encrypt_key_file"] = common.check_key_file("encrypt_key_file", params["encrypt_key_file"])
        if out["mode"] != "pull":
            raise InputError("--encrypt-key-file needs --mode pull (a push target's key is a libvirt secret)")
        if out.get("compress"):
            raise InputError("--compress and --encrypt-key-file are not offered together")
    out.update(common.parse_hooks(params))
    out.update(common.parse_disk_selection(params))
    state = require_backupable(hv, domain)
    job = hv.get_backup_job(domain) if state != "shutoff" else None
    if job is not None:  # no workflow of ours holds the domain (checked before validation): it is another tool's
        raise InputError(f"{bc.foreign_job_reason(domain, job)}; domcapture never aborts it: submit again once "
                         f"it has ended (virsh domjobinfo {domain})")
    common.check_quiesce_state(domain, state, out["quiesce"])
    disks = common.choose_disks(hv, domain, out, backing_ok=True, block_ok=True, network_ok=True)[0]
    if state == "shutoff":
        bc.check_offline_whole(disks, domain)
    if not out["incremental"]:  # an incremental's size is not known before its bitmap is read
        common.check_space(out["target"], sum(common.chain_size(d, hv, domain) for d in disks), "backup target")
    return out


# -- helpers -----------------------------------------------------------------------------------
def require_backupable(hv: Any, domain: str) -> str:
    """Running or paused (libvirt's backup job), or shut off (its images read offline)."""
    state: str = hv.domain_state(domain)
    if state not in ("running", "paused", "shutoff"):
        raise DomainNotRunning(f"domain {domain} is {state}; direct-backup captures a running, paused or "
                               "shut-off domain")
    return state


def _cp_name(ctx: StepContext) -> str:
    return naming.checkpoint_name(ctx.rec.id)


def _job_files(ctx: StepContext) -> dict[str, str]:
    """target -> the file libvirt writes: the push target's partial name, or the pull scratch file."""
    if ctx.params["mode"] == "push":
        return {a["disk"]: a["partial"] for a in ctx.rec.artifacts_of("backup-file")}
    return {a["disk"]: a["path"] for a in ctx.rec.artifacts_of("scratch-file")}


def _our_job(ctx: StepContext) -> BackupJob | None:
    """Our backup job while it runs.  Another tool's job is never taken for ours (nor waited on, nor ended):
    libvirt runs one backup job per domain, so while theirs runs ours is gone."""
    job = ctx.hv.get_backup_job(ctx.domain)
    if job is not None and not bc.job_is_ours(ctx, job):
        log.warning("workflow %s: %s; ours is not running", ctx.rec.id, bc.foreign_job_reason(ctx.domain, job))
        return None
    return job


def _whole_targets(ctx: StepContext) -> list[str]:
    """The disks taken in full every time (no bitmap: raw files, block devices, network disks)."""
    return [d["target"] for d in ctx.data["disks"] if d.get("whole")]


def _bitmap_targets(ctx: StepContext) -> list[str]:
    """The disks with a bitmap in the checkpoint (qcow2 images)."""
    return [d["target"] for d in ctx.data["disks"] if not d.get("whole")]


def disk_kind(ctx: StepContext, disk: str) -> str:
    """How this backup holds ``disk``: "full", or "incremental" over the parent backup's file."""
    return "incremental" if ctx.data["kind"] == "incremental" and disk not in _whole_targets(ctx) else "full"


def _backing_name(ctx: StepContext, art: dict[str, Any]) -> str | None:
    """The name an incremental file's header gives its parent backup's file (relative); None for a whole disk."""
    base = ctx.data.get("base")
    if not base or disk_kind(ctx, art["disk"]) != "incremental":
        return None
    return os.path.relpath(str(base["files"][art["disk"]]), os.path.dirname(art["path"]))


def _manifest(ctx: StepContext) -> str:
    path: str = ctx.rec.artifacts["manifest"]["path"]
    return path


class Preflight(Step):
    description = ("inspect the disks (qcow2; raw/block/network taken whole); name every file, the socket and the "
                   "checkpoint before anything exists")

    def execute(self, ctx: StepContext) -> None:
        ctx.data["offline"] = require_backupable(ctx.hv, ctx.domain) == "shutoff"
        disks, ctx.data["skipped_disks"] = common.choose_disks(ctx.hv, ctx.domain, ctx.params,
                                                                   backing_ok=True, block_ok=True,
                                                                   network_ok=True)
        if ctx.data["offline"]:
            bc.check_offline_whole(disks, ctx.domain)
        target, wf = ctx.params["target"], ctx.rec.id
        whole = bc.whole_disks(disks)  # no bitmap: taken in full every time, the qcow2 disks incrementally
        ctx.data["disks"] = [{"target": d.target, "source": d.source, "format": d.format,
                              "virtual_size": ctx.hv.get_disk_capacity(ctx.domain, d.target),
                              **({"whole": True} if d.target in whole else {})} for d in disks]
        ctx.data["domain_xml"] = ctx.hv.get_inactive_xml(ctx.domain)
        for d in disks:
            path = naming.backup_file(target, ctx.domain, wf, d.target, "qcow2")
            art = ctx.rec.plan_artifact(Artifact(f"backup:{d.target}", "backup-file", path, d.target))
            art["partial"] = naming.partial_of(path)
            if ctx.params["mode"] == "pull" and not ctx.data["offline"]:
                ctx.rec.plan_artifact(Artifact(f"scratch:{d.target}", "scratch-file",
                                               naming.scratch_file(target, ctx.domain, wf, d.target), d.target))
        if ctx.params["mode"] == "pull" and not ctx.data["offline"]:
            ctx.rec.plan_artifact(Artifact("socket", "nbd-socket", naming.nbd_socket(wf)))
        ctx.rec.plan_artifact(Artifact("checkpoint", "checkpoint", naming.checkpoint_name(wf)))
        ctx.rec.plan_artifact(Artifact("domain-xml", "domain-xml", naming.domain_xml_path(target, ctx.domain, wf)))
        evidence.plan_firmware(ctx, naming.backup_dir(target, ctx.domain, wf))
        evidence.plan_manifest(ctx, naming.manifest_path(target, ctx.domain, wf))

    def revert(self, ctx: StepContext) -> None:
        """The last revert to run: removes the backup folder once it is empty."""
        common.remove_capture_folder(ctx)


class CheckChain(Step):
    description = "redefine the checkpoints libvirt lost (parents first, validated); choose full or incremental"

    def execute(self, ctx: StepContext) -> None:
        if not direct_offline.is_offline(ctx):
            bc.refuse_foreign_job(ctx)  # before the freeze: the guest is not held frozen while we wait
        cps = ctx.fx.checkpoints
        ctx.data["chain"] = restore_chain(ctx.hv, cps, ctx.rec, check=ctx.guard)
        ctx.data.pop("base", None)
        ctx.data.pop("fallback", None)
        kind = "full"
        if ctx.params["incremental"]:
            present = {c.name for c in ctx.hv.list_checkpoints(ctx.domain)}
            targets = _bitmap_targets(ctx)
            base, why = backup_base(cps, ctx.rec, targets, present, lambda p: bc.read_manifest(p) is not None)
            manifest = bc.read_manifest(base.backup["manifest"]) if base and base.backup else None
            if base and manifest:
                files = {f["disk"]: f["path"] for f in manifest["files"]}
                missing = [t for t in targets if not os.path.exists(files.get(t, ""))]
                if missing:
                    why = f"the backup of {base.name} ({base.workflow}) lost its files for {missing}"
                else:
                    kind = "incremental"
                    ctx.data["base"] = {"checkpoint": base.name, "workflow": base.workflow,
                                        "manifest": (base.backup or {})["manifest"], "files": files,
                                        "chain": manifest.get("chain") or [base.workflow]}
            if not targets:
                kind, why = "full", "no disk can hold a bitmap (raw, block or network disks only)"
                ctx.data.pop("base", None)
            if kind == "full":
                ctx.data["fallback"] = f"incremental requested, taking a full backup: {why}"
                ctx.save("fallback-to-full", reason=why)  # the history says why, as the result does
        ctx.data["kind"] = kind


class Begin(Step):
    description = "backup begin (push target files | pull NBD export + scratch files) and its checkpoint, at once"

    def redirect(self, ctx: StepContext) -> str | None:
        if self.probe(ctx):
            return None
        if not direct_offline.is_offline(ctx) and bc.foreign_job(ctx) is not None:
            # another tool began a backup since checking_chain: thaw now, wait (retries), freeze again after
            if quiesce.frozen_info(ctx.rec):
                quiesce.thaw(ctx.hv, ctx.rec, by=ctx.rec.worker or "worker")
                hooks.post_thaw(ctx)
                ctx.save("thawed", reason="a backup job that is not ours runs on the domain")
            bc.refuse_foreign_job(ctx)
        return "refreeze" if common.needs_refreeze(ctx) else None

    def probe(self, ctx: StepContext) -> bool:
        # backupBegin creates the checkpoint with the job, atomically: it exists iff the backup began
        return ctx.hv.lookup_checkpoint(ctx.domain, _cp_name(ctx)) is not None

    def _pending(self, ctx: StepContext) -> Checkpoint:
        return Checkpoint(name=_cp_name(ctx), workflow=ctx.rec.id, kind=KIND_BACKUP, state=PENDING,
                          disks=_bitmap_targets(ctx),
                          backup={"manifest": _manifest(ctx), "dir": os.path.dirname(_manifest(ctx)),
                                  "mode": ctx.params["mode"], "kind": ctx.data["kind"]})

    def _begin(self, ctx: StepContext) -> None:
        files = _job_files(ctx)
        bc.remove_ours(ctx, list(files.values()))  # left by an attempt libvirt refused
        socket = ctx.rec.artifacts.get("socket", {}).get("path")
        if socket:
            ctx.fx.files.make_shared_folder(os.path.dirname(socket))
            bc.remove_ours(ctx, [socket])
        common.make_capture_folder(ctx)
        base = ctx.data.get("base", {}).get("checkpoint")
        ctx.data["began_at"] = time.time()
        if direct_offline.is_offline(ctx):
            direct_offline.begin(ctx, _cp_name(ctx), base)
            return
        ctx.save("backup-intent", checkpoint=_cp_name(ctx), kind=ctx.data["kind"], base=base,
                 mode=ctx.params["mode"])
        ctx.hv.backup_begin(ctx.domain, mode=ctx.params["mode"], disks=files, checkpoint=_cp_name(ctx),
                            incremental=base, socket=socket, full=_whole_targets(ctx))

    def execute(self, ctx: StepContext) -> None:
        cps = ctx.fx.checkpoints
        cps.put(ctx.rec, self._pending(ctx))  # pending before libvirt knows it: never an unknown checkpoint
        try:
            self._begin(ctx)
        except (CheckpointInconsistent, CheckpointNotFound) as exc:
            base = ctx.data.get("base", {}).get("checkpoint")
            if not base:
                raise
            # pitfall: a bitmap lost (e.g. in a QEMU crash): the chain is broken, fall back to full
            cps.mark_broken(ctx.rec, base, str(exc))
            ctx.data.pop("base")
            ctx.data["kind"] = "full"
            ctx.data["fallback"] = f"incremental from {base} refused, taking a full backup: {exc}"
            cps.put(ctx.rec, self._pending(ctx))
            ctx.save("fallback-to-full", reason=str(exc))
            self._begin(ctx)
        ctx.data["began"] = time.time()
        ctx.rec.set_artifact("checkpoint", status="present")

    def revert(self, ctx: StepContext) -> None:
        name = _cp_name(ctx)
        cps = ctx.fx.checkpoints
        if direct_offline.is_offline(ctx):
            direct_offline.undo_begin(ctx, name)
        else:
            bc.end_our_job(ctx)
        if ctx.hv.lookup_checkpoint(ctx.domain, name) is not None:
            ctx.save("checkpoint-delete-intent", checkpoint=name)
            ctx.hv.checkpoint_delete(ctx.domain, name)  # its bitmap merges into the parent's
        if owned_pending(cps.get(ctx.rec.uri, ctx.domain, name), ctx.rec.id):
            cps.remove(ctx.rec, name)
        ctx.rec.set_artifact("checkpoint", status="deleted")
        bc.remove_ours(ctx, list(_job_files(ctx).values()))
        socket = ctx.rec.artifacts.get("socket")
        if socket:
            bc.remove_ours(ctx, [socket["path"]])


class Transfer(Step):
    description = "push: wait for libvirt's job to complete | pull: read the extents over NBD into qcow2 files"

    def probe(self, ctx: StepContext) -> bool:
        return all(a["status"] == "present" and a.get("checksum") and os.path.exists(a["path"])
                   for a in ctx.rec.artifacts_of("backup-file"))

    def execute(self, ctx: StepContext) -> None:
        ctx.data.setdefault("transfer_started_at", time.time())
        if direct_offline.is_offline(ctx):
            self._offline(ctx)
        elif ctx.params["mode"] == "push":
            self._wait_push(ctx)
        else:
            self._pull(ctx)
        ctx.data["transfer_seconds"] = round(time.time() - ctx.data["began_at"], 3)

    # -- push --------------------------------------------------------------------------------------
    def _wait_push(self, ctx: StepContext) -> None:
        deadline = ctx.data.setdefault("transfer_deadline", time.time() + float(ctx.params["backup_timeout"]))

        checks = CheckCadence(ctx.guard, CHECK_INTERVAL)  # the lease and, going forward, the cancel flag
        while True:
            checks.due()
            job = _our_job(ctx)
            if job is None:
                break
            ctx.progress("backup", job.processed, job.total)
            datapath.write_behind([a["partial"] for a in ctx.rec.artifacts_of("backup-file")])
            if time.time() > deadline:
                raise DeadlineExceeded(f"the push backup of {ctx.domain} did not complete by its deadline")
            ctx.sleep(POLL)
        pending = [a for a in ctx.rec.artifacts_of("backup-file") if a["status"] != "present"]
        if any(not os.path.exists(a["path"]) for a in pending):
            # pitfall: a job that is gone is not a job that completed; libvirt's record of its end decides
            done = ctx.hv.get_completed_backup(ctx.domain)
            if done is None or not done.success:
                why = (done.error or "it did not complete") if done else "libvirt has no record of its end"
                raise StepFailed(f"the push backup job of {ctx.domain} ended without completing: {why}")
            ctx.data["job"] = {"processed": done.processed, "total": done.total}
            ctx.progress("backup", done.processed, done.total, force=True)
        for a in pending:
            self._finish(ctx, a)

    # -- a shut-off domain ----------------------------------------------------------------------------
    def _offline(self, ctx: StepContext) -> None:
        """Each image read through a private read-only qemu-nbd; the domain checked before and after."""
        direct_offline.require_untouched(ctx, "before its offline copy")
        dirty = ctx.data["kind"] == "incremental"
        pending = [a for a in ctx.rec.artifacts_of("backup-file") if a["status"] != "present"]
        plan = ctx.data.setdefault("plan", {})
        cursors = ctx.data.setdefault("cursor", {})
        for a in pending:
            if a["disk"] not in plan and not os.path.exists(a["path"]):
                export = direct_offline.open_export(ctx, a["disk"], dirty)
                try:
                    ext = export.extents(dirty)
                finally:
                    export.close()
                plan[a["disk"]] = {"extents": len(ext), "bytes": sum(n for _, n in ext)}
        total = sum(p["bytes"] for p in plan.values())
        for a in pending:
            if not os.path.exists(a["path"]):
                self._pull_disk(ctx, lambda d: direct_offline.open_export(ctx, d, dirty), a, dirty, cursors, total)
        direct_offline.require_untouched(ctx, "during its offline copy")
        for a in pending:
            self._finish(ctx, a)
        ctx.progress("transfer", total, total, force=True)

    # -- pull ---------------------------------------------------------------------------------------
    def _pull(self, ctx: StepContext) -> None:
        job = _our_job(ctx)
        pending = [a for a in ctx.rec.artifacts_of("backup-file") if a["status"] != "present"]
        if job is None and any(not os.path.exists(a["path"]) for a in pending):
            raise StepFailed(f"the pull backup job of {ctx.domain} is gone before its data was read")
        plan = ctx.data.setdefault("plan", {})
        cursors = ctx.data.setdefault("cursor", {})
        for a in pending:  # how much there is to read, for the progress figures
            if a["disk"] not in plan and not os.path.exists(a["path"]):
                # not None: a missing file with no job was refused above
                export = ctx.hv.open_backup_export(ctx.domain, cast(BackupJob, job), a["disk"])
                try:
                    ext = export.extents(disk_kind(ctx, a["disk"]) == "incremental")
                finally:
                    export.close()
                plan[a["disk"]] = {"extents": len(ext), "bytes": sum(n for _, n in ext)}
        total = sum(p["bytes"] for p in plan.values())
        for a in pending:
            if not os.path.exists(a["path"]):
                self._pull_disk(ctx, lambda d: ctx.hv.open_backup_export(ctx.domain, cast(BackupJob, job), d), a,
                                disk_kind(ctx, a["disk"]) == "incremental", cursors, total)
            self._finish(ctx, a)
        ctx.progress("transfer", total, total, force=True)

    def _pull_disk(self, ctx: StepContext, open_export: Callable[[str], Any], art: dict[str, Any], dirty: bool,
                   cursors: dict[str, Any], total: int) -> None:
        disk = art["disk"]
        before = sum(min(c["done"], ctx.data["plan"][t]["bytes"]) for t, c in cursors.items() if t != disk)
        cur = cursors.setdefault(disk, {"offset": 0, "done": 0, "stats": {}})
        partial = art["partial"]
        if cur["offset"] == 0 or not os.path.exists(partial):
            bc.remove_ours(ctx, [partial])
            cur.update(offset=0, done=0, stats={})
        compress, key = bool(ctx.params.get("compress")), ctx.params.get("encrypt_key_file")

        def durable(pos: int, stats: dict[str, int]) -> None:
            cur.update(offset=pos, stats=stats, done=stats["read"])
            ctx.save(None)

        def progress(done: int) -> None:
            ctx.progress("transfer", before + done, total, disk=disk)
        export = open_export(disk)
        try:
            extents = export.extents(dirty)
            if not compress and not key:  # a plain file: laid out and written by us, hashed on the way
                stats = self._pull_laid_out(ctx, export, art, extents, cur, progress, durable)
            else:
                stats = self._pull_through_qemu_nbd(ctx, export, art, extents, cur, dirty, progress, durable)
        finally:
            export.close()
        cur.update(offset=export.size, stats=stats, done=stats["read"])
        ctx.save("pulled", disk=disk, **stats)

    def _pull_through_qemu_nbd(self, ctx: StepContext, export: Any, art: dict[str, Any],
                               extents: list[tuple[int, int]], cur: dict[str, Any], dirty: bool,
                               progress: Callable[[int], None],
                               durable: Callable[[int, dict[str, int]], None]) -> dict[str, int]:
        """One disk into a qcow2 file written by a private qemu-nbd (compressed or encrypted)."""
        disk, partial = art["disk"], art["partial"]
        compress, key = bool(ctx.params.get("compress")), ctx.params.get("encrypt_key_file")
        ctx.save("transfer-intent", disk=disk, offset=cur["offset"], extents=len(extents),
                 bytes=sum(n for _, n in extents))
        if cur["offset"] == 0:
            ctx.fx.files.prepare_for_writer(partial)  # 0600, exclusive: qemu-img formats it in place
        try:
            writer = nbdio.QcowWriter(partial, export.size if cur["offset"] == 0 else None,
                                      compress=compress, key=key)
        except OperationFailed:
            if cur["offset"] == 0:
                raise
            bc.remove_ours(ctx, [partial])  # the partial file cannot be opened: start this disk over
            ctx.fx.files.prepare_for_writer(partial)
            cur.update(offset=0, done=0, stats={})
            ctx.save("transfer-restart", disk=disk)
            writer = nbdio.QcowWriter(partial, export.size, compress=compress, key=key)
        try:
            # qemu-nbd writes the chunks: the lease (and, going forward, the cancel flag) is checked before each
            return nbdio.copy_extents(export, extents, writer, start=cur["offset"], stats=cur["stats"],
                                      check=ctx.guard, on_progress=progress, on_durable=durable,
                                      zero_writes=dirty)
        finally:
            writer.close()

    def _pull_laid_out(self, ctx: StepContext, export: Any, art: dict[str, Any], extents: list[tuple[int, int]],
                       cur: dict[str, Any], progress: Callable[[int], None],
                       durable: Callable[[int, dict[str, int]], None]) -> dict[str, int]:
        """One disk into a qcow2 file of our own layout (``workflows/qcow2.py``); its checksum in the cursor."""
        disk, partial = art["disk"], art["partial"]
        t0 = time.monotonic()
        layout = qcow2.Layout(export.size, qcow2.widen(extents, export.size), _backing_name(ctx, art))
        stored = sum(n for _, n in layout.extents)
        ctx.save("transfer-intent", disk=disk, offset=cur["offset"], extents=len(layout.extents), bytes=stored,
                 layout="ours")
        out = None
        if cur["offset"]:
            try:
                out = qcow2.LaidOutFile(partial, layout, fresh=False)
                out.resume_at(cur["offset"])
            except (OperationFailed, OSError):
                if out is not None:
                    out.close()
                out = None
                bc.remove_ours(ctx, [partial])  # not the file this layout gives: this disk starts over
                cur.update(offset=0, done=0, stats={})
                ctx.save("transfer-restart", disk=disk)
        if out is None:
            ctx.fx.files.prepare_for_writer(partial)  # 0600, exclusive
            out = qcow2.LaidOutFile(partial, layout, fresh=True)
        took = {"opened": time.monotonic() - t0}
        try:
            stats = nbdio.copy_laid_out(export, out, start=cur["offset"], stats=cur["stats"], check=ctx.guard,
                                        on_progress=progress, on_durable=durable)
            took["copied"] = time.monotonic() - t0
            cur.update(checksum=out.finish(), laid_out=True)  # the file's sha256, hashed as it was written
            took["finished"] = time.monotonic() - t0
        finally:
            out.close()
        log.info("pulled %s into our layout (%d extents, %d bytes): each part done after (s) %s", disk,
                 len(layout.extents), stored, {k: round(v, 3) for k, v in took.items()})
        return stats

    # -- both -----------------------------------------------------------------------------------------
    def _finish(self, ctx: StepContext, art: dict[str, Any]) -> None:
        """Check a written file, name its parent backup, fsync and rename it; record its checksum."""
        path, partial, disk = art["path"], art["partial"], art["disk"]
        cur = ctx.data.get("cursor", {}).get(disk, {})  # a pulled file's own checksum, when it has one
        if not os.path.exists(path):
            if not os.path.exists(partial):
                raise StepFailed(f"the backup of {disk} left no file ({partial})")
            ctx.guard()
            backing = _backing_name(ctx, art)
            if backing and not cur.get("laid_out"):  # the header names the parent backup's file, so
                # qemu-img can read the chain (a file of our layout has it from the start)
                nbdio.set_backing(partial, backing, ctx.params.get("encrypt_key_file"))
        want = next(d["virtual_size"] for d in ctx.data["disks"] if d["target"] == disk)
        sealed = datapath.seal(partial, path, want, rename=ctx.fx.files.rename,  # check, fsync, hash; rename
                               key=ctx.params.get("encrypt_key_file"), checksum=cur.get("checksum"))
        ctx.rec.set_artifact(f"backup:{disk}", status="present", checksum=sealed.checksum, size=sealed.size,
                             allocated=sealed.allocated)
        ctx.save("transferred", disk=disk)

    def revert(self, ctx: StepContext) -> None:
        if not direct_offline.is_offline(ctx):
            bc.end_our_job(ctx)
        for art in ctx.rec.artifacts_of("backup-file"):
            bc.remove_ours(ctx, [art["path"], art["partial"]])
            art["status"] = "deleted"
        bc.remove_ours(ctx, [a["path"] for a in ctx.rec.artifacts_of("scratch-file")])
        ctx.data.pop("cursor", None)


class End(Step):
    description = "backup end: a pull job is ended (abortJob) once its data is read; a push job ended itself"

    def probe(self, ctx: StepContext) -> bool:
        return direct_offline.is_offline(ctx) or _our_job(ctx) is None

    def execute(self, ctx: StepContext) -> None:
        bc.end_our_job(ctx)


class Commit(Step):
    description = "commit the checkpoint in our store with libvirt's XML: it counts from now on"

    def probe(self, ctx: StepContext) -> bool:
        cp = ctx.fx.checkpoints.get(ctx.rec.uri, ctx.domain, _cp_name(ctx))
        return cp is not None and cp.state == COMMITTED

    def execute(self, ctx: StepContext) -> None:
        cps = ctx.fx.checkpoints
        cp = cps.get(ctx.rec.uri, ctx.domain, _cp_name(ctx)) or Begin()._pending(ctx)
        info = ctx.hv.lookup_checkpoint(ctx.domain, cp.name)
        if info is None:  # deleted behind our back: the backup stands, but nothing can follow from it
            cp.broken = "libvirt lost the checkpoint before it was committed"
        else:
            cp.parent, cp.xml, cp.disks = info.parent, info.xml, info.disks
        cp.state, cp.committed_at = COMMITTED, time.time()
        cps.put(ctx.rec, cp)

    def revert(self, ctx: StepContext) -> None:
        cps = ctx.fx.checkpoints
        cp = cps.get(ctx.rec.uri, ctx.domain, _cp_name(ctx))
        if cp is not None and cp.workflow == ctx.rec.id and cp.state == COMMITTED:
            cp.state = PENDING  # the backing out below deletes it
            cps.put(ctx.rec, cp)


class Finalize(Step):
    description = ("write domain.xml, copy the NVRAM/TPM state, write the manifest (every file, size, sha256, "
                   "parent backup; signed); complete only now")

    def probe(self, ctx: StepContext) -> bool:
        doc = bc.read_manifest(_manifest(ctx))
        return doc is not None and doc.get("workflow") == ctx.rec.id

    def _transfer(self, ctx: StepContext) -> dict[str, Any]:
        files = ctx.rec.artifacts_of("backup-file")
        if ctx.params["mode"] == "pull" or direct_offline.is_offline(ctx):
            stats = {t: c["stats"] for t, c in ctx.data.get("cursor", {}).items()}
            read = sum(s.get("read", 0) for s in stats.values())
            written = sum(s.get("written", 0) + s.get("zeroed", 0) for s in stats.values())
            return {"bytes_read": read, "bytes_written": written, "per_disk": stats}
        job = ctx.data.get("job", {})
        return {"bytes_read": job.get("processed"), "bytes_written": sum(a.get("allocated") or 0 for a in files),
                "per_disk": {a["disk"]: {"allocated": a.get("allocated")} for a in files}}

    def execute(self, ctx: StepContext) -> None:
        xml_path = ctx.rec.artifacts["domain-xml"]["path"]
        # libvirt drops a pull job's scratch files at its end; none may stay unlisted in the folder
        bc.remove_ours(ctx, [a["path"] for a in ctx.rec.artifacts_of("scratch-file")])
        ctx.fx.files.write_atomic(xml_path, ctx.data["domain_xml"])
        evidence.copy_firmware(ctx)
        base = ctx.data.get("base")
        files = [{"disk": a["disk"], "path": a["path"], "size": a["size"], "checksum": a["checksum"],
                  "format": "qcow2", "allocated": a.get("allocated"), "kind": disk_kind(ctx, a["disk"]),
                  "virtual_size": next(d["virtual_size"] for d in ctx.data["disks"] if d["target"] == a["disk"])}
                 for a in ctx.rec.artifacts_of("backup-file")]
        manifest = {"format": "domcapture-backup", "version": 1, "workflow": ctx.rec.id, "strategy": NAME,
                    "domain": ctx.domain, "uri": ctx.rec.uri, "kind": ctx.data["kind"], "mode": ctx.params["mode"],
                    "checkpoint": _cp_name(ctx), "began_at": ctx.data.get("began"),
                    "parent": ({"workflow": base["workflow"], "manifest": base["manifest"],
                                "checkpoint": base["checkpoint"]} if base else None),
                    "chain": (list(base["chain"]) if base else []) + [ctx.rec.id],
                    "quiesced": self._quiesced(ctx), "fallback": ctx.data.get("fallback"),
                    "domain_xml": os.path.basename(xml_path), "files": files, "transfer": self._transfer(ctx),
                    "firmware": ctx.data.get("firmware"), "offline": direct_offline.is_offline(ctx)}
        evidence.write_manifest(ctx, manifest)

    @staticmethod
    def _quiesced(ctx: StepContext) -> bool:
        return bool(ctx.data.get("quiesced")) and not ctx.data.get("freeze_broken")

    def next_trigger(self, ctx: StepContext) -> str:
        for name in ("manifest", "domain-xml"):
            ctx.rec.set_artifact(name, status="present")
        doc = bc.read_manifest(_manifest(ctx)) or {}
        transfer = doc.get("transfer") or self._transfer(ctx)
        ctx.rec.result = {
            "backup_dir": os.path.dirname(_manifest(ctx)), "manifest": _manifest(ctx),
            "files": {a["disk"]: {"path": a["path"], "size": a["size"], "checksum": a["checksum"],
                                  "kind": disk_kind(ctx, a["disk"])}
                      for a in ctx.rec.artifacts_of("backup-file")},
            "kind": ctx.data["kind"], "mode": ctx.params["mode"], "checkpoint": _cp_name(ctx),
            "parent_backup": (ctx.data.get("base") or {}).get("workflow"), "chain": doc.get("chain"),
            "fallback": ctx.data.get("fallback"), "quiesced": self._quiesced(ctx),
            "downtime_s": ctx.data.get("downtime_s"), "transfer_seconds": ctx.data.get("transfer_seconds"),
            "bytes_read": transfer.get("bytes_read"), "bytes_written": transfer.get("bytes_written"),
            "redefined": ctx.data.get("chain", {}).get("redefined"),
            "skipped_disks": ctx.data.get("skipped_disks", []),
            "offline": direct_offline.is_offline(ctx),
            "paused": bool(ctx.data.get("paused")),
            "quiesce_skipped": None if ctx.data.get("quiesced") else ctx.data.get("quiesce_error"),
            **({"leftover_bitmaps": ctx.data["leftover_bitmaps"]} if ctx.data.get("leftover_bitmaps") else {}),
            **evidence.result_fields(ctx),
        }
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        evidence.remove_manifest(ctx)
        evidence.remove_firmware(ctx)
        art = ctx.rec.artifacts.get("domain-xml")
        if art:
            bc.remove_ours(ctx, [art["path"], art["path"] + ".partial"])
            art["status"] = "deleted"


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "checking_chain": CheckChain(),
    "freezing": common.Freeze(),
    "beginning": Begin(),
    "thawing": common.Thaw(),
    "transferring": Transfer(),
    "ending": End(),
    "committing": Commit(),
    "finalizing": Finalize(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate,
                        options=(common.OPT_TARGET, OPT_MODE, OPT_INCREMENTAL, common.OPT_QUIESCE,
                                 common.OPT_ON_ERROR, common.OPT_FREEZE_DEADLINE, OPT_BACKUP_TIMEOUT, OPT_COMPRESS,
                                 OPT_ENCRYPT_KEY_FILE, common.OPT_DISKS, common.OPT_EXCLUDE, *hooks.OPTIONS),
                        summary="backup begin with a checkpoint (full or incremental), push or pull over NBD")
