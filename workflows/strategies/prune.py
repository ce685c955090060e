"""Prune: chain-aware retention of a domain's backups (restic's keep rules, ``workflows/retention.py``).

preflight -> consolidating -> deleting -> finalizing

- preflight: the good backups of the domain (``workflows/backups.py``; only
  those under ``--target`` when given); the rules choose the kept ones.  A
  kept incremental whose parent goes gets a new parent, its nearest kept
  ancestor (a rebase: ``qemu-img rebase`` of a copy, what differs copied in), or
  none (a synthetic full: ``qemu-img convert`` of its chain).  The plan, with
  every path to rewrite or remove (from the backups' records), is recorded
  before anything changes.
- consolidating, oldest first: the backup's record says ``consolidating``;
  the new image is written beside the old one, checked against the backup's
  chain (``qemu-img compare``), fsynced, hashed (recorded), then renamed over
  the old file (its children read the same content through it); its manifest
  and record take the new checksum, kind and parent, and it is good again.
- deleting, newest first: the backup's record says ``deleting`` (intent);
  libvirt deletes its checkpoint (the bitmap merges into the parent's) and our
  checkpoint store drops the entry; its files go (manifest last), then its
  folder; its record says ``deleted``.  A backup a kept one still depends on
  is never deleted (checked again right before).
- finalizing: our checkpoint store follows libvirt (parents refreshed); every
  kept backup whose chain changed gets it rewritten in its manifest and record.

The newest backup is always kept (every rule keeps the newest), so the
latest checkpoint and its backup stay the next incremental's base.  A crash
anywhere resumes; no backup is listed good while its files are changing.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .. import backupfolder as bf
from .. import manifest, naming, nbdio, retention
from ..backups import (CHAIN_INCOMPLETE, CONSOLIDATING, DELETED, DELETING, GOOD, BackupInfo, BackupRecords, catalog,
                       read_manifest)
from ..checkpoints import restore_chain
from ..definition import RESUME, Definition, Option
from ..errors import DomainNotFound, InputError, StepFailed
from ..effects import Inspect
from ..filecopy import sha256_file
from ..policy import PolicyError, PolicyStore
from ..record import Artifact, Record
from ..steps import Step, StepContext
from . import common, evidence

NAME = "prune"
VERSION = 1

STATES = ["preflight", "consolidating", "deleting", "finalizing"]

TRANSITIONS = [
    # trigger    source            dest
    ["advance", "preflight",      "consolidating"],  # choose what to keep; record every path
    ["advance", "consolidating",  "deleting"],       # synthetic full | rebase onto the nearest kept ancestor
    ["advance", "deleting",       "finalizing"],     # virDomainCheckpointDelete(), then the files
    ["advance", "finalizing",     "succeeded"],      # the store follows libvirt; manifests' chains
]

OPTIONS = tuple(Option(rule, f"prune: {rule.removeprefix('keep_')} backups to keep (restic's "
                             f"--{rule.replace('_', '-')}; -1: unlimited)") for rule in retention.RULES)
OPT_TARGET = Option("target", "prune: only the backups under this directory (default: every backup of the domain)")
OPT_TIMEZONE = Option("timezone", "prune: the time zone of the hours, days and weeks the rules count (default UTC)")
OPT_POLICY = Option("policy", "prune: take the retention, target and time zone of this stored policy "
                              "(domcapture policy show NAME)")


# -- input ---------------------------------------------------------------------------------------------
def _rules(params: dict[str, Any]) -> dict[str, int]:
    raw = params.get("retention")
    if raw is None:
        raw = {}
        for rule in retention.RULES:
            value = params.get(rule)
            if value is None:
                continue
            try:
                raw[rule] = int(str(value))
            except ValueError:
                raise InputError(f"--{rule.replace('_', '-')} must be a whole number, not {value!r}") from None
    from_cli = params.get("retention") is None
    if not isinstance(raw, dict):
        raise InputError("retention must be a table of keep_* rules")
    try:
        rules = retention.check_rules(raw)
    except ValueError as exc:
        message = str(exc)
        if from_cli:  # name the option the operator typed
            for rule in retention.RULES:
                message = message.replace(f"rule {rule} ", f"--{rule.replace('_', '-')} ")
        raise InputError(message) from None
    if retention.is_empty(rules):
        raise InputError("a prune needs a retention: at least one of --keep-last, --keep-hourly, --keep-daily, "
                         "--keep-weekly, --keep-monthly, --keep-yearly above 0")
    return rules


def _from_policy(look: Inspect, params: dict[str, Any]) -> dict[str, Any]:
    """``--policy NAME``: the stored policy's retention (and its target and time zone unless given)."""
    name = common.check_text("policy", params["policy"])
    given = [f"--{r.replace('_', '-')}" for r in retention.RULES if params.get(r) is not None]
    if given or params.get("retention") is not None:
        raise InputError(f"--policy {name} brings its own retention; leave out {', '.join(given) or 'retention'}")
    store = look.checkpoints.store
    try:
        policy = PolicyStore(store.r, store.prefix).get(name)
    except PolicyError as exc:
        raise InputError(str(exc)) from None
    if not policy.retention:
        raise InputError(f"policy {name} has no [retention] table")
    return {**params, "retention": dict(policy.retention), "target": params.get("target") or policy.target,
            "timezone": params.get("timezone") or policy.timezone}


