"""Backup policies: what to capture, where, when, and how much to keep.

A policy is one TOML file (read with the standard library's ``tomllib``)::

    name = "nightly"
    strategy = "direct-backup"
    target = "/var/backups/domcapture"
    domains = ["web-*", "db1"]          # names or globs (fnmatch)
    tags = ["nightly"]                  # and/or libvirt metadata tags (see TAG_NS)

    [hosts]                             # host name = libvirt URI
    hv1 = "qemu:///system"

    [options]                           # the strategy's own options, as on 'submit'
    mode = "push"

    [full]                              # direct-backup: incremental, with a full ...
    weekday = "sun"                     # ... every Sunday, and/or
    every = 6                           # ... after 6 incrementals

    [schedule]
    cron = "0 2 * * *"
    timezone = "Europe/Paris"

    [retention]                         # restic / Proxmox semantics; the prune strategy applies it
    keep_daily = 7
    keep_weekly = 4

    [verify]
    cron = "0 6 * * 0"                  # same time zone as the schedule

    [limits]
    per_host = 2                        # captures at once on one host
    per_target = 4                      # captures at once writing to this policy's target

A bad policy is refused whole: ``PolicyError`` names the line and the field.
Stored policies are versioned JSON in Redis (``PolicyStore``); every apply
adds a version, the newest is the one the scheduler follows.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis
from croniter import CroniterError, croniter

from . import policy_options, validate
from .errors import InputError, RecordNotFound
from .validate import has_control

if TYPE_CHECKING:
    from .definition import Definition

#: the libvirt metadata element a domain's tags live in:
#: ``<metadata><dc:tags xmlns:dc="urn:domcapture:tags">nightly db</dc:tags></metadata>``
TAG_NS = "urn:domcapture:tags"
RETENTION_KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA_VERSION = 1
MAX_BYTES = 256 * 1024  # a policy file is read up to this size, and refused past it
MAX_DEPTH = 3  # tables and arrays inside each other below the document ([options] disks = [...] is 2)
CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_HORIZON = 366 * 86400.0  # a schedule must fire within a year of its apply

_TOP = {"name", "strategy", "target", "domains", "tags", "hosts", "options", "full", "schedule", "retention",
        "verify", "limits"}
_TABLES: dict[str, set[str]] = {"full": {"weekday", "every"}, "schedule": {"cron", "timezone"},
                                "retention": set(RETENTION_KEYS), "verify": {"cron"},
                                "limits": {"per_host", "per_target"}}


class PolicyError(InputError):
    """A policy file or stored policy that cannot be used (exit code 2)."""


@dataclass
class Policy:
    name: str
    strategy: str
    hosts: dict[str, str]
    cron: str
    timezone: str
    domains: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    full_weekday: str | None = None
    full_every: int | None = None
    retention: dict[str, int] = field(default_factory=dict)
    verify_cron: str | None = None
    per_host: int | None = None
    per_target: int | None = None
    version: int = 0
    applied_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Policy":
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise PolicyError(f"stored policy {raw.get('name')!r} has schema version {raw.get('schema_version')!r}; "
                              f"this build reads {SCHEMA_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    # -- time --------------------------------------------------------------------
    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def slots_between(self, after: float, upto: float, cron: str | None = None) -> list[float]:
        """Slot times (epoch seconds) of ``cron`` (default: the schedule) in ``(after, upto]``.

        A wall-clock time that happens twice (the night summer time ends) is one slot, the first.
        """
        zone = self.zone
        it = croniter(cron or self.cron, datetime.fromtimestamp(after, zone))
        out: list[float] = []
        last_wall = datetime.fromtimestamp(after, zone).replace(tzinfo=None)
        while True:
            t = float(it.get_next(float))
            if t > upto:
                return out
            wall = datetime.fromtimestamp(t, zone).replace(tzinfo=None)
            if wall != last_wall:
                out.append(t)
            last_wall = wall

    def wants_full(self, slot: float, incrementals_since_full: int | None) -> bool:
        """direct-backup: is the capture of ``slot`` a full one?  None: no full yet, so yes."""
        if incrementals_since_full is None:
            return True
        if self.full_weekday and WEEKDAYS[datetime.fromtimestamp(slot, self.zone).weekday()] == self.full_weekday:
            return True
        return self.full_every is not None and incrementals_since_full >= self.full_every

    # -- domains -----------------------------------------------------------------
    def selects(self, domain: str, xml: Callable[[], str]) -> bool:
        """Does the policy cover ``domain``?  ``xml`` is called only when tags decide."""
        if any(fnmatch.fnmatchcase(domain, pattern) for pattern in self.domains):
            return True
        return bool(self.tags) and bool(set(self.tags) & domain_tags(xml()))


def domain_tags(xml: str) -> set[str]:
    """The tags in a domain's ``<metadata>`` (the TAG_NS element), split on spaces and commas."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return set()
    out: set[str] = set()
    for el in root.iterfind(f"metadata/{{{TAG_NS}}}tags"):
        out.update(t for t in re.split(r"[\s,]+", el.text or "") if t)
    return out


