"""A consistency group: one capture of several domains at one instant.

freeze every member -> take every member's point (the snapshot-backup's
disk-only external snapshot onto planned overlays) -> thaw every member ->
copy, commit, pivot and clean up each member as snapshot-backup does -> seal
(each member's signed manifest, then the group's manifest: the members, the
window and every file with its checksum).

One workflow, one lease, one record: every step acts on every member in turn,
through the snapshot-backup's own steps run on a member's view of the record
(``data["members"][DOMAIN]`` holds the member's artifacts and data, so a
member's intent is saved in the group's record before the member's effect).
The freeze mark names every member it may have frozen (``frozen["domains"]``),
so the engine, its freeze watchdog and recovery thaw them all.  The instant is
one window: no member is thawed before every member's point is taken, and a
window still open at its deadline (``--freeze-deadline``, from the first
freeze) rolls the whole group back.  A crash before every point is taken rolls
the whole group back (the points left could no longer share the window);
from the thaw on, a crash resumes, as a snapshot-backup does.  See docs/groups.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any

from .. import manifest, naming, quiesce, validate as checks
from ..definition import RESUME, ROLLBACK, Definition, Option
from ..effects import Effects, Inspect, OwnedFiles
from ..errors import Cancelled, DomainNotRunning, DomcaptureError, InputError, StepFailed
from ..record import Artifact, Record
from ..steps import Step, StepContext
from ..verify import verify_files
from . import common
from . import snapshot_backup as sb

NAME = "group-backup"
VERSION = 1

STATES = ["preparing", "freezing_all", "pointing_all", "thawing_all", "copying", "committing",
          "waiting_ready", "pivoting", "cleaning", "sealing"]

TRANSITIONS = [
    # trigger     source            dest
    ["advance",  "preparing",      "freezing_all"],
    ["advance",  "freezing_all",   "pointing_all"],
    ["advance",  "pointing_all",   "thawing_all"],
    ["advance",  "thawing_all",    "copying"],
    ["advance",  "copying",        "committing"],
    ["advance",  "committing",     "waiting_ready"],
    ["recommit", "waiting_ready",  "committing"],    # a member's commit job vanished before ready
    ["advance",  "waiting_ready",  "pivoting"],
    ["advance",  "pivoting",       "cleaning"],
    ["advance",  "cleaning",       "sealing"],
    ["advance",  "sealing",        "succeeded"],
]

# Before every point is taken a crash rolls the group back: the points still to take could not share the
# window of those taken (recovery thawed every member).  From the thaw on, every point exists: resume.
ON_CRASH = {"preparing": RESUME, "freezing_all": ROLLBACK, "pointing_all": ROLLBACK,
            **{s: RESUME for s in STATES[3:]}}

OPT_GROUP = Option("group", "the group's name (letters, digits, . _ -): names its manifest")
OPT_DOMAINS = Option("domains", "the member domains, comma separated (at least two, on this host)")
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MEMBER_PARAMS = ("target", "quiesce", "freeze_deadline", "commit_timeout", "bandwidth", "overlay_dir")


def domain_of(group: str) -> str:
    """The record's domain field of a group (its domain lock: one run of a group at a time)."""
    return f"group:{group}"


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    name = checks.text("group", params.get("group"))
    if not GROUP_RE.match(name):
        raise InputError(f"--group {name!r}: letters, digits and . _ -, starting with a letter or digit, "
                         "at most 64")
    if domain != domain_of(name):
        raise InputError(f"a group backup is submitted with --group, not --domain (got {domain!r})")
    members = [d.strip() for d in checks.text("domains", params.get("domains")).split(",")]
    for d in members:
        checks.domain_name(d, "domains")
    if len(members) < 2 or len(set(members)) != len(members):
        raise InputError(f"--domains needs at least two different domains (got {', '.join(members)})")
    out: dict[str, Any] = {"group": name, "domains": members,
                           "on_error": common.parse_on_error(params), "members": {}}
    given = {k: params.get(k) for k in MEMBER_PARAMS}
    for d in members:
        state = look.hv.domain_state(d)
        if state != "running":
            raise DomainNotRunning(f"group member {d} is {state}; every member of a group must be running")
        out["members"][d] = sb.validate(look, d, dict(given))
    first = out["members"][members[0]]
    out.update({k: first[k] for k in ("target", "quiesce", "freeze_deadline", "commit_timeout")})
    return out


