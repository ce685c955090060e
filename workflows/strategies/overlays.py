"""Our temporary overlays, seen as the domain's chains show them, and acted on only where they are ours.

Other actors change a domain's disks at any instruction: an admin's external snapshot puts a layer above
ours, another tool's block job runs where our commit should, a disk is unplugged, the domain is undefined.
Every probe and effect of the snapshot sequence decides from one view per disk (``DiskView``: its whole
chain from the live XML's ``backingStore``, its ``mirror`` and libvirt's block job):

- our overlay's place: ``top`` (the active layer), ``below`` (another layer above it), ``absent`` (in no
  layer of the disk any more) or ``unplugged`` (the disk left the domain);
- a job is ours only when it is the commit we recorded an intent for: its type (active or intermediate
  commit), our overlay as its top and our original as its base.  Any other job is another tool's: never
  aborted, pivoted, or waited on as ours; we wait for it visibly, bounded by the commit deadline;
- a file of ours is deleted only when no domain on the connection, running or defined, has it in its chain.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..errors import DeadlineExceeded, DomainNotFound, NeedsAttention, OperationFailed, StepFailed
from ..hypervisor.base import BlockJob, Disk
from ..steps import StepContext

DEFAULT_COMMIT_TIMEOUT = 600.0
POLL = 0.2
ACTIVE = ("running", "paused")
TOP, BELOW, ABSENT, UNPLUGGED = "top", "below", "absent", "unplugged"


@dataclass(frozen=True)
class DiskView:
    """One disk as libvirt shows it now: its chain (top first) and its block job."""

    target: str
    disk: Disk | None  # None: no disk of that name in the domain any more
    job: BlockJob | None

    @property
    def chain(self) -> list[str]:
        if self.disk is None:
            return []
        return [p for p in (self.disk.source, *self.disk.backing) if p]

    def place(self, path: str) -> str:
        if self.disk is None:
            return UNPLUGGED
        chain = self.chain
        if path not in chain:
            return ABSENT
        return TOP if chain[0] == path else BELOW

    def neighbour(self, path: str, step: int) -> str | None:
        """The layer ``step`` places from ``path`` (-1: the one above, +1: the one below)."""
        chain = self.chain
        i = chain.index(path) + step if path in chain else -1
        return chain[i] if 0 <= i < len(chain) else None


def disk_map(ctx: StepContext) -> dict[str, Disk]:
    return {d.target: d for d in ctx.hv.disks(ctx.domain)}


def overlays(ctx: StepContext) -> dict[str, str]:
    """target -> overlay path, as planned in the record."""
    return {a["disk"]: a["path"] for a in ctx.rec.artifacts_of("overlay")}


def originals(ctx: StepContext) -> dict[str, str]:
    return {d["target"]: d["source"] for d in ctx.data["disks"]}


def views(ctx: StepContext) -> dict[str, DiskView]:
    """A view of every disk we planned an overlay for (a domain that is not running has no block job)."""
    disks = disk_map(ctx)
    running = domain_state(ctx) in ACTIVE
    return {t: DiskView(t, disks.get(t), ctx.hv.block_job(ctx.domain, t) if running and t in disks else None)
            for t in overlays(ctx)}


def is_ours(ctx: StepContext, view: DiskView) -> bool:
    """The disk's job is the commit we recorded an intent for: its kind, our overlay into our original."""
    intent = ctx.data.get("commits", {}).get(view.target)
    job, disk = view.job, view.disk
    if job is None or disk is None or not intent or "top" not in intent:
        return False
    if intent["top"] != overlays(ctx).get(view.target) or intent["base"] != originals(ctx).get(view.target):
        return False
    if intent.get("kind") == "intermediate":
        return job.type == "commit" and view.place(intent["top"]) == BELOW
    return (job.type == "active-commit" and view.place(intent["top"]) == TOP
            and disk.mirror_source in (None, intent["base"]))


def on_overlay(ctx: StepContext) -> list[str]:
    """The disks whose chain holds our overlay anywhere (the active layer or below another tool's)."""
    planned = overlays(ctx)
    return [t for t, d in disk_map(ctx).items()
            if t in planned and planned[t] in (d.source, *d.backing)]


def on_overlay_top(ctx: StepContext) -> list[str]:
    planned = overlays(ctx)
    return [t for t, d in disk_map(ctx).items() if t in planned and d.source == planned[t]]