# -- parsing -------------------------------------------------------------------------
class _Locator:
    """Finds the line a key of a table was written on, to name it in an error."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def line(self, table: str, key: str | None = None) -> int:
        current = ""
        header = 0
        for n, raw in enumerate(self.lines, 1):
            s = raw.strip()
            m = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", s)
            if m:
                current = m.group(1)
                if current == table and key is None:
                    return n
                header = n if current == table else header
                continue
            # a key as written: bare, quoted, or with its control characters escaped ("hv\u0007")
            spelled = "|".join(re.escape(k) for k in {key, json.dumps(key)[1:-1]}) if key is not None else ""
            if current == table and key is not None and re.match(rf"^[\"']?(?:{spelled})[\"']?\s*=", s):
                return n
        return header or 1


def _shown(key: str) -> str:
    """A key as an error line may print it: quoted when it holds control characters."""
    return repr(key) if has_control(key) else key


def _depth(value: Any) -> int:
    """How many tables and arrays are nested in ``value`` (a scalar: 0)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _controls(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str] | None:
    """The first key or string in ``value`` holding a control character: (its path, it)."""
    if isinstance(value, str):
        return (path, value) if has_control(value) else None
    items: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and has_control(k):
            return path + (k,), k
        found = _controls(v, path + (str(k),))
        if found:
            return found
    return None


def _field(path: tuple[str, ...]) -> tuple[str, str | None]:
    """(table, key) of a path in the document: ``hosts.hv1``, or ``domains`` for ``domains[2]``."""
    if len(path) >= 2 and path[0] in (*_TABLES, "hosts", "options"):
        return path[0], path[1]
    return "", path[0] if path else None


