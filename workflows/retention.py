"""Which backups a retention keeps: restic's ``forget --keep-*`` rules, as a pure function.

The rules are a dict, every key optional::

    {"keep_last": int, "keep_hourly": int, "keep_daily": int,
     "keep_weekly": int, "keep_monthly": int, "keep_yearly": int}

The semantics are restic's (``internal/restic/snapshot_policy.go``), so a
retention reads the way its documentation says:

- Backups are taken newest first (ties keep their given order).
- Each rule has a counter (its value; ``-1`` means unlimited) and a bucket
  function of the backup's time *in its own time zone*: ``last`` gives every
  backup a bucket of its own; ``hourly`` the hour, ``daily`` the calendar day,
  ``weekly`` the ISO year and week (Monday to Sunday), ``monthly`` the month,
  ``yearly`` the year.
- A backup is kept by a rule when the rule's counter is not spent and its
  bucket differs from the bucket of the last backup that rule kept: the
  newest backup of each hour/day/week/... is the one kept.  The counter then
  goes down by one.  Rules are ORed: a backup kept by several rules counts
  once against each of them (the newest Sunday backup is at once a daily and
  a weekly one).
- The oldest backup is kept too when a rule still has counts left when the
  list ends (restic marks it ``oldest``): this keeps the longest history the
  counts allow.
- An empty retention (no rule above zero) keeps everything, as restic does;
  the prune strategy refuses one instead.

Proxmox's prune counts differently (a backup kept by one rule is not counted
by the next ones); this module follows restic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable, Mapping, Sequence

#: the rules, in restic's order of evaluation
RULES: tuple[str, ...] = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
UNLIMITED = -1


def _bucket(rule: str) -> Callable[[datetime, int], int]:
    def last(t: datetime, nr: int) -> int:
        return nr

    def hourly(t: datetime, nr: int) -> int:
        return t.year * 1_000_000 + t.month * 10_000 + t.day * 100 + t.hour

    def daily(t: datetime, nr: int) -> int:
        return t.year * 10_000 + t.month * 100 + t.day

    def weekly(t: datetime, nr: int) -> int:
        year, week, _ = t.isocalendar()
        return year * 100 + week

    def monthly(t: datetime, nr: int) -> int:
        return t.year * 100 + t.month

    def yearly(t: datetime, nr: int) -> int:
        return t.year

    return {"keep_last": last, "keep_hourly": hourly, "keep_daily": daily, "keep_weekly": weekly,
            "keep_monthly": monthly, "keep_yearly": yearly}[rule]


@dataclass(frozen=True)
class Backup:
    """What the rules look at: an id and a time zone-aware time."""

    id: str
    time: datetime


@dataclass
class Selection:
    keep: list[str] = field(default_factory=list)  # newest first
    remove: list[str] = field(default_factory=list)  # newest first
    reasons: dict[str, list[str]] = field(default_factory=dict)  # kept id -> the rules that kept it


def check_rules(rules: Mapping[str, object]) -> dict[str, int]:
    """The rules as ints; ValueError naming the first unknown key or bad value."""
    out: dict[str, int] = {}
    for key, value in rules.items():
        if key not in RULES:
            raise ValueError(f"unknown retention rule {key!r}; known: {', '.join(RULES)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < UNLIMITED:
            raise ValueError(f"retention rule {key} must be a whole number >= 0 (or -1: unlimited), not {value!r}")
        out[key] = value
    return out


def is_empty(rules: Mapping[str, int]) -> bool:
    return not any(rules.get(r, 0) != 0 for r in RULES)


def select(backups: Iterable[Backup], rules: Mapping[str, object]) -> Selection:
    """Which backups ``rules`` keep (restic's ``ApplyPolicy``, without tags and ``within``)."""
    checked = check_rules(rules)
    items: Sequence[Backup] = list(backups)
    for b in items:
        if b.time.tzinfo is None or b.time.utcoffset() is None:
            raise ValueError(f"backup {b.id}: its time {b.time.isoformat()} has no time zone")
    ordered = sorted(items, key=lambda b: b.time, reverse=True)  # stable: ties keep their order
    sel = Selection()
    if is_empty(checked):
        sel.keep = [b.id for b in ordered]
        sel.reasons = {b.id: ["policy is empty"] for b in ordered}
        return sel
    counts = {r: checked.get(r, 0) for r in RULES}
    last: dict[str, int | None] = {r: None for r in RULES}
    for nr, b in enumerate(ordered):
        why: list[str] = []
        for rule in RULES:
            if counts[rule] == 0:
                continue
            val = _bucket(rule)(b.time, nr)
            if val != last[rule] or nr == len(ordered) - 1:
                last[rule] = val
                if counts[rule] > 0:
                    counts[rule] -= 1
                why.append(rule.removeprefix("keep_"))
        if why:
            sel.keep.append(b.id)
            sel.reasons[b.id] = why
        else:
            sel.remove.append(b.id)
    return sel


__all__ = ["Backup", "Selection", "RULES", "UNLIMITED", "select", "check_rules", "is_empty"]
