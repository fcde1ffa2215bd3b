"""The OpenAPI 3 document of the web API (``GET /api/openapi.json``).

Built from the same constants the endpoints use (limits, states, the id
pattern, the query's column lists), so that it cannot drift from them
silently: a column the queries add without a type here is reported by
:func:`untyped_fields` (the tests call it). It describes the server as
configured: with a token, every data endpoint declares the bearer scheme.
"""
from __future__ import annotations

from typing import Any

from .. import __version__
from ..store import queries
from ..store import schema as s
from . import params
from .params import ID_MAX_LENGTH, ID_PATTERN, TEXT_MAX_LENGTH

__all__ = ["FIELD_TYPES", "document", "untyped_fields"]

OPENAPI_VERSION = "3.0.3"
JSON = "application/json"


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time", "description": "UTC, ISO 8601, ending in Z"}
_ID = {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$", "maxLength": ID_MAX_LENGTH}
_ANY_ID = {"type": "string"}  # ids already in the store, whatever wrote them
_JOB_STATE = {"type": "string", "enum": list(s.JOB_STATES)}
_OPERATION_STATE = {"type": "string", "enum": list(s.OPERATION_STATES)}
_OTHERS = {"type": "integer", "minimum": 0,
           "description": "Other operations with the label the path named (the newest is this one); 0 for an id."}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
           "description": "Children per job state."}

#: The type of every column the queries return, by table.
FIELD_TYPES: dict[str, dict[str, dict]] = {
    "job": {
        "id": _ANY_ID, "parent_id": _nullable(_ANY_ID), "root_id": _ANY_ID, "operation_id": _nullable(_ANY_ID),
        "position": _INT, "depth": _INT, "task_name": _STR, "queue": _nullable(_STR), "priority": _nullable(_INT),
        "state": _JOB_STATE, "pending_deps": _INT, "retries": _INT, "error": _nullable(_STR),
        "created_at": _TIME, "dispatched_at": _nullable(_TIME), "started_at": _nullable(_TIME),
        "finished_at": _nullable(_TIME), "not_before": _nullable(_TIME),
    },
    "operation": {
        "id": _ANY_ID, "label": _nullable(_STR), "parent_id": _ANY_ID, "root_id": _ANY_ID,
        "parent_task": _nullable(_STR),
        "handler": _nullable(_STR), "queue": _nullable(_STR), "depth": _INT, "state": _OPERATION_STATE,
        "total": _INT, "error": _nullable(_STR), "wait_for_descendants": _BOOL, "fail_fast": _BOOL,
        "completed": _BOOL, "created_at": _TIME, "updated_at": _TIME, "finished_at": _nullable(_TIME),
    },
    "tree": {
        "id": _ANY_ID, "parent_id": _nullable(_ANY_ID), "task_name": _STR, "state": _JOB_STATE, "depth": _INT,
        "queue": _nullable(_STR), "operation_id": _nullable(_ANY_ID), "position": _INT,
    },
}
_COLUMNS = {"job": queries.JOB_FIELDS, "operation": queries.OPERATION_FIELDS,
            # parent_id is how the rows are nested, not a field of a node
            "tree": tuple(f for f in queries.TREE_FIELDS if f != "parent_id")}


def untyped_fields() -> list[str]:
    """Columns the queries return that this document does not describe (should be empty)."""
    return [f"{table}.{field}" for table, fields in _COLUMNS.items() for field in fields
            if field not in FIELD_TYPES[table]]


def _object(properties: dict[str, dict], required: list[str] | None = None, description: str | None = None) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": list(properties) if required is None else required,
                              "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


