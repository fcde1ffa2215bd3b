"""A label shared by the spawns of several parents, on real workers: every parent's children run, and the
label stays queryable (``celery spawn list --operation``, ``tree``, ``cancel``, the Python API).

Runs on each broker/store combination (the ``backend`` fixture). The tests run in file order on one
label: two parents spawn under it, a redelivery changes nothing, and a third, running, parent is
the newest that ``cancel`` stops.
"""
from __future__ import annotations

import json
import types
import uuid

import pytest

from celery_spawn import completion_task_id, resolve_operation
from celery_spawn.handlers import labelled_operation_id
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.integration.helpers import (
    TIMEOUT,
    callback_rows,
    children_of,
    ok,
    on_complete,
    results_of,
    run,
    store_rows,
    wait_children,
)

#: The callbacks table exists on the client app's store (the fixture is in tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("callback_table")


def succeeded_count(worker, task_name: str, task_id: str) -> int:
    return worker.log().count(f"Task {task_name}[{task_id}] succeeded")


def labelled(app, label: str) -> list[dict]:
    """The operations with ``label``, oldest first."""
    return sorted(store_rows(app, s.operations, label=label), key=lambda op: (op["created_at"], op["id"]))


def wait_completed(app, operation_id: str) -> dict:
    return wait_for(lambda: (rows := store_rows(app, s.operations, id=operation_id)) and rows[0]["completed"]
                    and rows[0], TIMEOUT, what=f"operation {operation_id} to complete")


def numbers(app, label: str, values: list[int], parent_id: str, **config):
    """``tests.numbers`` under ``label``: it spawns a ``tests.square`` child per value."""
    sig = app.signature("tests.numbers", args=(values,),
                        kwargs={"_spawn_config": {"handler": "numbers", "operation_id": label, **config}})
    return sig, sig.apply_async(task_id=parent_id)


@pytest.fixture(scope="module")
def runs(worker, client_app):
    """Two parents, one after the other, spawning under the same label; returns once both trees ran."""
    label = f"nightly-{uuid.uuid4().hex[:8]}"
    first_id, second_id = f"{label}-first", f"{label}-second"
    _, first = numbers(client_app, label, [1, 2, 3], first_id)
    assert first.get(timeout=TIMEOUT) == [1, 2, 3]
    first_rows = wait_children(client_app, first_id, 3)
    wait_completed(client_app, label)
    second_sig, second = numbers(client_app, label, [4, 5], second_id, **on_complete(client_app))
    assert second.get(timeout=TIMEOUT) == [4, 5]
    second_rows = wait_children(client_app, second_id, 2)
    second_op = labelled_operation_id(label, second_id)
    wait_completed(client_app, second_op)
    return types.SimpleNamespace(label=label, first=first_id, second=second_id, first_op=label, second_op=second_op,
                                 first_rows=first_rows, second_rows=second_rows, second_sig=second_sig)


def test_a_second_parent_with_a_used_label_spawns_and_its_children_run(runs, client_app):
    assert results_of(client_app, runs.first_rows) == [1, 4, 9]
    assert results_of(client_app, runs.second_rows) == [16, 25]
    operations = labelled(client_app, runs.label)
    assert [(op["id"], op["parent_id"]) for op in operations] == [(runs.first_op, runs.first),
                                                                   (runs.second_op, runs.second)]
    assert runs.second_op.startswith(runs.label + "~")
    assert [op["state"] for op in operations] == ["succeeded", "succeeded"]
    assert {r["operation_id"] for r in runs.first_rows} == {runs.first_op}
    assert {r["operation_id"] for r in runs.second_rows} == {runs.second_op}


def test_the_python_api_resolves_the_label_for_completion_task_id(runs, client_app):
    found = resolve_operation(client_app, runs.label)
    assert (found["id"], found["label"], found["others"]) == (runs.second_op, runs.label, 1)
    callback = client_app.AsyncResult(completion_task_id(found["id"]))
    assert callback.get(timeout=TIMEOUT) == runs.second_op
    [row] = wait_for(lambda: callback_rows(client_app, runs.second_op), TIMEOUT, what="the callback row")
    assert json.loads(row["summary"])["counts"] == {"succeeded": 2}


