"""The OpenAPI 3.1 document of the HTTP API v1, built here and kept in the repo as docs/openapi.json.

``python -m workers.api_schema > docs/openapi.json`` writes it; a test fails
when the served document and the kept one differ.
"""

from __future__ import annotations

import json
from typing import Any

from workflows import strategies
from workflows.record import STATUSES
from workflows.validate import ID_RE

ID_PATTERN = ID_RE.pattern
# a page's cursor as the store's indexes make it (workflows.indexes.parse_cursor: SCORE:ID)
PAGE_CURSOR = r"^(\d{1,12}(?:\.\d{1,9})?(?:e[+-]?\d{1,3})?):([0-9a-f]{16}|[\w.-]{1,64})$"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": "invalid input (a field, a query parameter, an option the strategy refuses)",
    "401": "no valid bearer token",
    "403": "the token's scope is below the route's",
    "404": "no such workflow, domain, host, policy or route",
    "409": "refused by a workflow's state (busy domain, action not allowed now) or an idempotency key "
           "used with another request",
    "410": "the events cursor is older than the oldest change kept",
    "413": "the body is larger than 1 MiB",
    "415": "the body is not application/json",
    "502": "libvirt failed",
    "503": "Redis or libvirt unreachable",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"$ref": f"#/components/responses/E{c}"} for c in ("401", "403", "503", *codes)}


def _op(op_id: str, summary: str, scope: str, ok: dict[str, Any], *errors: str,
        params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
        ok_code: str = "200", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op_id, "summary": summary, "x-scope": scope,
                           "responses": {ok_code: ok, **(extra or {}), **_errors(*errors)}}
    if params:
        doc["parameters"] = params
    if body is not None:
        doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return doc


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


WF_ID = {"name": "wf_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": ID_PATTERN}}
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
OBJ = {"type": "object"}
NULLABLE_STR = {"type": ["string", "null"]}


