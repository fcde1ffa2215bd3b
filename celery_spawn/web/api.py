"""The Flask application: JSON endpoints over the store's read queries, and the dashboard.

Endpoints (all JSON; see ``/api/openapi.json`` and ``docs/web.md``)::

    GET  /api/spawn/operations?limit=&queue=&state=&operation=
    GET  /api/spawn/operations/<operation_id or label>
    POST /api/spawn/operations/<operation_id or label>/cancel?terminate=
    GET  /api/spawn/stats?queue=&hours=
    GET  /api/jobs/<job_id>/spawn-tree?format=json|mermaid&max_depth=
    GET  /api/jobs/<job_id>/children?state=&depth=&limit=
    GET  /api/jobs/<job_id>/parent
    GET  /api/openapi.json
    GET  /                      the dashboard (static HTML, CSS and JS)
    GET  /metrics               Prometheus text: celery_spawn_children{state}, celery_spawn_operations_running

Every answer is JSON, errors included: 400 for a bad parameter, 401/403 for
the token rules (:mod:`celery_spawn.web.auth`), 404 for an unknown id, 503
when the store cannot be reached, and a bare 500 for anything else: no stack
trace, SQL or database URL ever reaches a client. Reads go through
:mod:`celery_spawn.store.queries`, where every value is a bound parameter.

An operation's label (the ``operation_id`` a spawn config gave, which the
spawns of several parents may share) is taken wherever an operation id is:
it names the newest operation with that label, and the answer's ``others``
says how many older ones share it (``?operation=LABEL`` lists them all).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flask
from werkzeug.exceptions import HTTPException

from .. import render
from ..errors import JobNotFound, StoreError
from ..settings import SpawnSettings
from ..store import SpawnStore, queries
from ..store import schema as s
from . import auth
from .cancel import cancel_operation
from .params import (DEFAULT_CHILDREN_LIMIT, DEFAULT_HOURS, DEFAULT_OPERATIONS_LIMIT, DEFAULT_TREE_DEPTH,
                     ID_MAX_LENGTH, MAX_DEPTH, MAX_HOURS, MAX_LIMIT, ParameterError, Query, check_id)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["DEFAULT_CHILDREN_LIMIT", "DEFAULT_TREE_DEPTH", "MAX_HOURS", "WebState", "create_app", "web_state"]

logger = logging.getLogger("celery_spawn.web")

#: Seconds to wait for a database server before answering 503.
CONNECT_TIMEOUT = 10
#: The extension key the state lives under on the Flask app.
EXTENSION = "celery_spawn"

STATIC = Path(__file__).resolve().parent / "static"
#: Headers on every response: no sniffing, no framing, nothing cached, nothing leaked in a referrer.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: The dashboard loads nothing but its own files, and talks only to its own origin.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclasses.dataclass
class WebState:
    """What the API needs, kept on the Flask app (``app.extensions["celery_spawn"]``)."""

    store: SpawnStore
    #: The bearer token, or None: reads open, mutations refused.
    token: str | None
    #: The Celery app (``-A``) cancel goes through, or None: cancel in the store only.
    celery_app: Celery | None
    #: The store URL without its password, for logs.
    safe_url: str


def web_state(flask_app: flask.Flask | None = None) -> WebState:
    """The :class:`WebState` of a Flask app made by :func:`create_app` (default: the current one)."""
    return (flask_app or flask.current_app).extensions[EXTENSION]


class NotFound(Exception):
    """No job or operation has the id a request names (answered 404)."""


# ---- the factory --------------------------------------------------------------------------------
def create_app(app: Celery | None = None, *, database_url: str | None = None, token: str | None = None) -> flask.Flask:
    """The web API and dashboard as a Flask (WSGI) application.

    ``app`` is the Celery app whose settings (``spawn_database_url``,
    ``spawn_api_token``, ``spawn_engine_options``) apply and through which
    cancel revokes running children. ``database_url`` and ``token`` win over
    the settings; without an app, the ``CELERY_SPAWN_*`` environment and then
    the defaults apply. The store is only read, except by cancel: its tables are
    never created or migrated here, and a SQLite file that does not exist is
    answered 503, never created.

    Mount it in another WSGI application with, e.g., werkzeug's
    ``DispatcherMiddleware`` (see ``docs/web.md``).
    """
    settings = _settings(app, database_url, token)
    store = SpawnStore(settings.database_url, _engine_options(settings), auto_migrate=False,
                       connect_timeout=CONNECT_TIMEOUT)
    celery_app = app
    if app is not None:
        from ..state import get_state

        if get_state(app).settings.database_url != settings.database_url:
            # The app would cancel in another store than the one shown: cancel here, in the store only.
            logger.warning("celery-spawn web: the Celery app uses another store than %s; cancel works in the store "
                           "only", store.safe_url)
            celery_app = None
    flask_app = flask.Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    flask_app.url_map.merge_slashes = False  # /api/jobs//children is a 404, not a redirect elsewhere
    flask_app.extensions[EXTENSION] = WebState(store=store, token=settings.api_token, celery_app=celery_app,
                                               safe_url=store.safe_url)
    flask_app.register_blueprint(_api_blueprint())
    flask_app.add_url_rule("/", "dashboard", _dashboard)
    flask_app.add_url_rule("/metrics", "metrics", _metrics)
    _register_errors(flask_app)
    flask_app.after_request(_secure)
    logger.info("celery-spawn web: store %s, %s, cancel %s", store.safe_url,
                "token required" if settings.api_token else "no token (reads open, cancel refused)",
                "through Celery" if celery_app is not None else "in the store only")
    return flask_app


def _settings(app: Celery | None, database_url: str | None, token: str | None) -> SpawnSettings:
    """The app's settings (or the environment's), with the explicit arguments on top."""
    explicit: dict[str, Any] = {"database_url": database_url, "api_token": token}
    if app is None:
        return SpawnSettings.load({}, **explicit)
    from ..state import get_state

    state = get_state(app)
    return SpawnSettings.load(app.conf, **{**state.explicit, **{k: v for k, v in explicit.items() if v is not None}})


def _engine_options(settings: SpawnSettings) -> dict:
    """The app's engine options, with connections checked before use."""
    options = dict(settings.engine_options or {})
    options.setdefault("pool_pre_ping", True)
    return options


