"""``domcapture audit``, and the audit entry of every CLI command that acts.

An acting command (submit, resume, rollback, abort, verify, policy apply and
delete, mount, umount; ``web --add-user/--remove-user`` records its own) is
recorded with the OS user and host that ran it, ``cli <hostname> pid <pid>``
as its source, its target and its outcome (``ok``, ``exit N``, or
``refused: <the error>``); the workflow's own history names the same user
(``by``).  Format of an entry: ``workflows.audit``.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any, Callable

import redis

from workflows.audit import AuditLog, cli_actor
from workflows.errors import DomcaptureError, InputError

from .runtime import Runtime

TARGETS: dict[str, Callable[[argparse.Namespace], str]] = {
    "submit": lambda a: str(a.domain), "resume": lambda a: str(a.id), "rollback": lambda a: str(a.id),
    "abort": lambda a: str(a.id), "verify": lambda a: str(a.id), "policy apply": lambda a: str(a.file),
    "policy delete": lambda a: str(a.name), "mount": lambda a: str(a.backup), "umount": lambda a: str(a.target),
}


def _action(args: argparse.Namespace) -> str:
    sub = getattr(args, "policy_command", None)
    return f"{args.command} {sub}" if sub else str(args.command)


def run_audited(args: argparse.Namespace, rt: Runtime, func: Callable[..., int]) -> int:
    action = _action(args)
    if action not in TARGETS:
        return func(args, rt)
    actor = cli_actor()
    rt.captures.requester = actor.name
    log = AuditLog(rt.store.r, rt.settings.prefix)
    target = TARGETS[action](args)
    detail: dict[str, Any] = {"strategy": args.strategy} if action == "submit" else {}
    name = action.replace(" ", "-")
    try:
        code = func(args, rt)
    except BaseException as exc:
        why = f"refused: {exc}" if isinstance(exc, DomcaptureError) else f"error: {type(exc).__name__}: {exc}"
        try:
            log.append(actor, name, target, why, **detail)
        except redis.RedisError:
            pass  # the store is what failed: the command's own error says so
        raise
    log.append(actor, name, target, "ok" if code == 0 else f"exit {code}", **detail)
    return code


def parse_since(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        raise InputError(f"--since {raw[:40]!r}: give epoch seconds or an ISO 8601 time "
                         "(2024-05-01T12:00:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def cmd_audit(args: argparse.Namespace, rt: Runtime) -> int:
    since = parse_since(args.since) if args.since is not None else 0.0
    if not 0 <= since < 1e11:
        raise InputError(f"--since {args.since!r}: out of range")
    entries = AuditLog(rt.store.r, rt.settings.prefix).entries(since)
    if args.json:
        for e in entries:
            print(json.dumps(e, sort_keys=True))
        return 0
    for e in entries:
        when = datetime.fromtimestamp(e["ts"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{when}  {e['actor']:<24} {e['source']:<28} {e['action']:<14} {e['target']:<18} {e['outcome']}")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("audit", help="who did what, from where, when, and how it ended (console and CLI)")
    s.add_argument("--since", help="only entries at or after this time: epoch seconds or ISO 8601")
    s.add_argument("--json", action="store_true", help="one JSON object a line")
    s.set_defaults(func=cmd_audit)
