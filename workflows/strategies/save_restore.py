"""The way back from a ``save`` capture: rewind the domain to it
(``save-restore --from ID``).

preflight -> verifying -> staging -> stopping -> swapping -> restoring ->
committing -> succeeded.

- verifying: the capture's memory image still has its recorded checksum and
  is a complete save image of this domain.
- staging: each captured disk image is copied (resumable, checksummed) to a
  file beside the live disk, while the guest still runs.
- stopping: the running guest is saved to a safety image (its way back until
  the rewind commits), so nothing of the current state is lost yet.
- swapping: each live disk file is renamed aside and the staged copy renamed
  into its place.  Renames are atomic and every file is told apart by its
  inode, so a crash between two renames is found and finished (or undone).
- restoring: virDomainRestore from the capture's memory image; the disk paths
  are the ones in the image's XML, so no XML is edited.
- committing: the set-aside disks and the safety image are deleted; from here
  on the rewind is permanent.

Disks are replaced in place rather than the domain being pointed at new
files: the save image's XML and the domain's persistent definition then keep
naming the right files, and nothing needs redefining.  A crash in any state
resumes; rollback before the commit destroys the rewound guest, renames the
original disks back and restores the safety image, so the guest runs on as
it was before the rewind.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from .. import naming
from ..definition import RESUME, Definition
from ..errors import InputError, StepFailed
from ..filecopy import sha256_file
from ..effects import Inspect
from ..hypervisor.base import Hypervisor
from ..record import Artifact, Record
from ..steps import Step, StepContext
from ..verify import nothing_kept
from . import common, save_common

NAME = "save-restore"
VERSION = 1

STATES = ["preflight", "verifying", "staging", "stopping", "swapping", "restoring", "committing"]

TRANSITIONS = [
    # trigger    source         dest
    ["advance", "preflight",   "verifying"],
    ["advance", "verifying",   "staging"],
    ["advance", "staging",     "stopping"],
    ["advance", "stopping",    "swapping"],
    ["advance", "swapping",    "restoring"],
    ["advance", "restoring",   "committing"],
    ["advance", "committing",  "succeeded"],
]


# -- input -------------------------------------------------------------------------------
def resolve(load: Callable[[str], Record], params: dict[str, Any]) -> dict[str, Any]:
    """``--from ID``: the save capture to go back to, read from its record."""
    ref = params.get("from")
    if not ref:
        raise InputError("--from is required: the id of a succeeded save capture")
    src = load(str(ref))
    if src.strategy != "save":
        raise InputError(f"workflow {ref} is a {src.strategy} workflow; --from needs a save capture")
    if src.status != "succeeded":
        raise InputError(f"capture {ref} is {src.status}; only a succeeded save capture can be restored")
    files = src.result["files"]
    params["source"] = {
        "id": src.id, "domain": src.domain, "uuid": src.data["uuid"], "saved_at": src.result.get("saved_at"),
        "memory": dict(files["memory"]),
        "disks": {d["target"]: {**files[d["target"]], "format": d["format"], "source": d["source"]}
                  for d in src.data["disks"]},
    }
    return params


def _check_domain(hv: Hypervisor, domain: str, src: dict[str, Any]) -> None:
    if hv.get_uuid(domain) != src["uuid"]:
        raise InputError(f"domain {domain} is not the domain capture {src['id']} was taken of (its UUID differs)")
    state = hv.domain_state(domain)
    if state not in ("running", "shutoff"):
        raise InputError(f"domain {domain} is {state}; a rewind needs it running or shut off")
    if hv.has_managed_save_image(domain):
        raise InputError(f"domain {domain} has a managed save image; restore it (managed-save-restore) or "
                         "remove it (virsh managedsave-remove) first")
    current = {d.target: d.source for d in common.capture_disks(hv, domain)}
    captured = {t: d["source"] for t, d in src["disks"].items()}
    if current != captured:
        raise InputError(f"the disks of {domain} are now {current}; capture {src['id']} holds {captured}; a "
                         "rewind replaces the same disk files and refuses a changed layout")


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    hv = look.hv
    src = params.get("source")
    if not src:
        raise InputError("--from is required: the id of a succeeded save capture")
    if src["domain"] != domain:
        raise InputError(f"capture {src['id']} is of domain {src['domain']}, not {domain}")
    out = {"from": src["id"], "source": src,
           "on_error": common.parse_on_error(params),
           "bandwidth": common.parse_bandwidth(params.get("bandwidth"))}
    for item, info in [("memory", src["memory"]), *src["disks"].items()]:
        if not os.path.exists(info["path"]):
            raise InputError(f"capture {src['id']}: its {item} file {info['path']} is missing")
        if os.path.getsize(info["path"]) != info["size"]:
            raise InputError(f"capture {src['id']}: its {item} file {info['path']} has changed size")
    _check_domain(hv, domain, src)
    needed: dict[str, int] = {}
    for i, d in enumerate(src["disks"].values()):
        folder = os.path.dirname(d["source"])
        needed[folder] = needed.get(folder, 0) + d["size"] + (hv.get_memory_bytes(domain) if i == 0 else 0)
    for folder, size in needed.items():
        common.check_space(folder, size, "disk folder")
    return out


# -- helpers -------------------------------------------------------------------------------
def _ino(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _safety(ctx: StepContext) -> str:
    path: str = ctx.rec.artifacts["safety"]["path"]
    return path


def _disks(ctx: StepContext) -> list[dict[str, Any]]:
    """Per disk: live path, its inode at preflight, staged and set-aside paths, the staged copy's inode."""
    out = []
    for d in ctx.data["disks"]:
        staged = ctx.rec.artifacts[f"staged:{d['target']}"]
        out.append({"target": d["target"], "live": d["source"], "live_ino": d["ino"], "staged": staged["path"],
                    "staged_ino": staged.get("ino"), "aside": ctx.rec.artifacts[f"aside:{d['target']}"]["path"]})
    return out