# -- a member's view of the group's record ----------------------------------------------
def member_contexts(ctx: StepContext) -> list[StepContext]:
    """One step context per member, in --domains order.  A member's artifacts and data live in the group
    record, so whatever a member step records is saved (fenced) with the group's next save."""
    out = []
    slots = ctx.data.setdefault("members", {})
    for i, dom in enumerate(ctx.params["domains"]):
        slot = slots.setdefault(dom, {"id": f"{ctx.rec.id}-{i}", "artifacts": {}, "data": {}, "result": {}})
        mrec = Record(id=slot["id"], strategy=sb.NAME, definition_version=sb.VERSION, domain=dom,
                      uri=ctx.rec.uri, params=ctx.params["members"][dom], state=ctx.rec.state,
                      status=ctx.rec.status, mode=ctx.rec.mode, artifacts=slot["artifacts"], data=slot["data"],
                      worker=ctx.rec.worker)
        fx = Effects(hv=ctx.fx.hv, files=OwnedFiles(mrec, ctx.fx.files.guard), checkpoints=ctx.fx.checkpoints,
                     host=ctx.fx.host, images=ctx.fx.images)
        out.append(StepContext(mrec, fx, save=_member_save(ctx, mrec), guard=ctx.guard,
                               cancelled=lambda: _cancel_reason(ctx), clock=ctx.clock, sleep=ctx.sleep,
                               progress_interval=ctx.progress_interval))
    return out


def _member_save(ctx: StepContext, mrec: Record) -> Any:
    def save(event: str | None = None, **detail: Any) -> None:
        if mrec.progress:
            ctx.rec.progress = {**mrec.progress, "member": mrec.domain}
        if event:
            ctx.save(event, member=mrec.domain, **detail)
        else:
            ctx.save(None)
    return save


def _cancel_reason(ctx: StepContext) -> str | None:
    try:
        ctx.check_cancel()
    except Cancelled as exc:
        return str(exc) or "cancelled"
    return None


class EachMember(Step):
    """A snapshot-backup step run on every member in turn: probe, then execute if not done yet."""

    def __init__(self, step: Step, description: str) -> None:
        self.step = step
        self.description = description

    def probe(self, ctx: StepContext) -> bool:
        return False  # each member is probed on its own in execute

    def execute(self, ctx: StepContext) -> None:
        for m in member_contexts(ctx):
            if not self.step.probe(m):
                self.step.execute(m)

    def revert(self, ctx: StepContext) -> None:
        for m in reversed(member_contexts(ctx)):
            self.step.revert(m)


class Prepare(EachMember):
    def __init__(self) -> None:
        super().__init__(sb.Preflight(), "inspect every member's disks; name every overlay, backup file and the "
                                         "group manifest before anything exists")

    def execute(self, ctx: StepContext) -> None:
        super().execute(ctx)
        path = os.path.join(ctx.params["target"], f"{naming.PREFIX}-group-{ctx.params['group']}-{ctx.rec.id}.json")
        ctx.rec.plan_artifact(Artifact("group-manifest", "group-manifest", path))
        ctx.rec.plan_artifact(Artifact("group-manifest-sig", "manifest-sig", manifest.sig_path(path)))


class FreezeAll(Step):
    description = "freeze every member's file systems (guest agent); the mark names them all before the first"

    def execute(self, ctx: StepContext) -> None:
        mode = ctx.params["quiesce"]
        if quiesce.frozen_info(ctx.rec):  # an attempt that stopped part way: start from thawed members
            quiesce.thaw(ctx.hv, ctx.rec, by="refreeze")
        deadline = float(ctx.params["freeze_deadline"])
        now = time.time()
        window = ctx.data["window"] = {"opened_at": now, "deadline": now + deadline, "first_freeze": None,
                                       "frozen_at": {}, "points": {}, "last_thaw": None}
        members = member_contexts(ctx)
        for m in members:
            m.data["quiesced"] = False
            m.data.pop("quiesce_error", None)
        if mode == "off":
            ctx.save("window-opened", quiesce="off")
            return
        quiesce.mark_freezing(ctx.rec, deadline, now)
        ctx.data["frozen"]["domains"] = [m.domain for m in members]
        ctx.save("freeze-intent", domains=[m.domain for m in members], deadline_s=deadline)
        for m in members:
            try:
                count = ctx.hv.fs_freeze(m.domain)
            except DomcaptureError as exc:
                if mode == "require":
                    raise StepFailed(f"quiesce=require but group member {m.domain} could not be frozen: {exc}; "
                                     "every member is thawed and the group rolls back") from exc
                # try: thaw it anyway (the agent may have frozen and failed to answer), go on without it
                quiesce.thaw_domain(ctx.hv, m.domain)
                ctx.data["frozen"]["domains"].remove(m.domain)
                m.data["quiesce_error"] = str(exc)
                ctx.save("quiesce-skipped", member=m.domain, reason=str(exc))
                continue
            at = time.time()
            m.data.update(quiesced=True, frozen_filesystems=count)
            window["frozen_at"][m.domain] = at
            window["first_freeze"] = window["first_freeze"] or at
            ctx.save("frozen", member=m.domain, filesystems=count)
        if not ctx.data["frozen"]["domains"]:
            ctx.data["frozen"] = None  # nobody froze: no mark to thaw

    def revert(self, ctx: StepContext) -> None:
        if quiesce.frozen_info(ctx.rec):
            quiesce.thaw(ctx.hv, ctx.rec, by="rollback")


