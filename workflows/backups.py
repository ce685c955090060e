"""A domain's backups, as the records of its captures say, and the one way a prune changes them.

A backup is a succeeded ``snapshot-backup`` or ``direct-backup`` workflow.
Its files are the ones its record names (``result["files"]``, the manifest,
``domain.xml``); its parent is ``result["parent_backup"]`` (a direct-backup
incremental); its time is ``result["taken_at"]`` when set, else the instant
its data was taken (``data["began"]``, when the backup job began), else the
record's creation.

Each backup has a retention state in ``data["retention"]``:

- ``good`` (no entry): its files are all there and match its record;
- ``consolidating``: a prune is rewriting one of its files (a synthetic full,
  or a rebase onto an older kept backup); its record is updated, and the
  backup is good again, once the new file is in place;
- ``deleting``: a prune is removing it; some of its files may be gone;
- ``deleted``: gone.

A backup that is good itself but reads through one that is not is listed
``chain-incomplete`` (a restore refuses it the same way).

Only a good backup is listed as such, restored, or used as the base of an
incremental: a crash anywhere leaves no backup listed good whose files are
partly gone.  A prune changes a backup's record only through
``BackupRecords.update``, which takes the backup record's own lease (as an
operator's ``verify`` does) after checking the prune's.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .backupfolder import read_small
from .errors import OperationFailed
from .record import Record
from .store import Store

STRATEGIES = ("snapshot-backup", "direct-backup")
GOOD, CONSOLIDATING, DELETING, DELETED = "good", "consolidating", "deleting", "deleted"
CHAIN_INCOMPLETE = "chain-incomplete"  # good itself, but a backup of its chain is not
LEASE_TTL = 30.0


def read_manifest(path: str | None) -> dict[str, Any] | None:
    """A backup's manifest, or None when it is missing or unreadable (the one place manifests are read)."""
    data = read_small(path)  # no link followed, no FIFO waited on
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


@dataclass
class BackupInfo:
    id: str
    strategy: str
    domain: str
    uri: str
    kind: str  # full | incremental
    parent: str | None
    time: float
    files: dict[str, dict[str, Any]]  # disk -> {"path", "size", "checksum"}
    manifest: str | None
    state: str = GOOD
    checkpoint: str | None = None
    verified: dict[str, Any] | None = None  # the last verification: {"at", "ok"}
    chain: list[str] = field(default_factory=list)  # full first, this one last (from the parents)
    consolidated_by: str | None = None
    extra: list[str] = field(default_factory=list)  # the folder's other files: firmware copies, the signature

    @property
    def folder(self) -> str | None:
        return os.path.dirname(self.manifest) if self.manifest else None

    @property
    def size(self) -> int:
        return sum(int(f.get("size") or 0) for f in self.files.values())

    def paths(self) -> list[str]:
        """Every file of the backup, data first and its manifest last."""
        out = [f["path"] for _, f in sorted(self.files.items())]
        if self.folder:
            out.append(os.path.join(self.folder, "domain.xml"))
        out.extend(self.extra)
        if self.manifest:
            out.append(self.manifest)
        return out

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"workflow": self.id, "strategy": self.strategy, "kind": self.kind, "parent": self.parent,
                "chain": self.chain, "state": self.state, "time": self.time, "age_s": round(now - self.time, 1),
                "size": self.size, "files": self.files, "manifest": self.manifest, "checkpoint": self.checkpoint,
                "verified": self.verified, "consolidated_by": self.consolidated_by}


def backup_time(rec: Record) -> float:
    t = rec.result.get("taken_at") or rec.data.get("began") or rec.created_at
    return float(t)


def state_of(rec: Record) -> str:
    return str((rec.data.get("retention") or {}).get("state") or GOOD)


def from_record(rec: Record) -> BackupInfo | None:
    if rec.strategy not in STRATEGIES or rec.status != "succeeded" or not rec.result.get("files"):
        return None
    verifications = rec.data.get("verifications") or []
    return BackupInfo(id=rec.id, strategy=rec.strategy, domain=rec.domain, uri=rec.uri,
                      kind=str(rec.result.get("kind") or "full"), parent=rec.result.get("parent_backup"),
                      time=backup_time(rec), files=dict(rec.result["files"]), manifest=rec.result.get("manifest"),
                      state=state_of(rec), checkpoint=rec.result.get("checkpoint"),
                      verified=verifications[-1] if verifications else None,
                      consolidated_by=(rec.data.get("retention") or {}).get("consolidated_by"),
                      extra=sorted(a["path"] for a in rec.artifacts.values()
                                   if a.get("kind") in ("firmware-copy", "manifest-sig")
                                   and a.get("status") == "present"))


def with_chains(backups: list[BackupInfo]) -> list[BackupInfo]:
    """Fill each backup's chain by following the parents (full first); oldest backup first."""
    by_id = {b.id: b for b in backups}
    own = {b.id: b.state for b in backups}
    for b in backups:
        chain, cur, seen = [b.id], b.parent, {b.id}
        while cur and cur not in seen:
            chain.insert(0, cur)
            seen.add(cur)
            cur = by_id[cur].parent if cur in by_id else None
        b.chain = chain
        if b.state == GOOD and any(own.get(c) != GOOD for c in chain):
            b.state = CHAIN_INCOMPLETE  # good only when every backup it reads through is
    return sorted(backups, key=lambda x: (x.time, x.id))


def catalog(store: Store, uri: str, domain: str, *, include_deleted: bool = False) -> list[BackupInfo]:
    """Every backup of ``domain`` at ``uri`` (deleted ones only when asked), oldest first."""
    found = [b for rec in store.indexes.iter_all(domain=(uri, domain), status="succeeded")
             if isinstance(rec, Record) for b in [from_record(rec)] if b is not None]
    return [b for b in with_chains(found) if include_deleted or b.state != DELETED]


class BackupRecords:
    """The port through which a prune changes the records of the backups it consolidates or removes."""

    def __init__(self, store: Store, by: Record, guard: Callable[[], None]) -> None:
        self.store = store
        self.by = by
        self.guard = guard

    def catalog(self, uri: str, domain: str) -> list[BackupInfo]:
        return catalog(self.store, uri, domain, include_deleted=True)

    def load(self, wf_id: str) -> Record:
        return self.store.load(wf_id)

    def update(self, wf_id: str, event: str, change: Callable[[Record], None], **detail: Any) -> Record:
        """Apply ``change`` to backup ``wf_id``'s record under its own lease; the prune's lease is checked first."""
        self.guard()
        lease = self.store.acquire_lease(wf_id, f"{self.by.strategy}:{self.by.id}", LEASE_TTL)
        if lease is None:
            raise OperationFailed(f"backup {wf_id} is held by {self.store.lease_value(wf_id)}; "
                            f"workflow {self.by.id} does not change it now", retryable=True)
        try:
            rec = self.store.load(wf_id)
            change(rec)
            self.guard()
            self.store.save(rec, event, epoch=lease.epoch, by=self.by.id, **detail)
            return rec
        finally:
            lease.release()

    def set_state(self, wf_id: str, state: str, **extra: Any) -> Record:
        def change(rec: Record) -> None:
            entry = dict(rec.data.get("retention") or {})
            entry.update(state=state, by=self.by.id, at=time.time(), **extra)
            rec.data["retention"] = entry
        return self.update(wf_id, f"retention-{state}", change)


__all__ = ["BackupInfo", "BackupRecords", "catalog", "from_record", "read_manifest", "backup_time", "with_chains",
           "STRATEGIES", "GOOD", "CONSOLIDATING", "DELETING", "DELETED", "CHAIN_INCOMPLETE"]
