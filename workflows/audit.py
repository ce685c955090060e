"""The audit log: who asked for what, from where, when, and how it ended.

One Redis stream, ``P:audit``, append-only (nothing here edits or deletes an
entry) and bounded: each append trims it to about ``MAXLEN`` entries
(``XADD MAXLEN ~``), so the oldest entries go first once it is full.  An
entry holds ``ts`` (epoch seconds), ``actor`` (a console user, or
``os-user@host`` for a CLI call), ``source`` (``console <client address>`` or
``cli <hostname> pid <pid>``), ``action`` (``resume``, ``login-failed``,
``policy-apply``...), ``target`` (a workflow id, a domain, a policy or user
name), ``outcome`` (``ok``, ``refused: <why>``, ``denied: <role>``...) and
``detail`` (JSON).

Everything an entry holds may come from outside (a typed user name, a
domain): it is stored as text, cut to a bounded length, control characters
replaced, and shown escaped; it is never followed.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis

MAXLEN = 100_000
FIELD_MAX = 300
FIELDS = ("ts", "actor", "source", "action", "target", "outcome", "detail")


@dataclass(frozen=True)
class Actor:
    """Who acts: ``name`` goes into the workflow's history as ``by``; ``source`` says from where."""

    name: str
    source: str


def cli_actor() -> Actor:
    """The OS user and host of this process, with its pid."""
    host = socket.gethostname()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return Actor(f"{user}@{host}", f"cli {host} pid {os.getpid()}")


def clean(value: object, limit: int = FIELD_MAX) -> str:
    """Text fit to store and show: control characters as ``?``, at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    text = "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class AuditLog:
    def __init__(self, client: redis.Redis[bytes], prefix: str) -> None:
        self.r = client
        self.key = f"{prefix}:audit"

    def append(self, actor: Actor, action: str, target: str, outcome: str, **detail: Any) -> str:
        entry: dict[str | bytes, str | bytes | int | float] = {
            "ts": f"{time.time():.6f}", "actor": clean(actor.name), "source": clean(actor.source),
            "action": clean(action, 64), "target": clean(target), "outcome": clean(outcome, 1000),
            "detail": clean(json.dumps(detail, sort_keys=True, default=str), 2000)}
        entry_id = self.r.xadd(self.key, entry, maxlen=MAXLEN, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def entries(self, since: float = 0.0, count: int | None = None) -> list[dict[str, Any]]:
        """Entries at or after ``since`` (epoch seconds), oldest first; with ``count``, the newest ``count``."""
        start = f"{int(since * 1000)}-0" if since > 0 else "-"  # the id's millisecond; then the exact time
        if count is None:
            raw = self.r.xrange(self.key, start, "+")
        else:
            raw = self.r.xrevrange(self.key, "+", start, count=count)[::-1]
        out = []
        for entry_id, fields in raw:
            doc: dict[str, Any] = {"id": entry_id.decode()}
            for k in FIELDS:
                doc[k] = fields.get(k.encode(), b"").decode(errors="replace")
            doc["ts"] = float(doc["ts"] or 0)
            try:
                doc["detail"] = json.loads(doc["detail"] or "{}")
            except ValueError:
                pass  # a detail cut at its bound: shown as the text it is
            if doc["ts"] >= since:
                out.append(doc)
        return out