def validate(look: Inspect, domain: str, params: dict[str, Any]) -> dict[str, Any]:
    if params.get("policy") is not None:
        params = _from_policy(look, params)
    rules = _rules(params)
    zone = params.get("timezone") or "UTC"
    try:
        ZoneInfo(str(zone))
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"--timezone {zone!r} is not a known time zone (e.g. UTC, Europe/Paris)") from None
    target = params.get("target")
    if target is not None:
        target = os.path.realpath(str(target))
        if not os.path.isdir(target):
            raise InputError(f"target directory {target} does not exist")
    uri = look.hv.canonical_uri()
    if not catalog(look.checkpoints.store, uri, domain):
        try:
            look.hv.domain_state(domain)
        except DomainNotFound:
            raise InputError(f"domain {domain} is not defined at {uri} and has no backups") from None
    return {"retention": rules, "target": target, "timezone": str(zone), "on_error": common.parse_on_error(params)}


# -- helpers -----------------------------------------------------------------------------------------------
def _open_checked(every: dict[str, BackupInfo], wf: str, disk: str) -> bf.Opened:
    """The files of ``wf``'s chain for ``disk``, opened without following links, each checked against its
    record's size and sha256, each header naming only the file before it: refused in one line naming the
    file (the prune rolls back, nothing rewritten)."""
    opened = bf.Opened()
    try:
        bf.open_files([every[i].files[disk] for i in every[wf].chain], into=opened)
        bf.check_chain_headers(opened, _chain_files(every, wf, disk))
    except InputError as exc:
        opened.close()
        raise StepFailed(f"backup {wf}: {exc}") from None
    return opened


def _records(ctx: StepContext) -> BackupRecords:
    if ctx.fx.backups is None:
        raise StepFailed("this engine hands no backup records port to its steps")
    return ctx.fx.backups


def _current(ctx: StepContext) -> dict[str, BackupInfo]:
    return {b.id: b for b in _records(ctx).catalog(ctx.rec.uri, ctx.domain)}


def _under(path: str | None, folder: str | None) -> bool:
    return folder is None or (path is not None and os.path.realpath(path).startswith(folder.rstrip("/") + "/"))


def _chain_files(every: dict[str, BackupInfo], backup: str, disk: str) -> list[str]:
    return [every[i].files[disk]["path"] for i in every[backup].chain]


