"""``domcapture token create | list | revoke``: bearer tokens of the HTTP API (workflows/tokens.py).

Each create and revoke is recorded in the audit log with the OS user and host
that ran it; a token's own requests are recorded under ``token:<name>``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from workflows.audit import AuditLog, cli_actor
from workflows.errors import DomcaptureError
from workflows.tokens import SCOPES, Tokens

from .runtime import Runtime


def _audited(rt: Runtime, action: str, name: str, detail: dict[str, Any], fn: Any) -> Any:
    log = AuditLog(rt.store.r, rt.settings.prefix)
    try:
        out = fn()
    except DomcaptureError as exc:
        log.append(cli_actor(), action, f"token:{name}", f"refused: {exc}", **detail)
        raise
    log.append(cli_actor(), action, f"token:{name}", "ok", **detail)
    return out


def cmd_create(args: argparse.Namespace, rt: Runtime) -> int:
    tokens = Tokens(rt.store.r, rt.settings.prefix)
    secret = _audited(rt, "token-create", args.name, {"scope": args.scope},
                      lambda: tokens.create(args.name, args.scope, cli_actor().name))
    if args.json:
        print(json.dumps({"name": args.name, "scope": args.scope, "token": secret}, sort_keys=True))
    else:
        print(secret)
    return 0


def cmd_list(args: argparse.Namespace, rt: Runtime) -> int:
    rows = [t.to_dict() for t in Tokens(rt.store.r, rt.settings.prefix).list()]
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    for r in rows:
        print(f"{r['name']:<24} {r['scope']:<8} by {r['by']}")
    return 0


def cmd_revoke(args: argparse.Namespace, rt: Runtime) -> int:
    tokens = Tokens(rt.store.r, rt.settings.prefix)
    _audited(rt, "token-revoke", args.name, {}, lambda: tokens.revoke(args.name))
    print(json.dumps({"name": args.name, "revoked": True}) if args.json else f"token {args.name}: revoked")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("token", help="bearer tokens of the HTTP API (/api/v1): create, list, revoke")
    t = s.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    a = t.add_parser("create", help="create a token; its secret is printed once (only its SHA-256 is kept)")
    a.add_argument("name", help="letters, digits and . _ - (at most 64)")
    a.add_argument("--scope", required=True, choices=SCOPES,
                   help="read (the console's viewer), operate (operator) or admin")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_create)
    a = t.add_parser("list", help="every token: name, scope, who created it")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_list)
    a = t.add_parser("revoke", help="revoke a token: its next request is refused")
    a.add_argument("name")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_revoke)
