"""The web console: a server-side rendered Starlette app over the same library calls as the CLI.

Pages read the store (workflows, histories, checkpoints) and render Jinja
templates; the live parts of a workflow's page are one fragment that htmx
(vendored in ``static/``, no build step) polls.  Actions go through
``workflows.service.Captures``, exactly like the CLI's commands, so the
rules and messages are the same; a refused action shows the library's
message on the page.  ``/metrics`` serves the Prometheus collector.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from workflows import strategies, verify
from workflows.audit import Actor, AuditLog
from workflows.definition import END_STATES, ROLLING_BACK, Definition
from workflows.errors import DomcaptureError, InputError, RecordNotFound
from workflows.indexes import parse_cursor
from workflows.hosts import DEFAULT
from workflows.record import FINAL_STATUSES, STATUSES, Record
from workflows.validate import ID_RE, domain_name

from . import cli_checkpoints, overview
from .api import Api
from .metrics import StoreCollector, host_of
from .notify import delivery_log
from .runtime import Runtime
from .webauth import ROLES, Auth, AuthConfigError, LoginLimiter, Sessions, User, add_user, csrf_ok, new_csrf_token, \
    remove_user

HERE = Path(__file__).resolve().parent
ACTIONS = ("resume", "rollback", "abort", "verify")
HTTP_STATUS = {2: 400, 3: 409, 4: 503}  # DomcaptureError.exit_code -> HTTP status
# no framing (the action buttons must not be clickjacked), no caching of pages that show live state,
# no script but the console's own files (no inline script, no handler attributes)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_SIZE = 100  # workflows or domains on one page of the console
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": CSP,
                "Cache-Control": "no-store", "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff"}


@dataclass
class WebConfig:
    auth: Auth
    read_only: bool = False
    secret: str = ""
    secure_cookie: bool = False


def ts(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def size(n: float | None) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def states_table(defn: Definition, rec: Record) -> list[dict[str, Any]]:
    """Every state of the definition, its step, where its triggers lead, and which one the record is in."""
    entered = set(defn.states_through(rec.state)) if rec.state in defn.states else set(defn.states)
    rows = []
    for state in defn.states + [ROLLING_BACK, *END_STATES]:
        step = defn.steps.get(state)
        rows.append({
            "state": state, "description": getattr(step, "description", "") if step else "",
            "transitions": [(t, d) for t, s, d in defn.transitions if s == state]
            + ([("rollback", ROLLING_BACK)] if state in defn.states else [])
            + ([("reverted", "rolled_back")] if state == ROLLING_BACK else []),
            "on_crash": defn.crash_policy(state) if state in defn.states else "",
            "attempts": rec.attempts.get(state, 0), "current": state == rec.state,
            "entered": state in entered or state == rec.state,
        })
    return rows


def allowed_actions(rec: Record) -> list[str]:
    """The buttons to show; the library decides (and explains) whether an action is allowed now."""
    if rec.status == "succeeded":
        return ["verify"]
    if rec.status in FINAL_STATUSES:
        return []
    return ["resume", "rollback", "abort"]


def create_app(rt: Runtime, config: WebConfig) -> Starlette:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["ts"] = ts
    templates.env.filters["size"] = size
    templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, sort_keys=True, indent=1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(rt.store, rt.settings.queue))
    auth = config.auth
    sessions = Sessions(rt.store.r, rt.settings.prefix)
    limiter = LoginLimiter(rt.store.r, rt.settings.prefix)
    audit = AuditLog(rt.store.r, rt.settings.prefix)

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def current(request: Request) -> User | None:
        """The user of this request's session, as the user file says now; a viewer in read-only mode."""
        if auth.no_auth:
            who: User | None = auth.ANONYMOUS
        else:
            doc = sessions.get(request.session.get("sid"))
            who = auth.user(doc["user"]) if doc else None
            if who is not None and doc is not None and doc.get("stamp") != who.stamp:
                who = None  # a new password or role since this session began
        if who is not None and config.read_only:
            who = User(who.name, who.encoded, "viewer")
        return who

    def user(request: Request) -> str | None:
        who = getattr(request.state, "who", None)
        return who.name if isinstance(who, User) else None

    def actor(request: Request) -> Actor:
        return Actor(user(request) or "-", f"console {client_of(request)}")

    def csrf(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = new_csrf_token()
            request.session["csrf"] = token
        return token

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        flash = request.session.pop("flash", None)
        who = getattr(request.state, "who", None)
        base = {"user": user(request), "role": who.role if isinstance(who, User) else None,
                "csrf": csrf(request), "read_only": config.read_only, "flash": flash,
                "statuses": STATUSES, "strategy_names": sorted(strategies.DEFINITIONS)}
        resp = templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)
        resp.headers.update(PAGE_HEADERS)
        return resp

    def flash(request: Request, kind: str, text: str) -> None:
        request.session["flash"] = {"kind": kind, "text": text}

    Handler = Callable[[Request], Awaitable[Response]]

    def guard(role: str, *, acts: bool = False) -> Callable[[Handler], Handler]:
        """Every route but login, /metrics, /healthz and /static goes through here, in this order:
        a workflow id in the path must match the id format (else 404, before Redis is asked); then a
        session (else a redirect to the login page, or 401 for a POST or an htmx poll); for ``acts``
        (a POST that changes something) the CSRF token; then the role: a user below ``role`` gets 403
        (recorded in the audit log when the request acts), and nothing is read or changed."""
        def deco(fn: Handler) -> Handler:
            async def wrapped(request: Request) -> Response:
                wf_id = request.path_params.get("wf_id")
                if wf_id is not None and not ID_RE.match(wf_id):
                    return PlainTextResponse("not found: not a workflow id\n", status_code=404)
                who = await run_in_threadpool(current, request)
                request.state.who = who
                if who is None:
                    if acts:
                        return PlainTextResponse("not logged in\n", status_code=401)
                    if request.headers.get("HX-Request"):
                        return Response(status_code=401, headers={"HX-Redirect": "/login"})
                    return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
                if acts:
                    form = await request.form()
                    if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
                        return PlainTextResponse("refused: the form's CSRF token is missing or wrong; "
                                                 "reload the page\n", status_code=403)
                    request.state.form = form
                if ROLES.index(who.role) < ROLES.index(role):
                    why = "this console is read-only" if config.read_only else \
                        f"{who.name} has role {who.role}; this needs {role}"
                    if acts:
                        await run_in_threadpool(audit.append, actor(request), request.url.path[:200], "-",
                                                f"denied: {why}")
                    return PlainTextResponse(f"refused: {why}\n", status_code=403)
                try:
                    return await fn(request)
                except RecordNotFound as exc:
                    return render(request, "error.html", 404, message=str(exc))
                except DomcaptureError as exc:
                    return render(request, "error.html", HTTP_STATUS.get(exc.exit_code, 500), message=str(exc))
            wrapped.required_role = role  # type: ignore[attr-defined]  # read by the route-by-route tests
            wrapped.acts = acts  # type: ignore[attr-defined]
            return wrapped
        return deco

    def public(fn: Handler) -> Handler:
        fn.required_role = None  # type: ignore[attr-defined]
        return fn

    page = guard("viewer")
    action = guard("operator", acts=True)
    admin_page = guard("admin")
    admin_action = guard("admin", acts=True)

    # -- login -------------------------------------------------------------------------------
    def with_users() -> bool:
        return bool(auth.users) or auth.users_path is not None

    @public
    async def login_page(request: Request) -> Response:
        return render(request, "login.html", next=request.query_params.get("next", "/"), with_users=with_users())

    def _login(client: str, username: str, secret: str) -> tuple[User | None, int]:
        """(the user, 0), or (None, seconds to wait before the next try; 0 when not limited)."""
        wait = limiter.retry_after(client, username)
        who = None if wait else auth.login(username, secret)
        src = Actor(username or "-", f"console {client}")
        if wait:
            audit.append(src, "login-failed", username or "-", f"refused: rate limited for {wait}s")
        elif who is None:
            limiter.failed(client, username)
            audit.append(src, "login-failed", username or "-", "refused: wrong user name, password or token")
        else:
            audit.append(Actor(who.name, src.source), "login", who.name, "ok", role=who.role)
        return who, wait

    @public
    async def login(request: Request) -> Response:
        form = await request.form()
        if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
            return PlainTextResponse("refused: the form's CSRF token is missing or wrong; reload the page\n",
                                     status_code=403)
        username, secret = form.get("username", ""), form.get("secret", "")
        if not isinstance(username, str) or not isinstance(secret, str) or len(username) > 200 or len(secret) > 1024:
            return PlainTextResponse("refused: user name or password too long\n", status_code=400)
        who, wait = await run_in_threadpool(_login, client_of(request), username, secret)
        nxt = str(form.get("next") or "/")
        if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
            nxt = "/"
        if wait:
            resp = render(request, "login.html", 429, next=nxt, with_users=with_users(),
                          error=f"login refused: too many failed logins; try again in {wait} s")
            resp.headers["Retry-After"] = str(wait)
            return resp
        if who is None:
            return render(request, "login.html", 401, next=nxt, with_users=with_users(),
                          error="login failed: wrong user name, password or token")
        sid = await run_in_threadpool(sessions.create, who, client_of(request))
        request.session.clear()
        request.session["sid"] = sid
        request.session["csrf"] = new_csrf_token()
        return RedirectResponse(nxt, status_code=303)

    @guard("viewer", acts=True)
    async def logout(request: Request) -> Response:
        await run_in_threadpool(sessions.end, request.session.get("sid"))
        await run_in_threadpool(audit.append, actor(request), "logout", user(request) or "-", "ok")
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- workflows -----------------------------------------------------------------------------
    def _filtered(q: dict[str, str]) -> tuple[list[Record], str | None]:
        """A page of workflows, newest first, from the indexes (domain and host/URI: substrings, checked
        on each index entry's summary before any record is read)."""
        dom, hst = q.get("domain"), q.get("host")

        def match(meta: list[Any]) -> bool:  # [status, strategy, host, uri, domain, bytes]
            return (not dom or dom in meta[4]) and (not hst or hst in meta[3] or hst == meta[2])
        pg = rt.store.indexes.page(status=q.get("status") or None, strategy=q.get("strategy") or None,
                                   match=match if dom or hst else None, limit=PAGE_SIZE,
                                   cursor=q.get("cursor") or None)
        return [r for r in pg.entries if isinstance(r, Record)], pg.cursor

    @page
    async def index(request: Request) -> Response:
        q = {k: request.query_params.get(k, "").strip() for k in ("status", "strategy", "domain", "host", "cursor")}
        if q["status"] and q["status"] not in STATUSES:
            raise InputError(f"unknown status {q['status']!r}; choose one of: {', '.join(STATUSES)}")
        parse_cursor(q["cursor"], "cursor")
        recs, nxt = await run_in_threadpool(_filtered, q)
        more = urlencode({**{k: v for k, v in q.items() if v and k != "cursor"}, "cursor": nxt}) if nxt else None
        return render(request, "list.html", records=recs, q=q, host_of=host_of, more=more,
                      host_names=await run_in_threadpool(_host_names))

    def _workflow_context(wf_id: str) -> dict[str, Any]:
        rec = rt.store.load(wf_id)
        defn = strategies.DEFINITIONS.get(rec.strategy)
        history = rt.store.history(wf_id)
        return {"rec": rec, "table": states_table(defn, rec) if defn else [], "history": history[::-1],
                "actions": allowed_actions(rec), "lease": rt.store.lease_value(wf_id),
                "final": rec.status in FINAL_STATUSES, "summary": defn.summary if defn else "",
                "host_names": _host_names()}

    @page
    async def workflow(request: Request) -> Response:
        ctx = await run_in_threadpool(_workflow_context, request.path_params["wf_id"])
        return render(request, "workflow.html", **ctx)

    @page
    async def workflow_live(request: Request) -> Response:
        ctx = await run_in_threadpool(_workflow_context, request.path_params["wf_id"])
        return render(request, "_live.html", **ctx)

    def _do(name: str, wf_id: str, src: Actor) -> tuple[str, str]:
        """Run one operator action and record it in the audit log; (kind, message) worded like the CLI's."""
        try:
            kind, text = _act(name, wf_id, src.name)
        except DomcaptureError as exc:
            audit.append(src, name, wf_id, f"refused: {exc}")
            raise
        audit.append(src, name, wf_id, "ok" if kind == "ok" else "failed", message=text.splitlines()[-1])
        return kind, text

    def _act(name: str, wf_id: str, by: str) -> tuple[str, str]:
        if name == "abort":
            rec, what = rt.captures.abort(wf_id, by=by)
            return "ok", f"{rec.id}: {what}"
        if name in ("resume", "rollback"):
            rec = getattr(rt.captures, name)(wf_id, by=by)
            return "ok", f"{rec.id}: {'resuming' if name == 'resume' else 'rolling back'}"
        checks = rt.captures.verify(wf_id, by=by)
        ok = all(c["ok"] for c in checks)
        lines = [f"{'ok  ' if c['ok'] else 'FAIL'} {c['item']} {c.get('path', '')} {c.get('error', '')}".rstrip()
                 for c in checks]
        lines.append(f"{wf_id}: " + {verify.VERIFIED: "verified", verify.FAILED: "VERIFICATION FAILED",
                                    verify.NOTHING_KEPT: "nothing kept to verify (a restore: it keeps no artifact)"}
                     [verify.outcome(checks)])
        return ("ok" if ok else "error"), "\n".join(lines)

    @action
    async def workflow_action(request: Request) -> Response:
        wf_id, name = request.path_params["wf_id"], request.path_params["name"]
        if name not in ACTIONS:
            return PlainTextResponse(f"unknown action {name!r}\n", status_code=404)
        try:
            kind, text = await run_in_threadpool(_do, name, wf_id, actor(request))
        except DomcaptureError as exc:
            kind, text = "error", f"error: {exc}"
        flash(request, kind, text)
        return RedirectResponse(f"/wf/{wf_id}", status_code=303)

    # -- hosts: a request names a registered host, never a URI ----------------------------------
    def _host_uri(params: Any) -> tuple[str, str]:
        """(name, URI) of the host ``params`` names (``default`` when none); a ``uri`` is refused."""
        if "uri" in params:
            raise InputError("uri: the console takes a registered host's name (host=NAME; 'domcapture host "
                             "list'), never a URI")
        name = str(params.get("host") or DEFAULT)
        return name, rt.hosts().uri(name)

    def _host_names() -> dict[str, str]:
        """URI -> host name, for links to a domain's page (the first name of a URI wins)."""
        return {uri: name for name, uri in reversed(list(rt.hosts().all().items()))}

    # -- submit -----------------------------------------------------------------------------------
    def _submit_form(request: Request, strategy: str, values: dict[str, Any], status_code: int = 200,
                     error: str | None = None) -> Response:
        defn = strategies.DEFINITIONS.get(strategy)
        return render(request, "submit.html", status_code, defn=defn, strategy=strategy, values=values,
                      error=error, hosts=list(rt.hosts().all()))

    @page
    async def submit_page(request: Request) -> Response:
        strategy = request.query_params.get("strategy", "")
        if strategy:
            strategies.get(strategy)  # an unknown name: the library's message, 400
        return _submit_form(request, strategy, dict(request.query_params))

    @action
    async def submit(request: Request) -> Response:
        form = request.state.form
        values = {k: str(v) for k, v in form.items() if k != "csrf"}
        strategy = values.get("strategy", "")
        try:
            defn = strategies.get(strategy)
            domain = values.get("domain", "").strip()
            if not domain:
                raise InputError("domain: give the name of a libvirt domain")
            params: dict[str, Any] = {}
            for opt in defn.options:
                raw = values.get(opt.name, "").strip()
                if opt.flag:
                    if raw:
                        params[opt.name] = True
                elif raw:
                    params[opt.name] = raw
            _, uri = await run_in_threadpool(_host_uri, values)
            rec = await run_in_threadpool(rt.captures.submit, defn.name, domain, uri, params, by=user(request))
        except DomcaptureError as exc:
            await run_in_threadpool(audit.append, actor(request), "submit", values.get("domain", "-"),
                                    f"refused: {exc}", strategy=strategy)
            return _submit_form(request, strategy, values, HTTP_STATUS.get(exc.exit_code, 500), f"error: {exc}")
        await run_in_threadpool(audit.append, actor(request), "submit", rec.id, "ok", strategy=rec.strategy,
                                domain=rec.domain)
        flash(request, "ok", f"submitted {rec.strategy} of {rec.domain}: {rec.id}")
        return RedirectResponse(f"/wf/{rec.id}", status_code=303)

    # -- domains ----------------------------------------------------------------------------------
    def _domains(after: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """A page of domains in name order, from the domain indexes (workflows/indexes.py)."""
        rows, nxt = rt.store.indexes.domains(limit=PAGE_SIZE, after=after)
        names = _host_names()
        for row in rows:
            row["host"] = names.get(row["uri"])
        return [r for r in rows if r["last"] is not None], nxt

    @page
    async def domains(request: Request) -> Response:
        after = request.query_params.get("after", "").strip() or None
        if after is not None and len(after) > 1024:  # a bound of ZRANGEBYLEX, never a key name
            raise InputError("after: too long")
        rows, nxt = await run_in_threadpool(_domains, after)
        return render(request, "domains.html", rows=rows, more=urlencode({"after": nxt}) if nxt else None)

    def _domain(host: str, uri: str, name: str) -> dict[str, Any]:
        cp_error: str | None = None
        checkpoints: list[dict[str, Any]] = []
        canonical: str = uri
        defined: bool | None = None
        try:
            canonical, defined, checkpoints = cli_checkpoints.rows(rt, name, uri or None)
        except DomcaptureError as exc:
            cp_error = str(exc)
        recs = [r for r in rt.store.indexes.page(domain=(canonical, name), limit=PAGE_SIZE).entries
                if isinstance(r, Record)]  # its newest workflows (the domain's index)
        backups = [r for r in recs if r.status == "succeeded" and (r.result or {}).get("files")]
        return {"name": name, "host": host, "uri": canonical, "records": recs, "backups": backups,
                "checkpoints": checkpoints,
                "defined": defined, "cp_error": cp_error, "holder": rt.store.domain_holder(canonical, name)}

    @page
    async def domain(request: Request) -> Response:
        name = request.query_params.get("name", "").strip()
        if not name:
            raise InputError("name: which domain?")
        domain_name(name, "name")
        host, uri = await run_in_threadpool(_host_uri, request.query_params)
        ctx = await run_in_threadpool(_domain, host, uri, name)
        return render(request, "domain.html", **ctx)

    @page
    async def overview_page(request: Request) -> Response:
        now = time.time()
        rows = await run_in_threadpool(lambda: overview.freshness(rt.store.indexes.iter_all(), now))
        return render(request, "overview.html", rows=rows, days=overview.day_labels(now), now=now,
                      max_age=overview.MAX_AGE, max_hours=int(overview.MAX_AGE // 3600))

    @page
    async def notifications(request: Request) -> Response:
        entries = await run_in_threadpool(delivery_log, rt.store, 200)
        return render(request, "notifications.html", entries=entries[::-1])

    # -- metrics ------------------------------------------------------------------------------------
    @public
    async def metrics(request: Request) -> Response:
        client = request.client.host if request.client else None
        if not auth.metrics_allowed(client, request.headers.get("authorization")) \
                and await run_in_threadpool(current, request) is None:
            return PlainTextResponse("metrics: not allowed from here without the metrics token\n", status_code=403)
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @public
    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(rt.store.ping)
        except DomcaptureError as exc:
            return PlainTextResponse(f"redis: {exc}\n", status_code=503)
        return PlainTextResponse("ok\n")

    # -- audit log and users ---------------------------------------------------------------------
    @guard("operator")
    async def audit_page(request: Request) -> Response:
        raw = request.query_params.get("since", "").strip()
        try:
            since = float(raw) if raw else 0.0
            if not 0 <= since < 1e11:
                raise ValueError
        except ValueError:
            raise InputError(f"since {raw[:40]!r}: give epoch seconds") from None
        entries = await run_in_threadpool(audit.entries, since, 500)
        return render(request, "audit.html", entries=entries[::-1], since=raw)

    @admin_page
    async def users_page(request: Request) -> Response:
        auth.refresh()
        return render(request, "users.html", users=sorted(auth.users.values(), key=lambda u: u.name),
                      roles=ROLES, has_file=auth.users_path is not None)

    def _change_user(op: str, name: str, password: str, role: str, src: Actor) -> tuple[str, str]:
        if auth.users_path is None:
            raise InputError("this console has no user file (--users); users are managed there")
        try:
            if op == "remove":
                remove_user(auth.users_path, name)
                what = f"user {name} removed"
            elif op == "set":
                if password and len(password) < 8:
                    raise AuthConfigError("password: at least 8 characters")
                add_user(auth.users_path, name, password or None, role or None)
                what = f"user {name} set" + (f" ({role})" if role else "")
            else:
                raise AuthConfigError(f"op {op[:20]!r}: choose set or remove")
        except AuthConfigError as exc:
            audit.append(src, f"user-{op[:20]}", name, f"refused: {exc}")
            raise InputError(str(exc)) from None
        ended = sessions.end_user(name)
        auth.refresh()
        audit.append(src, f"user-{op}", name, "ok", role=role or None, password_changed=bool(password),
                     sessions_ended=ended)
        return "ok", f"{what}; {ended} session(s) ended"

    @admin_action
    async def users_change(request: Request) -> Response:
        form = request.state.form
        fields = {k: form.get(k, "") for k in ("op", "name", "password", "role")}
        if not all(isinstance(v, str) and len(v) <= 1024 for v in fields.values()):
            raise InputError("a field that is not text, or too long")
        kind, text = await run_in_threadpool(_change_user, str(fields["op"]), str(fields["name"]),
                                             str(fields["password"]), str(fields["role"]), actor(request))
        flash(request, kind, text)
        return RedirectResponse("/users", status_code=303)

    routes = [
        Route("/", index), Route("/login", login_page, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/audit", audit_page, methods=["GET"]),
        Route("/users", users_page, methods=["GET"]), Route("/users", users_change, methods=["POST"]),
        Route("/wf/{wf_id}", workflow), Route("/wf/{wf_id}/live", workflow_live),
        Route("/wf/{wf_id}/action/{name}", workflow_action, methods=["POST"]),
        Route("/submit", submit_page, methods=["GET"]), Route("/submit", submit, methods=["POST"]),
        Route("/domains", domains), Route("/domain", domain), Route("/notifications", notifications),
        Route("/overview", overview_page),
        Route("/metrics", metrics), Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        Mount("/api/v1", app=Api(rt, auth, config.read_only).app()),  # the HTTP API: docs/api.md
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=config.secret, session_cookie="domcapture_session",
                             same_site="strict", https_only=config.secure_cookie, max_age=12 * 3600)]
    return Starlette(routes=routes, middleware=middleware)