# -- waiting on another tool ---------------------------------------------------------------
def note_foreign(ctx: StepContext, blocked: dict[str, str]) -> None:
    """Make a wait on other tools' jobs visible (``show``, the console, metrics): which job, since when."""
    waiting: dict[str, Any] = ctx.data.setdefault("waiting_on", {})
    now = time.time()
    changed = False
    for target, job in blocked.items():
        if waiting.get(target, {}).get("job") != job:
            waiting[target] = {"job": job, "since": now, "owner": "another tool"}
            changed = True
    for target in [t for t in waiting if t not in blocked]:
        del waiting[target]
        changed = True
    if changed:
        ctx.save("waiting-on-foreign-job", jobs={t: w["job"] for t, w in waiting.items()})


def clear_foreign(ctx: StepContext) -> None:
    if ctx.data.pop("waiting_on", None):
        ctx.save("foreign-job-gone")


def foreign_deadline(ctx: StepContext, blocked: dict[str, str]) -> NeedsAttention:
    waiting = ctx.data.get("waiting_on", {})
    parts = [f"{t}: {job} since {time.strftime('%H:%M:%S', time.localtime(waiting.get(t, {}).get('since', 0)))}"
             for t, job in blocked.items()]
    ctx.data.pop("commit_deadline", None)  # a resume waits afresh
    return NeedsAttention(
        f"another tool's block job is where our commit must run ({'; '.join(parts)}); it is not ours, so it "
        "was neither aborted nor pivoted", command="resume",
        hint=f"let it end, or end it yourself (virsh blockjob {ctx.domain} DISK --info / --abort), then run the "
             "command: the commit of our overlay starts then")


# -- commit --------------------------------------------------------------------------------
def start_commits(ctx: StepContext) -> dict[str, str]:
    """Start the commit of every disk whose chain holds our overlay and has no job of ours.

    Our overlay on top: an active commit into the original.  Another tool's layer above it: an intermediate
    commit (top = our overlay, base = the original), after which that layer is backed by the original.  A
    domain that went down is committed offline.  Returns the disks held by another tool's job (disk -> job
    type): nothing was started there.
    """
    if domain_state(ctx) not in ACTIVE:
        commit_offline(ctx)
        return {}
    planned, original = overlays(ctx), originals(ctx)
    for _ in range(3):
        blocked: dict[str, str] = {}
        raced = False
        for target, view in views(ctx).items():
            ours, place = planned[target], view.place(planned[target])
            if place in (ABSENT, UNPLUGGED):
                continue
            if view.job is not None:
                if not is_ours(ctx, view):
                    blocked[target] = view.job.type
                continue
            if view.neighbour(ours, +1) != original[target]:
                raise NeedsAttention(
                    f"disk {target}: below our overlay {ours} lies {view.neighbour(ours, +1) or 'nothing'}, "
                    f"not the original {original[target]} (another tool changed the chain: "
                    f"{' <- '.join(reversed(view.chain))}); committing would not put the guest's writes "
                    "where they belong", command="resume",
                    hint=f"every guest write is in the chain above; bring {target} back to a chain with "
                         f"{ours} directly over {original[target]}, or take {ours} out of it (virsh blockcopy "
                         "+ pivot), then run the command")
            kind = "active" if place == TOP else "intermediate"
            ctx.data.setdefault("commits", {})[target] = {"started_at": time.time(), "kind": kind, "top": ours,
                                                          "base": original[target]}
            above = view.neighbour(ours, -1) if kind == "intermediate" else None
            if above:
                ctx.data.setdefault("foreign_layers", {})[target] = above
            ctx.save("commit-intent", disk=target, kind=kind, **({"below_layer": above} if above else {}))
            try:
                if kind == "active":
                    ctx.hv.block_commit_active(ctx.domain, target, ours, original[target])
                else:
                    ctx.hv.block_commit_intermediate(ctx.domain, target, ours, original[target])
            except OperationFailed:
                again = views(ctx)[target]
                if again.place(ours) == place and again.job is None:
                    raise
                raced = True  # the chain or its jobs changed under the call: look again
        if not raced:
            return blocked
    raise StepFailed(f"the chains of {ctx.domain} kept changing while our commits were being started")


