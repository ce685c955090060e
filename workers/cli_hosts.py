"""``domcapture host add | list | remove``: the registry of libvirt hosts by name (workflows/hosts.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .runtime import Runtime


def cmd_add(args: argparse.Namespace, rt: Runtime) -> int:
    rt.hosts().add({args.name: args.host_uri})
    print(json.dumps({"name": args.name, "uri": args.host_uri}, sort_keys=True) if args.json
          else f"host {args.name}: {args.host_uri}")
    return 0


def cmd_list(args: argparse.Namespace, rt: Runtime) -> int:
    hosts = rt.hosts().all()
    if args.json:
        print(json.dumps([{"name": n, "uri": u} for n, u in hosts.items()], sort_keys=True))
        return 0
    for name, uri in hosts.items():
        print(f"{name:<20} {uri or '(libvirt default)'}")
    return 0


def cmd_remove(args: argparse.Namespace, rt: Runtime) -> int:
    uri = rt.hosts().remove(args.name)
    print(json.dumps({"name": args.name, "uri": uri, "removed": True}, sort_keys=True) if args.json
          else f"host {args.name}: removed ({uri})")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("host", help="libvirt hosts by name: the console and remote callers name a host, never a URI")
    hosts = s.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    a = hosts.add_parser("add", help="register NAME as the libvirt URI (checked against the URI allowlist)")
    a.add_argument("name", help="letters, digits and . _ - (at most 64)")
    a.add_argument("host_uri", metavar="URI", help="e.g. qemu+ssh://root@hv1/system")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_add)
    a = hosts.add_parser("list", help="every host, 'default' (LIBVIRT_DEFAULT_URI) first")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_list)
    a = hosts.add_parser("remove", help="unregister a host")
    a.add_argument("name")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_remove)
