"""``domcapture holds``: the domains that carry a domcapture hold mark, and whether its holder still holds."""

from __future__ import annotations

import argparse
import json
from typing import Any

from workflows.errors import DomainNotFound
from workflows.holds import judge, store_status

from .runtime import Runtime


def rows(rt: Runtime, uri: str | None) -> tuple[str, list[dict[str, Any]]]:
    """Every domain on the connection with a mark: live (held), stale (its workflow is final or unknown
    here) or unreadable (never followed)."""
    hv = rt.hypervisor(uri or rt.settings.libvirt_uri)
    status_of = store_status(rt.store)
    out = []
    try:
        canonical = hv.canonical_uri()
        for name in hv.list_domains():
            try:
                mark = hv.hold_mark(name)
            except DomainNotFound:
                continue  # gone while we looked
            found = judge(mark, rt.settings.prefix, status_of)
            if found.kind == "none":
                continue
            row: dict[str, Any] = {"domain": name, "state": found.kind, "status": found.status, "text": found.text}
            if mark and "unreadable" not in mark:
                row.update({k: mark[k] for k in ("workflow", "strategy", "prefix", "started", "started_epoch",
                                                 "worker")})
            out.append(row)
    finally:
        hv.close()
    return canonical, out


def cmd_holds(args: argparse.Namespace, rt: Runtime) -> int:
    uri, found = rows(rt, args.uri)
    if args.json:
        print(json.dumps({"uri": uri, "prefix": rt.settings.prefix, "holds": found}, sort_keys=True))
        return 0
    print(f"{'DOMAIN':<24} {'HOLD':<10} {'WORKFLOW':<16} {'PREFIX':<12} {'STRATEGY':<20} {'STARTED':<24} STATUS")
    for r in found:
        if r["state"] == "unreadable":
            print(f"{r['domain']:<24} {'unreadable':<10} {r['text']}")
            continue
        print(f"{r['domain']:<24} {r['state']:<10} {r['workflow']:<16} {r['prefix']:<12} {r['strategy']:<20} "
              f"{r['started']:<24} {r['status'] or 'unknown here'}")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("holds", help="list the domains carrying a domcapture hold mark, and whether it is live")
    s.add_argument("--uri", help="libvirt URI (env LIBVIRT_DEFAULT_URI)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_holds)
