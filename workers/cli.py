"""The ``domcapture`` command.

Exit codes: 0 success; 1 the workflow ended without success (``--wait``) or
an unexpected error; 2 bad input (usage, unknown strategy, domain not found,
bad target, unsupported disk); 3 refused by the workflow's state (domain
busy, operation not allowed now); 4 Redis or libvirt unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from workflows import strategies
from workflows.definition import Option
from workflows.errors import DomcaptureError, InputError
from workflows.record import FINAL_STATUSES, STATUSES, STOPPED_STATUSES, Record
from workflows.service import summary

from . import cli_checkpoints
from .runtime import Runtime
from .settings import Settings, process_id


def _ts(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_line(rec: Record) -> str:
    p = rec.progress or {}
    line = f"{rec.id} {rec.status} {rec.state}"
    if p and p.get("state") == rec.state:
        line += (f"  {p.get('phase')} {p.get('percent', 0):.1f}% {_size(p.get('bytes_done', 0))}"
                 f"/{_size(p.get('bytes_total', 0))} at {_size(p.get('rate_bytes_per_s', 0))}/s")
    return line


def _wait(rt: Runtime, wf_id: str, timeout: float, quiet: bool) -> Record:
    deadline = time.time() + timeout
    last = ""
    started = time.time()
    while True:
        rec = rt.store.load(wf_id)
        line = progress_line(rec)
        if not quiet and line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if rec.status in FINAL_STATUSES or rec.status in STOPPED_STATUSES:
            return rec
        if time.time() > deadline:
            return rec
        time.sleep(0.05 if time.time() - started < 30 else 0.5)  # a short job is seen to end at once


def _emit(args: argparse.Namespace, rec: Record, text: str) -> None:
    if args.json:
        print(json.dumps(summary(rec), sort_keys=True))
    else:
        print(text)


def cmd_submit(args: argparse.Namespace, rt: Runtime) -> int:
    defn = strategies.get(args.strategy)
    own = {o.name for o in defn.options}
    params: dict[str, Any] = {}
    for opt in _all_options():
        value = getattr(args, opt.name)
        if value in (None, False):
            continue
        if opt.name not in own:
            raise InputError(f"--{opt.name.replace('_', '-')} does not apply to strategy {defn.name}")
        params[opt.name] = value
    rec = rt.captures.submit(args.strategy, args.domain, args.uri or rt.settings.libvirt_uri, params)
    if args.wait:
        rec = _wait(rt, rec.id, args.timeout, args.json)
        _emit(args, rec, _describe(rt, rec))
        return 0 if rec.status == "succeeded" else 1
    _emit(args, rec, rec.id)
    return 0


def _describe(rt: Runtime, rec: Record, history: bool = True) -> str:
    out = [f"id:        {rec.id}", f"strategy:  {rec.strategy} (v{rec.definition_version})",
           f"domain:    {rec.domain} at {rec.uri}", f"status:    {rec.status}",
           f"state:     {rec.state} (mode {rec.mode})", f"created:   {_ts(rec.created_at)}",
           f"updated:   {_ts(rec.updated_at)}", f"params:    {json.dumps(rec.params, sort_keys=True)}"]
    if rec.progress:
        out.append(f"progress:  {progress_line(rec)}")
    if rec.error:
        out.append(f"error:     {rec.error.get('type')}: {rec.error.get('message')} (in {rec.error.get('state')})")
    if rec.attention:
        out.append(f"attention: {rec.attention.get('reason')}")
        out.append(f"           run: {rec.attention.get('command')}")
    if rec.artifacts:
        out.append("artifacts:")
        for name, a in sorted(rec.artifacts.items()):
            extra = f" {a['checksum']}" if a.get("checksum") else ""
            out.append(f"  {name:<16} {a['status']:<8} {a['path']}{extra}")
    if rec.result:
        out.append(f"result:    {json.dumps(rec.result, sort_keys=True)}")
    if history:
        out.append("history:")
        for ev in rt.store.history(rec.id):
            detail = {k: v for k, v in ev.items() if k not in ("ts", "event", "state", "status", "mode",
                                                                "worker", "epoch")}
            out.append(f"  {_ts(ev['ts'])} {ev['event']:<18} {ev['state']:<14} {ev['status']:<15} "
                       f"epoch={ev['epoch']} worker={ev.get('worker') or '-'} "
                       f"{json.dumps(detail, sort_keys=True) if detail else ''}".rstrip())
    return "\n".join(out)


def cmd_show(args: argparse.Namespace, rt: Runtime) -> int:
    rec = rt.store.load(args.id)
    if args.json:
        doc = rec.to_dict()
        doc["history"] = rt.store.history(rec.id)
        doc["lease"] = rt.store.lease_value(rec.id)
        print(json.dumps(doc, sort_keys=True))
    else:
        print(_describe(rt, rec))
    return 0


def cmd_list(args: argparse.Namespace, rt: Runtime) -> int:
    recs = list(rt.store.records(args.status))
    if args.json:
        print(json.dumps([summary(r) for r in recs], sort_keys=True))
        return 0
    for r in recs:
        print(f"{r.id}  {r.strategy:<16} {r.domain:<20} {r.status:<15} {r.state:<14} {_ts(r.updated_at)}")
    return 0


def _operator(args: argparse.Namespace, rt: Runtime, action: str) -> int:
    if action == "abort":
        rec, what = rt.captures.abort(args.id)
    else:
        rec = getattr(rt.captures, action)(args.id)
        what = {"resume": "resuming", "rollback": "rolling back"}[action]
    if args.wait:
        rec = _wait(rt, rec.id, args.timeout, args.json)
        _emit(args, rec, _describe(rt, rec, history=False))
        return 0 if rec.status in FINAL_STATUSES else 1
    _emit(args, rec, f"{rec.id}: {what}")
    return 0


def cmd_wait(args: argparse.Namespace, rt: Runtime) -> int:
    rec = _wait(rt, args.id, args.timeout, args.json)
    _emit(args, rec, _describe(rt, rec, history=False))
    return 0 if rec.status == "succeeded" else 1


def cmd_verify(args: argparse.Namespace, rt: Runtime) -> int:
    checks = rt.captures.verify(args.id)
    ok = all(c["ok"] for c in checks)
    if args.json:
        print(json.dumps({"id": args.id, "ok": ok, "checks": checks}, sort_keys=True))
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['item']:<10} {c.get('path', '')} {c.get('error', '')}".rstrip())
        print(f"{args.id}: {'verified' if ok else 'VERIFICATION FAILED'}")
    return 0 if ok else 1


def cmd_worker(args: argparse.Namespace, rt: Runtime) -> int:
    from rq import SimpleWorker
    from rq.serializers import JSONSerializer
    # SimpleWorker runs the job in this process: a SIGKILL of the worker kills
    # the job with it, and the lease heartbeat lives and dies with the job.
    worker = SimpleWorker([rt.queue], connection=rt.store.r, serializer=JSONSerializer,
                          name=f"domcapture-{process_id()}-{uuid.uuid4().hex[:6]}")
    worker.work(burst=args.burst, logging_level=args.log_level)
    return 0


def cmd_recovery(args: argparse.Namespace, rt: Runtime) -> int:
    from .recovery import Recovery
    rec = Recovery(rt, owner=f"recovery:{process_id()}")
    if args.once:
        for wf_id, action in rec.sweep():
            print(f"{wf_id}: {action}")
        return 0
    rec.run_forever(args.interval or rt.settings.recovery_interval)
    return 0


def _all_options() -> list[Option]:
    """Every strategy's submit options, once each, in a stable order."""
    seen: dict[str, Option] = {}
    for defn in strategies.DEFINITIONS.values():
        for opt in defn.options:
            seen.setdefault(opt.name, opt)
    return list(seen.values())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="domcapture", description="Durable libvirt domain state capture")
    p.add_argument("--redis-url", help="Redis URL (env DOMCAPTURE_REDIS_URL)")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a capture workflow")
    s.add_argument("strategy", help=f"one of: {', '.join(sorted(strategies.DEFINITIONS))}")
    s.add_argument("--domain", required=True)
    s.add_argument("--uri", help="libvirt URI (env LIBVIRT_DEFAULT_URI)")
    for opt in _all_options():
        if opt.flag:
            s.add_argument(f"--{opt.name.replace('_', '-')}", dest=opt.name, action="store_true", help=opt.help)
        else:
            s.add_argument(f"--{opt.name.replace('_', '-')}", dest=opt.name, help=opt.help)
    s.add_argument("--wait", action="store_true", help="wait for the workflow to end, showing progress")
    s.add_argument("--timeout", type=float, default=3600, help="with --wait: give up waiting after this")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("list", help="list workflows")
    s.add_argument("--status", choices=STATUSES)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="show one workflow: state, status, history, artifacts, progress, error")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    for action, text in (("resume", "resume a stopped or crashed workflow"),
                         ("rollback", "roll back a workflow that no worker runs"),
                         ("abort", "stop a workflow (running or not) and roll it back")):
        s = sub.add_parser(action, help=text)
        s.add_argument("id")
        s.add_argument("--wait", action="store_true")
        s.add_argument("--timeout", type=float, default=3600)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=lambda a, rt, action=action: _operator(a, rt, action))

    s = sub.add_parser("wait", help="wait until a workflow ends or stops, showing progress; exit 0 if it succeeded")
    s.add_argument("id")
    s.add_argument("--timeout", type=float, default=3600)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_wait)

    s = sub.add_parser("verify", help="re-read a succeeded capture and check its recorded checksums")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("worker", help="run an RQ worker for capture jobs")
    s.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("recovery", help="run the recovery process (resumes or rolls back orphaned workflows)")
    s.add_argument("--once", action="store_true", help="one sweep, then exit")
    s.add_argument("--interval", type=float)
    s.set_defaults(func=cmd_recovery)

    cli_checkpoints.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    if args.redis_url:
        settings = Settings(**{**settings.__dict__, "redis_url": args.redis_url})
    try:
        rt = Runtime(settings)
        return args.func(args, rt)
    except DomcaptureError as exc:
        print(f"domcapture: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