# ---- responses ----------------------------------------------------------------------------------
def reply(data: Any, status: int = 200) -> flask.Response:
    """A JSON response of query results (datetimes as ISO 8601 UTC strings)."""
    return _raw_json(json.dumps(render.jsonable(data)), status)


def _raw_json(body: str, status: int = 200) -> flask.Response:
    response = flask.current_app.response_class(body, status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


def error(message: str, status: int) -> flask.Response:
    return reply({"error": message}, status)


def _secure(response: flask.Response) -> flask.Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "text/html":
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def _read(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one read query; a ValueError from it (a bad argument) is the client's: 400."""
    with web_state().store.read() as conn:
        try:
            return fn(conn, *args, **kwargs)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None


# ---- auth ---------------------------------------------------------------------------------------
def _authorize() -> flask.Response | None:
    """The token rules, before any parameter is looked at (see :mod:`celery_spawn.web.auth`)."""
    if flask.request.endpoint == "api.openapi":
        return None
    state = web_state()
    mutating = flask.request.method not in ("GET", "HEAD", "OPTIONS")
    if state.token is None:
        if mutating:
            return error("this server has no API token, so nothing may change through it: set spawn_api_token "
                         "(or CELERY_SPAWN_API_TOKEN, or serve --token)", 403)
        return None
    if not auth.token_matches(flask.request.headers.get("Authorization"), state.token):
        response = error("missing or wrong API token: send 'Authorization: Bearer <token>'", 401)
        response.headers["WWW-Authenticate"] = f'{auth.SCHEME} realm="celery-spawn"'
        return response
    return None


def _store_file_exists() -> flask.Response | None:
    """A SQLite store whose file does not exist is unavailable: a read must not create an empty file."""
    if flask.request.endpoint == "api.openapi" or not web_state().store.is_missing_file():
        return None
    logger.warning("celery-spawn web: no spawn store at %s: the file does not exist", web_state().safe_url)
    return error("the spawn store is unavailable", 503)


# ---- endpoints ----------------------------------------------------------------------------------
def _api_blueprint() -> flask.Blueprint:
    api = flask.Blueprint("api", __name__, url_prefix="/api")
    api.before_request(_authorize)
    api.before_request(_store_file_exists)

    @api.get("/openapi.json")
    def openapi() -> flask.Response:
        from .openapi import document

        Query(flask.request.args, ())
        return reply(document(token_required=web_state().token is not None))

    @api.get("/spawn/operations")
    def operations() -> flask.Response:
        query = Query(flask.request.args, ("limit", "queue", "state", "operation"))
        limit = query.integer("limit", default=DEFAULT_OPERATIONS_LIMIT, low=1, high=MAX_LIMIT)
        queue = query.text("queue")
        state = query.choice("state", s.OPERATION_STATES)
        operation = query.text("operation", max_length=ID_MAX_LENGTH)
        found = _read(queries.list_operations, limit=limit, queue=queue, state=state, operation=operation)
        return reply({"operations": found, "count": len(found), "limit": limit})

    @api.get("/spawn/operations/<operation_id>")
    def operation(operation_id: str) -> flask.Response:
        check_id(operation_id, "operation")
        Query(flask.request.args, ())
        with web_state().store.read() as conn:
            named, others = queries.resolve_operation(conn, operation_id)
            found = queries.get_operation(conn, named["id"]) if named is not None else None
        if found is None:
            raise NotFound(_unknown("operation", operation_id))
        return reply({**found, "others": others})

    @api.post("/spawn/operations/<operation_id>/cancel")
    def cancel(operation_id: str) -> flask.Response:
        check_id(operation_id, "operation")
        terminate = Query(flask.request.args, ("terminate",)).boolean("terminate", default=False)
        state = web_state()
        named, _ = _read(queries.resolve_operation, operation_id)
        if named is None:
            raise NotFound(_unknown("operation", operation_id))
        try:
            result = cancel_operation(state.store, state.celery_app, operation_id, terminate=terminate)
        except JobNotFound:  # deleted between the check and the cancel
            raise NotFound(_unknown("operation", operation_id)) from None
        return reply(result)

    @api.get("/spawn/stats")
    def stats() -> flask.Response:
        query = Query(flask.request.args, ("queue", "hours"))
        hours = query.number("hours", default=DEFAULT_HOURS, above=0, high=MAX_HOURS)
        queue = query.text("queue")
        return reply(_read(queries.stats, hours=hours, queue=queue))

    @api.get("/jobs/<job_id>/spawn-tree")
    def spawn_tree(job_id: str) -> flask.Response:
        check_id(job_id)
        query = Query(flask.request.args, ("format", "max_depth"))
        fmt = query.choice("format", ("json", "mermaid"), default="json")
        max_depth = query.integer("max_depth", default=DEFAULT_TREE_DEPTH, low=0, high=MAX_DEPTH)
        tree = _read(queries.spawn_tree, job_id, max_depth=max_depth)
        if tree is None:
            raise NotFound(_unknown_job(job_id))
        head = {"job_id": job_id, "format": fmt, "max_depth": max_depth, "summary": render.tree_summary(tree)}
        if fmt == "mermaid":
            return reply({**head, "mermaid": render.tree_mermaid(tree)})
        # A tree may be 1,000 levels deep: render.tree_json writes it without recursion.
        return _raw_json(json.dumps(head)[:-1] + ', "tree": ' + render.tree_json(tree) + "}")

    @api.get("/jobs/<job_id>/children")
    def children(job_id: str) -> flask.Response:
        check_id(job_id)
        query = Query(flask.request.args, ("state", "depth", "limit"))
        state = query.choice("state", s.JOB_STATES)
        depth = query.integer("depth", default=1, low=1, high=MAX_DEPTH)
        limit = query.integer("limit", default=DEFAULT_CHILDREN_LIMIT, low=1, high=MAX_LIMIT)
        assert limit is not None and depth is not None
        with web_state().store.read() as conn:
            if queries.find_kind(conn, job_id) != "job":
                raise NotFound(_unknown_job(job_id, conn))
            rows = queries.children(conn, job_id, state=state, depth=depth, limit=limit + 1)
        return reply({"job_id": job_id, "depth": depth, "state": state, "limit": limit,
                      "count": min(len(rows), limit), "truncated": len(rows) > limit, "children": rows[:limit]})

    @api.get("/jobs/<job_id>/parent")
    def parent(job_id: str) -> flask.Response:
        check_id(job_id)
        Query(flask.request.args, ())
        with web_state().store.read() as conn:
            if queries.find_kind(conn, job_id) != "job":
                raise NotFound(_unknown_job(job_id, conn))
            found = queries.parent(conn, job_id)
        return reply({"job_id": job_id, "parent": found})

    return api


def _unknown(what: str, some_id: str) -> str:
    return f"no spawn {what} has id {some_id!r}"


def _unknown_job(job_id: str, conn: Any = None) -> str:
    """404 text for a job id; says so when the id names an operation instead."""
    if conn is None:
        kind = _read(queries.find_kind, job_id)
    else:
        kind = queries.find_kind(conn, job_id)
    hint = " (that is an operation id: see /api/spawn/operations/" + job_id + ")" if kind == "operation" else ""
    return f"no spawned job has id {job_id!r}{hint}"


def _dashboard() -> Any:
    # ?job=<id> opens that job's tree: the page reads it (and checks it) itself.
    response = flask.send_from_directory(STATIC, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response


# ---- errors -------------------------------------------------------------------------------------
def _metrics() -> flask.Response:
    """Prometheus text of the store-backed gauges, read at each scrape; the API's token rules for reads."""
    denied = _authorize() or _store_file_exists()
    if denied is not None:
        return denied
    from .. import metrics

    try:
        body, content_type = metrics.render(metrics.store_collector(lambda: _read(queries.backlog)))
    except ImportError as exc:
        return error(str(exc), 501)
    return flask.Response(body, status=200, content_type=content_type)


def _register_errors(flask_app: flask.Flask) -> None:
    @flask_app.errorhandler(ParameterError)
    def bad_parameter(exc: ParameterError) -> flask.Response:
        return error(str(exc), 400)

    @flask_app.errorhandler(NotFound)
    def not_found(exc: NotFound) -> flask.Response:
        return error(str(exc), 404)

    @flask_app.errorhandler(StoreError)
    def store_down(exc: StoreError) -> flask.Response:
        # The message names the store without its password; it still stays in the server's log.
        logger.warning("celery-spawn web: %s", exc)
        return error("the spawn store is unavailable", 503)

    @flask_app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        response = exc.get_response()
        response.set_data(json.dumps({"error": (exc.description or exc.name or "error").strip()}))
        response.mimetype = "application/json"
        return response

    @flask_app.errorhandler(Exception)
    def crashed(exc: Exception) -> flask.Response:
        logger.exception("celery-spawn web: %s %s failed", flask.request.method, flask.request.path)
        return error("internal server error", 500)
