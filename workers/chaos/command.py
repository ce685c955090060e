"""``domcapture chaos``: the kill-anywhere guarantee, run against this host (docs/chaos.md).

Exit codes: 0 every invariant held; 1 violations (the table and the report
name them, the work folder is kept); 2 refused to start (bad input, not
root, another run in progress, no tagged domain, a work or report folder
that is not the run's own): one line, nothing touched.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from workflows.errors import InputError

from . import report
from .domains import URI, tag_command, tagged_domains
from .runner import (ALL_FAULTS, FAULTS, HA_FAULTS, HOST_FAULTS, MARKER, SINGLE_REDIS_FAULTS, STRATEGIES, Chaos,
                     Options)
from .services import libvirtd_answers

LOCK = Path("/run/domcapture-chaos.lock")
REPORT_FILES = {"report.json", "report.html"}


def register(sub: Any) -> None:
    s = sub.add_parser("chaos", help="run workflows under injected faults and check the invariants (as root)",
                       description=__doc__.split("\n\n")[0])
    s.add_argument("--seed", help="the fault schedule and every choice come from it (default: the time)")
    s.add_argument("--duration", default="600", help="seconds of workload with faults (default 600)")
    s.add_argument("--workers", default="3", help="worker processes (default 3)")
    s.add_argument("--disk-domains", help="throwaway no-OS domains with disks of known content (default 3)")
    s.add_argument("--guests", help="throwaway tiny Linux guests with an agent and a writer (default 1)")
    s.add_argument("--guest-dir", help="the built guest (vmlinuz, initrd.gz) of guest/build-guest.sh "
                                       "(env DOMCAPTURE_GUEST_DIR, default /var/lib/domcapture/guest)")
    s.add_argument("--tagged", action="store_true",
                   help=f"run on the domains tagged for it ({tag_command('DOM')}) instead of throwaway ones")
    s.add_argument("--faults", help=f"comma-separated subset of {','.join(ALL_FAULTS)} (default: "
                                    f"{','.join(FAULTS)}; with --tagged without {','.join(HOST_FAULTS)})")
    s.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of the strategies")
    s.add_argument("--redis", choices=("single", "sentinel"), default="single",
                   help="the run's Redis: one redis-server (default), or three redis-servers and three sentinels "
                        "on loopback (faults: redis-failover instead of redis-kill)")
    s.add_argument("--fault-interval", nargs=2, default=("1", "4"), metavar=("MIN", "MAX"),
                   help="seconds between two faults, drawn between MIN and MAX (default 1 4)")
    s.add_argument("--drain-timeout", default="240", help="seconds for every workflow to end after the faults")
    s.add_argument("--work-dir", help="the run's folder (logs, its Redis, backups): new, empty or an earlier "
                                      "run's (default /var/tmp/chaos-SEED-PID)")
    s.add_argument("--report", metavar="DIR", help="write report.json and report.html there")
    s.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print the difference of two reports")
    s.add_argument("--keep", action="store_true", help="keep the work folder (logs, backups)")
    s.add_argument("-v", "--verbose", action="store_true", help="print what the run does as it goes")
    s.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    s.set_defaults(func=cmd_chaos, offline=True)


def _number(name: str, value: str, minimum: float, maximum: float, integer: bool = False) -> float:
    try:
        n = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {'an integer' if integer else 'a number'} (got {value!r})") from None
    if not minimum <= n <= maximum:
        raise InputError(f"{name} must be between {minimum:g} and {maximum:g} (got {value})")
    return n


def _names(flag: str, value: str, known: tuple[str, ...]) -> list[str]:
    names = [x for x in value.split(",") if x]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise InputError(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(known)}")
    return names


def _ours_or_empty(flag: str, path: Path, allowed: set[str]) -> None:
    """A folder the run may write in: absent, empty, or holding only what a run writes there."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InputError(f"{flag} {path} is not a folder")
    if path.exists():
        left = {p.name for p in path.iterdir()} - allowed
        if left:
            raise InputError(f"{flag} {path} holds files that are not a chaos run's ({', '.join(sorted(left)[:3])}); "
                             "name a new or empty folder")


