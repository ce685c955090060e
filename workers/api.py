"""The HTTP API v1 (``/api/v1``): JSON over the same library calls as the CLI and the console.

Mounted in the console's Starlette app (``domcapture web``), so one process
serves both.  Every route goes through :func:`Api.guard`: a bearer token (an
API token of ``domcapture token create``, or the console's shared token, an
admin) whose scope (read / operate / admin, the console's viewer / operator /
admin) must reach the route's; a mutating request is recorded in the audit log
under ``token:<name>``, refused or not.  Every error is one JSON shape,
``{"error": {"code", "message", "field"}}``; the statuses are in docs/api.md
and in the OpenAPI document (``GET /api/v1/openapi.json``, kept as
docs/openapi.json).
"""

from __future__ import annotations

import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from workflows import strategies, verify
from workflows.audit import Actor, AuditLog
from workflows.errors import DomcaptureError, HypervisorError, InputError, RecordNotFound, StoreUnavailable
from workflows.indexes import parse_cursor
from workflows.idempotency import Idempotency, IdempotencyConflict, check_key, request_digest
from workflows.options import submit_options
from workflows.policy import MAX_BYTES, PolicyError, PolicyStore, parse
from workflows.record import STATUSES, Record
from workflows.service import summary
from workflows.tokens import SCOPE_OF_ROLE, Tokens
from workflows.validate import ID_RE, domain_name, host_name

from . import cli_backups, cli_checkpoints
from .api_schema import openapi
from .runtime import Runtime
from .webauth import ROLES, Auth, User

BODY_MAX = 1024 * 1024
PAGE_MAX = 500
EVENTS_MAX = 1000
WAIT_MAX = 30.0
CURSOR_RE = re.compile(r"^(0|now|[0-9]{1,20}-[0-9]{1,20})$")
FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\-]{0,60}): ")

Handler = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def from_library(exc: DomcaptureError) -> ApiError:
    """The library's error as an API error: its class decides the status, its message is kept."""
    text = str(exc)
    m = FIELD_RE.match(text)
    field = m.group(1) if m else None
    if isinstance(exc, IdempotencyConflict):
        return ApiError(409, "idempotency_conflict", text, "Idempotency-Key")
    if isinstance(exc, RecordNotFound):
        return ApiError(404, "not_found", text, field)
    if isinstance(exc, StoreUnavailable) or exc.exit_code == 4:
        return ApiError(503, "unavailable", text)
    if isinstance(exc, InputError) or exc.exit_code == 2:
        return ApiError(400, "invalid", text, field)
    if exc.exit_code == 3:
        return ApiError(409, "conflict", text, field)
    if isinstance(exc, HypervisorError):
        return ApiError(502, "hypervisor_error", text)
    return ApiError(500, "failed", text)


@dataclass(frozen=True)
class Caller:
    name: str  # "token:<name>" in the audit log and a workflow's history
    role: str

    @property
    def scope(self) -> str:
        return SCOPE_OF_ROLE[self.role]


def record_doc(rt: Runtime, rec: Record) -> dict[str, Any]:
    return {**summary(rec), "params": rec.params, "host": rt.host_of(rec), "waiting": rt.waiting(rec)}


