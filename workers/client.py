"""A typed, synchronous Python client of the HTTP API v1 (docs/api.md).

    from workers.client import Client
    api = Client("http://127.0.0.1:8080", token)
    wf = api.submit("snapshot-backup", "web1", options={"target": "/backups/web1"}).workflow
    for ev in api.events(cursor="0"):
        ...

Every submit carries an ``Idempotency-Key`` (one is made when none is given)
and a retry after a lost connection or a 502/503 sends the same key, so a
retried submit never makes a second workflow.  Reads are retried the same way;
an action (resume, rollback, abort, verify) only when the connection failed
before the request was sent.  A refused request raises :class:`ApiError` with
the API's ``code``, ``message`` and ``field``.
"""

from __future__ import annotations

import time
import uuid
from urllib.parse import quote
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx

FINAL = ("succeeded", "rolled_back", "partially_rolled_back")
RETRY_STATUSES = (502, 503)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass(frozen=True)
class Workflow:
    id: str
    strategy: str
    domain: str
    status: str
    state: str
    mode: str
    created_at: float
    updated_at: float
    host: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @classmethod
    def of(cls, doc: dict[str, Any]) -> "Workflow":
        return cls(id=doc["id"], strategy=doc["strategy"], domain=doc["domain"], status=doc["status"],
                   state=doc["state"], mode=doc["mode"], created_at=doc["created_at"], updated_at=doc["updated_at"],
                   host=doc.get("host"), params=doc.get("params") or {}, error=doc.get("error"),
                   attention=doc.get("attention"), result=doc.get("result"), progress=doc.get("progress"), raw=doc)


@dataclass(frozen=True)
class Submitted:
    workflow: Workflow
    replayed: bool  # an earlier submit with the same key made it
    idempotency_key: str


@dataclass(frozen=True)
class Event:
    cursor: str
    workflow_id: str
    rev: int
    status: str | None  # the workflow's status after this change
    event: dict[str, Any] | None  # the history event of this change (None: a write without one)

    @property
    def name(self) -> str | None:
        return (self.event or {}).get("event")


@dataclass(frozen=True)
class ActionResult:
    id: str
    outcome: str
    workflow: Workflow | None = None
    ok: bool | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)


class Client:
    def __init__(self, url: str, token: str, *, timeout: float = 30.0, retries: int = 4, backoff: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        self.retries = retries
        self.backoff = backoff

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------
    def _request(self, method: str, path: str, *, safe: bool, **kw: Any) -> Any:
        """``safe``: a retry cannot do the thing twice (a read, or a submit with its key)."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self.http.request(method, path, **kw)
            except httpx.ConnectError:
                if last:
                    raise
            except httpx.TransportError:
                if last or not safe:
                    raise
            else:
                if r.status_code in RETRY_STATUSES and safe and not last:
                    pass
                elif r.status_code >= 400:
                    try:
                        err = r.json()["error"]
                    except (ValueError, KeyError, TypeError):
                        raise ApiError(r.status_code, "error", r.text[:200]) from None
                    raise ApiError(r.status_code, err.get("code", "error"), err.get("message", ""), err.get("field"))
                else:
                    return r.json()
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, safe=True, params={k: v for k, v in params.items() if v is not None})

    # -- workflows ------------------------------------------------------------------------
    def submit(self, strategy: str, domain: str, *, host: str = "default", options: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> Submitted:
        key = idempotency_key or uuid.uuid4().hex
        doc = self._request("POST", "/workflows", safe=True, headers={"Idempotency-Key": key},
                            json={"strategy": strategy, "domain": domain, "host": host, "options": options or {}})
        return Submitted(Workflow.of(doc["workflow"]), bool(doc["replayed"]), key)

    def workflows(self, *, status: str | None = None, strategy: str | None = None, domain: str | None = None,
                  host: str | None = None, page_size: int = 100) -> Iterator[Workflow]:
        """Every matching workflow, newest first, following the pages."""
        cursor = None
        while True:
            page = self._get("/workflows", status=status, strategy=strategy, domain=domain, host=host,
                             limit=page_size, cursor=cursor)
            for doc in page["items"]:
                yield Workflow.of(doc)
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def get(self, wf_id: str) -> Workflow:
        return Workflow.of(self._get(f"/workflows/{wf_id}"))

    def history(self, wf_id: str) -> list[dict[str, Any]]:
        return list(self._get(f"/workflows/{wf_id}/history")["items"])

    def _action(self, name: str, wf_id: str) -> ActionResult:
        doc = self._request("POST", f"/workflows/{wf_id}/{name}", safe=False)
        wf = doc.get("workflow")
        return ActionResult(doc["id"], doc["outcome"], Workflow.of(wf) if wf else None, doc.get("ok"),
                            doc.get("checks") or [])

    def resume(self, wf_id: str) -> ActionResult:
        return self._action("resume", wf_id)

    def rollback(self, wf_id: str) -> ActionResult:
        return self._action("rollback", wf_id)

    def abort(self, wf_id: str) -> ActionResult:
        return self._action("abort", wf_id)

    def verify(self, wf_id: str) -> ActionResult:
        return self._action("verify", wf_id)

    # -- events ------------------------------------------------------------------------------
    def cursor(self) -> str:
        """The cursor of the newest change: ``events(cursor)`` then yields every change after this call."""
        return str(self._get("/events", cursor="now", wait=0)["cursor"])

    def events(self, cursor: str = "now", *, wait: float = 25.0) -> Iterator[Event]:
        """Every workflow change after ``cursor`` (``0``: the oldest kept; ``now``: from now on), forever;
        a lost connection is retried from the last cursor seen, so none is missed."""
        while True:
            page = self._get("/events", cursor=cursor, wait=wait)
            for doc in page["events"]:
                yield Event(doc["cursor"], doc["workflow_id"], int(doc["rev"]), doc.get("status"), doc["event"])
            cursor = page["cursor"]

    # -- the rest -------------------------------------------------------------------------------
    def domains(self) -> list[dict[str, Any]]:
        return list(self._get("/domains")["items"])

    def domain(self, name: str, host: str = "default") -> dict[str, Any]:
        return dict(self._get(f"/domains/{quote(name, safe='')}", host=host))

    def hosts(self) -> list[dict[str, Any]]:
        return list(self._get("/hosts")["items"])

    def strategies(self) -> list[dict[str, Any]]:
        return list(self._get("/strategies")["items"])

    def audit(self, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._get("/audit", since=since, limit=limit)["items"])

    def policies(self) -> list[dict[str, Any]]:
        return list(self._get("/policies")["items"])

    def apply_policy(self, toml: str) -> dict[str, Any]:
        return dict(self._request("POST", "/policies", safe=False, json={"toml": toml}))

    def delete_policy(self, name: str) -> None:
        self._request("DELETE", f"/policies/{quote(name, safe='')}", safe=False)