def _require_shutoff(ctx: StepContext, doing: str) -> None:
    state = ctx.hv.domain_state(ctx.domain)
    if state != "shutoff":
        raise StepFailed(f"domain {ctx.domain} is {state}; {doing} needs it shut off")


# -- steps ---------------------------------------------------------------------------------
class Preflight(Step):
    description = "check the domain and the capture; name every staged, set-aside and safety file"

    def execute(self, ctx: StepContext) -> None:
        src = ctx.params["source"]
        _check_domain(ctx.hv, ctx.domain, src)
        ctx.data["uuid"] = src["uuid"]
        ctx.data["state_before"] = ctx.hv.domain_state(ctx.domain)
        ctx.data["disks"] = [{"target": t, "source": d["source"], "ino": _ino(d["source"])}
                             for t, d in sorted(src["disks"].items())]
        for t, d in sorted(src["disks"].items()):
            ctx.rec.plan_artifact(Artifact(f"staged:{t}", "staged-disk",
                                           naming.staged_disk_path(d["source"], ctx.rec.id, t), t))
            ctx.rec.plan_artifact(Artifact(f"aside:{t}", "set-aside-disk",
                                           naming.set_aside_path(d["source"], ctx.rec.id, t), t))
        first = ctx.data["disks"][0]["source"]
        ctx.rec.plan_artifact(Artifact("safety", "safety-image", naming.safety_image_path(first, ctx.rec.id)))


class Verify(Step):
    description = "re-read the capture's memory image: recorded checksum, complete image of this domain"

    def probe(self, ctx: StepContext) -> bool:
        return bool(ctx.data.get("verified"))

    def execute(self, ctx: StepContext) -> None:
        mem = ctx.params["source"]["memory"]
        ctx.progress("verify", 0, mem["size"], force=True)
        actual = f"sha256:{sha256_file(mem['path'])}"
        if actual != mem["checksum"]:
            raise StepFailed(f"the memory image {mem['path']} differs from its recorded checksum")
        if not save_common.image_is_ours(ctx.hv, mem["path"], ctx.data["uuid"]):
            raise StepFailed(f"{mem['path']} is not a complete save image of {ctx.domain}")
        ctx.data["verified"] = True