def _columns(table: str) -> dict[str, Any]:
    return {field: FIELD_TYPES[table].get(field, {}) for field in _COLUMNS[table]}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _schemas() -> dict[str, dict]:
    nullable_number = _nullable(_NUM)
    progress = _object({"done": _INT, "total": _INT, "percent": _nullable({"type": "number", "minimum": 0,
                                                                             "maximum": 100})},
                       description="Finished children of the operation, of its total.")
    operation = _object({**_columns("operation"), "counts": _COUNTS, "progress": _ref("Progress")},
                        description="A spawn operation: one parent's run of a handler.")
    detail = _object({**_columns("operation"), "config": {"nullable": True, "description": "The spawn config used."},
                      "on_complete": {"nullable": True, "description": "The on_complete callback signature."},
                      "counts": _COUNTS, "progress": _ref("Progress"),
                      "children": {"type": "array", "items": _ref("Job")},
                      "children_shown": {"type": "integer", "minimum": 0}, "others": _OTHERS},
                     description="A spawn operation with its children in spawn order (at most 1,000 shown).")
    node = _object({**_columns("tree"), "children": {"type": "array", "items": _ref("TreeNode")},
                    "hidden_children": {"type": "integer", "minimum": 1,
                                        "description": "Children below max_depth, left out."}},
                   required=[*_columns("tree"), "children"],
                   description="One job of a spawn tree; children in spawn order.")
    summary = _object({"jobs": _INT, "levels": _INT, "hidden": _INT, "states": _COUNTS},
                      description="Jobs in the tree, levels shown, children hidden below max_depth, jobs per state.")
    tree_head: dict[str, Any] = {"job_id": _ANY_ID, "max_depth": {"type": "integer", "minimum": 0},
                                 "summary": _ref("TreeSummary")}
    group = {"operations": _INT, "children": _INT, "avg_children_per_spawn": nullable_number,
             "max_children_per_spawn": _nullable(_INT), "success_rate": nullable_number,
             "avg_duration_seconds": nullable_number, "max_duration_seconds": nullable_number}
    stats = _object({
        "window": _object({"hours": _NUM, "since": _TIME, "until": _TIME}),
        "queue": _nullable(_STR),
        "operations": _INT, "children": _INT, "avg_children_per_spawn": nullable_number,
        "max_children_per_spawn": _nullable(_INT), "success_rate": nullable_number,
        "operations_by_state": {"type": "object", "additionalProperties": _INT},
        "children_by_state": _COUNTS, "child_success_rate": nullable_number,
        "by_queue": {"type": "array", "items": _object({"queue": _nullable(_STR), **group})},
        "by_handler": {"type": "array", "items": _object({"handler": _nullable(_STR), **group})},
        "durations": _object({"operation_avg_seconds": nullable_number, "operation_max_seconds": nullable_number,
                              "child_avg_seconds": nullable_number, "child_max_seconds": nullable_number}),
    }, description="Operations created in the window: counts, rates (0 to 1) and durations (seconds).")
    return {
        "Error": _object({"error": _STR}, description="What went wrong, in one sentence."),
        "Job": _object(_columns("job"), description="A job recorded by celery-spawn."),
        "JobAtDistance": _object({**_columns("job"), "distance": {"type": "integer", "minimum": 1}},
                                 description="A job below another one; distance 1 is a child."),
        "Progress": progress,
        "Operation": operation,
        "OperationDetail": detail,
        "OperationList": _object({"operations": {"type": "array", "items": _ref("Operation")},
                                  "count": _INT, "limit": _INT}),
        "TreeNode": node,
        "TreeSummary": summary,
        "SpawnTreeJson": _object({**tree_head, "format": {"type": "string", "enum": ["json"]},
                                  "tree": _ref("TreeNode")}),
        "SpawnTreeMermaid": _object({**tree_head, "format": {"type": "string", "enum": ["mermaid"]},
                                     "mermaid": {"type": "string", "description": "A Mermaid `graph TD`."}}),
        "Children": _object({"job_id": _ANY_ID, "depth": _INT, "state": _nullable(_JOB_STATE), "limit": _INT,
                             "count": _INT, "truncated": _BOOL,
                             "children": {"type": "array", "items": _ref("JobAtDistance")}}),
        "Parent": _object({"job_id": _ANY_ID, "parent": {"allOf": [_ref("Job")], "nullable": True,
                                                          "description": "None for a root job."}}),
        "Stats": stats,
        "CancelResult": _object({
            "operation_id": _ANY_ID, "label": _nullable(_STR), "others": _OTHERS,
            "mode": {"type": "string", "enum": ["celery", "store"],
                     "description": "celery: through the Celery app (revokes running children); "
                                    "store: the store only (no Celery app)."},
            "cancelled": _INT, "revoked": _INT, "still_running": _INT, "terminate": _BOOL,
            "operations": {"type": "array", "items": _ANY_ID},
            "completed": _nullable({"type": "array", "items": _ANY_ID}),
            "note": _nullable(_STR),
        }),
    }


def _parameter(name: str, where: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema,
            "description": description}


_JOB_ID = _parameter("job_id", "path", _ID, "A job id (a Celery task id).")
_OPERATION_ID = _parameter("operation_id", "path", _ID,
                           "A spawn operation id, or a label: the newest operation with that label.")
_QUEUE = {"type": "string", "minLength": 1, "maxLength": TEXT_MAX_LENGTH,
          "pattern": "^[^\\u0000-\\u001f\\u007f]+$"}


def _responses(ok: str | dict, *, description: str, not_found: bool = False, secured: bool = False,
               mutating: bool = False, token_required: bool = False) -> dict:
    body = ok if isinstance(ok, dict) else _ref(ok)
    responses: dict[str, Any] = {
        "200": {"description": description, "content": {JSON: {"schema": body}}},
        "400": _error("A parameter is unknown, repeated, empty or malformed."),
    }
    if secured:
        responses["401"] = _error("The Authorization header is missing, or carries a wrong token.")
    if mutating and not token_required:
        responses["403"] = _error("The server has no API token: nothing may change through it.")
    if not_found:
        responses["404"] = _error("No job or operation has this id.")
    responses["503"] = _error("The spawn store cannot be reached.")
    return responses


