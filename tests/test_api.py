"""The HTTP API v1 against a real ``domcapture web`` process on real Redis (and, for submits, a real
QEMU domain): tokens and scopes route by route, the one error shape, paging, the event stream from a
cursor, idempotent submits (50 at once with one key; a client SIGKILLed right after sending), the
OpenAPI document kept in the repo, and the documented client example run against a real capture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from starlette.routing import Route

from workers.api import Api
from workers.webauth import Auth
from workflows.record import Record, new_id
from workflows.store import Store

from .realenv import DOMCAPTURE
from .webenv import WebServer

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parent.parent


def _offline_routes() -> list[tuple[str, str, Any, bool]]:
    r = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    rt: Any = SimpleNamespace(store=Store(r, "dct-offline"),
                              settings=SimpleNamespace(queue="q", prefix="dct-offline", libvirt_uri=""))
    app = Api(rt, Auth(token="t" * 20)).app()
    return [(r.path, m, getattr(r.endpoint, "required_role", "unguarded"), getattr(r.endpoint, "acts", False))
            for r in app.routes if isinstance(r, Route) for m in sorted(r.methods or ()) if m != "HEAD"]


ROUTES = _offline_routes()
MUTATING = [(p, m, role) for p, m, role, _ in ROUTES if m in ("POST", "PUT", "PATCH", "DELETE")]


class ApiServer:
    def __init__(self, env: dict[str, str], logdir: Path, prefix: str, r: redis.Redis) -> None:
        self.env, self.prefix, self.r = env, prefix, r
        self.web = WebServer(env, logdir)
        self.url = self.web.url + "/api/v1"
        self.store = Store(r, prefix)

    def cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOMCAPTURE, *args], env=self.env, capture_output=True, text=True, timeout=120, **kw)

    def token(self, name: str, scope: str) -> str:
        out = self.cli("token", "create", name, "--scope", scope)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def snapshot(self) -> dict[bytes, Any]:
        """Every key of the prefix but the audit log, with its value: what a refused request must not change."""
        out: dict[bytes, Any] = {}
        for k in self.r.scan_iter(f"{self.prefix}:*", count=5000):
            if k.endswith(b":audit"):
                continue
            kind = self.r.type(k)
            out[k] = (self.r.hgetall(k) if kind == b"hash" else self.r.lrange(k, 0, -1) if kind == b"list"
                      else self.r.smembers(k) if kind == b"set" else self.r.zrange(k, 0, -1, withscores=True)
                      if kind == b"zset" else self.r.xlen(k) if kind == b"stream" else self.r.get(k))
        return out


@pytest.fixture
def api(cluster, redis_client, prefix, tmp_path):
    server = ApiServer(cluster.env, tmp_path / "web", prefix, redis_client)
    yield server
    server.web.stop()


def record(store: Store, status: str, domain: str = "dctest-api-none", strategy: str = "snapshot-backup") -> Record:
    rec = Record(id=new_id(), strategy=strategy, definition_version=1, domain=domain, uri="qemu:///system",
                 params={}, state="copying", status=status,
                 error={"type": "StepFailed", "message": "disk full", "retryable": False, "state": "copying"})
    store.create(rec)
    return rec


def error_of(r: httpx.Response) -> dict[str, Any]:
    doc = r.json()
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message", "field"}, doc
    return dict(doc["error"])


# == tokens and scopes ====================================================================================
def test_every_api_route_is_guarded_and_mutating_ones_need_operate() -> None:
    assert len(ROUTES) >= 15
    assert [(p, m) for p, m, role, _ in ROUTES if role == "unguarded"] == []
    assert {(p, m) for p, m, role, _ in ROUTES if role is None} == {("/openapi.json", "GET")}
    assert MUTATING and all(role in ("operator", "admin") for _, _, role in MUTATING)
    assert all(acts for p, m, role, acts in ROUTES if (p, m, role) in MUTATING)


def test_tokens_scopes_and_refusals_route_by_route(api: ApiServer) -> None:
    failed = record(api.store, "failed")
    read, operate = api.token("reader", "read"), api.token("ops", "operate")
    # stored hashed: no secret anywhere under the prefix; listed without it
    dump = json.dumps({k.decode(): str(v) for k, v in api.snapshot().items()})
    assert read not in dump and operate not in dump and read.removeprefix("dct_")[:20] not in dump
    listed = json.loads(api.cli("token", "list", "--json").stdout)
    assert {(t["name"], t["scope"]) for t in listed} == {("reader", "read"), ("ops", "operate")}
    assert api.cli("token", "create", "reader", "--scope", "admin").returncode == 2  # a name exists once

    with api.client(None) as anon:
        r = anon.get("/workflows")
        assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
    with api.client("dct_" + "x" * 43) as wrong:
        assert wrong.get("/workflows").status_code == 401

    before = api.snapshot()
    with api.client(read) as c:
        assert c.get(f"/workflows/{failed.id}").json()["status"] == "failed"
        for path, method, _role in MUTATING:
            url = path.replace("{wf_id}", failed.id).replace("{name}", "nightly")
            r = c.request(method, url, json={"strategy": "snapshot-backup", "domain": "x", "toml": ""})
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert error_of(r)["code"] == "forbidden" and "scope read" in error_of(r)["message"]
    with api.client(operate) as c:  # an operator is refused the admin routes
        for path, method, role in MUTATING:
            if role == "admin":
                r = c.request(method, path.replace("{name}", "nightly"), json={"toml": ""})
                assert r.status_code == 403, (method, path)
        assert c.get("/policies").status_code == 403
    assert api.snapshot() == before, "a refused request changed the store"

    with api.client(operate) as c:
        r = c.post(f"/workflows/{failed.id}/rollback")
        assert r.status_code == 200 and r.json()["outcome"] == "rolling back", r.text
    hist = api.store.history(failed.id)
    assert hist[-1]["event"] == "rollback-requested" and hist[-1]["by"] == "token:ops"
    with api.client(api.web.token) as admin:
        entries = admin.get("/audit", params={"limit": 1000}).json()["items"]
    mine = [(e["actor"], e["action"], e["outcome"][:6]) for e in entries]
    assert ("token:reader", "api-denied", "denied") in mine and ("token:ops", "rollback", "ok") in mine
    assert any(e["action"] == "token-create" and e["target"] == "token:reader" for e in entries)

    assert api.cli("token", "revoke", "ops").returncode == 0
    with api.client(operate) as c:
        assert c.get("/workflows").status_code == 401
    assert api.cli("token", "revoke", "ops").returncode == 2


def test_errors_one_shape_and_documented_statuses(api: ApiServer) -> None:
    rec = record(api.store, "succeeded")
    with api.client(api.web.token) as c:
        cases = [
            (c.get("/nowhere"), 404, "not_found", None),
            (c.delete("/workflows"), 405, "method_not_allowed", None),
            (c.get("/workflows/not-an-id"), 404, "not_found", "wf_id"),
            (c.get(f"/workflows/{new_id()}"), 404, "not_found", None),
            (c.get("/workflows", params={"status": "bogus"}), 400, "invalid", "status"),
            (c.get("/workflows", params={"limit": "0"}), 400, "invalid", "limit"),
            (c.get("/events", params={"cursor": "x"}), 400, "invalid", "cursor"),
            (c.get("/events", params={"cursor": "1-0"}), 410, "cursor_expired", "cursor"),
            (c.post("/workflows", content=b"{", headers={"content-type": "application/json"}), 400, "invalid", None),
            (c.post("/workflows", content=b"x=1", headers={"content-type": "text/plain"}), 415,
             "unsupported_media_type", None),
            (c.post("/workflows", json=[1]), 400, "invalid", None),
            (c.post("/workflows", json={"strategy": "nope", "domain": "d"}), 400, "invalid", None),
            (c.post("/workflows", json={"strategy": "snapshot-backup", "domain": "d", "uri": "qemu:///system"}),
             400, "invalid", "uri"),
            (c.post("/workflows", json={"strategy": "snapshot-backup", "domain": "d", "host": "nohost"}),
             404, "not_found", None),
            (c.post("/workflows", json={"strategy": "snapshot-backup", "domain": "d",
                                        "options": {"bandwidth": 5}}), 400, "invalid", "bandwidth"),
            (c.post("/workflows", json={"strategy": "snapshot-backup", "domain": "d",
                                        "options": {"nonsense": "1"}}), 400, "invalid", "nonsense"),
            (c.post(f"/workflows/{rec.id}/resume"), 409, "conflict", None),
            (c.post("/workflows", content=b"[" * 100_000, headers={"content-type": "application/json"}),
             400, "invalid", None),
            (c.post("/workflows", content=b" " * (1024 * 1024 + 1), headers={"content-type": "application/json"}),
             413, "too_large", None),
        ]
        for r, status, code, field in cases:
            assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
            err = error_of(r)
            assert err["code"] == code and (field is None or err["field"] == field), err
            assert "Traceback" not in r.text


def test_list_paging_filters_history_and_events_from_a_cursor(api: ApiServer) -> None:
    with api.client(api.web.token) as c:
        start = c.get("/events", params={"cursor": "now"}).json()["cursor"]
        recs = [record(api.store, "failed" if i % 2 else "succeeded", domain=f"dctest-api-{i}") for i in range(7)]
        seen: list[str] = []
        cursor = None
        while True:
            page = c.get("/workflows", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["items"]) <= 3
            seen += [w["id"] for w in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [r.id for r in recs][::-1]  # newest first, each once
        failed = c.get("/workflows", params={"status": "failed"}).json()["items"]
        assert {w["id"] for w in failed} == {r.id for r in recs if r.status == "failed"}
        assert c.get("/workflows", params={"domain": "dctest-api-3"}).json()["items"][0]["id"] == recs[3].id
        assert c.get(f"/workflows/{recs[1].id}/history").json()["items"][0]["event"] == "submitted"

        first = c.get("/events", params={"cursor": start}).json()
        assert [e["workflow_id"] for e in first["events"]] == [r.id for r in recs]
        assert all(e["event"]["event"] == "submitted" for e in first["events"])
        # a long poll that a change ends: rollback from another client while this one waits
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(c.get, "/events", params={"cursor": first["cursor"], "wait": 10})
            time.sleep(0.3)
            with api.client(api.web.token) as other:
                assert other.post(f"/workflows/{recs[1].id}/rollback").status_code == 200
            got = waiting.result(timeout=15).json()
        assert got["events"] and got["events"][0]["workflow_id"] == recs[1].id
        assert got["events"][0]["event"]["event"] == "rollback-requested"
        # a caller that reconnects from its last cursor misses nothing and sees nothing twice
        again = c.get("/events", params={"cursor": start, "limit": 1000}).json()["events"]
        assert [e["cursor"] for e in again] == [e["cursor"] for e in first["events"] + got["events"]][:len(again)]
        assert [e["cursor"] for e in again][:len(first["events"]) + 1] == \
            [e["cursor"] for e in first["events"]] + [got["events"][0]["cursor"]]
        empty = c.get("/events", params={"cursor": again[-1]["cursor"], "wait": 0}).json()
        assert empty["events"] == [] and empty["cursor"] == again[-1]["cursor"]


# == idempotent submits ==========================================================================================
def test_fifty_concurrent_submits_with_one_key_make_one_workflow(api: ApiServer, disk_domain, tmp_path) -> None:
    dom = disk_domain()
    target = tmp_path / "t"
    target.mkdir()
    token = api.token("ops", "operate")
    body = {"strategy": "snapshot-backup", "domain": dom.name, "options": {"target": str(target)}}

    def post(_: int) -> httpx.Response:
        with api.client(token) as c:
            return c.post("/workflows", json=body, headers={"Idempotency-Key": "nightly-web1-2026-12-06"})

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(post, range(50)))
    assert sorted(r.status_code for r in answers) == [200] * 49 + [201], [r.text for r in answers if r.status_code
                                                                           not in (200, 201)]
    ids = {r.json()["workflow"]["id"] for r in answers}
    assert len(ids) == 1
    assert sum(r.json()["replayed"] for r in answers) == 49
    mine = [rec for rec in api.store.records() if rec.domain == dom.name]
    assert [rec.id for rec in mine] == list(ids)
    with api.client(token) as c:  # the same key with another request: refused, nothing recorded
        r = c.post("/workflows", json={**body, "options": {"target": str(target), "quiesce": "off"}},
                   headers={"Idempotency-Key": "nightly-web1-2026-12-06"})
        assert r.status_code == 409 and error_of(r)["code"] == "idempotency_conflict"
    assert len([rec for rec in api.store.records() if rec.domain == dom.name]) == 1
    # the key is kept at least 24 h
    key = next(k for k in api.r.scan_iter(f"{api.prefix}:idem:*"))
    assert api.r.ttl(key) >= 24 * 3600
    # the CLI shares the rule: the same key, another request (another host URI) exits 2; a new key after
    # the workflow holds the domain is refused by the domain lock, as without a key
    out = api.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target),
                  "--idempotency-key", "nightly-web1-2026-12-06", "--json")
    assert out.returncode == 2 and "another request" in out.stderr


def test_cli_idempotency_key_replays(api: ApiServer, disk_domain, tmp_path) -> None:
    dom = disk_domain()
    target = tmp_path / "t"
    target.mkdir()
    args = ["submit", "snapshot-backup", "--domain", dom.name, "--target", str(target), "--idempotency-key", "k-1",
            "--json"]
    first, second = api.cli(*args), api.cli(*args)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    assert json.loads(first.stdout)["id"] == json.loads(second.stdout)["id"]
    assert len([rec for rec in api.store.records() if rec.domain == dom.name]) == 1
    bad = api.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target),
                  "--idempotency-key", "has space")
    assert bad.returncode == 2 and "idempotency key" in bad.stderr


SENDER = textwrap.dedent("""
    import json, socket, sys
    host, port, token, key, body = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    s = socket.create_connection((host, port))
    data = body.encode()
    s.sendall((f"POST /api/v1/workflows HTTP/1.1\\r\\nHost: {host}\\r\\nAuthorization: Bearer {token}\\r\\n"
               f"Idempotency-Key: {key}\\r\\nContent-Type: application/json\\r\\n"
               f"Content-Length: {len(data)}\\r\\n\\r\\n").encode() + data)
    print("sent", flush=True)
    sys.stdin.read()