class Stage(Step):
    description = "copy each captured disk image beside its live disk (checksummed, resumable; the guest runs)"

    def probe(self, ctx: StepContext) -> bool:
        return all(a["status"] == "present" and a.get("ino") and _ino(a["path"]) == a["ino"]
                   for a in ctx.rec.artifacts_of("staged-disk"))

    def execute(self, ctx: StepContext) -> None:
        disks = ctx.params["source"]["disks"]
        cursors = ctx.data.setdefault("stage", {})
        total = sum(d["size"] for d in disks.values())
        base_done = 0
        for target, d in sorted(disks.items()):
            art = ctx.rec.artifacts[f"staged:{target}"]
            if art["status"] == "present" and art.get("ino") and _ino(art["path"]) == art["ino"]:
                base_done += d["size"]
                continue
            cur = cursors.setdefault(target, {"offset": 0})
            partial = naming.partial_of(art["path"])
            ctx.save("stage-intent", disk=target, partial=partial, offset=cur["offset"])

            def durable(pos: int, cur: dict[str, Any] = cur) -> None:
                cur["offset"] = pos
                ctx.save(None)

            def progress(pos: int, _total: int, done0: int = base_done, target: str = target) -> None:
                ctx.progress("stage", done0 + pos, total, disk=target)

            def check() -> None:  # the lease is checked by the effects port, per chunk
                ctx.check_cancel()

            checksum, size = ctx.fx.files.copy_resumable(d["path"], partial, art["path"], offset=cur["offset"],
                                                         on_progress=progress, on_durable=durable, check=check,
                                                         bandwidth=ctx.params.get("bandwidth") or 0, sleep=ctx.sleep)
            if f"sha256:{checksum}" != d["checksum"]:
                ctx.fx.files.remove_owned(art["path"])
                raise StepFailed(f"the captured image {d['path']} differs from its recorded checksum")
            ctx.rec.set_artifact(f"staged:{target}", status="present", checksum=d["checksum"], size=size,
                                 ino=_ino(art["path"]))
            ctx.save("staged", disk=target, bytes=size)
            base_done += size
        ctx.progress("stage", total, total, force=True)

    def revert(self, ctx: StepContext) -> None:
        for art in ctx.rec.artifacts_of("staged-disk"):
            for path in (art["path"], naming.partial_of(art["path"])):
                ctx.fx.files.remove_owned(path)
            art["status"] = "deleted"
        ctx.data.pop("stage", None)


class Stop(Step):
    description = "virDomainSave of the running guest to the safety image (nothing lost until the commit)"

    def probe(self, ctx: StepContext) -> bool:
        save_common.wait_no_job(ctx)
        if ctx.hv.domain_state(ctx.domain) != "shutoff":
            return False
        if ctx.data.get("safety_save") and not save_common.image_is_ours(ctx.hv, _safety(ctx), ctx.data["uuid"]):
            raise StepFailed(f"domain {ctx.domain} was shut off, but not by the save to {_safety(ctx)}")
        return True

    def execute(self, ctx: StepContext) -> None:
        ctx.data["safety_save"] = True
        ctx.data["stop_seconds"] = save_common.save_to(ctx, _safety(ctx), "safety-save")
        ctx.rec.set_artifact("safety", status="present")

    def revert(self, ctx: StepContext) -> None:
        """The guest saved to the safety image runs again (its own disks are back by now)."""
        path = _safety(ctx)
        if ctx.data.get("safety_save") and not ctx.data.get("committed"):
            save_common.wait_no_job(ctx)
            if ctx.hv.domain_state(ctx.domain) == "shutoff":
                if not save_common.image_is_ours(ctx.hv, path, ctx.data["uuid"]):
                    raise StepFailed(f"domain {ctx.domain} is shut off and its safety image {path} is missing or "
                                     f"incomplete; start it (virsh start {ctx.domain}), then continue the rollback")
                ctx.data["rollback_restore_seconds"] = save_common.restore_from(ctx, path, "rollback-restore")
        ctx.fx.files.remove_owned(path)
        ctx.rec.set_artifact("safety", status="deleted")


class Swap(Step):
    description = "rename each live disk aside and the staged capture into its place (atomic renames)"

    def probe(self, ctx: StepContext) -> bool:
        return all(_ino(d["live"]) == d["staged_ino"] for d in _disks(ctx))

    def execute(self, ctx: StepContext) -> None:
        _require_shutoff(ctx, "replacing its disks")
        started = time.time()
        for d in _disks(ctx):
            live = _ino(d["live"])
            if live == d["staged_ino"]:
                continue
            if live == d["live_ino"]:
                if _ino(d["aside"]) is not None:
                    raise StepFailed(f"{d['aside']} exists already; refusing to overwrite it")
                ctx.save("set-aside-intent", disk=d["target"])
                ctx.fx.files.rename(d["live"], d["aside"])
                live = None
            if live is not None or _ino(d["aside"]) != d["live_ino"] or _ino(d["staged"]) != d["staged_ino"]:
                raise StepFailed(f"{d['live']} is neither the disk found at preflight nor the staged capture")
            ctx.save("swap-intent", disk=d["target"])
            ctx.fx.files.rename(d["staged"], d["live"])
        ctx.data["swap_seconds"] = round(time.time() - started, 3)

    def revert(self, ctx: StepContext) -> None:
        """Put every original disk file back in place (the rewound guest was destroyed first)."""
        if ctx.data.get("committed"):
            return
        if any(_ino(d["live"]) != d["live_ino"] for d in _disks(ctx)):
            _require_shutoff(ctx, "putting its original disks back")
        for d in _disks(ctx):
            live = _ino(d["live"])
            if live == d["live_ino"]:
                continue
            if live is not None and live == d["staged_ino"]:
                ctx.save("unswap-intent", disk=d["target"])
                ctx.fx.files.rename(d["live"], d["staged"])
                live = None
            if live is not None or _ino(d["aside"]) != d["live_ino"]:
                raise StepFailed(f"cannot put {d['live']} back: the set-aside file {d['aside']} is not the "
                                 "original disk")
            ctx.save("unset-aside-intent", disk=d["target"])
            ctx.fx.files.rename(d["aside"], d["live"])


