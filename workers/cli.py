"""The ``domcapture`` command.

Exit codes: 0 success; 1 the workflow ended without success (``--wait``) or
an unexpected error; 2 bad input (usage, a flag or environment variable out
of its range, unknown strategy, domain not found, bad target, unsupported
disk, a Redis setting that cannot work); 3 refused by the workflow's state
(domain busy, operation not allowed now, record unreadable); 4 Redis or
libvirt unreachable or refusing our credentials; 5 ``verify``: the workflow kept
nothing to verify (it says what it did and when).

Every error is one line on stderr; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, NoReturn

from workflows import strategies, validate, verify
from workflows.definition import Definition
from workflows.errors import DomcaptureError, RecordUnreadable
from workflows.idempotency import Idempotency, check_key, request_digest
from workflows.indexes import parse_cursor
from workflows.options import submit_options
from workflows.record import FINAL_STATUSES, STATUSES, STOPPED_STATUSES, Record
from workflows.service import summary

from . import cli_audit, cli_backups, cli_checkpoints, cli_fleet, cli_holds, cli_hosts, cli_mount, cli_tokens, \
    completion, notify, web
from .chaos import command as chaos_command
from .runtime import Runtime, rq_module
from .settings import ENV, Settings, process_id

UNREADABLE = "unreadable"


def _ts(t: Any) -> str:
    if not isinstance(t, (int, float)) or not t:
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


def submit_params(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy's options as given (only its own exist on its parser), checked for shape."""
    defn = strategies.get(args.strategy)
    return submit_options(defn, {opt.name: getattr(args, opt.name, None) for opt in defn.options})


def cmd_submit(args: argparse.Namespace, rt: Runtime) -> int:
    params = submit_params(args)
    uri = args.uri or rt.settings.libvirt_uri
    if args.idempotency_key is not None:
        outcome = Idempotency(rt.store.r, rt.settings.prefix).submit(
            args.idempotency_key, request_digest(args.strategy, args.domain, f"uri:{uri}", params),
            lambda: rt.captures.submit(args.strategy, args.domain, uri, params))
        rec = rt.store.load(outcome.workflow_id)
        if outcome.replayed and not args.json:
            print(f"{rec.id} (replayed: submitted earlier with this idempotency key)", file=sys.stderr)
    else:
        rec = rt.captures.submit(args.strategy, args.domain, uri, params)
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
    host, waiting = rt.host_of(rec), rt.waiting(rec)
    if host:
        out.append(f"host:      {host}")
    if waiting:
        out.append(f"waiting:   {waiting}")
    if rec.progress:
        out.append(f"progress:  {progress_line(rec)}")
    for disk, w in sorted((rec.data.get("waiting_on") or {}).items()):
        out.append(f"blocked:   disk {disk}: a {w.get('job')} job of {w.get('owner', 'another tool')} since "
                   f"{_ts(w.get('since'))} ({time.time() - float(w.get('since') or 0):.0f} s); not ours, so "
                   "not touched")
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
            out.append(f"  {_ts(ev.get('ts'))} {ev.get('event', '-')!s:<18} {ev.get('state', '-')!s:<14} "
                       f"{ev.get('status', '-')!s:<15} epoch={ev.get('epoch', '-')} worker={ev.get('worker') or '-'} "
                       f"{json.dumps(detail, sort_keys=True) if detail else ''}".rstrip())
    return "\n".join(out)


def _unreadable_line(wf_id: str, reason: str) -> str:
    return f"{wf_id}  {UNREADABLE}: {reason}"


def cmd_show(args: argparse.Namespace, rt: Runtime) -> int:
    try:
        rec = rt.store.load(args.id)
    except RecordUnreadable as exc:
        # One line: what the record is, and why this build cannot show more.
        if args.json:
            print(json.dumps({"id": args.id, "status": UNREADABLE, "reason": str(exc)}, sort_keys=True))
        else:
            print(_unreadable_line(args.id, str(exc)))
        return 0
    if args.json:
        doc = rec.to_dict()
        doc["history"] = rt.store.history(rec.id)
        doc["lease"] = rt.store.lease_value(rec.id)
        doc["host"] = rt.host_of(rec)
        doc["waiting"] = rt.waiting(rec)
        print(json.dumps(doc, sort_keys=True))
    else:
        print(_describe(rt, rec))
    return 0


