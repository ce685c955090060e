"""Hostile cases for the console's and the CLI's users: roles, sessions, the audit log.

Groups (the test names say which): ``roles`` (every route of the app, enumerated from the app
itself, refuses whoever is below its role, and changes nothing), ``ids`` (a workflow id is
checked by its format before Redis is asked), ``sessions`` (server-side sessions end at logout,
a password change, a removal; login timing; the failed-login limit; the CSP), ``audit`` (who,
when, from where, what, and the outcome, for console and CLI actions).

Each hostile case asserts the outcome and that nothing changed: every Redis key of the
deployment but the audit stream and the failed-login counters (so sessions and workflow
records included), and the user file.  One console (a real ``domcapture web`` on a real Redis)
serves the module; a client picks its own loopback source address (127.0.0.x) when the test
needs its own address (the failed-login limit counts per address).
"""

from __future__ import annotations

import getpass
import html
import os
import re
import socket
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
import redis
from starlette.routing import Route
from starlette.testclient import TestClient

from workers.webapp import WebConfig, create_app
from workers.webauth import DEFAULT_ROLE, Auth, add_user, check_password, load_users
from workflows.audit import MAXLEN, AuditLog, Actor
from workflows.record import Record, new_id
from workflows.store import Store

from .conftest import REDIS_URL, _unavailable
from .realenv import DOMCAPTURE
from .webenv import WebServer

pytestmark = pytest.mark.real

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE.parent / "workers" / "templates"
PASSWORDS = {"ada": "pw-ada-admin-1", "olaf": "pw-olaf-oper-1", "vera": "pw-vera-view-1", "lena": "pw-lena-old-1"}
ROLES_OF = {"ada": "admin", "olaf": "operator", "vera": "viewer"}


# -- the app's routes, enumerated from the app itself ----------------------------------------------
def _offline_app(client: redis.Redis | None = None, no_auth: bool = False) -> Any:
    """The console's app over a store whose Redis is ``client`` (default: a port nothing listens on);
    with ``no_auth`` every request is admitted, so only the id check stands before Redis."""
    r = client or redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    rt: Any = SimpleNamespace(store=Store(r, "dct-offline"),
                              settings=SimpleNamespace(queue="q", prefix="dct-offline", libvirt_uri=""))
    auth = Auth(no_auth=True) if no_auth else Auth(token="t" * 20)
    return create_app(rt, WebConfig(auth=auth, secret="s" * 32))


ROUTES = [(r.path, m, getattr(r.endpoint, "required_role", "unguarded"), getattr(r.endpoint, "acts", False))
          for r in _offline_app().routes if isinstance(r, Route) for m in sorted(r.methods or ()) if m != "HEAD"]
PUBLIC = {("/login", "GET"), ("/login", "POST"), ("/metrics", "GET"), ("/healthz", "GET")}
GUARDED = [(p, m, role, acts) for p, m, role, acts in ROUTES if (p, m) not in PUBLIC]
MUTATING = [(p, m, role) for p, m, role, acts in GUARDED if m == "POST"]
VIEWER_REFUSED = [r for r in MUTATING if r[2] != "viewer"]
ADMIN = [(p, m) for p, m, role, acts in GUARDED if role == "admin"]


def _ids(routes: list[tuple[Any, ...]]) -> list[str]:
    return [f"{r[1]} {r[0]}" for r in routes]