def _error(description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


def document(*, token_required: bool) -> dict:
    """The OpenAPI document of a server with (``token_required``) or without an API token."""
    read_security: list = [{"bearerAuth": []}] if token_required else []
    reads = {"secured": token_required, "token_required": token_required}

    def get(summary: str, parameters: list[dict], ok: str | dict, description: str, *, not_found: bool = False,
            operation_id: str) -> dict:
        return {"get": {"summary": summary, "operationId": operation_id, "parameters": parameters,
                        "security": read_security, "tags": ["spawn"],
                        "responses": _responses(ok, description=description, not_found=not_found, **reads)}}

    limit = params.MAX_LIMIT
    paths = {
        "/api/spawn/operations": get(
            "Spawn operations, newest first, with child counts and progress",
            [_parameter("limit", "query", {"type": "integer", "minimum": 1, "maximum": limit,
                                           "default": params.DEFAULT_OPERATIONS_LIMIT}, "Operations to return."),
             _parameter("queue", "query", _QUEUE, "Only operations whose parent ran on this queue."),
             _parameter("state", "query", _OPERATION_STATE, "Only operations in this state."),
             _parameter("operation", "query", {**_QUEUE, "maxLength": ID_MAX_LENGTH},
                        "Only the operations with this label, or with this operation id.")],
            "OperationList", "The newest operations.", operation_id="listOperations"),
        "/api/spawn/operations/{operation_id}": get(
            "One operation: config, counts, progress and children", [_OPERATION_ID], "OperationDetail",
            "The operation.", not_found=True, operation_id="getOperation"),
        "/api/spawn/operations/{operation_id}/cancel": {"post": {
            "summary": "Cancel an operation's unfinished children",
            "description": "With the Celery app (serve -A), held and pending children are cancelled and running "
                           "ones revoked (mode celery). Without one, only children never dispatched are "
                           "cancelled, in the store (mode store). Needs the API token.",
            "operationId": "cancelOperation", "tags": ["spawn"],
            "security": [{"bearerAuth": []}] if token_required else [],
            "parameters": [_OPERATION_ID, _parameter("terminate", "query", {"type": "boolean", "default": False},
                                                     "Also terminate children already running (mode celery).")],
            "responses": _responses("CancelResult", description="What was cancelled.", not_found=True,
                                    secured=token_required, mutating=True, token_required=token_required),
        }},
        "/api/spawn/stats": get(
            "Spawn statistics over a window of hours",
            [_parameter("queue", "query", _QUEUE, "Only operations whose parent ran on this queue."),
             _parameter("hours", "query", {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                           "maximum": params.MAX_HOURS, "default": params.DEFAULT_HOURS},
                        "The window: operations created in the last HOURS.")],
            "Stats", "The statistics.", operation_id="getStats"),
        "/api/jobs/{job_id}/spawn-tree": get(
            "The spawn tree below a job, as nested JSON or a Mermaid diagram",
            [_JOB_ID,
             _parameter("format", "query", {"type": "string", "enum": ["json", "mermaid"], "default": "json"},
                        "json: nested nodes (tree); mermaid: a diagram (mermaid)."),
             _parameter("max_depth", "query", {"type": "integer", "minimum": 0, "maximum": params.MAX_DEPTH,
                                               "default": params.DEFAULT_TREE_DEPTH},
                        "Levels below the job (0: the job alone); deeper children are counted in "
                        "hidden_children.")],
            {"oneOf": [_ref("SpawnTreeJson"), _ref("SpawnTreeMermaid")]}, "The tree.", not_found=True,
            operation_id="getSpawnTree"),
        "/api/jobs/{job_id}/children": get(
            "Jobs below a job, nearest first",
            [_JOB_ID,
             _parameter("state", "query", _JOB_STATE, "Only jobs in this state."),
             _parameter("depth", "query", {"type": "integer", "minimum": 1, "maximum": params.MAX_DEPTH, "default": 1},
                        "Levels to follow (1: direct children)."),
             _parameter("limit", "query", {"type": "integer", "minimum": 1, "maximum": limit,
                                           "default": params.DEFAULT_CHILDREN_LIMIT},
                        "Jobs to return at most (truncated says whether there were more).")],
            "Children", "The jobs below.", not_found=True, operation_id="getChildren"),
        "/api/jobs/{job_id}/parent": get(
            "The parent of a job (null for a root)", [_JOB_ID], "Parent", "The parent.", not_found=True,
            operation_id="getParent"),
        "/api/openapi.json": {"get": {
            "summary": "This document", "operationId": "getOpenAPI", "tags": ["meta"], "security": [],
            "responses": {"200": {"description": "The OpenAPI document.",
                                  "content": {JSON: {"schema": {"type": "object"}}}},
                          "400": _error("The document takes no query parameters.")},
        }},
        "/": {"get": {
            "summary": "The dashboard (HTML; its data comes from the endpoints above)", "operationId": "dashboard",
            "tags": ["meta"], "security": [],
            "responses": {"200": {"description": "The dashboard page.",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}},
        }},
    }
    auth_text = ("Every endpoint but this document and the dashboard needs `Authorization: Bearer <token>`."
                 if token_required else
                 "This server has no API token: reads are open (it listens on loopback only) and cancel is "
                 "refused (403).")
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "celery-spawn", "version": __version__,
                 "description": "Spawn operations, trees and statistics recorded by celery-spawn. " + auth_text},
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                                          "description": "The spawn_api_token setting."}}},
    }