def options(args: argparse.Namespace) -> Options:
    """The run's options, every flag checked: bad input raises InputError (exit 2) before anything starts."""
    if args.redis_url is not None:
        raise InputError("chaos kills and stops the redis-server it uses: it starts its own and takes no "
                         "--redis-url")
    if args.tagged and (args.guests is not None or args.disk_domains is not None):
        raise InputError("--tagged runs on the tagged domains only: drop --guests and --disk-domains")
    opts = Options(seed=int(_number("--seed", args.seed, 0, 2**63, integer=True)) if args.seed is not None
                   else int(time.time()) % 100000,
                   duration=_number("--duration", args.duration, 1, 7 * 86400),
                   workers=int(_number("--workers", args.workers, 1, 64, integer=True)),
                   disk_domains=int(_number("--disk-domains", args.disk_domains or "3", 0, 64, integer=True)),
                   guests=int(_number("--guests", args.guests or "1", 0, 64, integer=True)),
                   tagged=args.tagged, strategies=_names("--strategies", args.strategies, STRATEGIES),
                   fault_interval=(_number("--fault-interval MIN", args.fault_interval[0], 0.1, 3600),
                                   _number("--fault-interval MAX", args.fault_interval[1], 0.1, 3600)),
                   drain_timeout=_number("--drain-timeout", args.drain_timeout, 10, 86400),
                   guest_dir=Path(args.guest_dir or os.environ.get("DOMCAPTURE_GUEST_DIR")
                                  or "/var/lib/domcapture/guest"),
                   keep=args.keep, verbose=args.verbose, redis=args.redis)
    default = [f for f in FAULTS if not (args.tagged and f in HOST_FAULTS)]
    if opts.redis == "sentinel":
        default = [f for f in default if f not in SINGLE_REDIS_FAULTS] + list(HA_FAULTS)
    opts.faults = _names("--faults", args.faults, ALL_FAULTS) if args.faults is not None else default
    mismatch = [f for f in opts.faults if f in (HA_FAULTS if opts.redis == "single" else SINGLE_REDIS_FAULTS)]
    if mismatch:
        raise InputError(f"--faults {','.join(mismatch)}: " + ("needs --redis sentinel" if opts.redis == "single"
                                                                 else "hits the single redis-server of --redis single"))
    if opts.fault_interval[0] > opts.fault_interval[1]:
        raise InputError("--fault-interval: MIN is larger than MAX")
    if not args.tagged and opts.disk_domains + opts.guests == 0:
        raise InputError("no domain to run on: --disk-domains and --guests are both 0")
    if not args.tagged and opts.guests and not all((opts.guest_dir / f).is_file() for f in ("vmlinuz", "initrd.gz")):
        raise InputError(f"--guests needs a built guest in {opts.guest_dir} (guest/build-guest.sh {opts.guest_dir}), "
                         "or --guests 0")
    if args.work_dir is not None:
        if not os.path.isabs(args.work_dir):
            raise InputError(f"--work-dir must be an absolute path (got {args.work_dir!r})")
        opts.workdir = Path(args.work_dir)
        if opts.workdir.exists() and any(opts.workdir.iterdir()) and not (opts.workdir / MARKER).is_file():
            raise InputError(f"--work-dir {opts.workdir} is not empty and not a chaos run's folder; "
                             "name a new or empty folder")
        _ours_or_empty("--work-dir", opts.workdir, {p.name for p in opts.workdir.iterdir()}
                       if (opts.workdir / MARKER).is_file() else set())
    if args.report is not None:
        _ours_or_empty("--report", Path(args.report), REPORT_FILES)
    return opts


def cmd_compare(args: argparse.Namespace) -> int:
    docs = []
    for path in args.compare:
        try:
            docs.append(report.load(Path(path)))
        except (OSError, ValueError) as exc:
            raise InputError(f"--compare: {path}: {exc}") from None
    rows = report.compare(docs[0], docs[1])
    if args.json:
        print(json.dumps([{"what": w, "a": a, "b": b} for w, a, b in rows]))
    else:
        print(report.compare_text(rows, args.compare[0], args.compare[1]))
    return 0


def cmd_chaos(args: argparse.Namespace, rt: object) -> int:
    if args.compare:
        return cmd_compare(args)
    opts = options(args)
    if os.geteuid() != 0:
        raise InputError("chaos must run as root (it restarts libvirtd, mounts tmpfs folders, kills processes)")
    if not libvirtd_answers():
        raise InputError(f"libvirtd does not answer on {URI}")
    lock = _lock()
    tagged = []
    if opts.tagged:
        tagged = tagged_domains()
        if not tagged:
            raise InputError(f"--tagged: no domain on {URI} is tagged for chaos runs; tag one with "
                             f"{tag_command('DOM')}")
        down = [t.name for t in tagged if t.state() != "running"]
        if down:
            raise InputError(f"--tagged: {', '.join(down)} not running; start it or remove its tag")
    chaos = Chaos(opts, tagged)
    try:
        violations = chaos.run()
    finally:
        lock.close()
    doc = report.build(chaos)
    if args.report:
        report.write(doc, Path(args.report))
    if args.json:
        print(json.dumps(doc, sort_keys=True, default=str))
    else:
        print(report.table(doc, chaos.workdir if opts.keep else None))
        if violations:
            print(f"violations found: the work folder {chaos.workdir} is kept")
    sys.stdout.flush()
    return 1 if violations else 0


def _lock() -> IO[str]:
    """One chaos run per host: it restarts the host's libvirtd."""
    f = open(LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InputError(f"another chaos run holds {LOCK}; one at a time per host") from None
    return f