# -- the console of this module ------------------------------------------------------------------------
class Console:
    def __init__(self, r: redis.Redis, prefix: str, users: Path, web: WebServer) -> None:
        self.r, self.prefix, self.users, self.web = r, prefix, users, web
        self.store = Store(r, prefix)
        self._sessions: dict[str, httpx.Client] = {}
        self.failed = self.record("failed")
        self.succeeded = self.record("succeeded")

    def record(self, status: str) -> Record:
        rec = Record(id=new_id(), strategy="snapshot-backup", definition_version=1,
                     domain=f"dctest-hostile-{uuid.uuid4().hex[:6]}", uri="qemu:///system", params={},
                     state="copying", status=status,
                     error={"type": "StepFailed", "message": "disk full", "retryable": False, "state": "copying"})
        self.store.create(rec)
        return rec

    def session(self, name: str) -> httpx.Client:
        """A logged-in client kept for the module (for tests that do not end its session)."""
        if name not in self._sessions:
            self._sessions[name] = self.login(name)
        return self._sessions[name]

    def client(self, addr: str = "127.0.0.1") -> httpx.Client:
        return httpx.Client(base_url=self.web.url, transport=httpx.HTTPTransport(local_address=addr), timeout=20)

    def login(self, name: str, addr: str = "127.0.0.1", password: str | None = None) -> httpx.Client:
        c = self.client(addr)
        r = login(c, name, password or PASSWORDS[name])
        assert r.status_code == 303, (name, r.status_code, r.text[:300])
        return c

    def snapshot(self) -> dict[str, Any]:
        """Every key of the deployment but the audit stream and the failed-login counters, and the user file."""
        keys = sorted(k.decode() for k in self.r.scan_iter(f"{self.prefix}:*", count=1000))
        out: dict[str, Any] = {k: self.r.dump(k) for k in keys
                               if k != f"{self.prefix}:audit" and ":web:login-fail:" not in k}
        out["<users file>"] = self.users.read_bytes()
        return out

    def sessions(self) -> list[str]:
        return sorted(k.decode() for k in self.r.scan_iter(f"{self.prefix}:web:session:*"))

    def audit(self, since: float = 0.0) -> list[dict[str, Any]]:
        return AuditLog(self.r, self.prefix).entries(since)


def csrf_of(client: httpx.Client, path: str = "/login") -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert m, path
    return m.group(1)


def login(client: httpx.Client, name: str, password: str, **extra: str) -> httpx.Response:
    return client.post("/login", data={"csrf": csrf_of(client), "next": "/", "username": name, "secret": password,
                                       **extra})


