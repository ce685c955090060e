"""Notifications: a webhook POST (and/or an executable) when a workflow reaches a status worth telling.

The notifier is its own process (``domcapture notifier``).  It never runs in
a worker, so a slow or broken receiver cannot fail or slow a capture, and a
worker SIGKILLed right after writing a final status loses no notification:
the notifier finds the status in the store, not in a message the worker
would have had to send.

Every sweep reads the records; a record whose status is one to notify gets
one delivery per target for each time it *entered* that status (counted in
its history, so a workflow that is resumed and needs attention again is told
again).  That occurrence gives the delivery its idempotency key,
``<workflow>:<status>:<n>``, sent as the ``Idempotency-Key`` header.

Redis keys (``P`` is the prefix):

- ``P:notify:since``               unix time of the first sweep; statuses entered before it are not sent
- ``P:notify:done:<target>:<key>`` set once the delivery succeeded or gave up (the dedupe marker)
- ``P:notify:claim:<target>:<key>`` held (with a TTL) by the notifier attempting it, so two notifiers
                                   never send the same delivery at once
- ``P:notify:retry:<target>:<key>`` attempts so far and the time of the next one
- ``P:notify:log``                 the delivery log: one JSON entry per attempt, newest last (trimmed)
- ``P:notify:counts``              hash ``<status>|<outcome>`` -> attempts (delivered, failed, gave-up),
                                   never trimmed: what ``/metrics`` counts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from workflows.errors import DomcaptureError, InputError, RecordNotFound
from workflows.record import FAILED, NEEDS_ATTENTION, ROLLED_BACK, SUCCEEDED, Record
from workflows.service import summary
from workflows.store import Store

from .runtime import Runtime
from .settings import Settings, process_id

log = logging.getLogger("domcapture.notify")

DEFAULT_ON = (NEEDS_ATTENTION, FAILED, ROLLED_BACK)
ALLOWED_ON = (NEEDS_ATTENTION, FAILED, ROLLED_BACK, SUCCEEDED)
RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0)  # then it gives up (the log says so)
LOG_KEEP = 10000
CLAIM_TTL_MS = 120_000


def redis_call(store: Store, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """A Redis call through the store's error mapping (connection errors become StoreUnavailable)."""
    return store._call(fn, *args, **kw)  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Target:
    kind: str  # webhook | exec
    address: str  # URL or executable path

    @property
    def id(self) -> str:
        return hashlib.sha256(f"{self.kind}:{self.address}".encode()).hexdigest()[:12]


@dataclass
class Delivery:
    rec: Record
    status: str
    occurrence: int
    entered_at: float

    @property
    def key(self) -> str:
        return f"{self.rec.id}:{self.status}:{self.occurrence}"

    def payload(self) -> dict[str, Any]:
        return {"event": f"workflow.{self.status}", "idempotency_key": self.key, "entered_at": self.entered_at,
                "workflow": summary(self.rec)}


def entries_into(history: list[dict[str, Any]], status: str) -> list[float]:
    """When the workflow entered ``status``: each event whose status differs from the one before."""
    out, before = [], None
    for ev in history:
        if ev.get("status") == status and before != status:
            out.append(float(ev["ts"]))
        before = ev.get("status")
    return out


