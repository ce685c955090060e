"""``domcapture mount ID [--disk vdb] DIR`` and ``domcapture umount ID|DIR``.

Both submit a workflow (``mount`` / ``unmount``, see
``workflows/strategies/mount.py``) and wait for it: the mount is there (or
gone) when the command returns 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from workflows import naming, validate
from workflows.errors import InputError
from workflows.record import FINAL_STATUSES, STOPPED_STATUSES, Record
from workflows.service import summary
from workflows.strategies import mount as mount_strategy

from .runtime import Runtime


def _wait(rt: Runtime, wf_id: str, timeout: float) -> Record:
    deadline = time.time() + timeout
    while True:
        rec = rt.store.load(wf_id)
        if rec.status in FINAL_STATUSES or rec.status in STOPPED_STATUSES or time.time() > deadline:
            return rec
        time.sleep(0.05)


def _report(args: argparse.Namespace, rec: Record, ok_text: str) -> int:
    if args.json:
        print(json.dumps(summary(rec), sort_keys=True))
    elif rec.status == "succeeded":
        print(ok_text)
    else:
        err = rec.error or {}
        print(f"domcapture: {rec.strategy} {rec.id} is {rec.status} ({rec.state}): {err.get('message', '')}; "
              f"see 'domcapture show {rec.id}'", file=sys.stderr)
    return 0 if rec.status == "succeeded" else 1


def cmd_mount(args: argparse.Namespace, rt: Runtime) -> int:
    backup = rt.store.load(validate.workflow_id(args.backup, "from"))
    params: dict[str, Any] = {"from": backup.id, "mountpoint": validate.path("mountpoint", args.dir)}
    if args.disk is not None:
        params["disk"] = validate.text("disk", args.disk)
    rec = rt.captures.submit(mount_strategy.NAME, backup.domain, args.uri or rt.settings.libvirt_uri, params)
    rec = _wait(rt, rec.id, args.timeout)
    return _report(args, rec, f"{rec.id}: backup {backup.id} mounted read-only on {rec.params['mountpoint']}")


def find_mount(rt: Runtime, what: str) -> Record:
    """The mount workflow ``what`` names: its id, or the folder it is mounted on (the newest still up)."""
    if validate.ID_RE.match(what):
        return rt.store.load(what)
    folder = os.path.realpath(validate.path("mountpoint", what))
    found = [r for r in rt.store.indexes.iter_all(status="succeeded", strategy=mount_strategy.NAME)
             if isinstance(r, Record) and r.params.get("mountpoint") == folder
             and os.path.isdir(naming.mount_dir(r.id))]
    if not found:
        raise InputError(f"no mounted backup of ours on {folder}")
    return max(found, key=lambda r: r.created_at)


def cmd_umount(args: argparse.Namespace, rt: Runtime) -> int:
    mounted = find_mount(rt, args.target)
    rec = rt.captures.submit(mount_strategy.UNMOUNT, mounted.domain, args.uri or rt.settings.libvirt_uri,
                             {"from": mounted.id})
    rec = _wait(rt, rec.id, args.timeout)
    return _report(args, rec, f"{rec.id}: {mounted.params['mountpoint']} unmounted; mount {mounted.id} taken down")


def register(sub: Any) -> None:
    s = sub.add_parser("mount", help="mount a backup (its whole chain) read-only on an empty folder")
    s.add_argument("backup", metavar="ID", help="the direct-backup to mount (any backup of a chain)")
    s.add_argument("dir", metavar="DIR", help="an empty folder")
    s.add_argument("--disk", help="the disk to mount (needed when the backup holds more than one)")
    s.add_argument("--uri", help="libvirt URI (env LIBVIRT_DEFAULT_URI)")
    s.add_argument("--timeout", default="600", help="seconds to wait for the mount (default 600)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount a mounted backup and take down everything the mount made")
    s.add_argument("target", metavar="ID|DIR", help="the mount workflow's id, or the folder it is mounted on")
    s.add_argument("--uri", help="libvirt URI (env LIBVIRT_DEFAULT_URI)")
    s.add_argument("--timeout", default="600", help="seconds to wait (default 600)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_umount)