def cli_env(prefix: str) -> dict[str, str]:
    return {**os.environ, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q"}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.ping()
    except redis.RedisError:
        _unavailable(f"redis at {REDIS_URL}")  # fails the run where real services are required
    prefix = f"dct-{uuid.uuid4().hex[:8]}"
    d = tmp_path_factory.mktemp("hostile-console")
    users = d / "users"
    for name, role in ROLES_OF.items():
        add_user(users, name, PASSWORDS[name], role)
    # an entry written before roles existed: no role field
    legacy = add_user(d / "legacy", "lena", PASSWORDS["lena"])
    with users.open("a") as f:
        f.write(f"lena:{legacy.encoded}\n")
    web = WebServer(cli_env(prefix), d / "web", "--users", str(users))
    try:
        yield Console(r, prefix, users, web)
    finally:
        web.stop()
        keys = list(r.scan_iter(f"{prefix}:*", count=5000))
        if keys:
            r.delete(*keys)


def fill(path: str, console: Console) -> str:
    return path.replace("{wf_id}", console.failed.id).replace("{name}", "abort")


# == roles ==============================================================================================
def test_roles_every_route_is_guarded_or_known_public() -> None:
    assert ROUTES, "no route found"
    unguarded = [(p, m) for p, m, role, _ in ROUTES if role == "unguarded"]
    assert unguarded == [], f"routes without the guard: {unguarded}"
    public = {(p, m) for p, m, role, _ in ROUTES if role is None}
    assert public == PUBLIC
    # every POST but login acts (CSRF checked); only logout is open to a viewer
    assert all(acts for p, m, role, acts in GUARDED if m == "POST")
    assert {p for p, m, role in MUTATING if role == "viewer"} == {"/logout"}


@pytest.mark.parametrize("path, method, role", VIEWER_REFUSED, ids=_ids(VIEWER_REFUSED))
def test_roles_viewer_refused_every_mutating_route(console: Console, path: str, method: str, role: str) -> None:
    c = console.session("vera")
    token = csrf_of(c, "/")
    before, t0 = console.snapshot(), time.time()
    r = c.request(method, fill(path, console), data={"csrf": token, "op": "remove", "name": "ada",
                                                     "strategy": "snapshot-backup", "domain": "x"})
    assert r.status_code == 403 and "vera has role viewer; this needs" in r.text
    assert console.snapshot() == before
    denied = [e for e in console.audit(t0) if e["actor"] == "vera"]
    assert denied and denied[-1]["outcome"].startswith("denied:")
    assert console.store.load(console.failed.id).status == "failed"


@pytest.mark.parametrize("path, method, role, acts", GUARDED, ids=_ids(GUARDED))
def test_roles_anonymous_refused_every_guarded_route(console: Console, path: str, method: str, role: str,
                                                     acts: bool) -> None:
    with console.client() as c:
        token = csrf_of(c)  # a real pre-login CSRF token: only the missing session refuses it
        before = console.snapshot()
        r = c.request(method, fill(path, console), data={"csrf": token} if method == "POST" else None)
        if method == "POST":
            assert r.status_code == 401 and "not logged in" in r.text
        else:
            assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert console.snapshot() == before


@pytest.mark.parametrize("path, method", ADMIN, ids=_ids(ADMIN))
def test_roles_operator_refused_admin_routes(console: Console, path: str, method: str) -> None:
    c = console.session("olaf")
    token = csrf_of(c, "/")
    before = console.snapshot()
    r = c.request(method, fill(path, console), data={"csrf": token, "op": "set", "name": "olaf",
                                                     "role": "admin"} if method == "POST" else None)
    assert r.status_code == 403 and "olaf has role operator; this needs admin" in r.text
    assert console.snapshot() == before
    assert load_users(console.users)["olaf"].role == "operator"


@pytest.mark.parametrize("path", ["/", "/domains", "/notifications", "/wf/{wf_id}", "/wf/{wf_id}/live"])
def test_roles_viewer_reads_pages_without_action_buttons(console: Console, path: str) -> None:
    c = console.session("vera")
    r = c.get(fill(path, console))
    assert r.status_code == 200
    assert "action-abort" not in r.text and 'href="/submit"' not in r.text and 'href="/users"' not in r.text


@pytest.mark.parametrize("name, role, audit_status, users_status", [
    ("vera", "viewer", 403, 403), ("olaf", "operator", 200, 403), ("lena", DEFAULT_ROLE, 200, 403),
    ("ada", "admin", 200, 200),
])
def test_roles_each_role_reaches_what_it_may(console: Console, name: str, role: str, audit_status: int,
                                             users_status: int) -> None:
    c = console.login(name)
    assert f"{name} ({role})" in c.get("/").text
    assert c.get("/audit").status_code == audit_status
    assert c.get("/users").status_code == users_status


def test_roles_entry_without_a_role_is_an_operator(console: Console) -> None:
    line = next(x for x in console.users.read_text().splitlines() if x.startswith("lena:"))
    assert line.count(":") == 1  # written before roles existed
    assert load_users(console.users)["lena"].role == "operator"


@pytest.mark.parametrize("line, message", [
    ("bob:scrypt$1$2$3$aa$bb:root", "role 'root'"),
    ("bob:scrypt$1$2$3$aa$bb:Admin", "role 'Admin'"),
    ("bob:md5$1$2$3$aa$bb", "expected name:scrypt"),
    (":scrypt$1$2$3$aa$bb", "expected name:scrypt"),
    ("bob", "expected name:scrypt"),
])
def test_roles_bad_user_file_line_named(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "users"
    f.write_text(line + "\n")
    out = subprocess.run([DOMCAPTURE, "web", "--users", str(f), "--bind", "127.0.0.1:1"], capture_output=True,
                         text=True, timeout=30, env=cli_env(f"dct-{uuid.uuid4().hex[:8]}"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr and "line 1" in out.stderr
    assert "Traceback" not in out.stderr and f.read_text() == line + "\n"


@pytest.mark.parametrize("args, message", [
    (["--add-user", "bob", "--role", "root"], "--role 'root'"),
    (["--add-user", "bo:b"], "bad user name"),
    (["--add-user", " bob"], "bad user name"),
    (["--add-user", "bob\x1b[31m"], "bad user name"),
    (["--remove-user", "nobody"], "no user 'nobody'"),
    (["--role", "admin"], "--role goes with --add-user"),
    (["--add-user", "bob", "--remove-user", "vera"], "give one"),
])
def test_roles_cli_user_changes_bad_input(console: Console, args: list[str], message: str) -> None:
    before = console.snapshot()
    audit_len = len(console.audit())
    out = subprocess.run([DOMCAPTURE, "web", "--users", str(console.users), *args], input="long-enough-pw\n",
                         capture_output=True, text=True, timeout=30, env=cli_env(console.prefix))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert console.snapshot() == before and len(console.audit()) == audit_len


def test_roles_read_only_makes_an_admin_a_viewer(console: Console, tmp_path: Path) -> None:
    web = WebServer(cli_env(console.prefix), tmp_path / "ro", "--users", str(console.users), "--read-only")
    try:
        with httpx.Client(base_url=web.url) as c:
            assert login(c, "ada", PASSWORDS["ada"]).status_code == 303
            assert "ada (viewer)" in c.get("/").text
            token = csrf_of(c, "/")
            before = console.snapshot()
            for path in ("/users", f"/wf/{console.failed.id}/action/resume", "/submit"):
                r = c.post(path, data={"csrf": token, "op": "remove", "name": "vera"})
                assert r.status_code == 403 and "read-only" in r.text
            assert c.get("/users").status_code == 403
            assert console.snapshot() == before
    finally:
        web.stop()


# == ids ================================================================================================
BAD_IDS = ["x:history", "0123456789abcdef:history", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0",
           "g123456789abcdef", "..%2F..%2Fetc", "%00", "0123456789abcde%0A", "*", "dc:wf:*", "%C3%A9" * 8,
           "0123456789abcdef%20"]


@pytest.mark.parametrize("template", ["/wf/{}", "/wf/{}/live", "/wf/{}/action/abort"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_bad_workflow_id_is_404_before_redis(template: str, bad: str) -> None:
    """The app's Redis is a port nothing listens on: any Redis call would fail (500), so 404 means none."""
    with TestClient(_offline_app(no_auth=True), raise_server_exceptions=False) as c:
        method = "POST" if "action" in template else "GET"
        r = c.request(method, template.format(bad), data={"csrf": "x"} if method == "POST" else None,
                      follow_redirects=False)
        assert r.status_code == 404  # the guard's, or the router's when the id holds a "/"


def test_ids_good_id_does_reach_redis() -> None:
    """The other side of the check above: a well-formed id goes on (and meets the missing Redis)."""
    with TestClient(_offline_app(no_auth=True), raise_server_exceptions=False) as c:
        r = c.get(f"/wf/{new_id()}", follow_redirects=False)
        assert r.status_code == 503 and "redis" in r.text.lower()  # StoreUnavailable: it asked Redis


@pytest.mark.parametrize("bad", BAD_IDS[:6])
def test_ids_bad_id_through_the_server_changes_nothing(console: Console, bad: str) -> None:
    c = console.session("olaf")
    token = csrf_of(c, "/")
    before = console.snapshot()
    assert c.get(f"/wf/{bad}").status_code == 404
    assert c.post(f"/wf/{bad}/action/abort", data={"csrf": token}).status_code == 404
    assert console.snapshot() == before


@pytest.mark.parametrize("name", ["delete", "ABORT", "abort ", "../abort", "submit"])
def test_ids_unknown_action_is_404(console: Console, name: str) -> None:
    c = console.session("olaf")
    token = csrf_of(c, "/")
    before = console.snapshot()
    r = c.post(f"/wf/{console.failed.id}/action/{name}", data={"csrf": token})
    assert r.status_code == 404
    assert console.snapshot() == before


# == sessions ==========================================================================================
def test_sessions_live_in_redis_with_expiry(console: Console) -> None:
    before = set(console.sessions())
    c = console.login("olaf")
    new = set(console.sessions()) - before
    assert len(new) == 1
    key = new.pop()
    ttl = console.r.ttl(key)
    assert 0 < ttl <= 12 * 3600
    assert console.r.hget(key, "user") == b"olaf"
    cookie = c.cookies.get("domcapture_session") or ""
    assert "olaf" not in cookie and PASSWORDS["olaf"] not in cookie


def test_sessions_logout_ends_a_copied_cookie(console: Console) -> None:
    c = console.login("olaf")
    copy = console.client()
    copy.cookies.update(c.cookies)
    assert copy.get("/").status_code == 200
    before = set(console.sessions())
    assert c.post("/logout", data={"csrf": csrf_of(c, "/")}).status_code == 303
    assert len(before - set(console.sessions())) == 1
    r = copy.get("/")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert copy.post(f"/wf/{console.failed.id}/action/abort", data={"csrf": "x"}).status_code == 401


@pytest.mark.parametrize("how", ["console-password", "console-remove", "console-role", "cli-password",
                                 "cli-remove", "file-edit"])
def test_sessions_user_change_ends_that_users_sessions(console: Console, how: str) -> None:
    name = f"vic{uuid.uuid4().hex[:6]}"
    add_user(console.users, name, "victim-pass-1", "operator")
    victim, other = console.login(name, password="victim-pass-1"), console.session("olaf")
    copy = console.client()
    copy.cookies.update(victim.cookies)
    assert copy.get("/").status_code == 200
    if how.startswith("console"):
        ada = console.session("ada")
        data = {"remove": {"op": "remove"}, "password": {"op": "set", "password": "another-pass-2"},
                "role": {"op": "set", "role": "viewer"}}[how.split("-")[1]]
        r = ada.post("/users", data={"csrf": csrf_of(ada, "/users"), "name": name, **data}, follow_redirects=True)
        assert r.status_code == 200 and "1 session(s) ended" in r.text
    elif how.startswith("cli"):
        args = ["--add-user", name] if how == "cli-password" else ["--remove-user", name]
        out = subprocess.run([DOMCAPTURE, "web", "--users", str(console.users), *args], input="another-pass-2\n",
                             capture_output=True, text=True, timeout=30, env=cli_env(console.prefix))
        assert out.returncode == 0 and "1 console session(s) ended" in out.stdout, out.stderr
    else:  # an edit of the file by hand: the session's stamp no longer matches the entry
        text = console.users.read_text()
        console.users.write_text(re.sub(rf"^{name}:(.*):operator$", rf"{name}:\1:viewer", text, flags=re.M))
    for c in (victim, copy):
        r = c.get("/")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert other.get("/").status_code == 200  # someone else's session is untouched


def test_sessions_password_change_new_password_works_old_does_not(console: Console) -> None:
    name = f"pw{uuid.uuid4().hex[:6]}"
    add_user(console.users, name, "first-pass-1", "viewer")
    ada = console.session("ada")
    ada.post("/users", data={"csrf": csrf_of(ada, "/users"), "op": "set", "name": name, "password": "second-pass-2"})
    with console.client("127.0.0.61") as c:
        assert login(c, name, "first-pass-1").status_code == 401
        assert login(c, name, "second-pass-2").status_code == 303


def test_sessions_login_time_same_for_unknown_names() -> None:
    auth = Auth(users={})
    auth.users = {"known": load_users_from_line("known", "a-password-1")}
    known: list[float] = []
    unknown: list[float] = []
    for _ in range(20):
        for name, out in (("known", known), ("nobody-here", unknown)):
            t = time.perf_counter()
            assert auth.login(name, "wrong-password") is None
            out.append(time.perf_counter() - t)
    k, u = statistics.median(known), statistics.median(unknown)
    assert u >= 0.5 * k and k >= 0.5 * u, (k, u)


def load_users_from_line(name: str, password: str) -> Any:
    from workers.webauth import User, hash_password
    return User(name, hash_password(password), "operator")


@pytest.mark.parametrize("attempt", ["right-password-after-5", "wrong-password-after-5"])
def test_sessions_failed_logins_limited_per_address(console: Console, attempt: str) -> None:
    addr = f"127.0.0.{70 + (attempt == 'wrong-password-after-5')}"
    before_sessions = console.sessions()
    with console.client(addr) as c:
        for i in range(5):  # names nobody has: only the address is counted against anyone real
            assert login(c, f"nobody-{addr}-{i}", "wrong").status_code == 401
        before = console.snapshot()
        r = login(c, "olaf", PASSWORDS["olaf"] if attempt.startswith("right") else "wrong-again")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert "too many failed logins" in r.text
        assert c.get("/").status_code == 303  # no session came of it
        assert console.snapshot() == before and console.sessions() == before_sessions
    # another address is not limited (for another user)
    with console.client("127.0.0.72") as c:
        assert login(c, "vera", PASSWORDS["vera"]).status_code == 303


def test_sessions_failed_logins_limited_per_user(console: Console) -> None:
    name = f"lim{uuid.uuid4().hex[:6]}"
    add_user(console.users, name, "limited-pass-1", "viewer")
    for i in range(5):
        with console.client(f"127.0.1.{i + 1}") as c:
            assert login(c, name, "wrong").status_code == 401
    with console.client("127.0.1.50") as c:
        r = login(c, name, "limited-pass-1")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert c.get("/").status_code == 303


@pytest.mark.parametrize("path", ["/login", "/", "/wf/{wf_id}", "/audit", "/users", "/domains"])
def test_sessions_csp_forbids_inline_script(console: Console, path: str) -> None:
    c = console.session("ada")
    r = c.get(fill(path, console))
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    script = re.search(r"script-src ([^;]*)", csp)
    assert script and script.group(1).split() == ["'self'"]
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text)
    assert not re.search(r"\son[a-z]+\s*=", r.text)


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_sessions_templates_have_no_inline_script_or_handlers(template: str) -> None:
    text = (TEMPLATES / template).read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text)
    assert not re.search(r"\son[a-z]+\s*=", text, re.I)
    assert "javascript:" not in text.lower()


@pytest.mark.parametrize("cookie", ["", "garbage", "a" * 4000, "eyJzaWQiOiAieCJ9.forged.sig",
                                    "eyJ1c2VyIjogImFkYSJ9"])
def test_sessions_forged_cookie_is_no_session(console: Console, cookie: str) -> None:
    before = console.snapshot()
    with console.client() as c:
        c.cookies.set("domcapture_session", cookie)
        r = c.get("/users")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert console.snapshot() == before


def test_sessions_signed_cookie_of_the_old_kind_is_no_session(console: Console) -> None:
    """A cookie naming a user (the format before server-side sessions) admits nobody, even if signed right."""
    from itsdangerous import TimestampSigner
    import base64
    import json
    forged = TimestampSigner("s" * 32).sign(base64.b64encode(json.dumps({"user": "ada"}).encode())).decode()
    with console.client() as c:
        c.cookies.set("domcapture_session", forged)
        assert c.get("/").status_code == 303


@pytest.mark.parametrize("name, password", [
    ("x" * 201, "p"), ("ada", "p" * 1025), ("ada\x00", PASSWORDS["ada"]), ("ada\n", PASSWORDS["ada"]),
    ("ADA", PASSWORDS["ada"]), (" ada", PASSWORDS["ada"]), ("ada", PASSWORDS["ada"] + " "), ("", PASSWORDS["ada"]),
    ("ada", ""), ("<script>alert(1)</script>", "p"), ("' OR 1=1 --", "p"), ("*", "p"), ("dc:*", "p"),
])
def test_sessions_hostile_login_input_is_refused(console: Console, name: str, password: str) -> None:
    before = console.snapshot()
    with console.client(f"127.0.2.{abs(hash(name + password)) % 200 + 1}") as c:
        r = login(c, name, password)
        assert r.status_code in (400, 401)
        assert "<script>alert(1)" not in r.text
        assert c.get("/").status_code == 303
    assert console.snapshot() == before


@pytest.mark.parametrize("nxt", ["//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:x",
                                 "\\\\evil.example"])
def test_sessions_login_never_redirects_off_site(console: Console, nxt: str) -> None:
    with console.client() as c:
        r = c.post("/login", data={"csrf": csrf_of(c), "next": nxt, "username": "vera", "secret": PASSWORDS["vera"]})
        assert r.status_code == 303 and r.headers["location"] == "/"


def test_sessions_login_without_csrf_is_refused(console: Console) -> None:
    before = console.snapshot()
    with console.client() as c:
        r = c.post("/login", data={"username": "ada", "secret": PASSWORDS["ada"]})
        assert r.status_code == 403
    assert console.snapshot() == before


# == audit ==============================================================================================
def test_audit_console_abort_names_user_and_address(console: Console) -> None:
    rec = console.record("failed")
    t0 = time.time()
    c = console.login("olaf", addr="127.0.0.99")
    r = c.post(f"/wf/{rec.id}/action/abort", data={"csrf": csrf_of(c, f"/wf/{rec.id}")},
               headers={"X-Forwarded-For": "10.9.9.9"})
    assert r.status_code == 303
    entry = [e for e in console.audit(t0) if e["action"] == "abort" and e["target"] == rec.id]
    assert len(entry) == 1
    assert entry[0]["actor"] == "olaf" and entry[0]["source"] == "console 127.0.0.99"
    assert entry[0]["outcome"] == "ok" and t0 <= entry[0]["ts"] <= time.time()
    history = console.store.history(rec.id)
    assert history[-1]["event"] == "rollback-requested" and history[-1]["by"] == "olaf"
    # and the audit page shows it to an operator
    page = c.get("/audit").text
    assert "console 127.0.0.99" in page and rec.id in page


@pytest.mark.parametrize("action", ["resume", "rollback", "verify"])
def test_audit_console_actions_record_outcome(console: Console, action: str) -> None:
    rec = console.record("failed")
    t0 = time.time()
    c = console.login("olaf", addr="127.0.0.98")
    c.post(f"/wf/{rec.id}/action/{action}", data={"csrf": csrf_of(c, "/")})
    e = [e for e in console.audit(t0) if e["target"] == rec.id][-1]
    assert e["action"] == action and e["actor"] == "olaf" and e["source"] == "console 127.0.0.98"
    if action == "verify":  # only a succeeded capture can be verified: refused, and nothing changed
        assert e["outcome"].startswith("refused:") and "only a succeeded capture" in e["outcome"]
        assert [h["event"] for h in console.store.history(rec.id)] == ["submitted"]
    else:
        assert e["outcome"] == "ok"
        assert console.store.history(rec.id)[-1]["by"] == "olaf"


def test_audit_logins_and_failed_logins(console: Console) -> None:
    t0 = time.time()
    with console.client("127.0.0.97") as c:
        login(c, "vera", "not-her-password")
        login(c, "vera\x1b[31m<b>", "x")
        login(c, "vera", PASSWORDS["vera"])
    entries = [e for e in console.audit(t0) if e["source"] == "console 127.0.0.97"]
    assert [(e["action"], e["outcome"].split(":")[0]) for e in entries] == [
        ("login-failed", "refused"), ("login-failed", "refused"), ("login", "ok")]
    assert entries[1]["target"] == "vera?[31m<b>"  # a typed name is data: control characters replaced
    page = console.session("ada").get("/audit").text
    assert "vera?[31m&lt;b&gt;" in page and "<b>" not in page.split("<main>")[1]


def test_audit_cli_action_names_os_user_host_and_pid(console: Console) -> None:
    rec = console.record("failed")
    t0 = time.time()
    out = subprocess.run([DOMCAPTURE, "rollback", rec.id], capture_output=True, text=True, timeout=60,
                         env=cli_env(console.prefix))
    assert out.returncode == 0, out.stderr
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    e = [e for e in console.audit(t0) if e["target"] == rec.id]
    assert len(e) == 1 and e[0]["actor"] == who and e[0]["action"] == "rollback" and e[0]["outcome"] == "ok"
    assert re.fullmatch(rf"cli {re.escape(socket.gethostname())} pid \d+", e[0]["source"])
    assert console.store.history(rec.id)[-1]["by"] == who


def test_audit_cli_refused_action_is_recorded_and_changes_nothing(console: Console) -> None:
    t0 = time.time()
    before = console.snapshot()
    out = subprocess.run([DOMCAPTURE, "verify", console.failed.id], capture_output=True, text=True, timeout=60,
                         env=cli_env(console.prefix))
    assert out.returncode == 3 and "only a succeeded capture" in out.stderr
    e = [e for e in console.audit(t0) if e["target"] == console.failed.id]
    assert e and e[-1]["outcome"].startswith("refused:") and e[-1]["source"].startswith("cli ")
    assert console.snapshot() == before


def test_audit_cli_command_lists_since_as_json(console: Console) -> None:
    log = AuditLog(console.r, console.prefix)
    log.append(Actor("old", "cli test pid 1"), "resume", "x", "ok")
    t0 = time.time()
    log.append(Actor("new", "cli test pid 2"), "abort", "y", "ok")
    out = subprocess.run([DOMCAPTURE, "audit", "--since", f"{t0:.6f}", "--json"], capture_output=True, text=True,
                         timeout=30, env=cli_env(console.prefix))
    assert out.returncode == 0, out.stderr
    import json
    docs = [json.loads(x) for x in out.stdout.splitlines()]
    assert "new" in [d["actor"] for d in docs] and "old" not in [d["actor"] for d in docs]
    text = subprocess.run([DOMCAPTURE, "audit"], capture_output=True, text=True, timeout=30,
                          env=cli_env(console.prefix)).stdout
    assert re.search(r"old\s+cli test pid 1\s+resume", text)


@pytest.mark.parametrize("since", ["yesterday", "1e400", "2024-13-01"])
def test_audit_cli_bad_since_exit_2(console: Console, since: str) -> None:
    before = console.snapshot()
    out = subprocess.run([DOMCAPTURE, "audit", "--since", since], capture_output=True, text=True, timeout=30,
                         env=cli_env(console.prefix))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--since" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert console.snapshot() == before


@pytest.mark.parametrize("since", ["x", "-1", "1e300", "nan", "inf", "2024-13-01"])
def test_audit_page_bad_since_is_400(console: Console, since: str) -> None:
    c = console.session("olaf")
    r = c.get("/audit", params={"since": since})
    assert r.status_code == 400 and "since" in r.text


def test_audit_stream_is_bounded(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAXLEN == 100_000
    monkeypatch.setattr("workflows.audit.MAXLEN", 50)
    log = AuditLog(console.r, f"{console.prefix}-bounded")
    try:
        for i in range(300):
            log.append(Actor("a", "s"), "resume", str(i), "ok")
        n = console.r.xlen(log.key)
        assert 50 <= n < 250  # trimmed (approximately: whole nodes of the stream go at once)
        assert log.entries(count=1)[0]["target"] == "299"
    finally:
        console.r.delete(log.key)


def test_audit_user_changes_recorded_with_admin_and_address(console: Console) -> None:
    name = f"aud{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    ada = console.login("ada", addr="127.0.0.96")
    ada.post("/users", data={"csrf": csrf_of(ada, "/users"), "op": "set", "name": name, "password": "new-user-pw-1",
                             "role": "viewer"})
    ada.post("/users", data={"csrf": csrf_of(ada, "/users"), "op": "remove", "name": name})
    got = [(e["action"], e["target"], e["actor"], e["source"], e["outcome"]) for e in console.audit(t0)
           if e["target"] == name]
    assert got == [("user-set", name, "ada", "console 127.0.0.96", "ok"),
                   ("user-remove", name, "ada", "console 127.0.0.96", "ok")]
    assert name not in load_users(console.users)


@pytest.mark.parametrize("form, message", [
    ({"op": "set", "name": "bo:b", "password": "long-enough-1"}, "bad user name"),
    ({"op": "set", "name": "bob", "password": "short"}, "at least 8"),
    ({"op": "set", "name": "bob", "role": "root", "password": "long-enough-1"}, "role 'root'"),
    ({"op": "remove", "name": "nobody"}, "no user 'nobody'"),
    ({"op": "set", "name": "nobody"}, "no user 'nobody'"),
    ({"op": "drop", "name": "vera"}, "choose set or remove"),
    ({"op": "set", "name": "x" * 65, "password": "long-enough-1"}, "bad user name"),
])
def test_audit_bad_user_change_refused_and_recorded(console: Console, form: dict[str, str], message: str) -> None:
    ada = console.session("ada")
    token = csrf_of(ada, "/users")
    before, t0 = console.snapshot(), time.time()
    r = ada.post("/users", data={"csrf": token, **form})
    assert r.status_code == 400 and message in html.unescape(r.text)
    assert console.snapshot() == before
    assert console.audit(t0)[-1]["outcome"].startswith("refused:")
    assert check_password(PASSWORDS["vera"], load_users(console.users)["vera"].encoded)