class Restore(Step):
    description = "virDomainRestore from the capture's memory image onto the rewound disks"

    def probe(self, ctx: StepContext) -> bool:
        save_common.wait_no_job(ctx)
        return ctx.hv.domain_state(ctx.domain) == "running" and "restore_started_at" in ctx.data.get("timing", {})

    def execute(self, ctx: StepContext) -> None:
        _require_shutoff(ctx, "restoring the capture")
        ctx.data.setdefault("timing", {})["restore_started_at"] = time.time()
        ctx.data["restore_seconds"] = save_common.restore_from(ctx, ctx.params["source"]["memory"]["path"],
                                                               "restore")
        ctx.data["running_again_at"] = time.time()

    def next_trigger(self, ctx: StepContext) -> str:
        if "running_again_at" not in ctx.data and "restore_started_at" in ctx.data.get("timing", {}):
            # restored before a crash that lost the time: the moment it was found running bounds it
            ctx.data["running_again_at"] = time.time()
            ctx.data["downtime_is_upper_bound"] = True
        return "advance"

    def revert(self, ctx: StepContext) -> None:
        """Stop the rewound guest, so its original disks can go back."""
        if ctx.data.get("committed") or "restore_started_at" not in ctx.data.get("timing", {}):
            return
        save_common.wait_no_job(ctx)
        if ctx.hv.domain_state(ctx.domain) != "shutoff":
            ctx.save("destroy-intent", reason="rollback of the rewind")
            ctx.hv.destroy(ctx.domain)


class Commit(Step):
    description = "delete the set-aside disks and the safety image: the rewind is permanent"

    def probe(self, ctx: StepContext) -> bool:
        return bool(ctx.data.get("committed")) and all(
            _ino(a["path"]) is None for a in ctx.rec.artifacts_of("set-aside-disk") + ctx.rec.artifacts_of(
                "safety-image"))

    def execute(self, ctx: StepContext) -> None:
        ctx.data["committed"] = True
        ctx.save("commit")
        for art in ctx.rec.artifacts_of("set-aside-disk") + ctx.rec.artifacts_of("safety-image"):
            ctx.fx.files.remove_owned(art["path"])
            art["status"] = "deleted"

    def revert(self, ctx: StepContext) -> None:
        """Past the commit there is no way back: finish deleting what the rewind no longer needs."""
        if ctx.data.get("committed"):
            self.execute(ctx)
            ctx.effect_stands(f"the rewind of {ctx.domain} to capture {ctx.params['from']} was committed "
                              "(its set-aside disks and safety image are deleted); it cannot be undone")

    def next_trigger(self, ctx: StepContext) -> str:
        timing = ctx.data.get("timing", {})
        stopped = timing.get("safety-save_started_at") or timing.get("restore_started_at")
        running_again = ctx.data.get("running_again_at")
        ctx.rec.result = {
            "from": ctx.params["from"], "rewound_to": ctx.params["source"].get("saved_at"),
            "state_before": ctx.data.get("state_before"), "domain_state": "running",
            "downtime_s": round(running_again - stopped, 3) if running_again and stopped else None,
            "downtime_is_upper_bound": bool(ctx.data.get("downtime_is_upper_bound")),
            "stop_seconds": ctx.data.get("stop_seconds"), "swap_seconds": ctx.data.get("swap_seconds"),
            "restore_seconds": ctx.data.get("restore_seconds"),
        }
        return "advance"


def verify(rec: Record, look: Inspect) -> list[dict[str, Any]]:
    """Nothing kept: the domain was rewound (disks, then memory) and ran again; its set-aside disks and
    safety image were deleted at the commit.  The domain now is not read: a later stop, capture or disk
    change says nothing about that rewind."""
    return nothing_kept(rec, f"rewound {rec.domain} to capture {rec.params['from']} (its disks, then its "
                             "memory); it ran again", rec.data.get("running_again_at"))


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "verifying": Verify(),
    "staging": Stage(),
    "stopping": Stop(),
    "swapping": Swap(),
    "restoring": Restore(),
    "committing": Commit(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, resolve=resolve, verify=verify,
                        options=(save_common.OPT_FROM, common.OPT_ON_ERROR, common.OPT_BANDWIDTH),
                        summary="rewind a domain to a save capture: its disks, then its memory")