def plan(backups: list[BackupInfo], rules: dict[str, int], zone: str) -> dict[str, Any]:
    """What a prune does to ``backups`` (good ones, oldest first): kept, consolidated (and onto what), removed."""
    tz = ZoneInfo(zone)
    sel = retention.select([retention.Backup(b.id, datetime.fromtimestamp(b.time, tz)) for b in backups], rules)
    keep = set(sel.keep)
    by_id = {b.id: b for b in backups}

    def kept_ancestor(b: BackupInfo) -> str | None:
        cur = b.parent
        while cur in by_id and cur not in keep:
            cur = by_id[cur].parent
        return cur

    consolidate = []
    for b in backups:  # oldest first: an ancestor is rewritten before its descendants
        if b.id in keep and b.parent in by_id and b.parent not in keep:
            consolidate.append({"id": b.id, "onto": kept_ancestor(b)})
    return {"keep": sel.keep, "reasons": sel.reasons, "remove": sel.remove, "consolidate": consolidate}


class Preflight(Step):
    description = "list the good backups, apply the rules; record what is kept, rewritten and removed, and each path"

    def execute(self, ctx: StepContext) -> None:
        every = _current(ctx)
        target = ctx.params.get("target")
        backups = [b for b in every.values() if b.state == GOOD and _under(b.manifest, target)]
        backups.sort(key=lambda b: (b.time, b.id))
        ctx.data["plan"] = plan(backups, ctx.params["retention"], ctx.params["timezone"])
        ctx.data["backups"] = {b.id: {"time": b.time, "kind": b.kind, "parent": b.parent} for b in backups}
        for item in ctx.data["plan"]["consolidate"]:
            b = every[item["id"]]
            for disk, f in sorted(b.files.items()):
                ctx.rec.plan_artifact(Artifact(f"rewrite:{b.id}:{disk}", "backup-file", f["path"], disk,
                                               status="present"))
        for wf in ctx.data["plan"]["keep"]:  # a kept manifest may be rewritten (its new chain), and signed again
            path = every[wf].manifest
            if path:
                if evidence.signed_without_key(path):
                    raise StepFailed(f"backup {wf} has a signed manifest and no signing key is set here "
                                     f"({manifest.KEY_ENV}); a prune would have to rewrite it")
                ctx.rec.plan_artifact(Artifact(f"manifest:{wf}", "manifest", path, status="present"))
                ctx.rec.plan_artifact(Artifact(f"manifest-sig:{wf}", "manifest-sig", manifest.sig_path(path),
                                               status="present"))
        for wf in ctx.data["plan"]["remove"]:
            b = every[wf]
            for i, path in enumerate(b.paths()):
                ctx.rec.plan_artifact(Artifact(f"remove:{wf}:{i}", "backup-file", path, status="present"))
            if b.folder:
                ctx.rec.plan_artifact(Artifact(f"folder:{wf}", "folder", b.folder, status="present"))
        ctx.save("prune-plan", keep=ctx.data["plan"]["keep"], remove=ctx.data["plan"]["remove"],
                 consolidate=ctx.data["plan"]["consolidate"])