def schemas() -> dict[str, Any]:
    return {
        "Error": {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
            "error": {"type": "object", "required": ["code", "message", "field"], "additionalProperties": False,
                      "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                     "field": NULLABLE_STR}}}},
        "Workflow": {"type": "object", "required": ["id", "strategy", "domain", "status", "state", "mode",
                                                    "created_at", "updated_at"],
                     "properties": {
                         "id": {"type": "string", "pattern": ID_PATTERN}, "strategy": {"type": "string"},
                         "domain": {"type": "string"}, "uri": {"type": "string"},
                         "status": {"type": "string", "enum": list(STATUSES)}, "state": {"type": "string"},
                         "mode": {"type": "string", "enum": ["forward", "rollback"]},
                         "progress": {"type": ["object", "null"]}, "error": {"type": ["object", "null"]},
                         "attention": {"type": ["object", "null"]}, "result": {"type": ["object", "null"]},
                         "params": OBJ, "host": NULLABLE_STR, "waiting": NULLABLE_STR,
                         "created_at": {"type": "number"}, "updated_at": {"type": "number"}}},
        "WorkflowPage": {"type": "object", "required": ["items", "next_cursor"], "properties": {
            "items": {"type": "array", "items": _ref("Workflow")}, "next_cursor": NULLABLE_STR}},
        "SubmitRequest": {"type": "object", "required": ["strategy", "domain"], "additionalProperties": False,
                          "properties": {
                              "strategy": {"type": "string", "enum": sorted(strategies.DEFINITIONS)},
                              "domain": {"type": "string", "minLength": 1, "maxLength": 200},
                              "host": {"type": "string", "description": "a registered host's name "
                                                                        "(GET /hosts); default 'default'"},
                              "options": {"type": "object", "description": "the strategy's options "
                                          "(GET /strategies): a value option is text, a flag true",
                                          "additionalProperties": {"type": ["string", "boolean"]}}}},
        "Submitted": {"type": "object", "required": ["workflow", "replayed"], "properties": {
            "workflow": _ref("Workflow"), "replayed": {"type": "boolean"}}},
        "ActionResult": {"type": "object", "required": ["id", "outcome"], "properties": {
            "id": {"type": "string"}, "outcome": {"type": "string"}, "workflow": _ref("Workflow"),
            "ok": {"type": "boolean"}, "checks": {"type": "array", "items": OBJ}}},
        "Items": {"type": "object", "required": ["items"], "properties": {"items": {"type": "array",
                                                                                    "items": OBJ}}},
        "Events": {"type": "object", "required": ["events", "cursor"], "properties": {
            "cursor": {"type": "string"},
            "events": {"type": "array", "items": {
                "type": "object", "required": ["cursor", "workflow_id", "rev", "status", "event"], "properties": {
                    "cursor": {"type": "string"}, "workflow_id": {"type": "string"}, "status": NULLABLE_STR,
                    "rev": {"type": "integer"}, "event": {"type": ["object", "null"]}}}}}},
        "Domain": {"type": "object", "required": ["domain", "host", "backups", "checkpoints"], "properties": {
            "domain": {"type": "string"}, "host": {"type": "string"}, "defined": {"type": "boolean"},
            "backups": {"type": "array", "items": OBJ}, "checkpoints": {"type": "array", "items": OBJ},
            "holder": NULLABLE_STR}},
        "PolicyApply": {"type": "object", "required": ["toml"], "additionalProperties": False,
                        "properties": {"toml": {"type": "string", "description": "the policy file's text "
                                                                                  "(docs/fleet.md)"}}},
    }


def openapi() -> dict[str, Any]:
    err = _ref("Error")
    limit = _q("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "items per page (default 50)")
    paths: dict[str, Any] = {
        "/strategies": {"get": _op("listStrategies", "strategies and their options", "read",
                                   _json(_ref("Items"), "strategies"))},
        "/workflows": {
            "get": _op("listWorkflows", "workflows, newest first, filtered, in pages", "read",
                       _json(_ref("WorkflowPage"), "a page"), "400", params=[
                           _q("status", {"type": "string", "enum": list(STATUSES)}, "only this status"),
                           _q("strategy", {"type": "string", "enum": sorted(strategies.DEFINITIONS)},
                              "only this strategy"),
                           _q("domain", {"type": "string"}, "only this domain"),
                           _q("host", {"type": "string"}, "only this host name"), limit,
                           _q("cursor", {"type": "string", "pattern": PAGE_CURSOR},
                              "next_cursor of the previous page")]),
            "post": _op("submitWorkflow", "submit a workflow (idempotent with Idempotency-Key)", "operate",
                        _json(_ref("Submitted"), "recorded and enqueued"), "400", "404", "409", "413", "415",
                        "502", ok_code="201", body=_ref("SubmitRequest"),
                        extra={"200": _json(_ref("Submitted"), "replayed: the workflow an earlier submit with "
                                                               "this key made")},
                        params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                                 "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                                            "pattern": "^[!-~]+$"},
                                 "description": "at most one workflow per key (kept 24 h)"}])},
        "/workflows/{wf_id}": {"get": _op("getWorkflow", "one workflow", "read",
                                          _json(_ref("Workflow"), "the workflow"), "404", params=[WF_ID])},
        "/workflows/{wf_id}/history": {"get": _op("getHistory", "a workflow's history, oldest first", "read",
                                                  _json(_ref("Items"), "events"), "404", params=[WF_ID])},
        "/events": {"get": _op("events", "workflow changes after a cursor (long poll)", "read",
                               _json(_ref("Events"), "changes, oldest first"), "400", "410", params=[
                                   _q("cursor", {"type": "string", "pattern": "^(0|now|[0-9]{1,20}-[0-9]{1,20})$"},
                                      "0 (the oldest change kept), now (only changes from now on) or the "
                                      "cursor of the previous answer"),
                                   _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                                      "at most this many (default 100)"),
                                   _q("wait", {"type": "number", "minimum": 0, "maximum": 30},
                                      "seconds to wait for a change when there is none (default 0)")])},
        "/domains": {"get": _op("listDomains", "domains with workflows", "read", _json(_ref("Items"), "domains"))},
        "/domains/{name}": {"get": _op("getDomain", "a domain's backups and checkpoints", "read",
                                       _json(_ref("Domain"), "the domain"), "400", "404", "502", params=[
                                           NAME, _q("host", {"type": "string"}, "a registered host's name")])},
        "/hosts": {"get": _op("listHosts", "registered hosts", "read", _json(_ref("Items"), "hosts"))},
        "/policies": {
            "get": _op("listPolicies", "policies", "admin", _json(_ref("Items"), "policies")),
            "post": _op("applyPolicy", "apply a policy (a new version)", "admin",
                        _json({"type": "object", "required": ["name", "version"]}, "stored"),
                        "400", "409", "413", "415", ok_code="201", body=_ref("PolicyApply"))},
        "/policies/{name}": {
            "get": _op("getPolicy", "one policy", "admin", _json(OBJ, "the policy"), "404", params=[NAME]),
            "delete": _op("deletePolicy", "delete a policy", "admin", _json(OBJ, "deleted"), "404",
                          params=[NAME])},
        "/audit": {"get": _op("auditLog", "the audit log, oldest first", "operate", _json(_ref("Items"), "entries"),
                              "400", params=[_q("since", {"type": "number", "minimum": 0, "exclusiveMaximum": 1e11},
                                                "epoch seconds"),
                                             _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                                                "the newest this many (default 100)")])},
    }
    for name, what in (("resume", "resume a stopped workflow"), ("rollback", "roll a workflow back"),
                       ("abort", "stop a workflow and roll it back"),
                       ("verify", "re-read a succeeded capture's files")):
        paths[f"/workflows/{{wf_id}}/{name}"] = {"post": _op(f"{name}Workflow", what, "operate",
                                                             _json(_ref("ActionResult"), "done"), "400", "404",
                                                             "409", "502", params=[WF_ID])}
    return {
        "openapi": "3.1.0",
        "info": {"title": "domcapture", "version": "1",
                 "description": "Durable libvirt domain captures. See docs/api.md."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "an API token ('domcapture token create NAME "
                                                          "--scope read|operate|admin')"}},
            "schemas": schemas(),
            "responses": {f"E{code}": _json(err, what) for code, what in ERRORS.items()},
        },
    }


def text() -> str:
    return json.dumps(openapi(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(text(), end="")