def wait_ready(ctx: StepContext, deadline: float) -> list[str]:
    """Poll until every disk with our overlay in its chain has our commit ready (active: ready to pivot;
    intermediate: finished, the overlay out of the chain).

    Returns the disks whose job of ours is gone while the overlay is still in the chain (or another tool's
    job took its place): a vanished job is never taken as success.
    """
    planned = overlays(ctx)
    while True:
        ctx.check_cancel()
        ctx.guard()
        pending, vanished, done, total = [], [], 0, 0
        for target, view in views(ctx).items():
            if view.place(planned[target]) in (ABSENT, UNPLUGGED):
                continue  # committed (or pivoted) already, or no longer in the domain
            if view.job is not None and is_ours(ctx, view):
                done, total = done + view.job.cur, total + view.job.end
                if view.place(planned[target]) == TOP and view.disk is not None and view.disk.mirror_ready:
                    continue
                pending.append(target)
            elif view.job is None and view.disk is not None and view.disk.mirror_job \
                    and view.place(planned[target]) == TOP:
                pending.append(target)  # libvirt still shows the mirror of a job it is ending
            else:
                vanished.append(target)
        ctx.progress("commit", done, total)
        if not pending:
            return vanished
        if time.time() > deadline:
            raise DeadlineExceeded(f"block commit of {', '.join(pending)} not ready by its deadline")
        ctx.sleep(POLL)


def pivot_all(ctx: StepContext) -> None:
    """Pivot every disk whose active layer is our overlay and whose job is our ready commit; a domain that
    went down meanwhile is committed offline.  Another tool's job is never pivoted."""
    planned = overlays(ctx)
    for target, view in views(ctx).items():
        if view.place(planned[target]) != TOP:
            continue
        if domain_state(ctx) not in ACTIVE:
            commit_offline(ctx)
            break
        if not is_ours(ctx, view):
            continue  # not our job: the check below stops the step
        ctx.save("pivot-intent", disk=target)
        try:
            ctx.hv.block_pivot(ctx.domain, target)
        except OperationFailed:
            if domain_state(ctx) in ACTIVE:
                raise
            commit_offline(ctx)  # it died under the pivot
            break
    still = [t for t, v in views(ctx).items() if v.place(planned[t]) in (TOP, BELOW)]
    if still:
        raise StepFailed(f"after pivot, disks {still} still have our overlay in their chain")


def domain_state(ctx: StepContext) -> str:
    """The domain's state; a domain no longer on this host stops the workflow for an operator."""
    try:
        return ctx.hv.domain_state(ctx.domain)
    except DomainNotFound as exc:
        planned = overlays(ctx)
        if ctx.rec.mode == "rollback":
            return "gone"
        raise NeedsAttention(
            f"domain {ctx.domain} is no longer on this host ({exc}); our overlays {sorted(planned.values())} "
            "hold every write its guest made since our snapshot, and are kept", command="rollback",
            hint="if the domain runs on another host, leave this workflow alone until it is back and run "
                 f"'domcapture resume {ctx.rec.id}'; if it was deleted, the command commits each overlay into "
                 "its original image (qemu-img, which refuses an image another process holds) and removes them"
        ) from exc


def commit_offline(ctx: StepContext) -> None:
    """The domain went down on our overlays (powered off, its QEMU killed) or is gone: commit each overlay
    into its original image with qemu-img, then point the persistent definition back at the originals.

    Every guest write since the snapshot is in the overlay, so none is lost; a re-run after a crash commits
    the same data again.  An overlay below another tool's layer is left for an online commit.
    """
    planned, original = overlays(ctx), originals(ctx)
    formats = {d["target"]: d.get("format") or "raw" for d in ctx.data["disks"]}
    types = {d["target"]: d.get("type") or "file" for d in ctx.data["disks"]}
    gone = domain_state(ctx) == "gone"
    if gone:
        users = ctx.hv.chain_users(list(planned.values()))  # one look at every domain, for all overlays
        on = [t for t in planned if not users[planned[t]]]
        held = {t: users[planned[t]] for t in planned if t not in on}
        if held:
            raise StepFailed(f"{ctx.domain} is gone, but our overlays are in other domains' chains: {held}")
    else:
        view = views(ctx)
        below = {t: view[t].neighbour(planned[t], -1) for t in planned if view[t].place(planned[t]) == BELOW}
        if below:
            raise NeedsAttention(
                f"{ctx.domain} went down with another tool's layer above our overlay ({below}); an offline commit "
                "would leave that layer pointing at our overlay", command="resume",
                hint=f"start the domain (virsh start {ctx.domain}) and run the command: the commit then runs "
                     "online and that layer ends up backed by the original")
        on = on_overlay_top(ctx)
    network = [t for t in on if types[t] == "network"]
    if network:  # qemu-img commit needs the base by name; a network disk's base is no local path
        raise StepFailed(f"{ctx.domain} went down on our overlays of network disks {network}; nothing is lost "
                         f"(the guest's writes are in {[planned[t] for t in network]}): commit them by hand "
                         "(qemu-img commit) or start the domain and resume")
    for target in on:
        if gone and not os.path.exists(planned[target]):
            continue  # never made, or committed and removed by an earlier attempt
        ctx.save("offline-commit-intent", disk=target)
        if gone:
            ctx.hv.commit_image(planned[target], original[target])
        else:
            ctx.hv.commit_offline(ctx.domain, planned[target], original[target])
    if on:
        ctx.data["offline_commit"] = {"disks": on, "at": time.time(), "domain_gone": gone}
        if not gone:
            ctx.save("redefine-intent", disks=on)
            ctx.hv.define_disk_sources(ctx.domain, {t: {"path": original[t], "format": formats[t],
                                                        "type": types[t]} for t in on})