@dataclass
class Notifier:
    store: Store
    targets: list[Target]
    on: tuple[str, ...] = DEFAULT_ON
    owner: str = field(default_factory=lambda: f"notifier:{process_id()}:{uuid.uuid4().hex[:6]}")
    timeout: float = 10.0
    retry_delays: tuple[float, ...] = RETRY_DELAYS
    clock: Any = time.time
    # records whose every delivery is settled, by revision: a later sweep skips their history
    _settled: dict[str, int] = field(default_factory=dict)

    def _k(self, *parts: str) -> str:
        return ":".join((self.store.prefix, "notify", *parts))

    def since(self) -> float:
        redis_call(self.store, self.store.r.set, self._k("since"), repr(self.clock()), nx=True)
        return float(redis_call(self.store, self.store.r.get, self._k("since")))

    def due(self) -> list[Delivery]:
        since = self.since()
        out = []
        for wf_id in self.store.ids():
            try:
                rec = self.store.load(wf_id)
            except RecordNotFound:
                continue
            if rec.status not in self.on or rec.updated_at < since or self._settled.get(wf_id) == rec.rev:
                continue
            times = entries_into(self.store.history(wf_id), rec.status)
            if times and times[-1] >= since:
                out.append(Delivery(rec, rec.status, len(times), times[-1]))
        return out

    def sweep(self) -> list[dict[str, Any]]:
        """One pass: attempt every due delivery once; returns the log entries written."""
        written = []
        for d in self.due():
            for t in self.targets:
                entry = self._attempt(d, t)
                if entry is not None:
                    written.append(entry)
            done = [self._k("done", t.id, d.key) for t in self.targets]
            if redis_call(self.store, self.store.r.exists, *done) == len(done):
                self._settled[d.rec.id] = d.rec.rev
        return written

    def _attempt(self, d: Delivery, t: Target) -> dict[str, Any] | None:
        r = self.store.r
        done, claim, retry = (self._k(part, t.id, d.key) for part in ("done", "claim", "retry"))
        if redis_call(self.store, r.exists, done):
            return None
        state = json.loads(redis_call(self.store, r.get, retry) or b'{"attempts": 0, "next_at": 0}')
        if state["next_at"] > self.clock():
            return None
        if not redis_call(self.store, r.set, claim, self.owner, nx=True, px=CLAIM_TTL_MS):
            return None  # another notifier is on it
        try:
            if redis_call(self.store, r.exists, done):  # finished by another notifier between our checks
                return None
            attempt = state["attempts"] + 1
            started = time.monotonic()
            ok, detail = self._send(d, t, attempt)
            entry = {"ts": self.clock(), "workflow": d.rec.id, "status": d.status, "key": d.key,
                     "target": t.address, "kind": t.kind, "attempt": attempt, "ok": ok,
                     "seconds": round(time.monotonic() - started, 3), "by": self.owner, **detail}
            final = ok or attempt > len(self.retry_delays)
            if not ok and final:
                entry["gave_up"] = True
            pipe = r.pipeline(transaction=True)
            pipe.rpush(self._k("log"), json.dumps(entry, sort_keys=True))
            pipe.ltrim(self._k("log"), -LOG_KEEP, -1)
            outcome = "delivered" if ok else ("gave-up" if final else "failed")
            pipe.hincrby(self._k("counts"), f"{d.status}|{outcome}", 1)
            if final:
                pipe.set(done, json.dumps({"ok": ok, "attempts": attempt, "at": entry["ts"]}))
                pipe.delete(retry)
            else:
                delay = self.retry_delays[attempt - 1]
                pipe.set(retry, json.dumps({"attempts": attempt, "next_at": self.clock() + delay}))
            redis_call(self.store, pipe.execute)
            level = logging.INFO if ok else logging.WARNING
            log.log(level, "notify %s %s -> %s: %s", d.key, t.kind, t.address, "ok" if ok else detail)
            return entry
        finally:
            redis_call(self.store, r.delete, claim)

    def _send(self, d: Delivery, t: Target, attempt: int) -> tuple[bool, dict[str, Any]]:
        body = json.dumps(d.payload(), sort_keys=True)
        if t.kind == "webhook":
            import httpx  # only the notifier needs it; the other commands start faster without

            headers = {"Content-Type": "application/json", "Idempotency-Key": d.key,
                       "X-Domcapture-Event": f"workflow.{d.status}", "X-Domcapture-Attempt": str(attempt),
                       "User-Agent": "domcapture-notifier"}
            try:
                resp = httpx.post(t.address, content=body, headers=headers, timeout=self.timeout)
            except httpx.HTTPError as exc:
                return False, {"error": f"{type(exc).__name__}: {exc}"}
            return 200 <= resp.status_code < 300, {"http_status": resp.status_code}
        env = {**os.environ, "DOMCAPTURE_EVENT": f"workflow.{d.status}", "DOMCAPTURE_IDEMPOTENCY_KEY": d.key,
               "DOMCAPTURE_WORKFLOW": d.rec.id, "DOMCAPTURE_STATUS": d.status, "DOMCAPTURE_DOMAIN": d.rec.domain}
        try:
            out = subprocess.run([t.address], input=body, env=env, capture_output=True, text=True,
                                 timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, {"error": f"{type(exc).__name__}: {exc}"}
        detail: dict[str, Any] = {"exit_code": out.returncode}
        if out.returncode != 0:
            detail["error"] = out.stderr.strip()[-500:]
        return out.returncode == 0, detail

    def run_forever(self, interval: float) -> None:
        log.info("notifier: %d target(s), on %s, sweeping every %.1fs", len(self.targets), ",".join(self.on),
                 interval)
        while True:
            try:
                self.sweep()
            except DomcaptureError as exc:  # redis away: try again next round
                log.error("notifier sweep failed: %s", exc)
            time.sleep(interval)


def delivery_log(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    raw = redis_call(store, store.r.lrange, f"{store.prefix}:notify:log", -limit, -1)
    return [json.loads(x) for x in raw]


# -- command line -------------------------------------------------------------------------
def parse_on(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in ALLOWED_ON]
    if bad or not items:
        raise InputError(f"--on: {', '.join(bad) or 'empty'}: choose among {', '.join(ALLOWED_ON)}")
    return items


def targets_from(args: argparse.Namespace) -> list[Target]:
    urls = list(args.webhook or []) or [u for u in os.environ.get("DOMCAPTURE_NOTIFY_WEBHOOKS", "").split() if u]
    execs = list(args.exec or []) or [e for e in os.environ.get("DOMCAPTURE_NOTIFY_EXEC", "").split() if e]
    targets = []
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--webhook {url!r}: not an http:// or https:// URL")
        targets.append(Target("webhook", url))
    for path in execs:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise InputError(f"--exec {path!r}: not an executable file")
        targets.append(Target("exec", path))
    if not targets:
        raise InputError("no notification target: give --webhook URL or --exec PATH "
                         "(env DOMCAPTURE_NOTIFY_WEBHOOKS, DOMCAPTURE_NOTIFY_EXEC)")
    return targets


def cmd_notifier(args: argparse.Namespace, rt: Runtime) -> int:
    on = parse_on(args.on or os.environ.get("DOMCAPTURE_NOTIFY_ON", ",".join(DEFAULT_ON)))
    notifier = Notifier(rt.store, targets_from(args), on=on, timeout=args.timeout)
    rt.store.ping()
    if args.once:
        for e in notifier.sweep():
            print(json.dumps(e, sort_keys=True))
        return 0
    notifier.run_forever(args.interval)
    return 0


def cmd_notifier_log(args: argparse.Namespace, rt: Runtime) -> int:
    for e in delivery_log(rt.store, args.limit):
        print(json.dumps(e, sort_keys=True))
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("notifier", help="send webhooks / run a command when workflows need attention, fail or "
                                        "roll back (a process of its own)")
    s.add_argument("--webhook", action="append", metavar="URL", help="POST a JSON event here (repeatable; "
                   "env DOMCAPTURE_NOTIFY_WEBHOOKS, space separated)")
    s.add_argument("--exec", action="append", metavar="PATH", help="run this with the JSON event on stdin "
                   "(repeatable; env DOMCAPTURE_NOTIFY_EXEC)")
    s.add_argument("--on", help=f"statuses to notify, comma separated (default {','.join(DEFAULT_ON)}; "
                   f"env DOMCAPTURE_NOTIFY_ON; allowed: {','.join(ALLOWED_ON)})")
    s.add_argument("--interval", type=float, default=Settings.recovery_interval, help="seconds between sweeps")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds one delivery may take")
    s.add_argument("--once", action="store_true", help="one sweep, print the attempts, exit")
    s.add_argument("--log", dest="show_log", action="store_true", help="print the delivery log and exit")
    s.add_argument("--limit", type=int, default=100, help="with --log: how many entries")
    s.add_argument("--json", action="store_true", help="log as JSON lines")
    s.set_defaults(func=lambda a, rt: cmd_notifier_log(a, rt) if a.show_log else cmd_notifier(a, rt), daemon=True)
