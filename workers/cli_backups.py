"""``domcapture backups --domain D``: a domain's backups, their chains, sizes, ages and last verification."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from workflows.backups import catalog
from workflows.checkpoints import CheckpointStore
from workflows.errors import DomainNotFound

from .runtime import Runtime


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}[unit]
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def rows(rt: Runtime, domain: str, uri: str | None, *, include_deleted: bool) -> tuple[str, list[dict[str, Any]]]:
    hv = rt.hypervisor(uri or rt.settings.libvirt_uri)
    try:
        canonical = hv.canonical_uri()
        try:
            live = {c.name for c in hv.list_checkpoints(domain)}
        except DomainNotFound:
            live = set()
    finally:
        hv.close()
    cps = {c.name: c for c in CheckpointStore(rt.store).all(canonical, domain)}
    now = time.time()
    out = []
    for b in catalog(rt.store, canonical, domain, include_deleted=include_deleted):
        row = b.to_dict(now)
        cp = cps.get(b.checkpoint or "")
        row["checkpoint_state"] = (None if not b.checkpoint else
                                   "broken" if cp is not None and cp.broken else
                                   (cp.state if cp is not None else "not-in-store") +
                                   ("" if b.checkpoint in live else ", not-in-libvirt"))
        out.append(row)
    return canonical, out


def cmd_backups(args: argparse.Namespace, rt: Runtime) -> int:
    uri, found = rows(rt, args.domain, args.uri, include_deleted=args.all)
    if args.json:
        print(json.dumps({"domain": args.domain, "uri": uri, "backups": found}, sort_keys=True))
        return 0
    if not found:
        print(f"(no backups of {args.domain} at {uri})")
        return 0
    print(f"{'WORKFLOW':<16} {'KIND':<11} {'STATE':<13} {'PARENT':<16} {'SIZE':>9} {'AGE':>7} {'VERIFIED':<8} CHAIN")
    for r in found:
        v = r["verified"]
        verified = "-" if not v else ("ok" if v.get("ok") else "FAILED")
        print(f"{r['workflow']:<16} {r['kind']:<11} {r['state']:<13} {r['parent'] or '-':<16} "
              f"{_size(r['size']):>9} {_age(r['age_s']):>7} {verified:<8} {' > '.join(r['chain'])}")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("backups", help="list a domain's backups: kind, parent, chain, size, age, last verification")
    s.add_argument("--domain", required=True)
    s.add_argument("--uri", help="libvirt URI (env LIBVIRT_DEFAULT_URI)")
    s.add_argument("--all", action="store_true", help="also the backups a prune deleted")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=cmd_backups)