class PointAll(Step):
    description = "take every member's point: its disk-only external snapshot, all inside the freeze window"

    def execute(self, ctx: StepContext) -> None:
        window = ctx.data["window"]
        frozen = [d for d, at in window["frozen_at"].items() if at]
        for m in member_contexts(ctx):
            self._check_window(ctx, frozen)
            if not sb.Snapshot().probe(m):
                sb.Snapshot().execute(m)
                window["points"][m.domain] = [m.data["snapshot_started_at"], m.data["snapshot_at"]]
                ctx.save("point-taken", member=m.domain)
        self._check_window(ctx, frozen)

    @staticmethod
    def _check_window(ctx: StepContext, frozen: list[str]) -> None:
        window = ctx.data["window"]
        if time.time() > window["deadline"]:
            raise StepFailed(f"the freeze deadline ({ctx.params['freeze_deadline']}s) passed before every "
                             "member's point was taken; the whole group rolls back")
        if frozen and not quiesce.frozen_info(ctx.rec):
            raise StepFailed("the group's freeze was broken before every member's point was taken; the whole "
                             "group rolls back")

    def revert(self, ctx: StepContext) -> None:
        for m in reversed(member_contexts(ctx)):
            if m.data.get("disks") is not None:
                sb.Snapshot().revert(m)


class ThawAll(Step):
    description = "thaw every member: the window closes"

    def probe(self, ctx: StepContext) -> bool:
        return not quiesce.frozen_info(ctx.rec)

    def execute(self, ctx: StepContext) -> None:
        outcome = quiesce.thaw(ctx.hv, ctx.rec, by=ctx.rec.worker or "worker")
        ctx.data["downtime_s"] = outcome.get("frozen_seconds")

    def next_trigger(self, ctx: StepContext) -> str:
        window = ctx.data["window"]
        if window["first_freeze"] and not window["last_thaw"]:
            # this worker's thaw, or (after a crash here) recovery's: the window closed at or before it
            window["last_thaw"] = (ctx.data.get("last_thaw") or {}).get("at")
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        if quiesce.frozen_info(ctx.rec):
            quiesce.thaw(ctx.hv, ctx.rec, by="rollback")


class WaitAllReady(EachMember):
    def __init__(self) -> None:
        super().__init__(sb.WaitReady(), "wait until every member's commit jobs are ready to pivot")

    def execute(self, ctx: StepContext) -> None:
        vanished = False
        for m in member_contexts(ctx):
            sb.WaitReady().execute(m)
            vanished = sb.WaitReady().next_trigger(m) == "recommit" or vanished
        ctx.data["vanished"] = vanished

    def next_trigger(self, ctx: StepContext) -> str:
        return "recommit" if ctx.data.pop("vanished", None) else "advance"