def _deep_line(text: str) -> tuple[int, str | None]:
    """Where brackets nest deeper than a policy may: (line, the field being set there)."""
    depth, table, key = 0, "", None
    for n, raw in enumerate(text.splitlines(), 1):
        bare = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', "", raw.split("#", 1)[0])
        header = re.match(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*$", bare)
        m = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", bare)
        if header and depth == 0:
            table, key = header.group(1), None
            continue
        if m and depth == 0:
            key = f"{table}.{m.group(1)}" if table else m.group(1)
        for c in bare:
            depth += 1 if c in "[{" else -1 if c in "]}" else 0
            if depth > MAX_DEPTH + 1:
                return n, key
    return 1, key


def _cron_problem(cron: str, zone: ZoneInfo, now: float, horizon: float | None) -> str | None:
    """Why ``cron`` cannot be a schedule: not five fields, not cron, never fires (Feb 31), or not within
    ``horizon`` seconds of ``now``; None when it is fine."""
    fields = cron.split()
    if not (len(fields) == 5 or (len(fields) == 1 and fields[0].lower() in CRON_ALIASES)):
        return (f"not a cron expression: {cron!r} (five fields, minute hour day month weekday, or one of "
                f"{', '.join(CRON_ALIASES)})")
    if not croniter.is_valid(cron):
        return f"not a cron expression: {cron!r}"
    try:
        upcoming = float(croniter(cron, datetime.fromtimestamp(now, zone)).get_next(float))
    except (CroniterError, ValueError, OverflowError):
        return f"{cron!r} never fires (no date matches it)"
    if horizon is not None and upcoming - now > horizon:
        when = datetime.fromtimestamp(upcoming, zone).strftime("%Y-%m-%d")
        return f"{cron!r} fires next on {when}; a schedule must fire within a year"
    return None


def allowed_uri(uri: str) -> str:
    """A ``[hosts]`` URI through the allowlist every URI passes (``validate.libvirt_uri``)."""
    return validate.libvirt_uri("URI", uri)


def parse(text: str, source: str = "policy", known_strategies: Callable[[str], bool] | None = None, *,
          check_uri: Callable[[str], str] | None = allowed_uri,
          definitions: Mapping[str, Definition] | None = None, now: float | None = None) -> Policy:
    """The policy in ``text``, or PolicyError naming ``source:line`` and the field.

    ``check_uri`` checks each ``[hosts]`` URI (the allowlist; None only for an in-memory
    hypervisor's ``fake:///`` URIs in tests and benchmarks).  With ``definitions`` (the strategies, by
    name) the strategy's options are checked as ``submit`` checks them (``policy_options``), and each
    schedule must fire within a year of ``now``.
    """
    loc = _Locator(text)

    def fail(table: str, key: str | None, why: str) -> PolicyError:
        shown = _shown(key) if key else key
        what = f"{table}.{shown}" if table and shown else (shown or table)
        return PolicyError(f"{source}:{loc.line(table, key)}: {what}: {why}")

    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise PolicyError(f"{source}: size: larger than {MAX_BYTES // 1024} KiB; a policy is a short file")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not TOML: {exc}") from None
    except RecursionError:
        line, deep = _deep_line(text)
        raise PolicyError(f"{source}:{line}: {deep or 'nesting'}: tables or arrays nested too deeply "
                          f"(at most {MAX_DEPTH})") from None
    for key, value in doc.items():
        inner = value.items() if isinstance(value, dict) else ()
        for sub, v in inner:
            if _depth(v) >= MAX_DEPTH:
                raise fail(key, sub, f"tables or arrays nested too deeply (at most {MAX_DEPTH})")
        if _depth(value) > MAX_DEPTH:
            raise fail("", key, f"tables or arrays nested too deeply (at most {MAX_DEPTH})")
    found = _controls(doc)
    if found:
        where = _field(found[0])
        raise fail(*where, f"must not contain control characters (got {found[1]!r})")
    for key in doc:
        if key not in _TOP:
            raise fail("", key, f"unknown field; expected one of {', '.join(sorted(_TOP))}")
    for table, keys in _TABLES.items():
        sub = doc.get(table, {})
        if not isinstance(sub, dict):
            raise fail("", table, "must be a table")
        for key in sub:
            if key not in keys:
                raise fail(table, key, f"unknown field; expected one of {', '.join(sorted(keys))}")

    def text_of(table: str, key: str, value: Any, required: bool = False) -> str | None:
        if value is None:
            if required:
                raise fail(table, key, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(table, key, "must be a non-empty string")
        return value

    def count(table: str, key: str, value: Any, minimum: int = 0) -> int | None:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= 100_000:
            raise fail(table, key, f"must be a whole number from {minimum} to 100000")
        return value

    def str_list(key: str) -> list[str]:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail("", key, "must be a list of non-empty strings")
        return list(value)

    name = text_of("", "name", doc.get("name"), required=True)
    assert name is not None
    if not NAME_RE.match(name):
        raise fail("", "name", "letters, digits, '_', '.', '-' only (at most 64), starting with a letter or digit")
    strategy = text_of("", "strategy", doc.get("strategy"), required=True)
    assert strategy is not None
    if (known_strategies is not None and not known_strategies(strategy)) or \
            (definitions is not None and strategy not in definitions):
        raise fail("", "strategy", f"unknown strategy {strategy!r}")
    target = text_of("", "target", doc.get("target"))
    if target is not None and not target.startswith("/"):
        raise fail("", "target", "must be an absolute path")
    domains, tags = str_list("domains"), str_list("tags")
    if not domains and not tags:
        raise fail("", "domains", "name at least one domain (or glob) in domains, or a tag in tags")

    hosts = doc.get("hosts")
    if not isinstance(hosts, dict) or not hosts:
        raise fail("hosts", None, "is required: one line per host, NAME = \"libvirt URI\"")
    for host, uri in hosts.items():
        if not NAME_RE.match(host):
            raise fail("hosts", host, "a host name: letters, digits, '_', '.', '-' only")
        text_of("hosts", host, uri, required=True)
        if check_uri is not None:
            try:
                check_uri(uri)
            except InputError as exc:
                raise fail("hosts", host, str(exc)) from None

    options = doc.get("options", {})
    if not isinstance(options, dict):
        raise fail("", "options", "must be a table")
    for key in ("target", "incremental"):
        if key in options:
            raise fail("options", key, "is set by the policy itself (target, and [full] for incrementals)")

    sched = doc.get("schedule")
    if not isinstance(sched, dict):
        raise fail("schedule", None, "is required, with cron and timezone")
    cron = text_of("schedule", "cron", sched.get("cron"), required=True)
    zone = text_of("schedule", "timezone", sched.get("timezone"), required=True)
    assert cron is not None and zone is not None
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise fail("schedule", "timezone", f"unknown time zone {zone!r} (an IANA name like Europe/Paris)") from None
    horizon = CRON_HORIZON if definitions is not None else None
    at = time.time() if now is None else now
    why = _cron_problem(cron, tz, at, horizon)
    if why:
        raise fail("schedule", "cron", why)

    full = doc.get("full", {})
    weekday = text_of("full", "weekday", full.get("weekday"))
    if weekday is not None and weekday.lower()[:3] not in WEEKDAYS:
        raise fail("full", "weekday", f"one of {', '.join(WEEKDAYS)}")
    every = count("full", "every", full.get("every"), minimum=1)
    if (weekday or every) and strategy != "direct-backup":
        raise fail("full", None, "only direct-backup takes incrementals")

    retention = {k: v for k in RETENTION_KEYS
                 if (v := count("retention", k, doc.get("retention", {}).get(k))) is not None}
    if "retention" in doc and not any(retention.values()):
        raise fail("retention", None, "keeps nothing: give at least one keep_* above 0")
    verify_cron = text_of("verify", "cron", doc.get("verify", {}).get("cron"))
    if verify_cron is not None and (why := _cron_problem(verify_cron, tz, at, horizon)):
        raise fail("verify", "cron", why)
    if definitions is not None:
        problem = policy_options.problem(definitions[strategy], options, target)
        if problem:
            raise fail(*problem)
    limits = doc.get("limits", {})
    return Policy(name=name, strategy=strategy, hosts=dict(hosts), cron=cron, timezone=zone, domains=domains,
                  tags=tags, target=target, options=dict(options),
                  full_weekday=weekday.lower()[:3] if weekday else None, full_every=every, retention=retention,
                  verify_cron=verify_cron, per_host=count("limits", "per_host", limits.get("per_host"), 1),
                  per_target=count("limits", "per_target", limits.get("per_target"), 1))


def check_stored(policy: Policy, definitions: Mapping[str, Definition], now: float | None = None) -> None:
    """A stored policy re-checked before the scheduler evaluates it: PolicyError ``policy NAME: field: why``.

    One stored before a check existed, or broken since (its key file removed, its strategy gone from
    this build), is refused here, so the scheduler marks that policy errored and goes on with the others.
    """
    def fail(what: str | None, why: str) -> PolicyError:
        return PolicyError(f"policy {policy.name}: {_shown(what) if what else 'policy'}: {why}")

    found = _controls(policy.to_dict())
    if found:
        table, key = _field(found[0])
        raise fail(f"{table}.{key}" if table else key, f"must not contain control characters (got {found[1]!r})")
    if policy.strategy not in definitions:
        raise fail("strategy", f"unknown strategy {policy.strategy!r} (not in this build)")
    try:
        tz = ZoneInfo(policy.timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise fail("schedule.timezone", f"unknown time zone {policy.timezone!r}") from None
    at = time.time() if now is None else now
    for what, cron in (("schedule.cron", policy.cron), ("verify.cron", policy.verify_cron)):
        why = _cron_problem(cron, tz, at, None) if cron is not None else None
        if why:
            raise fail(what, why)
    problem = policy_options.problem(definitions[policy.strategy], dict(policy.options), policy.target)
    if problem:
        table, key, why = problem
        raise fail(f"{table}.{key}" if table and key else (key or table), why)


# -- storage -------------------------------------------------------------------------
_APPLY = """
-- KEYS: policy hash, versions list, names set   ARGV: name, data-without-version (JSON), now
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local doc = cjson.decode(ARGV[2])
doc['version'] = v
doc['applied_at'] = tonumber(ARGV[3])
local data = cjson.encode(doc)
redis.call('HSET', KEYS[1], 'data', data)
redis.call('RPUSH', KEYS[2], data)
redis.call('SADD', KEYS[3], ARGV[1])
return v
"""


class PolicyStore:
    """Policies under ``P:policy:<name>`` (newest) and ``P:policy:<name>:versions`` (every apply)."""

    def __init__(self, client: redis.Redis[bytes], prefix: str) -> None:
        self.r, self.prefix = client, prefix
        self._apply = client.register_script(_APPLY)

    def _k(self, name: str, suffix: str = "") -> str:
        return f"{self.prefix}:policy:{name}{suffix}"

    def apply(self, policy: Policy) -> int:
        """Store a new version; returns its number."""
        doc = policy.to_dict()
        doc.pop("version"), doc.pop("applied_at")
        version = int(self._apply(keys=[self._k(policy.name), self._k(policy.name, ":versions"),
                                        f"{self.prefix}:policies"],
                                  args=[policy.name, json.dumps(doc), time.time()]))
        policy.version = version
        self.clear_error(policy.name)  # the new version is evaluated afresh at the next pass
        return version

    def names(self) -> list[str]:
        return sorted(x.decode() for x in self.r.smembers(f"{self.prefix}:policies"))

    def get(self, name: str) -> Policy:
        raw = self.r.hget(self._k(name), "data")
        if raw is None:
            raise RecordNotFound(f"no policy named {name!r}; see 'domcapture policy list'")
        return Policy.from_dict(json.loads(raw))

    def versions(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(self._k(name, ":versions"), 0, -1)]

    def all(self) -> list[Policy]:
        return [self.get(n) for n in self.names()]

    def delete(self, name: str) -> None:
        """Forget the policy (its versions stay readable under ``:versions`` for the record)."""
        if not self.r.srem(f"{self.prefix}:policies", name):
            raise RecordNotFound(f"no policy named {name!r}; see 'domcapture policy list'")
        self.r.delete(self._k(name))
        self.clear_error(name)

    # -- policies the scheduler could not evaluate -------------------------------------
    def mark_error(self, name: str, why: str, at: float) -> bool:
        """Record why the scheduler could not evaluate ``name``; True when that is news (not the same why)."""
        key = f"{self.prefix}:policy-errors"
        old = self.r.hget(key, name)
        if old is not None and json.loads(old).get("error") == why:
            return False
        self.r.hset(key, name, json.dumps({"error": why, "since": at}))
        return True

    def clear_error(self, name: str) -> None:
        self.r.hdel(f"{self.prefix}:policy-errors", name)

    def errors(self) -> dict[str, dict[str, Any]]:
        """Policy name -> ``{"error", "since"}``: the ones the scheduler skips until they are fixed."""
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(f"{self.prefix}:policy-errors").items()}