""")


def test_client_killed_after_sending_then_retry_gets_the_one_workflow(api: ApiServer, disk_domain,
                                                                      tmp_path) -> None:
    dom = disk_domain()
    target = tmp_path / "t"
    target.mkdir()
    token = api.token("ops", "operate")
    body = json.dumps({"strategy": "snapshot-backup", "domain": dom.name, "options": {"target": str(target)}})
    sender = subprocess.Popen([sys.executable, "-c", SENDER, "127.0.0.1", str(api.web.port), token, "retry-1", body],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sender.stdout is not None and sender.stdout.readline().strip() == "sent"
    os.kill(sender.pid, signal.SIGKILL)
    sender.wait(timeout=10)
    with api.client(token) as c:
        r = c.post("/workflows", content=body, headers={"Idempotency-Key": "retry-1",
                                                        "content-type": "application/json"})
    assert r.status_code in (200, 201), r.text
    mine = [rec.id for rec in api.store.records() if rec.domain == dom.name]
    assert mine == [r.json()["workflow"]["id"]]
    # whichever request recorded it, the retry names it; a second retry says it replayed
    with api.client(token) as c:
        again = c.post("/workflows", content=body, headers={"Idempotency-Key": "retry-1",
                                                            "content-type": "application/json"})
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["workflow"]["id"] == mine[0]


# == the OpenAPI document =========================================================================================
def test_openapi_served_is_the_one_kept_in_the_repo(api: ApiServer) -> None:
    served = httpx.get(api.url + "/openapi.json", timeout=20)
    assert served.status_code == 200
    kept = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served.json() == kept, "docs/openapi.json is stale: python -m workers.api_schema > docs/openapi.json"
    assert kept["openapi"].startswith("3.1")
    documented = {(p, m.upper()) for p, ops in kept["paths"].items() for m in ops}
    assert documented == {(p, m) for p, m, _, _ in ROUTES if p != "/openapi.json"}


# == the client example, on a real capture ============================================================================
def _example() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    start = text.index("```python\n", text.index("<!-- example -->")) + len("```python\n")
    return text[start:text.index("```", start)]


def test_client_example_follows_a_real_capture(api: ApiServer, cluster, disk_domain, tmp_path) -> None:
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    token = api.token("mgmt", "operate")
    code = _example()
    assert len(code.strip().splitlines()) <= 12
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env={**api.env, "DOMCAPTURE_API": api.web.url, "DOMCAPTURE_TOKEN": token,
                              "DOMAIN": dom.name, "TARGET": str(target)})
    assert out.returncode == 0, out.stderr
    wf_id = out.stdout.split()[-2]
    assert out.stdout.strip().endswith("succeeded"), out.stdout
    rec = api.store.load(wf_id)
    assert rec.status == "succeeded" and rec.domain == dom.name
    for art in rec.artifacts.values():
        if art.get("checksum") and os.path.exists(art["path"]):
            assert Path(art["path"]).stat().st_size > 0