# -- consolidating -----------------------------------------------------------------------------------------
class Consolidate(Step):
    description = "rewrite each kept backup whose parent goes: a synthetic full, or a rebase onto a kept ancestor"

    def execute(self, ctx: StepContext) -> None:
        done = ctx.data.setdefault("consolidated", [])
        for item in ctx.data["plan"]["consolidate"]:
            if item["id"] not in done:
                self._one(ctx, item)
                done.append(item["id"])
                ctx.save("consolidated", backup=item["id"], onto=item["onto"])

    def _one(self, ctx: StepContext, item: dict[str, Any]) -> None:
        wf, onto = item["id"], item["onto"]
        records = _records(ctx)
        every = _current(ctx)
        b = every[wf]
        if b.state in (GOOD, CHAIN_INCOMPLETE) and b.parent == onto:
            return  # done before a crash
        if b.state != CONSOLIDATING:
            records.set_state(wf, CONSOLIDATING, onto=onto)
        news = ctx.data.setdefault("new_files", {}).setdefault(wf, {})
        for disk, f in sorted(b.files.items()):
            if f.get("kind") == "full":  # a disk taken whole (no bitmap): its file stands alone already
                continue
            path, partial = f["path"], naming.partial_of(f["path"])
            want = news.get(disk)
            if want and not os.path.exists(partial) and f"sha256:{sha256_file(path)}" == want["checksum"]:
                continue  # renamed over before a crash
            if not (want and os.path.exists(partial) and f"sha256:{sha256_file(partial)}" == want["checksum"]):
                news.pop(disk, None)
                ctx.fx.files.remove_owned(partial)
                chain = _chain_files(every, wf, disk)
                with _open_checked(every, wf, disk) as opened:  # every file checked before anything is rewritten
                    ctx.save("consolidate-intent", backup=wf, disk=disk, onto=onto, partial=partial)
                    self._rewrite(ctx, opened, every, wf, onto, disk, partial)
                    if not nbdio.same_content([opened.proc(p) for p in chain], self._result(opened, every, onto, disk,
                                                                                            partial)):
                        raise StepFailed(f"the rewritten image of backup {wf} ({disk}) differs from its chain")
                ctx.fx.files.fsync(partial)
                news[disk] = {"path": path, "checksum": f"sha256:{sha256_file(partial)}",
                              "size": os.path.getsize(partial)}
                ctx.save("consolidate-sealed", backup=wf, disk=disk, checksum=news[disk]["checksum"])
            ctx.fx.files.rename(partial, path)
        self.finish(ctx, wf, onto, news)

    @staticmethod
    def _rewrite(ctx: StepContext, opened: bf.Opened, every: dict[str, BackupInfo], wf: str, onto: str | None,
                 disk: str, partial: str) -> None:
        """Write the new image of ``wf``'s ``disk`` from the checked open files (never a name in a header)."""
        chain = _chain_files(every, wf, disk)
        path = chain[-1]
        if onto is None:  # a synthetic full: the chain read as one image
            ctx.fx.files.prepare_for_writer(partial)
            nbdio.convert_chain([opened.proc(p) for p in chain], partial)
        else:  # a copy of this layer, rebased (safe mode: what differs is copied in) onto the ancestor
            with os.fdopen(ctx.fx.files.create_exclusive(partial), "wb") as out:
                fd = opened.fd(path)
                pos = 0
                while data := os.pread(fd, 1 << 20, pos):
                    out.write(data)
                    pos += len(data)
            base = _chain_files(every, onto, disk)
            nbdio.rebase_onto(partial, [opened.proc(p) for p in chain[:-1]], [opened.proc(p) for p in base],
                              os.path.relpath(base[-1], os.path.dirname(path)))
        nbdio.check_image(partial)

    @staticmethod
    def _result(opened: bf.Opened, every: dict[str, BackupInfo], onto: str | None, disk: str, partial: str) -> str:
        """The rewritten image as qemu-img reads it: over the checked files of its new chain."""
        if onto is None:
            return partial
        return nbdio.chain_spec([opened.proc(p) for p in _chain_files(every, onto, disk)] + [partial])

    @staticmethod
    def finish(ctx: StepContext, wf: str, onto: str | None, news: dict[str, Any]) -> None:
        """The new files are in place: the manifest, then the record (good again) say so."""
        records = _records(ctx)
        every = _current(ctx)
        chain = (every[onto].chain if onto else []) + [wf]
        kind = "incremental" if onto else "full"
        b = every[wf]
        doc = read_manifest(b.manifest)
        digest = None
        if doc is not None and b.manifest:
            for entry in doc.get("files", []):
                new = news.get(entry.get("disk"))
                if new:
                    entry.update(checksum=new["checksum"], size=new["size"])
            doc.update(kind=kind, chain=chain, consolidated_by=ctx.rec.id,
                       parent=({"workflow": onto, "manifest": every[onto].manifest,
                                "checkpoint": every[onto].checkpoint} if onto else None))
            digest = evidence.rewrite_manifest(ctx, b.manifest, doc, {b.files[d]["path"]: new["checksum"]
                                                                      for d, new in news.items()})

        def change(rec: Record) -> None:
            if digest:
                rec.result["manifest_sha256"] = digest
            for disk, new in news.items():
                rec.result["files"][disk].update(checksum=new["checksum"], size=new["size"])
            rec.result.update(kind=kind, parent_backup=onto, chain=chain)
            rec.data["retention"] = {"state": GOOD, "consolidated_by": ctx.rec.id,
                                     "was": {"kind": b.kind, "parent": b.parent}}
        records.update(wf, "consolidated", change, onto=onto)

    def revert(self, ctx: StepContext) -> None:
        every = _current(ctx)
        for item in ctx.data.get("plan", {}).get("consolidate", []):
            b = every.get(item["id"])
            if b is None or b.state != CONSOLIDATING:
                continue
            news = ctx.data.get("new_files", {}).get(b.id, {})
            replaced = {d for d, f in b.files.items()
                        if d in news and f"sha256:{sha256_file(f['path'])}" == news[d]["checksum"]}
            for f in b.files.values():
                ctx.fx.files.remove_owned(naming.partial_of(f["path"]))
            if replaced and replaced == set(b.files):
                self.finish(ctx, b.id, item["onto"], news)  # the new image is in place: complete it
                ctx.effect_stands(f"backup {b.id} was rewritten onto {item['onto'] or 'nothing (a full)'}")
            elif not replaced:
                _records(ctx).set_state(b.id, GOOD)
            else:  # some disks rewritten: finish the others forward
                Consolidate()._one(ctx, item)
                ctx.effect_stands(f"backup {b.id} was rewritten onto {item['onto'] or 'nothing (a full)'}")