def _query_int(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise ApiError(400, "invalid", f"{name}: a whole number from 1 to {maximum}", name)
    return int(raw)


def _text(doc: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid", f"{name}: give text", name)
    return value


class Api:
    def __init__(self, rt: Runtime, auth: Auth, read_only: bool = False) -> None:
        self.rt = rt
        self.auth = auth
        self.read_only = read_only
        self.audit = AuditLog(rt.store.r, rt.settings.prefix)
        self.tokens = Tokens(rt.store.r, rt.settings.prefix)
        self.idem = Idempotency(rt.store.r, rt.settings.prefix)

    # -- who asks -------------------------------------------------------------------------
    def caller(self, authorization: str | None) -> Caller | None:
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return Caller("anonymous", User("anonymous", "", "operator").role) if self.auth.no_auth else None
        token = self.tokens.authenticate(secret)
        if token is not None:
            who = Caller(f"token:{token.name}", token.role)
        elif self.auth.token is not None and hmac.compare_digest(secret.encode(), self.auth.token.encode()):
            who = Caller("token", "admin")  # the console's shared token
        else:
            return None
        return Caller(who.name, "viewer") if self.read_only else who

    def guard(self, role: str, *, acts: bool = False) -> Callable[[Handler], Handler]:
        """Every API route goes through here: a workflow id in the path must match the id format
        (else 404 before Redis is asked); a bearer token (else 401); its scope must reach ``role``
        (else 403, recorded in the audit log when the route acts); then the handler, whose library
        errors become the one JSON error shape."""
        def deco(fn: Handler) -> Handler:
            async def wrapped(request: Request) -> Response:
                wf_id = request.path_params.get("wf_id")
                if wf_id is not None and not ID_RE.match(wf_id):
                    return error_response(404, "not_found", "not a workflow id", "wf_id")
                try:
                    who = await run_in_threadpool(self.caller, request.headers.get("authorization"))
                except DomcaptureError as exc:
                    err = from_library(exc)
                    return error_response(err.status, err.code, str(err))
                if who is None:
                    return error_response(401, "unauthorized", "give a valid API token: Authorization: Bearer "
                                          "<token> ('domcapture token create')", None,
                                          {"WWW-Authenticate": 'Bearer realm="domcapture"'})
                request.state.caller = who
                if ROLES.index(who.role) < ROLES.index(role):
                    why = "this console is read-only" if self.read_only else \
                        f"{who.name} has scope {who.scope}; this needs {SCOPE_OF_ROLE[role]}"
                    if acts:
                        await run_in_threadpool(self.audit.append, self.actor(request), "api-denied",
                                                request.url.path[:200], f"denied: {why}")
                    return error_response(403, "forbidden", why)
                try:
                    return await fn(request)
                except ApiError as exc:
                    return error_response(exc.status, exc.code, str(exc), exc.field)
                except DomcaptureError as exc:
                    err = from_library(exc)
                    return error_response(err.status, err.code, str(err), err.field)
            wrapped.required_role = role  # type: ignore[attr-defined]  # read by the route-by-route tests
            wrapped.acts = acts  # type: ignore[attr-defined]
            return wrapped
        return deco

    @staticmethod
    def actor(request: Request) -> Actor:
        who = getattr(request.state, "caller", None)
        client = request.client.host if request.client else "unknown"
        return Actor(who.name if isinstance(who, Caller) else "-", f"api {client}")

    @staticmethod
    async def body(request: Request) -> dict[str, Any]:
        if not request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        raw = await request.body()
        if len(raw) > BODY_MAX:
            raise ApiError(413, "too_large", f"the body is larger than {BODY_MAX // 1024} KiB")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid", "the body is not JSON") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "invalid", "the body must be a JSON object")
        return doc

    def audited(self, request: Request, action: str, target: str, fn: Callable[[], Any], **detail: Any) -> Any:
        src = self.actor(request)
        try:
            out = fn()
        except DomcaptureError as exc:
            self.audit.append(src, action, target, f"refused: {exc}", **detail)
            raise
        self.audit.append(src, action, target, "ok", **detail)
        return out

    # -- workflows --------------------------------------------------------------------------
    def _submit(self, request: Request, doc: dict[str, Any], key: str | None) -> tuple[dict[str, Any], bool]:
        unknown = sorted(set(doc) - {"strategy", "domain", "host", "options"})
        if unknown:
            raise ApiError(400, "invalid", f"{unknown[0][:60]}: not a field of a submit (strategy, domain, host, "
                                           "options)", unknown[0][:60])
        strategy = _text(doc, "strategy") or ""
        defn = strategies.get(strategy)
        domain = domain_name(_text(doc, "domain"), "domain")
        host = _text(doc, "host", required=False) or "default"
        host_name(host, "host")
        options = doc.get("options", {})
        if not isinstance(options, dict):
            raise ApiError(400, "invalid", "options: an object of the strategy's options", "options")
        params = submit_options(defn, options, strict=True)
        uri = self.rt.hosts().uri(host)
        by = self.actor(request).name

        def submit() -> Record:
            return self.rt.captures.submit(defn.name, domain, uri, params, by=by)

        if key is None:
            rec = submit()
            replayed = False
        else:
            out = self.idem.submit(key, request_digest(defn.name, domain, f"host:{host}", params), submit)
            rec, replayed = self.rt.store.load(out.workflow_id), out.replayed
        return record_doc(self.rt, rec), replayed

    async def submit(self, request: Request) -> Response:
        key = request.headers.get("idempotency-key")
        if key is not None:
            try:
                check_key(key)
            except InputError as exc:
                raise ApiError(400, "invalid", str(exc), "Idempotency-Key") from None
        doc = await self.body(request)
        target = str(doc.get("domain"))[:200]
        try:
            wf, replayed = await run_in_threadpool(self.audited, request, "submit", target,
                                                   lambda: self._submit(request, doc, key),
                                                   strategy=str(doc.get("strategy"))[:40],
                                                   idempotency_key=key is not None)
        except ApiError as exc:
            await run_in_threadpool(self.audit.append, self.actor(request), "submit", target, f"refused: {exc}")
            raise
        return JSONResponse({"workflow": wf, "replayed": replayed}, status_code=200 if replayed else 201,
                            headers={"Location": f"/api/v1/workflows/{wf['id']}"})

    def _list(self, q: dict[str, str], cursor: str | None, limit: int) -> dict[str, Any]:
        """A page of the store's indexes (workflows/indexes.py), newest first; domain and host (a registered
        name, matched by its URI) are matched exactly on each index entry's summary before any record is read."""
        uri = self.rt.hosts().all().get(q["host"]) if q.get("host") else None
        if q.get("host") and uri is None:
            return {"items": [], "next_cursor": None}  # no registered host of that name: no workflow on it

        def match(meta: list[Any]) -> bool:  # [status, strategy, host, uri, domain, bytes]
            return (not q.get("domain") or meta[4] == q["domain"]) and (uri is None or meta[3] == uri)
        pg = self.rt.store.indexes.page(status=q.get("status") or None, strategy=q.get("strategy") or None,
                                        match=match if q.get("domain") or uri is not None else None,
                                        limit=limit, cursor=cursor)
        return {"items": [record_doc(self.rt, r) for r in pg.entries if isinstance(r, Record)],
                "next_cursor": pg.cursor}

    async def list_workflows(self, request: Request) -> Response:
        q = {k: request.query_params.get(k, "") for k in ("status", "strategy", "domain", "host")}
        if q["status"] and q["status"] not in STATUSES:
            raise ApiError(400, "invalid", f"status: one of {', '.join(STATUSES)}", "status")
        if q["strategy"] and q["strategy"] not in strategies.DEFINITIONS:
            raise ApiError(400, "invalid", f"strategy: one of {', '.join(sorted(strategies.DEFINITIONS))}",
                           "strategy")
        cursor = request.query_params.get("cursor")
        try:
            if cursor is not None and parse_cursor(cursor, "cursor") is None:  # given, but empty
                raise InputError("cursor: empty")
        except InputError:
            raise ApiError(400, "invalid", "cursor: the next_cursor of the previous page", "cursor") from None
        limit = _query_int(request, "limit", 50, PAGE_MAX)
        return JSONResponse(await run_in_threadpool(self._list, q, cursor, limit))

    async def get_workflow(self, request: Request) -> Response:
        rec = await run_in_threadpool(self.rt.store.load, request.path_params["wf_id"])
        doc = await run_in_threadpool(record_doc, self.rt, rec)
        doc.update(artifacts=rec.artifacts, lease=await run_in_threadpool(self.rt.store.lease_value, rec.id))
        return JSONResponse(doc)

    async def history(self, request: Request) -> Response:
        wf_id = request.path_params["wf_id"]
        await run_in_threadpool(self.rt.store.load, wf_id)  # 404 for an unknown id
        return JSONResponse({"items": await run_in_threadpool(self.rt.store.history, wf_id)})

    def _act(self, name: str, wf_id: str, by: str) -> dict[str, Any]:
        if name == "verify":
            checks = self.rt.captures.verify(wf_id, by=by)
            return {"id": wf_id, "ok": all(c["ok"] for c in checks), "outcome": verify.outcome(checks),
                    "checks": checks}
        if name == "abort":
            rec, what = self.rt.captures.abort(wf_id, by=by)
        else:
            rec = getattr(self.rt.captures, name)(wf_id, by=by)
            what = "resuming" if name == "resume" else "rolling back"
        return {"id": rec.id, "outcome": what, "workflow": record_doc(self.rt, rec)}

    def action(self, name: str) -> Handler:
        async def handler(request: Request) -> Response:
            wf_id = request.path_params["wf_id"]
            out = await run_in_threadpool(self.audited, request, name, wf_id,
                                          lambda: self._act(name, wf_id, self.actor(request).name))
            return JSONResponse(out)
        return handler

    # -- events ---------------------------------------------------------------------------------
    def _events(self, cursor: str, limit: int, wait: float) -> dict[str, Any]:
        if cursor == "now":  # the newest change: follow from here on
            cursor = self.rt.store.changes_newest() or "0"
        oldest = self.rt.store.changes_oldest()
        if cursor != "0" and oldest is not None and _stream_lt(cursor, oldest):
            raise ApiError(410, "cursor_expired", f"cursor: older than the oldest change kept ({oldest}); "
                                                  "list the workflows again, then follow from cursor 0", "cursor")
        deadline = time.monotonic() + wait
        while True:
            block = int(min(1.0, max(0.0, deadline - time.monotonic())) * 1000) or None
            found = self.rt.store.changes(cursor, limit, block_ms=block if wait else None)
            if found or time.monotonic() >= deadline:
                break
        events = [{"cursor": c["cursor"], "workflow_id": c["wf"], "rev": c["rev"], "status": c["status"],
                   "event": c["event"]} for c in found]
        return {"events": events, "cursor": events[-1]["cursor"] if events else cursor}

    async def events(self, request: Request) -> Response:
        cursor = request.query_params.get("cursor", "0")
        if not CURSOR_RE.match(cursor):
            raise ApiError(400, "invalid", "cursor: 0 (the oldest change kept), now, or the cursor of the previous "
                                           "answer", "cursor")
        limit = _query_int(request, "limit", 100, EVENTS_MAX)
        raw = request.query_params.get("wait", "0")
        try:
            wait = float(raw)
            if not 0 <= wait <= WAIT_MAX:
                raise ValueError
        except ValueError:
            raise ApiError(400, "invalid", f"wait: seconds from 0 to {WAIT_MAX:g}", "wait") from None
        return JSONResponse(await run_in_threadpool(self._events, cursor, limit, wait))

    # -- domains, hosts ----------------------------------------------------------------------
    def _domains(self) -> list[dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        names = {uri: name for name, uri in reversed(list(self.rt.hosts().all().items()))}
        for rec in self.rt.store.records():
            row = rows.setdefault((rec.uri, rec.domain), {"domain": rec.domain, "host": names.get(rec.uri),
                                                          "workflows": 0, "last_workflow": None,
                                                          "last_succeeded": None, "last_succeeded_at": None})
            row["workflows"] += 1
            row["last_workflow"] = rec.id if row["last_workflow"] is None else row["last_workflow"]
            if rec.status == "succeeded" and (row["last_succeeded_at"] or 0) < rec.updated_at:
                row["last_succeeded"], row["last_succeeded_at"] = rec.id, rec.updated_at
        for (uri, _), row in rows.items():
            row["holder"] = self.rt.store.domain_holder(uri, row["domain"])
        return sorted(rows.values(), key=lambda r: (r["domain"], r["host"] or ""))

    async def domains(self, request: Request) -> Response:
        return JSONResponse({"items": await run_in_threadpool(self._domains)})

    def _domain(self, name: str, host: str) -> dict[str, Any]:
        uri = self.rt.hosts().uri(host)
        _, backups = cli_backups.rows(self.rt, name, uri or None, include_deleted=False)
        canonical, defined, checkpoints = cli_checkpoints.rows(self.rt, name, uri or None)
        return {"domain": name, "host": host, "defined": defined, "backups": backups, "checkpoints": checkpoints,
                "holder": self.rt.store.domain_holder(canonical, name)}

    async def domain(self, request: Request) -> Response:
        name = domain_name(request.path_params["name"], "name")
        host = request.query_params.get("host", "default")
        host_name(host, "host")
        return JSONResponse(await run_in_threadpool(self._domain, name, host))

    async def hosts(self, request: Request) -> Response:
        hosts = await run_in_threadpool(self.rt.hosts().all)
        return JSONResponse({"items": [{"name": n, "uri": u} for n, u in hosts.items()]})

    # -- policies (admin) ---------------------------------------------------------------------
    def _policies(self) -> PolicyStore:
        return PolicyStore(self.rt.store.r, self.rt.settings.prefix)

    def _policy_rows(self) -> list[dict[str, Any]]:
        store = self._policies()
        errors = store.errors()
        rows = []
        for name in store.names():
            try:
                row = store.get(name).to_dict()
            except (PolicyError, ValueError) as exc:
                row = {"name": name, "error": f"unreadable: {exc}"}
            if name in errors:
                row["error"] = errors[name]["error"]
            rows.append(row)
        return rows

    async def policies(self, request: Request) -> Response:
        return JSONResponse({"items": await run_in_threadpool(self._policy_rows)})

    async def policy(self, request: Request) -> Response:
        name = request.path_params["name"]
        store = self._policies()
        p = await run_in_threadpool(store.get, name)
        return JSONResponse({**p.to_dict(), "error": store.errors().get(p.name)})

    def _apply(self, text: str) -> dict[str, Any]:
        policy = parse(text, "policy", definitions=strategies.DEFINITIONS)
        registry = self.rt.hosts()
        registry.check(policy.hosts)
        version = self._policies().apply(policy)
        registry.add(policy.hosts)
        for host, uri in policy.hosts.items():
            self.rt.map_host(uri, host)
        return {"name": policy.name, "version": version}

    async def apply_policy(self, request: Request) -> Response:
        doc = await self.body(request)
        text = doc.get("toml")
        if not isinstance(text, str) or set(doc) != {"toml"}:
            raise ApiError(400, "invalid", "toml: the policy file's text (the only field)", "toml")
        if len(text.encode()) > MAX_BYTES:
            raise ApiError(400, "invalid", f"toml: larger than {MAX_BYTES // 1024} KiB", "toml")
        out = await run_in_threadpool(self.audited, request, "policy-apply", "api", lambda: self._apply(text))
        return JSONResponse(out, status_code=201)

    async def delete_policy(self, request: Request) -> Response:
        name = request.path_params["name"]
        await run_in_threadpool(self.audited, request, "policy-delete", name[:200],
                                lambda: self._policies().delete(name))
        return JSONResponse({"name": name, "deleted": True})

    # -- audit, strategies, schema ---------------------------------------------------------------
    async def audit_log(self, request: Request) -> Response:
        raw = request.query_params.get("since", "0")
        try:
            since = float(raw)
            if not 0 <= since < 1e11:
                raise ValueError
        except ValueError:
            raise ApiError(400, "invalid", "since: epoch seconds", "since") from None
        limit = _query_int(request, "limit", 100, 1000)
        return JSONResponse({"items": await run_in_threadpool(self.audit.entries, since, limit)})

    async def strategies_list(self, request: Request) -> Response:
        return JSONResponse({"items": [
            {"name": d.name, "summary": d.summary,
             "options": [{"name": o.name, "help": o.help, "flag": o.flag, "choices": list(o.choices or ())}
                         for o in d.options]}
            for d in sorted(strategies.DEFINITIONS.values(), key=lambda d: d.name)]})

    async def schema(self, request: Request) -> Response:
        return JSONResponse(openapi())


    # -- the app ---------------------------------------------------------------------------------
    def app(self) -> Starlette:
        read, operate, admin = self.guard("viewer"), self.guard("operator", acts=True), self.guard("admin")
        admin_acts = self.guard("admin", acts=True)
        async def schema(request: Request) -> Response:
            return await self.schema(request)
        schema.required_role = None  # type: ignore[attr-defined]  # public: the document holds no data
        schema.acts = False  # type: ignore[attr-defined]

        doc = openapi()["paths"]

        def route(path: str, method: str, guard: Callable[[Handler], Handler], fn: Handler) -> Route:
            """``fn`` behind ``guard``, taking only the query parameters its OpenAPI operation declares."""
            names = {p["name"] for p in doc[path][method.lower()].get("parameters", []) if p["in"] == "query"}

            async def strict(request: Request) -> Response:
                extra = sorted(set(request.query_params.keys()) - names)
                if extra:
                    raise ApiError(400, "invalid", f"{extra[0][:60]}: not a parameter of {method} {path}",
                                   extra[0][:60])
                return await fn(request)
            return Route(path, guard(strict), methods=[method])

        routes = [
            Route("/openapi.json", schema, methods=["GET"]),
            route("/strategies", "GET", read, self.strategies_list),
            route("/workflows", "GET", read, self.list_workflows),
            route("/workflows", "POST", operate, self.submit),
            route("/workflows/{wf_id}", "GET", read, self.get_workflow),
            route("/workflows/{wf_id}/history", "GET", read, self.history),
            *(route(f"/workflows/{{wf_id}}/{name}", "POST", operate, self.action(name))
              for name in ("resume", "rollback", "abort", "verify")),
            route("/events", "GET", read, self.events),
            route("/domains", "GET", read, self.domains),
            route("/domains/{name}", "GET", read, self.domain),
            route("/hosts", "GET", read, self.hosts),
            route("/policies", "GET", admin, self.policies),
            route("/policies", "POST", admin_acts, self.apply_policy),
            route("/policies/{name}", "GET", admin, self.policy),
            route("/policies/{name}", "DELETE", admin_acts, self.delete_policy),
            route("/audit", "GET", self.guard("operator"), self.audit_log),
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            code = {404: "not_found", 405: "method_not_allowed"}.get(status, "error")
            return error_response(status, code, "no such route" if status == 404 else
                                  "method not allowed" if status == 405 else "the request failed")

        async def crash(request: Request, exc: Exception) -> Response:
            return error_response(500, "internal", "internal error; see the server's log")

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: crash})


def _split(cursor: str) -> tuple[int, int]:
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)


def _stream_lt(a: str, b: str) -> bool:
    return _split(a) < _split(b)