def test_list_operation_shows_every_operation_of_the_label(runs, backend):
    listed = json.loads(ok(backend, "list", "--operation", runs.label, "-f", "json"))
    assert [(op["id"], op["label"], op["parent_id"]) for op in listed] == [
        (runs.second_op, runs.label, runs.second), (runs.first_op, runs.label, runs.first)]
    assert [op["progress"]["done"] for op in listed] == [2, 3]
    header, *rows = ok(backend, "list", "--operation", runs.label).splitlines()
    assert header.split()[:4] == ["CREATED", "(UTC)", "OPERATION", "LABEL"]
    assert [row.split()[2:5] for row in rows] == [[runs.second_op, runs.label, runs.second],
                                                  [runs.first_op, runs.label, runs.first]]
    by_id = json.loads(ok(backend, "list", "--operation", runs.second_op, "-f", "json"))
    assert [op["id"] for op in by_id] == [runs.second_op]


def test_tree_of_the_label_shows_the_newest_and_says_one_other(runs, backend):
    result = run(backend.env(), "tree", runs.label)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"tests.numbers  succeeded  {runs.second}")
    assert lines[-1] == "3 jobs, 2 levels (succeeded 3)"
    assert result.stderr.strip() == (f"label '{runs.label}' names 2 operations; showing the newest "
                                     f"({runs.second_op}), 1 other: celery spawn list --operation {runs.label}")
    as_json = run(backend.env(), "tree", runs.label, "-f", "json")
    tree = json.loads(as_json.stdout)  # the note stays on stderr
    assert tree["id"] == runs.second and [child["id"] for child in tree["children"]] == [
        row["id"] for row in runs.second_rows]


def test_a_redelivered_parent_with_the_label_spawns_once(runs, worker, client_app):
    """The second parent's message again (as after a crash): the same operation, no new child, none run twice."""
    runs.second_sig.apply_async(task_id=runs.second)
    wait_for(lambda: succeeded_count(worker, "tests.numbers", runs.second) == 2, TIMEOUT, what="the redelivery")
    assert [r["id"] for r in children_of(client_app, runs.second)] == [r["id"] for r in runs.second_rows]
    assert [op["id"] for op in labelled(client_app, runs.label)] == [runs.first_op, runs.second_op]
    for row in runs.second_rows:
        assert succeeded_count(worker, "tests.square", row["id"]) == 1


def test_cancel_of_the_label_stops_the_newest_operation(runs, backend, client_app):
    third_id = f"{runs.label}-third"
    client_app.signature("tests.spawner", kwargs={
        "count": 5, "seconds": 5, "_spawn_config": {"handler": "sleepers", "operation_id": runs.label}},
    ).apply_async(task_id=third_id).get(timeout=TIMEOUT)
    wait_children(client_app, third_id, 5)
    wait_for(lambda: any(r["state"] == "started" for r in children_of(client_app, third_id)), TIMEOUT,
             what="a started sleeper")
    third_op = labelled_operation_id(runs.label, third_id)
    result = run(backend.env(), "cancel", runs.label, "--terminate", "-f", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["operation_id"], body["label"], body["others"]) == (third_op, runs.label, 2)
    assert body["cancelled"] == 3 and body["revoked"] >= 1
    assert f"names 3 operations; cancelling the newest ({third_op}), 2 others" in result.stderr
    assert wait_completed(client_app, third_op)["state"] in ("cancelled", "partially_failed")
    assert [op["state"] for op in labelled(client_app, runs.label)[:2]] == ["succeeded", "succeeded"]
    assert all(r["state"] == "succeeded" for r in children_of(client_app, runs.first) + children_of(
        client_app, runs.second))


def test_a_label_no_tool_could_take_is_refused_and_the_refusal_is_listed(worker, backend, client_app):
    """One id grammar: a label outside it would be recorded and never shown or cancelled; it is refused at
    spawn time instead, the parent's result stands, and the refused operation is reachable."""
    parent = client_app.signature("tests.spawner", kwargs={
        "count": 2, "_spawn_config": {"handler": "sleepers", "operation_id": "tenant/42 report"}}).delay()
    assert parent.get(timeout=TIMEOUT) == "spawned"
    [operation] = wait_for(lambda: store_rows(client_app, s.operations, parent_id=parent.id), TIMEOUT,
                           what="the refused operation")
    assert operation["state"] == "failed" and "A-Z a-z 0-9" in operation["error"]
    assert store_rows(client_app, s.jobs, parent_id=parent.id) == []
    listed = json.loads(ok(backend, "list", "--format", "json", "--limit", "200"))
    assert operation["id"] in json.dumps(listed)
