"""Our own record of each domain's checkpoints, in Redis beside the workflows.

libvirt forgets checkpoints (the domain is undefined and defined again,
``virsh checkpoint-delete --metadata``, a reinstall) while their bitmaps stay
in the qcow2 images.  This store keeps what is needed to redefine them:

- ``P:ckpt:<uri>|<domain>``  hash: checkpoint name -> JSON ``Checkpoint``

A checkpoint is written ``pending`` *before* libvirt is asked to create it
(with the workflow that is creating it), and becomes ``committed`` only once
its backup's data is safely written (or at once for a checkpoint made alone).
Only committed, unbroken checkpoints count: as the base of an incremental
backup, and for redefinition.  Every write is fenced by the writing
workflow's epoch, like the workflow records: a worker that lost its lease
changes nothing here either.

``restore_chain`` redefines what libvirt lost, parents first, with
``REDEFINE_VALIDATE``; a checkpoint that fails validation (its bitmap is gone)
is marked broken, with its descendants.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, ParamSpec, TypeVar

from .errors import (CheckpointInconsistent, CheckpointNotFound, LeaseLost, OperationFailed, StoreUnavailable)
from .record import Record
from .store import Store

P = ParamSpec("P")
T = TypeVar("T")

PENDING = "pending"
COMMITTED = "committed"
KIND_BACKUP = "backup"  # made by a direct backup: its data is in that backup
KIND_PLAIN = "checkpoint"  # made alone (the checkpoint strategy)

_FENCED = """
-- KEYS: checkpoints hash, writer's epoch key   ARGV: epoch, op, name, json
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 'stale' end
if ARGV[2] == 'put' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
else redis.call('HDEL', KEYS[1], ARGV[3]) end
return 'ok'
"""


@dataclass
class Checkpoint:
    name: str
    workflow: str  # the workflow that made it
    kind: str = KIND_BACKUP
    state: str = PENDING
    parent: str | None = None
    disks: list[str] = field(default_factory=list)
    xml: str | None = None  # as libvirt returned it (no domain): what a redefinition hands back
    created_at: float = field(default_factory=time.time)
    committed_at: float | None = None
    broken: str | None = None  # why the chain through it cannot be used any more
    backup: dict[str, Any] | None = None  # kind backup: {"manifest", "dir", "mode", "kind"}

    @property
    def usable(self) -> bool:
        return self.state == COMMITTED and not self.broken

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Checkpoint":
        data = json.loads(raw)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def topological(cps: Iterable[Checkpoint]) -> list[Checkpoint]:
    """Parents before children; siblings by creation time."""
    items = sorted(cps, key=lambda c: (c.created_at, c.name))
    names = {c.name for c in items}
    out: list[Checkpoint] = []
    placed: set[str] = set()
    while len(out) < len(items):
        progressed = False
        for c in items:
            if c.name not in placed and (c.parent is None or c.parent not in names or c.parent in placed):
                out.append(c)
                placed.add(c.name)
                progressed = True
        if not progressed:  # a cycle cannot come from libvirt; keep the rest in time order
            out.extend(c for c in items if c.name not in placed)
            break
    return out


class CheckpointStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._fenced = store.r.register_script(_FENCED)

    def key(self, uri: str, domain: str) -> str:
        return f"{self.store.prefix}:ckpt:{uri}|{domain}"

    def _epoch_key(self, wf_id: str) -> str:
        return f"{self.store.prefix}:wf:{wf_id}:epoch"  # the workflow's fencing epoch (see store.py)

    def _redis(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        return self.store._call(fn, *args, **kw)

    # -- reads -----------------------------------------------------------------------
    def all(self, uri: str, domain: str) -> list[Checkpoint]:
        raw = self._redis(self.store.r.hgetall, self.key(uri, domain))
        return topological(Checkpoint.from_json(v) for v in raw.values())

    def get(self, uri: str, domain: str, name: str) -> Checkpoint | None:
        raw = self._redis(self.store.r.hget, self.key(uri, domain), name)
        return Checkpoint.from_json(raw) if raw else None

    # -- fenced writes --------------------------------------------------------------------
    def _write(self, rec: Record, op: str, name: str, payload: str = "") -> None:
        res = self._redis(self._fenced, keys=[self.key(rec.uri, rec.domain), self._epoch_key(rec.id)],
                          args=[rec.epoch, op, name, payload])
        if (res.decode() if isinstance(res, bytes) else res) != "ok":
            raise LeaseLost(f"workflow {rec.id}: checkpoint write with epoch {rec.epoch} refused")

    def put(self, rec: Record, cp: Checkpoint) -> None:
        self._write(rec, "put", cp.name, json.dumps(asdict(cp), sort_keys=True))

    def remove(self, rec: Record, name: str) -> None:
        self._write(rec, "del", name)

    def commit(self, rec: Record, name: str) -> Checkpoint:
        cp = self.get(rec.uri, rec.domain, name)
        if cp is None:
            raise OperationFailed(f"checkpoint {name} is not in the checkpoint store")
        if cp.state != COMMITTED:
            cp.state, cp.committed_at = COMMITTED, time.time()
            self.put(rec, cp)
        return cp

    def mark_broken(self, rec: Record, name: str, reason: str) -> list[str]:
        """Mark ``name`` and its descendants broken; returns the names marked."""
        cps = self.all(rec.uri, rec.domain)
        doomed, marked = {name}, []
        for cp in cps:
            if cp.name in doomed or cp.parent in doomed:
                doomed.add(cp.name)
                if not cp.broken:
                    cp.broken = reason if cp.name == name else f"its ancestor {name} is broken: {reason}"
                    self.put(rec, cp)
                    marked.append(cp.name)
        return marked


def owned_pending(cp: Checkpoint | None, wf_id: str) -> bool:
    return cp is not None and cp.state == PENDING and cp.workflow == wf_id


def restore_chain(hv: Any, cps: CheckpointStore, rec: Record, check: Any = None) -> dict[str, Any]:
    """Make libvirt know every usable checkpoint of our store again (parents first).

    Checkpoints libvirt still has are left alone, but their parent and XML
    are refreshed from libvirt (a checkpoint deleted elsewhere re-parents its
    children).  A checkpoint that libvirt refuses to redefine (its bitmap is
    missing, its parent is gone) is marked broken with its descendants.
    """
    present = {c.name: c for c in hv.list_checkpoints(rec.domain)}
    redefined: list[str] = []
    broken: dict[str, str] = {}
    # first what libvirt still has: a child re-parented by another tool's delete of its parent is no longer
    # that parent's descendant, so the parent's loss below does not mark it broken
    for cp in cps.all(rec.uri, rec.domain):
        live = present.get(cp.name)
        if cp.state == COMMITTED and not cp.broken and live is not None and \
                (live.parent != cp.parent or live.xml != cp.xml):
            cp.parent, cp.xml = live.parent, live.xml
            cps.put(rec, cp)
    for cp in cps.all(rec.uri, rec.domain):
        if check:
            check()
        if cp.state != COMMITTED:
            continue
        if cp.broken:
            broken[cp.name] = cp.broken
            continue
        if cp.name in present:
            continue
        if cp.parent in broken:
            reason = f"its parent {cp.parent} is broken"
        elif not cp.xml:
            reason = "no XML was recorded for it"
        else:
            try:
                hv.checkpoint_redefine(rec.domain, cp.xml)
                redefined.append(cp.name)
                continue
            except (CheckpointInconsistent, CheckpointNotFound, OperationFailed) as exc:
                if isinstance(exc, OperationFailed) and exc.retryable:
                    raise
                # libvirt forgot it (another tool's checkpoint-delete, an undefine): with its bitmap gone too
                # nothing can follow from it, and the next incremental is full and names it
                gone = "its bitmap is gone; " if isinstance(exc, CheckpointInconsistent) else ""
                reason = f"libvirt no longer has it and {gone}redefinition refused: {exc}"
        for name in cps.mark_broken(rec, cp.name, reason):
            broken.setdefault(name, reason)
        broken[cp.name] = reason
    return {"redefined": redefined, "broken": broken}


def backup_base(cps: CheckpointStore, rec: Record, disks: list[str], present: set[str],
                manifest_exists: Any) -> tuple[Checkpoint | None, str]:
    """The checkpoint an incremental backup starts from, or None and why not.

    The newest committed, unbroken checkpoint made by a backup whose manifest
    is still there, that libvirt knows and that covers every disk.
    """
    candidates = [c for c in cps.all(rec.uri, rec.domain) if c.kind == KIND_BACKUP and c.state == COMMITTED]
    if not candidates:
        return None, "no committed backup checkpoint for this domain"
    reasons = []
    for cp in sorted(candidates, key=lambda c: c.committed_at or c.created_at, reverse=True):
        if cp.broken:
            reasons.append(f"{cp.name} is broken ({cp.broken})")
        elif cp.name not in present:
            reasons.append(f"libvirt does not know {cp.name}")
        elif not set(disks) <= set(cp.disks):
            reasons.append(f"{cp.name} does not cover disks {sorted(set(disks) - set(cp.disks))}")
        elif not (cp.backup and manifest_exists(cp.backup.get("manifest"))):
            reasons.append(f"the backup of {cp.name} ({cp.workflow}) is gone")
        else:
            return cp, ""
        break  # only the newest backup's checkpoint is a base: when it cannot serve, the backup is full
    return None, "; ".join(reasons)


__all__ = ["Checkpoint", "CheckpointStore", "COMMITTED", "PENDING", "KIND_BACKUP", "KIND_PLAIN", "topological",
           "restore_chain", "backup_base", "owned_pending", "StoreUnavailable"]