class Seal(Step):
    description = "each member's manifest (signed), then the group's: members, window, every file and checksum"

    def _path(self, ctx: StepContext) -> str:
        path: str = ctx.rec.artifacts["group-manifest"]["path"]
        return path

    def probe(self, ctx: StepContext) -> bool:
        try:
            with open(self._path(ctx)) as f:
                same: bool = json.load(f).get("workflow") == ctx.rec.id
                return same
        except (OSError, ValueError):
            return False

    def execute(self, ctx: StepContext) -> None:
        for m in member_contexts(ctx):
            if not sb.Finalize().probe(m):
                sb.Finalize().execute(m)
        results = self._member_results(ctx)
        window = ctx.data["window"]
        doc = {"format": "domcapture-group", "version": 1, "workflow": ctx.rec.id, "group": ctx.params["group"],
               "uri": ctx.rec.uri, "quiesce": ctx.params["quiesce"], "quiesced": all_quiesced(ctx),
               "window": window_of(window),
               "members": [{"domain": d, "workflow": ctx.data["members"][d]["id"], "backup_dir": r["backup_dir"],
                            "manifest": r["manifest"], "manifest_sha256": r["manifest_sha256"],
                            "quiesced": r["quiesced"], "point": window["points"].get(d),
                            "files": [{"disk": disk, **info} for disk, info in sorted(r["files"].items())]}
                           for d, r in results.items()]}
        data = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        key = manifest.load_key()
        if key is not None:
            ctx.fx.files.write_atomic(manifest.sig_path(self._path(ctx)), manifest.sign(data.encode(), key) + "\n")
        ctx.fx.files.write_atomic(self._path(ctx), data)

    @staticmethod
    def _member_results(ctx: StepContext) -> dict[str, dict[str, Any]]:
        out = {}
        for m in member_contexts(ctx):
            sb.Finalize().next_trigger(m)
            ctx.data["members"][m.domain]["result"] = m.rec.result
            out[m.domain] = m.rec.result
        return out

    def next_trigger(self, ctx: StepContext) -> str:
        results = self._member_results(ctx)
        ctx.rec.set_artifact("group-manifest", status="present")
        with open(self._path(ctx), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        ctx.rec.result = {"group": ctx.params["group"], "manifest": self._path(ctx), "manifest_sha256": digest,
                          "window": window_of(ctx.data["window"]), "quiesced": all_quiesced(ctx),
                          "downtime_s": ctx.data.get("downtime_s"),
                          "quiesce_skipped": {d: r["quiesce_skipped"] for d, r in results.items()
                                              if not r["quiesced"]},
                          "members": results}
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        for name in ("group-manifest", "group-manifest-sig"):
            art = ctx.rec.artifacts.get(name)
            if art:
                ctx.fx.files.remove_owned(art["path"])
                ctx.fx.files.remove_owned(naming.partial_of(art["path"]))
                art["status"] = "deleted"
        for m in reversed(member_contexts(ctx)):
            sb.Finalize().revert(m)


def all_quiesced(ctx: StepContext) -> bool:
    return all(ctx.data["members"][d]["data"].get("quiesced") for d in ctx.params["domains"])


def window_of(window: dict[str, Any]) -> dict[str, Any]:
    """The instant as the manifest states it: first freeze, each member's point [start, end], last thaw."""
    points = window.get("points") or {}
    return {"first_freeze": window.get("first_freeze"), "last_thaw": window.get("last_thaw"),
            "points": points, "frozen_at": window.get("frozen_at") or {},
            "first_point": min((p[0] for p in points.values()), default=None),
            "last_point": max((p[1] for p in points.values()), default=None)}


def verify(rec: Record, look: Inspect) -> list[dict[str, Any]]:
    """The set: the group manifest (its sha256 as recorded, its members those of the record), then every
    member's folder (its manifest's sha256, every file's size and sha256)."""
    out: list[dict[str, Any]] = []
    path = rec.result["manifest"]
    check: dict[str, Any] = {"item": "group-manifest", "path": path}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        doc = json.loads(raw)
        listed = {m["domain"]: m for m in doc.get("members", [])}
        ok = hashlib.sha256(raw).hexdigest() == rec.result["manifest_sha256"] and \
            sorted(listed) == sorted(rec.params["domains"]) and \
            all(listed[d]["manifest_sha256"] == r["manifest_sha256"] for d, r in rec.result["members"].items())
        check.update(ok=ok, **({} if ok else {"error": "the group manifest differs from the record"}))
    except (OSError, ValueError, KeyError) as exc:
        check.update(ok=False, error=str(exc))
    out.append(check)
    for dom in rec.params["domains"]:
        member = Record(id=rec.data["members"][dom]["id"], strategy=sb.NAME, definition_version=sb.VERSION,
                        domain=dom, uri=rec.uri, params={}, state="succeeded",
                        result=rec.result["members"][dom])
        for c in verify_files(member):
            out.append({**c, "item": f"{dom}:{c['item']}"})
    return out


STEPS: dict[str, Step] = {
    "preparing": Prepare(),
    "freezing_all": FreezeAll(),
    "pointing_all": PointAll(),
    "thawing_all": ThawAll(),
    "copying": EachMember(sb.CopyBackingFiles(), "copy each member's original images to the target"),
    "committing": EachMember(sb.Commit(), "blockcommit each member's overlays into its originals"),
    "waiting_ready": WaitAllReady(),
    "pivoting": EachMember(sb.Pivot(), "pivot each member's disks back onto their originals"),
    "cleaning": EachMember(sb.Cleanup(), "delete every member's overlays, once no chain holds them"),
    "sealing": Seal(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash=ON_CRASH, validate=validate,
                        verify=verify, holds_domain=False, members=lambda params: list(params["domains"]),
                        options=(OPT_GROUP, OPT_DOMAINS, common.OPT_TARGET, common.OPT_QUIESCE,
                                 common.OPT_ON_ERROR, common.OPT_FREEZE_DEADLINE, common.OPT_COMMIT_TIMEOUT,
                                 common.OPT_BANDWIDTH, common.OPT_OVERLAY_DIR),
                        summary="a consistency group: freeze every member, take every point, thaw, then copy "
                                "each as snapshot-backup does")
