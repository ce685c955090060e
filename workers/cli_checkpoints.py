"""``domcapture checkpoints --domain D``: a domain's checkpoints, as our store and libvirt see them."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any

from workflows.checkpoints import CheckpointStore
from workflows.errors import DomainNotFound

from .runtime import Runtime


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


def rows(rt: Runtime, domain: str, uri: str | None) -> tuple[str, bool, list[dict[str, Any]]]:
    hv = rt.hypervisor(uri or rt.settings.libvirt_uri)
    try:
        canonical = hv.canonical_uri()
        try:
            live = {c.name: c for c in hv.list_checkpoints(domain)}
            defined = True
        except DomainNotFound:
            live, defined = {}, False
    finally:
        hv.close()
    out = []
    for cp in CheckpointStore(rt.store).all(canonical, domain):
        out.append({"name": cp.name, "parent": cp.parent, "state": cp.state, "kind": cp.kind,
                    "workflow": cp.workflow, "broken": cp.broken, "in_libvirt": cp.name in live,
                    "disks": cp.disks, "created_at": cp.created_at, "committed_at": cp.committed_at,
                    "backup_manifest": (cp.backup or {}).get("manifest")})
    known = {r["name"] for r in out}
    for name, info in live.items():
        if name not in known:
            out.append({"name": name, "parent": info.parent, "state": "not-ours", "kind": None, "workflow": None,
                        "broken": None, "in_libvirt": True, "disks": info.disks, "created_at": info.created,
                        "committed_at": None, "backup_manifest": None})
    return canonical, defined, out


def cmd_checkpoints(args: argparse.Namespace, rt: Runtime) -> int:
    uri, defined, found = rows(rt, args.domain, args.uri)
    if not defined and not found:
        raise DomainNotFound(f"domain {args.domain} is not defined at {uri} and has no checkpoints in the store")
    if args.json:
        print(json.dumps({"domain": args.domain, "uri": uri, "defined": defined, "checkpoints": found},
                         sort_keys=True))
        return 0
    if not defined:
        print(f"(domain {args.domain} is not defined at {uri}: libvirt knows none of these)")
    print(f"{'NAME':<30} {'PARENT':<30} {'STATE':<10} {'LIBVIRT':<7} {'KIND':<10} {'WORKFLOW':<16} CREATED")
    for r in found:
        line = (f"{r['name']:<30} {r['parent'] or '-':<30} {r['state']:<10} {'yes' if r['in_libvirt'] else 'no':<7} "
                f"{r['kind'] or '-':<10} {r['workflow'] or '-':<16} {_ts(r['created_at'])}")
        if r["broken"]:
            line += f"  BROKEN: {r['broken']}"
        print(line)
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("checkpoints", help="list a domain's checkpoints: domcapture's store and libvirt")
    s.add_argument("--domain", required=True)
    s.add_argument("--uri", help="libvirt URI (env LIBVIRT_DEFAULT_URI)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_checkpoints)
