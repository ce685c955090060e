"""The console's overview: backup freshness per domain and day, the domains in breach first.

A domain is in breach when its newest succeeded capture that kept files
(a backup: ``result.files``) is older than ``MAX_AGE`` (26 hours: a daily
backup plus slack), or when it has none.  The grid has one cell per UTC day
of the last ``DAYS`` days: how many backups of that domain succeeded that day.
It reads every record through the store's indexes, so it costs one pass over
the workflows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable

from workflows.record import Record

DAYS = 14
MAX_AGE = 26 * 3600


@dataclass
class Row:
    domain: str
    uri: str
    cells: list[int] = field(default_factory=list)  # backups per day, oldest day first
    last_ok: Record | None = None

    def age(self, now: float) -> float | None:
        return None if self.last_ok is None else now - self.last_ok.updated_at

    def breach(self, now: float, max_age: float = MAX_AGE) -> bool:
        age = self.age(now)
        return age is None or age > max_age


def day_labels(now: float, days: int = DAYS) -> list[str]:
    today = datetime.fromtimestamp(now, timezone.utc).date()
    return [(today - timedelta(days=days - 1 - i)).isoformat() for i in range(days)]


def freshness(records: Iterable[Record | tuple[str, str]], now: float | None = None, days: int = DAYS,
              max_age: float = MAX_AGE) -> list[Row]:
    """One row per (URI, domain) that has any workflow; breaches first (never backed up, then the oldest)."""
    now = time.time() if now is None else now
    labels = day_labels(now, days)
    index = {d: i for i, d in enumerate(labels)}
    rows: dict[tuple[str, str], Row] = {}
    for rec in records:
        if not isinstance(rec, Record):
            continue  # unreadable: 'domcapture list --status unreadable' shows why
        row = rows.setdefault((rec.uri, rec.domain), Row(rec.domain, rec.uri, [0] * days))
        if rec.status != "succeeded" or not (rec.result or {}).get("files"):
            continue
        if row.last_ok is None or rec.updated_at > row.last_ok.updated_at:
            row.last_ok = rec
        day = datetime.fromtimestamp(rec.updated_at, timezone.utc).date().isoformat()
        if day in index:
            row.cells[index[day]] += 1
    return sorted(rows.values(), key=lambda r: (not r.breach(now, max_age),
                                                r.last_ok.updated_at if r.last_ok else 0.0, r.domain, r.uri))