def cmd_list(args: argparse.Namespace, rt: Runtime) -> int:
    status = "quarantined" if args.status == UNREADABLE else args.status
    nxt: str | None = None
    if status == "quarantined":  # a short set of its own, not an index
        entries: list[Record | tuple[str, str]] = list(rt.store.listing(status))
    else:  # newest first, one page of the status index (workflows/indexes.py)
        pg = rt.store.indexes.page(status=status, limit=args.limit, cursor=args.cursor)
        entries, nxt = pg.entries, pg.cursor
    if nxt:
        print(f"(more: domcapture list{' --status ' + args.status if args.status else ''} --limit {args.limit} "
              f"--cursor {nxt})", file=sys.stderr)
    if args.json:
        print(json.dumps([{**summary(e), "host": rt.host_of(e), "waiting": rt.waiting(e)} if isinstance(e, Record)
                          else {"id": e[0], "status": UNREADABLE, "reason": e[1]} for e in entries], sort_keys=True))
        return 0
    for e in entries:
        if isinstance(e, Record):
            waiting = rt.waiting(e)
            print(f"{e.id}  {e.strategy:<16} {e.domain:<20} {e.status:<15} {e.state:<14} {_ts(e.updated_at)}"
                  f"{'  ' + waiting if waiting else ''}")
        else:
            print(_unreadable_line(*e))
    return 0


def _page_limit(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a whole number") from None
    if not 1 <= n <= 10_000:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and 10000")
    return n


def _cursor(value: str) -> str:
    try:
        parse_cursor(value)
    except DomcaptureError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--cursor ")) from None
    return value


def cmd_reindex(args: argparse.Namespace, rt: Runtime) -> int:
    t0 = time.monotonic()
    n = rt.store.indexes.reindex()
    took = time.monotonic() - t0
    if args.json:
        print(json.dumps({"indexed": n, "seconds": round(took, 3)}, sort_keys=True))
    else:
        print(f"indexed {n} workflows in {took:.1f}s")
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


VERIFY_EXIT = {verify.VERIFIED: 0, verify.FAILED: 1, verify.NOTHING_KEPT: 5}


def cmd_verify(args: argparse.Namespace, rt: Runtime) -> int:
    """Exit 0 verified, 1 a check failed, 5 the workflow kept nothing to verify (a restore of a managed save
    or of a save: the line says what it did and when)."""
    checks = rt.captures.verify(args.id)
    ok = all(c["ok"] for c in checks)
    result = verify.outcome(checks)
    if args.json:
        print(json.dumps({"id": args.id, "ok": ok, "outcome": result, "checks": checks}, sort_keys=True))
    elif result == verify.NOTHING_KEPT:
        for c in checks:
            print(f"{args.id}: nothing kept to verify: {c['did']} at {_ts(c['at'])}")
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['item']:<10} {c.get('path', '')} {c.get('error', '')}".rstrip())
        print(f"{args.id}: {'verified' if ok else 'VERIFICATION FAILED'}")
    return VERIFY_EXIT[result]


ANNOUNCE_TTL = 6.0


def _host_name(args: argparse.Namespace, rt: Runtime) -> str | None:
    """``--host NAME``, or ``--host libvirt``: the name libvirt gives its host (virConnectGetHostname)."""
    if args.host != "libvirt":
        return str(args.host) if args.host else None
    hv = rt.hypervisor(rt.settings.libvirt_uri)
    try:
        return validate.key_part("host", hv.host_name())
    finally:
        hv.close()


def cmd_worker(args: argparse.Namespace, rt: Runtime) -> int:
    rq = rq_module(rt.settings)
    host = _host_name(args, rt)
    name = f"domcapture-{process_id()}-{uuid.uuid4().hex[:6]}"
    queue = rt.queue
    stop = threading.Event()
    if host:
        # This worker runs the domains of one host: its own queue, its URI mapped to it,
        # and an announcement renewed while it lives ('list' says when a host has none).
        queue = rt.host_queue(host)
        hv = rt.hypervisor(rt.settings.libvirt_uri)
        try:
            rt.map_host(hv.canonical_uri(), host)
        finally:
            hv.close()
        rt.announce(host, name, ANNOUNCE_TTL)

        def renew() -> None:
            while not stop.wait(ANNOUNCE_TTL / 3):
                try:
                    rt.announce(host, name, ANNOUNCE_TTL)
                except Exception:  # noqa: BLE001 - a Redis blip: the next round tries again
                    logging.getLogger("domcapture.worker").warning("host announcement failed", exc_info=True)
        threading.Thread(target=renew, name="announce", daemon=True).start()
    # SimpleWorker runs the job in this process: a SIGKILL of the worker kills
    # the job with it, and the lease heartbeat lives and dies with the job.
    worker = rq.SimpleWorker([queue], connection=rt.store.r, serializer=rt.serializer, name=name)
    try:
        worker.work(burst=args.burst, logging_level=args.log_level or "INFO", with_scheduler=False)
    finally:
        stop.set()
        if host:
            rt.withdraw(host, name)
    return 0