# -- deleting -----------------------------------------------------------------------------------------------
def _delete_checkpoint(ctx: StepContext, b: BackupInfo) -> None:
    name = b.checkpoint
    if not name:
        return
    cps = ctx.fx.checkpoints
    try:
        if ctx.hv.lookup_checkpoint(ctx.domain, name) is not None:
            ctx.save("checkpoint-delete-intent", checkpoint=name, backup=b.id)
            ctx.hv.checkpoint_delete(ctx.domain, name)  # its bitmap merges into its parent's
    except DomainNotFound:
        pass  # nothing in libvirt to delete
    cp = cps.get(ctx.rec.uri, ctx.domain, name)
    if cp is not None and cp.workflow == b.id:
        cps.remove(ctx.rec, name)


def _delete(ctx: StepContext, b: BackupInfo) -> None:
    records = _records(ctx)
    if b.state != DELETING:
        records.set_state(b.id, DELETING)
    _delete_checkpoint(ctx, b)
    for path in b.paths():
        ctx.fx.files.remove_owned(path)
        ctx.fx.files.remove_owned(naming.partial_of(path))
    if b.folder:
        ctx.fx.files.remove_folder(b.folder)
    records.set_state(b.id, DELETED)


class Delete(Step):
    description = "each removed backup, newest first: marked deleting; its checkpoint; its files; marked deleted"

    def execute(self, ctx: StepContext) -> None:
        doomed = ctx.data["plan"]["remove"]
        for wf in doomed:
            every = _current(ctx)
            b = every.get(wf)
            if b is None or b.state == DELETED:
                continue
            needed = [o.id for o in every.values() if o.state != DELETED and o.id not in doomed and wf in o.chain]
            if needed:
                raise StepFailed(f"backup {wf} is still in the chain of {', '.join(sorted(needed))}; not deleted")
            _delete(ctx, b)
            ctx.save("backup-deleted", backup=wf)

    def revert(self, ctx: StepContext) -> None:
        every = _current(ctx)
        for wf in ctx.data.get("plan", {}).get("remove", []):
            b = every.get(wf)
            if b is None or b.state in (GOOD, CHAIN_INCOMPLETE):
                continue
            if b.state == DELETING and all(os.path.exists(p) for p in b.paths()):
                _records(ctx).set_state(wf, GOOD)  # nothing of it was removed: it stays
                continue
            if b.state == DELETING:
                _delete(ctx, b)  # a half-deleted backup is the one state not to leave
            ctx.effect_stands(f"backup {wf} was deleted")


