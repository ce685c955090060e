"""``domcapture policy ...`` and ``domcapture scheduler``: the fleet commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import datetime, timezone
from typing import Any

from workflows import strategies
from workflows.errors import InputError
from workflows.policy import MAX_BYTES, Policy, PolicyError, PolicyStore, parse
from workflows import validate
from workflows.scheduler import BATCH, Scheduler

from .jobs import fault_hook
from .runtime import Runtime
from .settings import process_id

log = logging.getLogger("domcapture.scheduler")


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


def _safe(text: str) -> str:
    """A line for the terminal: control characters (a policy stored before they were refused) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def read_policy(path: str) -> Policy:
    """The policy in the file at ``path``, checked whole (PolicyError naming line and field)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # a larger file is refused without reading it all
    except OSError as exc:
        raise InputError(f"{path}: cannot read the policy file: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise PolicyError(f"{path}: size: larger than {MAX_BYTES // 1024} KiB; a policy is a short file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, path, definitions=strategies.DEFINITIONS)


def cmd_apply(args: argparse.Namespace, rt: Runtime) -> int:
    policy = read_policy(args.file)
    registry = rt.hosts()
    registry.check(policy.hosts)  # a host registered with another URI: refused before anything is stored
    version = PolicyStore(rt.store.r, rt.settings.prefix).apply(policy)
    registry.add(policy.hosts)
    for host, uri in policy.hosts.items():
        rt.map_host(uri, host)
    if args.json:
        print(json.dumps({"name": policy.name, "version": version}, sort_keys=True))
    else:
        print(f"policy {policy.name}: version {version}")
    return 0


def cmd_list(args: argparse.Namespace, rt: Runtime) -> int:
    store = PolicyStore(rt.store.r, rt.settings.prefix)
    errors = store.errors()
    rows: list[dict[str, Any]] = []
    for name in store.names():
        try:
            row = store.get(name).to_dict()
        except (PolicyError, ValueError) as exc:  # unreadable: listed by name with why
            row = {"name": name, "error": f"unreadable: {exc}"}
        if name in errors:
            row["error"] = errors[name]["error"]
            row["error_since"] = errors[name]["since"]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    for r in rows:
        if "strategy" in r:
            print(_safe(f"{r['name']:<20} v{r['version']:<3} {r['strategy']:<14} {r['cron']!r} {r['timezone']}  "
                        f"hosts {','.join(r['hosts'])}"))
        else:
            print(f"{r['name']:<20} -")
        if "error" in r:
            print(f"  ERRORED, skipped by the scheduler: {_safe(r['error'])}")
    return 0


def cmd_show(args: argparse.Namespace, rt: Runtime) -> int:
    store = PolicyStore(rt.store.r, rt.settings.prefix)
    p = store.get(args.name)
    slots = rt.store.slots(p.name)[-args.slots:] if args.slots else []
    rows: list[dict[str, Any]] = [{"host": m.split("|")[0], "domain": m.split("|")[1], "at": at,
                                   "kind": m.split("|")[3], "outcome": v} for m, at, v in slots]
    if args.json:
        print(json.dumps({**p.to_dict(), "slots": rows, "error": store.errors().get(p.name)}, sort_keys=True))
        return 0
    error = store.errors().get(p.name)
    lines = [f"name:      {p.name} (version {p.version}, applied {_ts(p.applied_at)})",
             f"strategy:  {p.strategy} {json.dumps(p.options, sort_keys=True)}  target {p.target or '-'}",
             f"domains:   {', '.join(p.domains) or '-'}  tags {', '.join(p.tags) or '-'}",
             f"hosts:     {', '.join(f'{h}={u}' for h, u in sorted(p.hosts.items()))}",
             f"schedule:  {p.cron!r} {p.timezone}  full: {p.full_weekday or '-'} / every {p.full_every or '-'}",
             f"retention: {json.dumps(p.retention, sort_keys=True)}  verify: {p.verify_cron or '-'}",
             f"limits:    per host {p.per_host or '-'}, per target {p.per_target or '-'}",
             *([f"ERRORED:   skipped by the scheduler since {_ts(error['since'])}: {error['error']}"] if error else []),
             "slots:",
             *(f"  {_ts(r['at'])} {r['kind']:<8} {r['host']:<10} {r['domain']:<20} {r['outcome']}" for r in rows)]
    for line in lines:
        print(_safe(line))
    return 0


def cmd_delete(args: argparse.Namespace, rt: Runtime) -> int:
    PolicyStore(rt.store.r, rt.settings.prefix).delete(args.name)
    print(json.dumps({"name": args.name, "deleted": True}) if args.json else f"policy {args.name}: deleted")
    return 0


def cmd_scheduler(args: argparse.Namespace, rt: Runtime) -> int:
    # several schedulers share a slot's batches; a batch a dead one held is taken over after its lease
    sched = Scheduler(rt.captures, PolicyStore(rt.store.r, rt.settings.prefix), owner=f"scheduler:{process_id()}",
                      crash_hook=fault_hook(os.environ.get("DOMCAPTURE_FAULT")),
                      batch=int(validate.number("DOMCAPTURE_SCHEDULER_BATCH",
                                                os.environ.get("DOMCAPTURE_SCHEDULER_BATCH", BATCH),
                                                minimum=1, allow_minimum=True, maximum=10_000)),
                      batch_ttl=max(10.0, 6 * rt.settings.lease_ttl))
    if args.once:
        outcomes = sched.tick()
        if args.json:
            print(json.dumps([{"policy": o.slot.policy, "slot": o.slot.member, "outcome": o.what}
                              for o in outcomes], sort_keys=True))
        else:
            for o in outcomes:
                print(f"{o.slot.policy} {o.slot.member}: {o.what}")
        return 0
    sched.run_forever(args.interval or 10.0)
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("policy", help="backup policies: apply, list, show, delete")
    pol = s.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    a = pol.add_parser("apply", help="check a policy file (TOML) whole and store it as a new version")
    a.add_argument("file")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_apply)
    a = pol.add_parser("list", help="every stored policy")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_list)
    a = pol.add_parser("show", help="one policy and its recent slots (submitted, skipped, coalesced)")
    a.add_argument("name")
    a.add_argument("--slots", type=int, default=50, help="how many recent slots to show (default 50)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_show)
    a = pol.add_parser("delete", help="stop scheduling a policy (its versions stay readable)")
    a.add_argument("name")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_delete)

    s = sub.add_parser("scheduler", help="run the scheduler: submits each due slot of every policy once")
    s.add_argument("--once", action="store_true", help="one pass, then exit")
    s.add_argument("--interval", help="seconds between passes (default 10)")
    s.add_argument("--json", action="store_true", help="--once: print the outcomes as JSON")
    s.set_defaults(func=cmd_scheduler, daemon=True)