def cmd_recovery(args: argparse.Namespace, rt: Runtime) -> int:
    from .recovery import Recovery
    rec = Recovery(rt, owner=f"recovery:{process_id()}")
    if args.once:
        actions = rec.sweep()
        if args.json:
            print(json.dumps([{"id": wf_id, "action": action} for wf_id, action in actions], sort_keys=True))
        for wf_id, action in [] if args.json else actions:
            print(f"{wf_id}: {action}")
        return 0
    rec.run_forever(args.interval or rt.settings.recovery_interval)
    return 0


def cmd_completion(args: argparse.Namespace, rt: Runtime | None) -> int:
    script = completion.bash_script(build_parser())
    if args.json:
        print(json.dumps({"shell": args.shell, "script": script}))
    else:
        print(script)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.dest == "strategy" and action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, f"unknown strategy {value!r}; choose one of: "
                                                 f"{', '.join(sorted(strategies.DEFINITIONS))}")
        super()._check_value(action, value)


def _add_strategy(sub: Any, defn: Definition) -> None:
    s = sub.add_parser(defn.name, help=defn.summary, description=f"{defn.name}: {defn.summary}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    grouped = any(o.name == "group" for o in defn.options)  # a consistency group names --group, not --domain
    s.add_argument("--domain", required=not grouped, help=argparse.SUPPRESS if grouped else "the libvirt domain")
    s.add_argument("--uri", help="libvirt URI (env LIBVIRT_DEFAULT_URI)")
    for opt in defn.options:
        flag = f"--{opt.name.replace('_', '-')}"
        if opt.flag:
            s.add_argument(flag, dest=opt.name, action="store_true", help=opt.help)
        else:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else opt.name.upper()
            s.add_argument(flag, dest=opt.name, metavar=metavar, help=opt.help)
    s.add_argument("--wait", action="store_true", help="wait for the workflow to end, showing progress")
    s.add_argument("--timeout", default="3600", help="with --wait: give up waiting after this many seconds "
                                                     "(default 3600)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--idempotency-key", metavar="KEY",
                   help="submit at most once per KEY (kept 24 h): the same KEY again prints the same workflow; "
                        "with another request, exit 2")
    s.set_defaults(func=cmd_submit)


def _with_json(s: argparse.ArgumentParser, what: str = "print JSON instead of text") -> None:
    s.add_argument("--json", action="store_true", help=what)


def build_parser() -> argparse.ArgumentParser:
    env = "\n".join(f"  {name:<32} {what}" for name, what in ENV.items())
    p = Parser(prog="domcapture", description="Durable libvirt domain state capture",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"environment:\n{env}\n\nexit codes: 0 ok, 1 ended without success or unexpected error, "
                      "2 bad input, 3 refused by a workflow's state, 4 Redis or libvirt unreachable or refusing")
    p.add_argument("--redis-url", help="Redis URL without a password (env DOMCAPTURE_REDIS_URL; the password "
                                       "comes from DOMCAPTURE_REDIS_PASSWORD_FILE)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO for worker and "
                                       "recovery, WARNING otherwise)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="submit a capture workflow ('submit STRATEGY --help': its options)")
    strat = s.add_subparsers(dest="strategy", required=True, metavar="STRATEGY",
                             help="the capture strategy; 'submit STRATEGY --help' shows its options")
    for defn in strategies.DEFINITIONS.values():
        _add_strategy(strat, defn)

    s = sub.add_parser("list", help="list workflows, newest first, a page at a time")
    s.add_argument("--status", choices=(*STATUSES, UNREADABLE))
    s.add_argument("--limit", type=_page_limit, default=100, help="workflows per page, 1 to 10000 (default 100)")
    s.add_argument("--cursor", type=_cursor, help="where the next page starts, as the previous page printed it")
    _with_json(s)
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("reindex", help="index the workflows written before this build's indexes (once, idempotent)")
    _with_json(s)
    s.set_defaults(func=cmd_reindex)

    s = sub.add_parser("show", help="show one workflow: state, status, history, artifacts, progress, error")
    s.add_argument("id")
    _with_json(s)
    s.set_defaults(func=cmd_show)

    for action, text in (("resume", "resume a stopped or crashed workflow"),
                         ("rollback", "roll back a workflow that no worker runs"),
                         ("abort", "stop a workflow (running or not) and roll it back")):
        s = sub.add_parser(action, help=text)
        s.add_argument("id")
        s.add_argument("--wait", action="store_true")
        s.add_argument("--timeout", default="3600", help="with --wait: seconds (default 3600)")
        _with_json(s)
        s.set_defaults(func=lambda a, rt, action=action: _operator(a, rt, action))

    s = sub.add_parser("wait", help="wait until a workflow ends or stops, showing progress; exit 0 if it succeeded")
    s.add_argument("id")
    s.add_argument("--timeout", default="3600", help="seconds (default 3600)")
    _with_json(s)
    s.set_defaults(func=cmd_wait)

    s = sub.add_parser("verify", help="re-read a succeeded capture and check its recorded checksums")
    s.add_argument("id")
    _with_json(s)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("worker", help="run an RQ worker for capture jobs")
    s.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    s.add_argument("--host", help="serve the queue of this host only ('libvirt': the name libvirt reports; "
                                  "env DOMCAPTURE_HOST)")
    _with_json(s, "log as JSON lines")
    s.set_defaults(func=cmd_worker, daemon=True)

    s = sub.add_parser("recovery", help="run the recovery process (resumes or rolls back orphaned workflows)")
    s.add_argument("--once", action="store_true", help="one sweep, then exit")
    s.add_argument("--interval", help="seconds between sweeps (env DOMCAPTURE_RECOVERY_INTERVAL, default 1)")
    _with_json(s, "--once: print the actions as JSON; otherwise log as JSON lines")
    s.set_defaults(func=cmd_recovery, daemon=True)

    cli_checkpoints.register(sub)
    cli_holds.register(sub)
    cli_hosts.register(sub)
    cli_backups.register(sub)
    cli_mount.register(sub)
    cli_fleet.register(sub)
    chaos_command.register(sub)

    s = sub.add_parser("completion", help="print a shell completion script: eval \"$(domcapture completion bash)\"")
    s.add_argument("shell", choices=("bash",))
    _with_json(s)
    s.set_defaults(func=cmd_completion, offline=True)
    web.register(sub)
    cli_audit.register(sub)
    notify.register(sub)
    cli_tokens.register(sub)
    return p


def check_args(args: argparse.Namespace) -> None:
    """The flags every command shares, checked before anything connects anywhere."""
    if args.log_level is not None:
        args.log_level = validate.log_level(args.log_level)
    if getattr(args, "id", None) is not None:
        validate.workflow_id(args.id)
    if getattr(args, "domain", None) is not None:
        validate.domain_name(args.domain)
    if getattr(args, "uri", None) is not None:
        validate.libvirt_uri("uri", args.uri)
    if getattr(args, "timeout", None) is not None:
        args.timeout = validate.seconds("timeout", args.timeout)
    if args.command == "worker" and args.host is None:
        args.host = os.environ.get("DOMCAPTURE_HOST") or None
    if getattr(args, "host", None) is not None and args.host != "libvirt":
        args.host = validate.key_part("host", args.host)
    if args.command == "host":  # a host's name and URI, checked before the registry is read
        if getattr(args, "name", None) is not None:
            validate.host_name(args.name, "NAME")
        if getattr(args, "host_uri", None) is not None:
            validate.libvirt_uri("URI", args.host_uri)
    if getattr(args, "interval", None) is not None:
        args.interval = validate.number("interval", args.interval, minimum=0.05, allow_minimum=True,
                                        maximum=3600, unit=" of seconds")
    if args.command == "submit":
        submit_params(args)
        if getattr(args, "group", None) is not None and args.domain is None:  # group-backup: the group's lock
            args.domain = f"group:{validate.text('group', args.group)}"
        if args.idempotency_key is not None:
            check_key(args.idempotency_key)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": record.created, "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=True)


def _logging(args: argparse.Namespace) -> None:
    level = args.log_level or ("INFO" if getattr(args, "daemon", False) else "WARNING")
    handler = logging.StreamHandler()
    if getattr(args, "json", False) and getattr(args, "daemon", False):
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


FAST_EXIT = ("submit", "wait")  # commands that end the process without the interpreter's teardown


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code = _run(args)
    if argv is None and args.command in FAST_EXIT:
        # as the command itself: its output is written, nothing of it runs on; the interpreter's teardown
        # (module cleanup, closing the libvirt and Redis connections one by one) took 0.2-0.3 s of a
        # `submit --wait` here, which a script waiting on a short backup pays every time
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a reader that went away: nothing more can be said
            code = code or 1
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        _logging(args)
        func: Callable[..., int] = args.func
        if getattr(args, "offline", False):
            return func(args, None)
        settings = Settings.from_env()
        if args.redis_url is not None:
            settings = settings.with_redis_url(args.redis_url)
        return cli_audit.run_audited(args, Runtime(settings), func)
    except DomcaptureError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"domcapture: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an error nothing mapped: still one line, unless --debug
        if args.debug:
            traceback.print_exc()
        code = 4 if _is_connection_error(exc) else 1
        print(f"domcapture: error: {type(exc).__name__}: {one_line(str(exc))}"
              f"{'' if args.debug else ' (run with --debug for the traceback)'}", file=sys.stderr)
        return code


def _is_connection_error(exc: BaseException) -> bool:
    import redis
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


if __name__ == "__main__":
    sys.exit(main())
