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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

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

from workflows import strategies
from workflows.definition import END_STATES, ROLLING_BACK, Definition
from workflows.errors import DomcaptureError, InputError, RecordNotFound
from workflows.record import FINAL_STATUSES, STATUSES, Record

from . import cli_checkpoints
from .metrics import StoreCollector, host_of
from .notify import delivery_log
from .runtime import Runtime
from .webauth import Auth, csrf_ok, new_csrf_token

HERE = Path(__file__).resolve().parent
ACTIONS = ("resume", "rollback", "abort", "verify")
HTTP_STATUS = {2: 400, 3: 409, 4: 503}  # DomcaptureError.exit_code -> HTTP status
# no framing (the action buttons must not be clickjacked), no caching of pages that show live state
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
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

    def user(request: Request) -> str | None:
        if auth.no_auth:
            return "anonymous"
        name = request.session.get("user")
        return name if isinstance(name, str) else None

    def csrf(request: Request) -> str:
        token = request.session.get("csrf")
        if not isinstance(token, str):
            token = new_csrf_token()
            request.session["csrf"] = token
        return token

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        flash = request.session.pop("flash", None)
        base = {"user": user(request), "csrf": csrf(request), "read_only": config.read_only, "flash": flash,
                "statuses": STATUSES, "strategy_names": sorted(strategies.DEFINITIONS)}
        resp = templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)
        resp.headers.update(PAGE_HEADERS)
        return resp

    def flash(request: Request, kind: str, text: str) -> None:
        request.session["flash"] = {"kind": kind, "text": text}

    Handler = Callable[[Request], Awaitable[Response]]

    def page(fn: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            if user(request) is None:
                if request.headers.get("HX-Request"):
                    return Response(status_code=401, headers={"HX-Redirect": "/login"})
                return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
            try:
                return await fn(request)
            except RecordNotFound as exc:
                return render(request, "error.html", 404, message=str(exc))
            except DomcaptureError as exc:
                return render(request, "error.html", HTTP_STATUS.get(exc.exit_code, 500), message=str(exc))
        return wrapped

    def action(fn: Handler) -> Handler:
        """A state-changing POST: logged in, CSRF token checked, not in read-only mode."""
        async def wrapped(request: Request) -> Response:
            if user(request) is None:
                return PlainTextResponse("not logged in\n", status_code=403)
            form = await request.form()
            if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
                return PlainTextResponse("refused: the form's CSRF token is missing or wrong; reload the page\n",
                                         status_code=403)
            if config.read_only:
                return PlainTextResponse("refused: this console is read-only\n", status_code=403)
            request.state.form = form
            return await fn(request)
        return wrapped

    # -- login -------------------------------------------------------------------------------
    async def login_page(request: Request) -> Response:
        return render(request, "login.html", next=request.query_params.get("next", "/"),
                      with_users=bool(auth.users))

    async def login(request: Request) -> Response:
        form = await request.form()
        if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
            return PlainTextResponse("refused: the form's CSRF token is missing or wrong; reload the page\n",
                                     status_code=403)
        name = await run_in_threadpool(auth.login, str(form.get("username", "")), str(form.get("secret", "")))
        nxt = str(form.get("next") or "/")
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        if name is None:
            return render(request, "login.html", 401, next=nxt, with_users=bool(auth.users),
                          error="login failed: wrong user name, password or token")
        request.session.clear()
        request.session["user"] = name
        request.session["csrf"] = new_csrf_token()
        return RedirectResponse(nxt, status_code=303)

    @action
    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- workflows -----------------------------------------------------------------------------
    def _filtered(q: dict[str, str]) -> list[Record]:
        out = []
        for rec in rt.store.records(q.get("status") or None):
            if q.get("strategy") and rec.strategy != q["strategy"]:
                continue
            if q.get("domain") and q["domain"] not in rec.domain:
                continue
            if q.get("host") and q["host"] not in rec.uri and q["host"] != host_of(rec.uri):
                continue
            out.append(rec)
        out.sort(key=lambda r: r.created_at, reverse=True)
        return out[:500]

    @page
    async def index(request: Request) -> Response:
        q = {k: request.query_params.get(k, "").strip() for k in ("status", "strategy", "domain", "host")}
        if q["status"] and q["status"] not in STATUSES:
            raise InputError(f"unknown status {q['status']!r}; choose one of: {', '.join(STATUSES)}")
        recs = await run_in_threadpool(_filtered, q)
        return render(request, "list.html", records=recs, q=q, host_of=host_of)

    def _workflow_context(wf_id: str) -> dict[str, Any]:
        rec = rt.store.load(wf_id)
        defn = strategies.DEFINITIONS.get(rec.strategy)
        history = rt.store.history(wf_id)
        return {"rec": rec, "table": states_table(defn, rec) if defn else [], "history": history[::-1],
                "actions": allowed_actions(rec), "lease": rt.store.lease_value(wf_id),
                "final": rec.status in FINAL_STATUSES, "summary": defn.summary if defn else ""}

    @page
    async def workflow(request: Request) -> Response:
        ctx = await run_in_threadpool(_workflow_context, request.path_params["wf_id"])
        return render(request, "workflow.html", **ctx)

    @page
    async def workflow_live(request: Request) -> Response:
        ctx = await run_in_threadpool(_workflow_context, request.path_params["wf_id"])
        return render(request, "_live.html", **ctx)

    def _do(name: str, wf_id: str) -> tuple[str, str]:
        """Run one operator action; (kind, message) worded like the CLI's output."""
        if name == "abort":
            rec, what = rt.captures.abort(wf_id)
            return "ok", f"{rec.id}: {what}"
        if name in ("resume", "rollback"):
            rec = getattr(rt.captures, name)(wf_id)
            return "ok", f"{rec.id}: {'resuming' if name == 'resume' else 'rolling back'}"
        checks = rt.captures.verify(wf_id)
        ok = all(c["ok"] for c in checks)
        lines = [f"{'ok  ' if c['ok'] else 'FAIL'} {c['item']} {c.get('path', '')} {c.get('error', '')}".rstrip()
                 for c in checks]
        lines.append(f"{wf_id}: {'verified' if ok else 'VERIFICATION FAILED'}")
        return ("ok" if ok else "error"), "\n".join(lines)

    @action
    async def workflow_action(request: Request) -> Response:
        wf_id, name = request.path_params["wf_id"], request.path_params["name"]
        if name not in ACTIONS:
            return PlainTextResponse(f"unknown action {name!r}\n", status_code=404)
        try:
            kind, text = await run_in_threadpool(_do, name, wf_id)
        except DomcaptureError as exc:
            kind, text = "error", f"error: {exc}"
        flash(request, kind, text)
        return RedirectResponse(f"/wf/{wf_id}", status_code=303)

    # -- submit -----------------------------------------------------------------------------------
    def _submit_form(request: Request, strategy: str, values: dict[str, Any], status_code: int = 200,
                     error: str | None = None) -> Response:
        defn = strategies.DEFINITIONS.get(strategy)
        return render(request, "submit.html", status_code, defn=defn, strategy=strategy, values=values,
                      error=error, default_uri=rt.settings.libvirt_uri)

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
            uri = values.get("uri", "").strip() or rt.settings.libvirt_uri
            rec = await run_in_threadpool(rt.captures.submit, defn.name, domain, uri, params)
        except DomcaptureError as exc:
            return _submit_form(request, strategy, values, HTTP_STATUS.get(exc.exit_code, 500), f"error: {exc}")
        flash(request, "ok", f"submitted {rec.strategy} of {rec.domain}: {rec.id}")
        return RedirectResponse(f"/wf/{rec.id}", status_code=303)

    # -- domains ----------------------------------------------------------------------------------
    def _domains() -> list[dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in rt.store.records():
            row = rows.setdefault((rec.uri, rec.domain), {"uri": rec.uri, "domain": rec.domain, "last": None,
                                                            "last_ok": None, "count": 0, "holder": None})
            row["count"] += 1
            if row["last"] is None or rec.created_at > row["last"].created_at:
                row["last"] = rec
            if rec.status == "succeeded" and (row["last_ok"] is None or rec.updated_at > row["last_ok"].updated_at):
                row["last_ok"] = rec
        for row in rows.values():
            row["holder"] = rt.store.domain_holder(row["uri"], row["domain"])
        return sorted(rows.values(), key=lambda r: (r["domain"], r["uri"]))

    @page
    async def domains(request: Request) -> Response:
        return render(request, "domains.html", rows=await run_in_threadpool(_domains))

    def _domain(uri: str, name: str) -> dict[str, Any]:
        recs = sorted((r for r in rt.store.records() if r.domain == name and (not uri or r.uri == uri)),
                      key=lambda r: r.created_at, reverse=True)
        backups = [r for r in recs if r.status == "succeeded" and (r.result or {}).get("files")]
        cp_error: str | None = None
        checkpoints: list[dict[str, Any]] = []
        canonical: str = uri
        defined: bool | None = None
        try:
            canonical, defined, checkpoints = cli_checkpoints.rows(rt, name, uri or (recs[0].uri if recs else None))
        except DomcaptureError as exc:
            cp_error = str(exc)
        return {"name": name, "uri": canonical, "records": recs, "backups": backups, "checkpoints": checkpoints,
                "defined": defined, "cp_error": cp_error, "holder": rt.store.domain_holder(canonical, name)}

    @page
    async def domain(request: Request) -> Response:
        name = request.query_params.get("name", "").strip()
        if not name:
            raise InputError("name: which domain?")
        ctx = await run_in_threadpool(_domain, request.query_params.get("uri", "").strip(), name)
        return render(request, "domain.html", **ctx)

    @page
    async def notifications(request: Request) -> Response:
        entries = await run_in_threadpool(delivery_log, rt.store, 200)
        return render(request, "notifications.html", entries=entries[::-1])

    # -- metrics ------------------------------------------------------------------------------------
    async def metrics(request: Request) -> Response:
        client = request.client.host if request.client else None
        if not auth.metrics_allowed(client, request.headers.get("authorization")) and user(request) is None:
            return PlainTextResponse("metrics: not allowed from here without the metrics token\n", status_code=403)
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(rt.store.ping)
        except DomcaptureError as exc:
            return PlainTextResponse(f"redis: {exc}\n", status_code=503)
        return PlainTextResponse("ok\n")

    routes = [
        Route("/", index), Route("/login", login_page, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/wf/{wf_id}", workflow), Route("/wf/{wf_id}/live", workflow_live),
        Route("/wf/{wf_id}/action/{name}", workflow_action, methods=["POST"]),
        Route("/submit", submit_page, methods=["GET"]), Route("/submit", submit, methods=["POST"]),
        Route("/domains", domains), Route("/domain", domain), Route("/notifications", notifications),
        Route("/metrics", metrics), Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=config.secret, session_cookie="domcapture_session",
                             same_site="strict", https_only=config.secure_cookie, max_age=12 * 3600)]
    return Starlette(routes=routes, middleware=middleware)
