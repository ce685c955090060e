"""The workflow record: versioned JSON, never pickles.

A record is everything needed to continue a workflow in another process:
which definition (and which version of it) it follows, the state it is in,
what it was asked to do, what it intends to create and what it created.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import RecordUnreadable

SCHEMA_VERSION = 1

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
# The rollback ended, but an effect could not be undone (a revert issued, a delete
# that had finished, a rewind committed): ``result["effects_standing"]`` says which.
PARTIALLY_ROLLED_BACK = "partially_rolled_back"
NEEDS_ATTENTION = "needs_attention"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, ROLLED_BACK, PARTIALLY_ROLLED_BACK, NEEDS_ATTENTION)
# Final: the domain lock is released, nothing will touch the workflow again.
FINAL_STATUSES = (SUCCEEDED, ROLLED_BACK, PARTIALLY_ROLLED_BACK)
# Stopped: nothing runs it until an operator says resume, rollback or abort.
STOPPED_STATUSES = (FAILED, NEEDS_ATTENTION)

FORWARD = "forward"
ROLLBACK = "rollback"


def new_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class Slot:
    """A scheduled run: policy, domain (with its host) and slot time; ``kind`` capture | prune | verify."""

    policy: str
    host: str
    domain: str
    at: float
    kind: str = "capture"

    @property
    def member(self) -> str:
        return f"{self.host}|{self.domain}|{int(self.at)}|{self.kind}"


@dataclass
class Artifact:
    """Something a step creates outside the store, named before it exists."""

    name: str
    kind: str  # overlay | backup-file | partial-file | manifest | ...
    path: str
    disk: str | None = None
    status: str = "planned"  # planned | present | deleted | kept
    checksum: str | None = None
    size: int | None = None


@dataclass
class Record:
    id: str
    strategy: str
    definition_version: int
    domain: str
    uri: str
    params: dict[str, Any]
    state: str
    status: str = QUEUED
    mode: str = FORWARD
    attempts: dict[str, int] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None
    revert_queue: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    worker: str | None = None
    epoch: int = 0
    rev: int = 0
    enqueues: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    # -- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "Record":
        """The record in ``raw``, or RecordUnreadable saying why this build cannot read it."""
        if not isinstance(raw, dict):
            raise RecordUnreadable(f"record is a JSON {type(raw).__name__}, not an object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise RecordUnreadable(f"record {raw.get('id')!r} has schema version {version!r}; this build reads "
                                   f"version {SCHEMA_VERSION}{' (written by a newer build)' if newer else ''}")
        for name, kind in _REQUIRED.items():
            if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
                raise RecordUnreadable(f"record {raw.get('id')!r}: field {name!r} is missing or not a "
                                       f"{kind.__name__}")
        if raw["status"] not in STATUSES or raw.get("mode", FORWARD) not in (FORWARD, ROLLBACK):
            raise RecordUnreadable(f"record {raw.get('id')!r}: unknown status {raw['status']!r} or mode "
                                   f"{raw.get('mode')!r}")
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise RecordUnreadable(f"record {raw.get('id')!r}: {exc}") from None

    # -- artifacts -------------------------------------------------------------
    def plan_artifact(self, art: Artifact) -> dict[str, Any]:
        """Record an artifact's name before the effect that creates it."""
        existing = self.artifacts.get(art.name)
        if existing is not None:
            return existing
        self.artifacts[art.name] = asdict(art)
        return self.artifacts[art.name]

    def set_artifact(self, name: str, **changes: Any) -> None:
        self.artifacts[name].update(changes)

    def artifacts_of(self, kind: str) -> list[dict[str, Any]]:
        return [a for a in self.artifacts.values() if a["kind"] == kind]

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


_REQUIRED: dict[str, type] = {"id": str, "strategy": str, "definition_version": int, "domain": str, "uri": str,
                              "params": dict, "state": str, "status": str}