def commit_unplugged(ctx: StepContext) -> None:
    """A captured disk left the running domain (hot-unplugged) while on our overlay: QEMU let go of both
    images, so the overlay is committed into its original with qemu-img (no guest write is lost), and a
    persistent definition that still names the overlay for that disk is pointed back at the original."""
    planned, original = overlays(ctx), originals(ctx)
    formats = {d["target"]: d.get("format") or "raw" for d in ctx.data["disks"]}
    types = {d["target"]: d.get("type") or "file" for d in ctx.data["disks"]}
    if domain_state(ctx) not in ACTIVE:
        return  # a domain that is down is committed offline, disk by disk, from its definition
    unplugged = [t for t, v in views(ctx).items() if v.place(planned[t]) == UNPLUGGED]
    done = ctx.data.setdefault("unplugged", {})
    for target in unplugged:
        if target in done:
            continue
        users = ctx.hv.chain_users([planned[target]])[planned[target]]
        running = [u for u in users if ", running)" in u]
        if running:
            raise NeedsAttention(f"disk {target} left {ctx.domain}, but our overlay {planned[target]} is still "
                                 f"open in {running}", command="resume")
        if types[target] == "network":
            raise NeedsAttention(f"disk {target} (network) left {ctx.domain} on our overlay {planned[target]}: "
                                 "commit it by hand (qemu-img commit)", command="resume")
        ctx.save("unplugged-commit-intent", disk=target)
        ctx.hv.commit_image(planned[target], original[target])
        if any(u.startswith(f"{ctx.domain} ({target}, defined)") for u in users):  # the commit changes no definition
            ctx.save("redefine-intent", disks=[target])
            ctx.hv.define_disk_sources(ctx.domain, {target: {"path": original[target], "format": formats[target],
                                                             "type": types[target]}}, running_ok=True)
        done[target] = {"at": time.time(), "committed_into": original[target]}
        ctx.save("unplugged-committed", disk=target)


# -- removing our files ----------------------------------------------------------------------
def remove_overlays(ctx: StepContext) -> None:
    """Delete our overlay files that no chain uses any more: neither this domain's nor any other domain's on
    the connection, running or defined.  One still in use stops the workflow for an operator."""
    arts = [a for a in ctx.rec.artifacts_of("overlay") if a["status"] != "deleted"]
    users = ctx.hv.chain_users([a["path"] for a in arts]) if arts else {}
    held = {a["path"]: users[a["path"]] for a in arts if users.get(a["path"])}
    if held:
        where = "; ".join(f"{p} in {', '.join(u)}" for p, u in held.items())
        raise NeedsAttention(
            f"our overlay is still in a chain, so it was not deleted: {where}", command=(
                "rollback" if ctx.rec.mode == "rollback" else "resume"),
            hint="it may hold guest writes: see 'virsh dumpxml DOMAIN' for the chain; once no domain uses it, "
                 "run the command and it is removed")
    for art in arts:
        ctx.fx.files.remove_owned(art["path"])
        art["status"] = "deleted"


def get_off_overlays(ctx: StepContext) -> None:
    """Bring every disk back off our overlays: commit (active or below another tool's layer), wait, pivot,
    then delete what no chain uses."""
    if domain_state(ctx) == "gone":
        commit_offline(ctx)
    else:
        commit_unplugged(ctx)
        if on_overlay(ctx):
            timeout = float(ctx.params.get("commit_timeout", DEFAULT_COMMIT_TIMEOUT))
            deadline = time.time() + timeout
            for _ in range(3):
                while blocked := start_commits(ctx):
                    note_foreign(ctx, blocked)
                    if time.time() > deadline:
                        raise foreign_deadline(ctx, blocked)
                    ctx.sleep(POLL)
                clear_foreign(ctx)
                if not wait_ready(ctx, time.time() + timeout):
                    break
            pivot_all(ctx)
    remove_overlays(ctx)
    ctx.save("overlays-removed")
