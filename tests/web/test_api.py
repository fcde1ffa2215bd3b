"""The JSON API (Flask's test client) against trees a real worker produced, on every broker/store combination."""
from __future__ import annotations

import json
from datetime import datetime

import pytest

from celery_spawn import get_state
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import queries
from celery_spawn.web import create_app
from celery_spawn.web.api import web_state
from tests.harness import StoreBuilder, wait_for
from tests.web.helpers import NASTY_QUEUE, TIMEOUT

TOKEN = "s3cret-web-token"


@pytest.fixture(scope="module")
def web(client_app, trees):
    """The API over the client app's store, with its Celery app (cancel revokes) and a token."""
    store = get_state(client_app).store
    builder = StoreBuilder(store)  # rows no worker would make: held children on a SQL-looking queue
    builder.job("nasty-root", task="tests.parent", queue=NASTY_QUEUE)
    builder.spawn("nasty-root", 3, operation="nasty-op", states=["held"], queue=NASTY_QUEUE, handler="nasty")
    builder.flush()
    flask_app = create_app(client_app, token=TOKEN)
    yield flask_app.test_client()
    web_state(flask_app).store.dispose()


def call(client, path: str, method: str = "GET", token: str | None = TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.open(path, method=method, headers=headers)
    assert response.mimetype == "application/json", (path, response.status_code, response.data[:200])
    body = response.get_json()
    assert "Traceback" not in response.get_data(as_text=True)
    return response.status_code, body


def ok(client, path: str, method: str = "GET"):
    status, body = call(client, path, method)
    assert status == 200, (path, status, body)
    return body


# ---- reads --------------------------------------------------------------------------------------
def test_operations(web, trees):
    listed = ok(web, "/api/spawn/operations")
    assert listed["limit"] == 50 and listed["count"] == len(listed["operations"])
    dataset = next(op for op in listed["operations"] if op["id"] == trees.dataset_op)
    assert dataset["parent_id"] == trees.dataset and dataset["handler"] == "dataset_processor"
    assert dataset["queue"] == trees.queue and dataset["state"] == "succeeded" and dataset["completed"] is True
    assert dataset["counts"] == {"succeeded": 11}
    assert dataset["progress"] == {"done": 11, "total": 11, "percent": 100.0}
    assert dataset["created_at"].endswith("Z") and dataset["finished_at"].endswith("Z")
    # 1 dataset + 7 nested spawns + 1 workflow + 1 refused + 1 nasty, newest first
    assert len(listed["operations"]) == 11
    created = [datetime.fromisoformat(op["created_at"].replace("Z", "+00:00")) for op in listed["operations"]]
    assert created == sorted(created, reverse=True)

    assert ok(web, "/api/spawn/operations?limit=2")["count"] == 2
    failed = ok(web, "/api/spawn/operations?state=failed")["operations"]
    assert [op["parent_id"] for op in failed] == [trees.refused]
    assert "too many spawn failures" in failed[0]["error"] and failed[0]["counts"] == {}
    by_queue = ok(web, f"/api/spawn/operations?queue={trees.queue}&limit=100")["operations"]
    assert len(by_queue) == 10 and "nasty-op" not in {op["id"] for op in by_queue}
    assert ok(web, "/api/spawn/operations?queue=no-such-queue")["operations"] == []


def test_queue_names_are_data(web):
    from urllib.parse import quote

    listed = ok(web, f"/api/spawn/operations?queue={quote(NASTY_QUEUE)}")["operations"]
    assert [(op["id"], op["queue"]) for op in listed] == [("nasty-op", NASTY_QUEUE)]
    stats = ok(web, f"/api/spawn/stats?queue={quote(NASTY_QUEUE)}")
    assert stats["operations"] == 1 and stats["by_queue"][0]["queue"] == NASTY_QUEUE
    assert stats["children_by_state"] == {"held": 3}


def test_operation_detail(web, trees):
    detail = ok(web, f"/api/spawn/operations/{trees.dataset_op}")
    assert detail["id"] == trees.dataset_op and detail["total"] == 11
    assert [child["id"] for child in detail["children"]] == trees.dataset_children
    assert [child["position"] for child in detail["children"]] == list(range(11))
    assert {child["task_name"] for child in detail["children"]} == {"tests.process_chunk"}
    assert all(child["state"] == "succeeded" and child["finished_at"] for child in detail["children"])
    assert detail["children_shown"] == 11 and detail["counts"] == {"succeeded": 11}
    assert detail["config"]["batch_size"] == 7 and detail["on_complete"] is None

    workflow = ok(web, f"/api/spawn/operations/{default_operation_id(trees.workflow)}")
    assert [child["task_name"] for child in workflow["children"]] == ["tests.workflow_step"] * 3

    refused = ok(web, f"/api/spawn/operations/{trees.refused_op}")
    assert refused["state"] == "failed" and refused["children"] == [] and refused["progress"]["percent"] is None

    status, body = call(web, "/api/spawn/operations/no-such-operation")
    assert status == 404 and body == {"error": "no spawn operation has id 'no-such-operation'"}


def test_spawn_tree(web, trees):
    answer = ok(web, f"/api/jobs/{trees.nested}/spawn-tree")
    assert answer["job_id"] == trees.nested and answer["format"] == "json" and answer["max_depth"] == 10
    assert answer["summary"] == {"jobs": 15, "levels": 4, "hidden": 0, "states": {"succeeded": 15}}
    root = answer["tree"]
    assert root["id"] == trees.nested and root["task_name"] == "tests.nest" and root["depth"] == 0
    assert [len(root["children"]), len(root["children"][0]["children"])] == [2, 2]
    leaves = root["children"][0]["children"][0]["children"]
    assert [leaf["task_name"] for leaf in leaves] == ["tests.square", "tests.square"]
    assert [leaf["position"] for leaf in leaves] == [0, 1] and leaves[0]["depth"] == 3
    assert all("hidden_children" not in node for node in root["children"])

    cut = ok(web, f"/api/jobs/{trees.nested}/spawn-tree?max_depth=1")
    assert cut["summary"]["jobs"] == 3 and cut["summary"]["hidden"] == 4
    assert [child["hidden_children"] for child in cut["tree"]["children"]] == [2, 2]
    assert ok(web, f"/api/jobs/{trees.deepest}/spawn-tree?max_depth=0")["tree"]["children"] == []

    mermaid = ok(web, f"/api/jobs/{trees.nested}/spawn-tree?format=mermaid&max_depth=1")
    assert set(mermaid) == {"job_id", "format", "max_depth", "summary", "mermaid"}
    assert mermaid["mermaid"].startswith("graph TD\n") and trees.nested[:8] in mermaid["mermaid"]
    assert "-.->" in mermaid["mermaid"]  # the hidden children

    status, body = call(web, f"/api/jobs/{trees.dataset_op}/spawn-tree")
    assert status == 404 and "that is an operation id" in body["error"]


def test_children_and_parent(web, trees):
    direct = ok(web, f"/api/jobs/{trees.dataset}/children")
    assert [c["id"] for c in direct["children"]] == trees.dataset_children
    assert direct["count"] == 11 and direct["truncated"] is False and direct["depth"] == 1
    assert {c["distance"] for c in direct["children"]} == {1}

    everything = ok(web, f"/api/jobs/{trees.nested}/children?depth=3")
    assert everything["count"] == 14
    assert [c["distance"] for c in everything["children"]] == [1] * 2 + [2] * 4 + [3] * 8
    squares = ok(web, f"/api/jobs/{trees.nested}/children?depth=3&state=succeeded&limit=5")
    assert squares["count"] == 5 and squares["truncated"] is True and squares["state"] == "succeeded"
    assert ok(web, f"/api/jobs/{trees.nested}/children?state=failed")["children"] == []

    parent = ok(web, f"/api/jobs/{trees.deepest}/parent")
    assert parent["job_id"] == trees.deepest and parent["parent"]["id"] == trees.middle
    assert parent["parent"]["task_name"] == "tests.nest" and parent["parent"]["depth"] == 2
    assert ok(web, f"/api/jobs/{trees.nested}/parent")["parent"] is None

    for path in ("children", "parent"):
        status, body = call(web, f"/api/jobs/unknown-job/{path}")
        assert status == 404 and body["error"] == "no spawned job has id 'unknown-job'"


def test_stats(web, trees):
    stats = ok(web, "/api/spawn/stats")
    assert stats["window"]["hours"] == 24
    assert stats["operations"] == 11 and stats["children"] == 11 + 14 + 3 + 3
    assert stats["children_by_state"] == {"held": 3, "succeeded": 28}
    assert stats["operations_by_state"]["failed"] == 1
    handlers = {group["handler"]: group for group in stats["by_handler"]}
    assert handlers["dataset_processor"]["children"] == 11 and handlers["nested"]["operations"] == 7
    assert stats["durations"]["child_avg_seconds"] is not None

    mine = ok(web, f"/api/spawn/stats?queue={trees.queue}&hours=1.5")
    assert mine["queue"] == trees.queue and mine["window"]["hours"] == 1.5 and mine["operations"] == 10
    assert ok(web, "/api/spawn/stats?hours=0.000001")["operations"] == 0


@pytest.mark.parametrize("path", [
    "/api/spawn/operations?limit=0",
    "/api/spawn/operations?limit=10001",
    "/api/spawn/operations?limit=ten",
    "/api/spawn/operations?limit=-1",
    "/api/spawn/operations?limit=1.5",
    "/api/spawn/operations?limit=1&limit=2",
    "/api/spawn/operations?state=exploded",
    "/api/spawn/operations?queue=",
    "/api/spawn/operations?queue=a%00b",
    f"/api/spawn/operations?queue={'q' * 256}",
    "/api/spawn/operations?lmit=5",
    "/api/spawn/operations/bad%20id",
    "/api/spawn/operations/" + "x" * 65,
    "/api/spawn/stats?hours=0",
    "/api/spawn/stats?hours=-3",
    "/api/spawn/stats?hours=nan",
    "/api/spawn/stats?hours=inf",
    "/api/spawn/stats?hours=1e9",
    "/api/jobs/some-job/spawn-tree?format=dot",
    "/api/jobs/some-job/spawn-tree?max_depth=1001",
    "/api/jobs/some-job/spawn-tree?max_depth=-1",
    "/api/jobs/some%27%3B%20DROP%20TABLE%20spawn_jobs/spawn-tree",
    "/api/jobs/some-job/children?depth=0",
    "/api/jobs/some-job/children?state=running",
    "/api/jobs/some-job/children?limit=0",
    "/api/jobs/some-job/parent?x=1",
])
def test_bad_parameters_answer_400(web, path):
    status, body = call(web, path)
    assert status == 400 and set(body) == {"error"} and body["error"], body


def test_unknown_routes_and_methods_answer_json(web):
    status, body = call(web, "/api/nothing-here")
    assert status == 404 and "error" in body
    response = web.delete("/api/spawn/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405 and response.get_json()["error"]
    assert "GET" in response.headers["Allow"]


# ---- cancel -------------------------------------------------------------------------------------
def sleepers(client_app, count: int = 5, seconds: float = 1.0):
    """A running tree: `count` sleeping children, the last three held behind the first."""
    parent = client_app.signature("tests.spawner", kwargs={
        "count": count, "seconds": seconds, "_spawn_config": {"handler": "sleepers"}}).delay()
    parent.get(timeout=TIMEOUT)
    store = get_state(client_app).store

    def started():
        with store.read() as conn:
            rows = queries.children(conn, parent.id)
        return len(rows) == count and any(r["state"] == "started" for r in rows) and rows

    wait_for(started, TIMEOUT, what="a started sleeper")
    return parent.id, default_operation_id(parent.id)


def operation_done(client_app, operation_id: str) -> dict:
    store = get_state(client_app).store

    def done():
        with store.read() as conn:
            found = queries.get_operation(conn, operation_id)
        return found if found and found["completed"] else None

    return wait_for(done, TIMEOUT, what=f"operation {operation_id} to complete")


def test_cancel_through_celery(web, client_app):
    _parent, operation_id = sleepers(client_app)
    result = ok(web, f"/api/spawn/operations/{operation_id}/cancel?terminate=true", method="POST")
    assert result["mode"] == "celery" and result["note"] is None and result["terminate"] is True
    assert result["operation_id"] == operation_id and operation_id in result["operations"]
    assert result["cancelled"] == 3 and result["revoked"] >= 1
    finished = operation_done(client_app, operation_id)
    assert finished["state"] in ("cancelled", "partially_failed")
    assert finished["counts"].get("cancelled") == 3
    assert all(child["state"] != "held" for child in finished["children"])

    status, body = call(web, "/api/spawn/operations/no-such-op/cancel", method="POST")
    assert status == 404 and "no-such-op" in body["error"]


def test_cancel_in_the_store_only(client_app, backend):
    """A server without a Celery app cancels the children never dispatched, and says what it did not do."""
    flask_app = create_app(database_url=backend.database_url, token=TOKEN)
    try:
        _parent, operation_id = sleepers(client_app, count=5, seconds=1.0)
        status, result = call(flask_app.test_client(), f"/api/spawn/operations/{operation_id}/cancel", "POST")
        assert status == 200 and result["mode"] == "store" and "no Celery app" in result["note"]
        assert result["cancelled"] == 3 and result["revoked"] == 0 and result["still_running"] == 2
        finished = operation_done(client_app, operation_id)  # the worker completes it when its sleepers end
        assert finished["counts"] == {"succeeded": 2, "cancelled": 3}
        assert finished["state"] == "partially_failed"
        held = [child for child in finished["children"] if child["state"] == "cancelled"]
        assert [child["started_at"] for child in held] == [None] * 3  # they never ran
        assert {child["error"] for child in held} == {"cancelled from the web API"}
    finally:
        web_state(flask_app).store.dispose()


# ---- labels -------------------------------------------------------------------------------------
def test_a_label_names_its_newest_operation(sqlite_url):
    """Two parents' spawns labelled ``nightly``: the operation endpoints take the label and count the others."""
    from datetime import timedelta

    from celery_spawn.store import SpawnStore

    store = SpawnStore(sqlite_url)
    builder = StoreBuilder(store)
    for parent, operation, minutes in (("p1", "nightly", 10), ("p2", "nightly~0a1b2c3d", 5)):
        builder.job(parent, task="tests.parent")
        builder.spawn(parent, 2, operation=operation, label="nightly", states=["pending", "held"],
                      created=builder.now - timedelta(minutes=minutes))
    builder.job("p3", task="tests.parent")
    builder.spawn("p3", 1, operation="plain-op")
    builder.flush()
    store.dispose()
    flask_app = create_app(database_url=sqlite_url, token=TOKEN)
    client = flask_app.test_client()
    try:
        listed = ok(client, "/api/spawn/operations?operation=nightly")["operations"]
        assert [(op["id"], op["label"]) for op in listed] == [("nightly~0a1b2c3d", "nightly"), ("nightly", "nightly")]
        assert [op["label"] for op in ok(client, "/api/spawn/operations?operation=plain-op")["operations"]] == [None]
        detail = ok(client, "/api/spawn/operations/nightly")
        assert (detail["id"], detail["label"], detail["others"], detail["parent_id"]) == (
            "nightly~0a1b2c3d", "nightly", 1, "p2")
        assert ok(client, "/api/spawn/operations/nightly~0a1b2c3d")["others"] == 0
        assert ok(client, "/api/spawn/operations/plain-op")["label"] is None
        result = ok(client, "/api/spawn/operations/nightly/cancel", method="POST")
        assert (result["operation_id"], result["label"], result["others"]) == ("nightly~0a1b2c3d", "nightly", 1)
        assert result["mode"] == "store" and result["cancelled"] == 2
        assert ok(client, "/api/spawn/operations/nightly~0a1b2c3d")["counts"] == {"cancelled": 2}
        counts = {op["id"]: op["counts"] for op in ok(client, "/api/spawn/operations?operation=nightly")["operations"]}
        assert counts == {"nightly~0a1b2c3d": {"cancelled": 2}, "nightly": {"pending": 1, "held": 1}}
        status, body = call(client, "/api/spawn/operations/p1/cancel", "POST")
        assert status == 404 and "p1" in body["error"]  # a job id is not an operation here
        status, body = call(client, "/api/spawn/operations?operation=" + "x" * 65)
        assert status == 400 and "operation" in body["error"]
    finally:
        web_state(flask_app).store.dispose()


# ---- what never reaches a client ----------------------------------------------------------------
def test_store_down_answers_503_without_the_url(tmp_path):
    flask_app = create_app(database_url="postgresql+psycopg2://spawn:hunter2@127.0.0.1:9/spawn_db", token=None)
    response = flask_app.test_client().get("/api/spawn/operations")
    text = response.get_data(as_text=True)
    assert response.status_code == 503 and response.get_json() == {"error": "the spawn store is unavailable"}
    for secret in ("hunter2", "postgresql", "127.0.0.1", "spawn_db", "Traceback"):
        assert secret not in text

    empty = create_app(database_url=f"sqlite:///{tmp_path / 'empty.sqlite3'}")  # no tables: never created here
    response = empty.test_client().get("/api/jobs/x/spawn-tree")
    assert response.status_code == 503 and "SELECT" not in response.get_data(as_text=True)
    web_state(flask_app).store.dispose()
    web_state(empty).store.dispose()


def test_a_crash_answers_a_bare_500(tmp_path):
    flask_app = create_app(database_url=f"sqlite:///{tmp_path / 's.sqlite3'}")

    @flask_app.get("/api/boom")
    def boom():
        raise RuntimeError("secret detail: SELECT * FROM spawn_jobs")

    response = flask_app.test_client().get("/api/boom")
    assert response.status_code == 500 and response.get_json() == {"error": "internal server error"}
    assert "secret" not in response.get_data(as_text=True)
    web_state(flask_app).store.dispose()


def test_openapi_describes_every_column():
    from celery_spawn.web.openapi import document, untyped_fields

    assert untyped_fields() == []
    doc = document(token_required=False)
    assert set(doc["paths"]) == {
        "/api/spawn/operations", "/api/spawn/operations/{operation_id}", "/api/spawn/operations/{operation_id}/cancel",
        "/api/spawn/stats", "/api/jobs/{job_id}/spawn-tree", "/api/jobs/{job_id}/children",
        "/api/jobs/{job_id}/parent", "/api/openapi.json", "/"}
    json.dumps(doc)


def test_mounted_under_a_prefix(sqlite_url):
    """The app factory inside another WSGI application, as docs/web.md shows: every URL is relative to the mount."""
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from celery_spawn.store import SpawnStore

    store = SpawnStore(sqlite_url)
    builder = StoreBuilder(store)
    builder.job("root", task="tests.parent")
    builder.spawn("root", 2)
    builder.flush()
    store.dispose()

    main = Flask("main")
    main.add_url_rule("/", "home", lambda: "the main application")
    spawn_app = create_app(database_url=sqlite_url, token=TOKEN)
    main.wsgi_app = DispatcherMiddleware(main.wsgi_app, {"/spawn": spawn_app})  # type: ignore[method-assign]
    client = main.test_client()
    assert client.get("/").get_data(as_text=True) == "the main application"
    page = client.get("/spawn/")
    assert page.status_code == 200 and b'href="static/dashboard.css"' in page.data
    assert b'src="static/dashboard.js"' in page.data and "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert client.get("/spawn/static/dashboard.js").status_code == 200
    assert client.get("/spawn").status_code in (301, 308)  # to /spawn/, so that relative URLs resolve
    tree = client.get("/spawn/api/jobs/root/spawn-tree", headers={"Authorization": f"Bearer {TOKEN}"}).get_json()
    assert tree["summary"]["jobs"] == 3
    assert client.get("/spawn/api/spawn/stats").status_code == 401
    web_state(spawn_app).store.dispose()