# -- finalizing -------------------------------------------------------------------------------------------
class Finalize(Step):
    description = "our checkpoint store follows libvirt; manifests and records of kept backups name their new chain"

    def execute(self, ctx: StepContext) -> None:
        try:
            ctx.data["chain"] = restore_chain(ctx.hv, ctx.fx.checkpoints, ctx.rec, check=ctx.guard)
        except DomainNotFound:
            ctx.data["chain"] = {"redefined": [], "broken": {}}
        every = _current(ctx)
        for wf in ctx.data["plan"]["keep"]:
            b = every.get(wf)
            if b is None or not b.manifest:
                continue
            doc = read_manifest(b.manifest)
            digest = None
            if doc is not None and "chain" in doc and doc["chain"] != b.chain:
                doc["chain"] = b.chain
                digest = evidence.rewrite_manifest(ctx, b.manifest, doc, {})

            def change(rec: Record, chain: list[str] = b.chain, digest: str | None = digest) -> None:
                rec.result["chain"] = chain
                if digest:
                    rec.result["manifest_sha256"] = digest
            record = _records(ctx).load(wf)
            if ("chain" in record.result and record.result["chain"] != b.chain) or \
                    (digest and record.result.get("manifest_sha256") != digest):
                _records(ctx).update(wf, "rechained", change)

    def next_trigger(self, ctx: StepContext) -> str:
        p = ctx.data["plan"]
        ctx.rec.result = {"kept": p["keep"], "removed": p["remove"], "reasons": p["reasons"],
                          "consolidated": p["consolidate"], "retention": ctx.params["retention"],
                          "timezone": ctx.params["timezone"],
                          "broken": sorted((ctx.data.get("chain") or {}).get("broken", {}))}
        return "advance"


def verify(rec: Record, look: Inspect) -> list[dict[str, Any]]:
    """Removed backups are gone (files and checkpoints); kept ones still match their records."""
    every = {b.id: b for b in catalog(look.checkpoints.store, rec.uri, rec.domain, include_deleted=True)}
    try:
        live = {c.name for c in look.hv.list_checkpoints(rec.domain)}
    except DomainNotFound:
        live = set()
    checks: list[dict[str, Any]] = []
    for wf in rec.result.get("removed", []):
        b = every.get(wf)
        left = [p for p in (b.paths() if b else []) if os.path.exists(p)]
        cp = b.checkpoint if b else None
        ok = b is not None and b.state == DELETED and not left and (cp is None or cp not in live)
        checks.append({"item": wf, "ok": ok, "deleted": ok, "left": left})
    for wf in rec.result.get("kept", []):
        b = every.get(wf)
        bad = [f["path"] for f in (b.files.values() if b else [])
               if not os.path.exists(f["path"]) or f"sha256:{sha256_file(f['path'])}" != f.get("checksum")]
        ok = b is not None and b.state == GOOD and not bad and all(c in every and every[c].state == GOOD
                                                                 for c in b.chain)
        checks.append({"item": wf, "ok": ok, "kept": True, "bad": bad})
    return checks


STEPS: dict[str, Step] = {
    "preflight": Preflight(),
    "consolidating": Consolidate(),
    "deleting": Delete(),
    "finalizing": Finalize(),
}

DEFINITION = Definition(NAME, VERSION, STATES, TRANSITIONS, STEPS, on_crash={s: RESUME for s in STATES},
                        validate=validate, verify=verify,
                        options=(*OPTIONS, OPT_POLICY, OPT_TARGET, OPT_TIMEZONE, common.OPT_ON_ERROR),
                        summary="apply a retention (restic's keep rules) to a domain's backups, chains kept whole")
