"""Notifications from ``domcapture notifier`` processes to a real HTTP receiver (and a script).

Two notifier processes run at once, as two hosts would.  The receiver must
get exactly one successful delivery per (workflow, status entered): also
when the worker was SIGKILLed right after writing the final status, also
when the receiver failed the first attempt (then there is a retry, and the
delivery log holds both attempts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from workers.metrics import StoreCollector
from workflows.store import Store

from .realenv import DOMCAPTURE

pytestmark = pytest.mark.real

ALL = "needs_attention,failed,rolled_back,succeeded"


class Receiver:
    """Records every POST; answers 500 to the first attempt of the keys in ``fail_first``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_first: set[str] = set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                key = self.headers["Idempotency-Key"]
                with receiver.lock:
                    code = 500 if key in receiver.fail_first else 204
                    receiver.fail_first.discard(key)
                    receiver.requests.append({"key": key, "code": code, "body": json.loads(body),
                                              "event": self.headers["X-Domcapture-Event"]})
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self.lock:
            for r in self.requests:
                if r["code"] < 300:
                    out[r["key"]] = out.get(r["key"], 0) + 1
        return out


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_one_delivery_per_status_even_after_sigkill(cluster, disk_domain, tmp_path, redis_client):
    receiver = Receiver()
    script = tmp_path / "hook.sh"
    sink = tmp_path / "hook.out"
    script.write_text("#!/bin/sh\n"
                      f"printf '%s %s\\n' \"$DOMCAPTURE_IDEMPOTENCY_KEY\" \"$(cat | head -c 40)\" >> {sink}\n")
    script.chmod(0o755)
    notifier_cmd = [DOMCAPTURE, "notifier", "--webhook", receiver.url, "--exec", str(script), "--on", ALL,
                    "--interval", "0.2"]
    notifiers = [subprocess.Popen(notifier_cmd, env=cluster.env, stdout=open(tmp_path / f"notifier{i}.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True) for i in range(2)]
    prefix = cluster.env["DOMCAPTURE_PREFIX"]
    try:
        wait_for(lambda: redis_client.exists(f"{prefix}:notify:since"), 20, "the notifiers' first sweep")
        target = tmp_path / "backups"
        target.mkdir()

        # 1. rolled back, and the worker is SIGKILLed right after saving that final status
        dom1 = disk_domain()
        doomed = cluster.start_worker(fault="kill-at:saved:rolled-back:*")
        wf1 = cluster.cli("submit", "snapshot-backup", "--domain", dom1.name, "--target", str(target),
                          "--quiesce", "require").stdout.strip()
        doomed.wait(timeout=60)
        assert doomed.returncode == -signal.SIGKILL
        assert cluster.show(wf1)["status"] == "rolled_back"

        # 2. succeeded; the receiver fails the first attempt
        cluster.start_worker()
        dom2 = disk_domain()
        out = cluster.cli("submit", "snapshot-backup", "--domain", dom2.name, "--target", str(target),
                          "--quiesce", "off", "--json")
        wf2 = json.loads(out.stdout)["id"]
        receiver.fail_first.add(f"{wf2}:succeeded:1")
        assert cluster.wait_final(wf2)["status"] == "succeeded"

        # 3. failed (--on-error stop), then aborted by the operator: rolled_back, a second status
        dom3 = disk_domain()
        wf3 = cluster.cli("submit", "snapshot-backup", "--domain", dom3.name, "--target", str(target),
                          "--quiesce", "require", "--on-error", "stop").stdout.strip()
        assert cluster.wait_final(wf3)["status"] == "failed"
        cluster.cli("abort", wf3)
        assert cluster.wait(wf3, lambda d: d["status"] == "rolled_back")["status"] == "rolled_back"

        expected = {f"{wf1}:rolled_back:1", f"{wf2}:succeeded:1", f"{wf3}:failed:1", f"{wf3}:rolled_back:1"}
        wait_for(lambda: set(receiver.delivered()) >= expected, 60, "the webhook deliveries")
        wait_for(lambda: sink.exists() and len(sink.read_text().splitlines()) >= len(expected), 30,
                 "the script deliveries")
        # every delivery is settled (a done marker per target and key): another sweep sends nothing
        done = {k.decode().rsplit(":", 3)[-3:][0] for k in redis_client.scan_iter(f"{prefix}:notify:done:*")}
        assert done == {wf1, wf2, wf3}
        extra = subprocess.run(notifier_cmd[:-2] + ["--once"], env=cluster.env, capture_output=True, text=True,
                               timeout=60)
        assert extra.returncode == 0 and extra.stdout == "", extra.stdout + extra.stderr
    finally:
        for p in notifiers:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)
        receiver.server.shutdown()

    delivered = receiver.delivered()
    assert delivered == {k: 1 for k in expected}, delivered
    # the failed first attempt was retried with the same key; nothing else was attempted twice
    attempts = [r["key"] for r in receiver.requests]
    assert sorted(attempts) == sorted(list(expected) + [f"{wf2}:succeeded:1"])
    body = next(r["body"] for r in receiver.requests if r["key"] == f"{wf1}:rolled_back:1")
    assert body["event"] == "workflow.rolled_back" and body["workflow"]["id"] == wf1
    assert body["workflow"]["domain"] == dom1.name and "could not be frozen" in body["workflow"]["error"]["message"]
    script_keys = [line.split()[0] for line in sink.read_text().splitlines()]
    assert sorted(script_keys) == sorted(expected)

    log = [json.loads(x) for x in redis_client.lrange(f"{prefix}:notify:log", 0, -1)]
    hooks = [e for e in log if e["kind"] == "webhook"]
    assert len(hooks) == 5
    retried = [e for e in hooks if e["key"] == f"{wf2}:succeeded:1"]
    assert [(e["attempt"], e["ok"], e["http_status"]) for e in retried] == [(1, False, 500), (2, True, 204)]
    shown = cluster.cli("notifier", "--log").stdout.splitlines()
    assert len(shown) == len(log)

    # /metrics counts the attempts (webhook and script): one failure, the rest delivered
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(Store(redis_client, prefix), cluster.env["DOMCAPTURE_QUEUE"]))
    counts = {(s.labels["status"], s.labels["outcome"]): s.value
              for fam in text_string_to_metric_families(generate_latest(registry).decode())
              if fam.name == "domcapture_notification_attempts" for s in fam.samples}
    assert counts == {("rolled_back", "delivered"): 4, ("failed", "delivered"): 2,
                      ("succeeded", "delivered"): 2, ("succeeded", "failed"): 1}
