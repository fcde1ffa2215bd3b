"""`celery spawn cancel` against a tree a real worker is running."""
from __future__ import annotations

import json

from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from tests.harness import wait_for
from tests.integration.helpers import TIMEOUT, children_of, fails, ok, wait_children, wait_operation_done


def test_cancel_stops_a_running_tree_from_the_command_line(backend, worker, client_app):
    parent = client_app.signature("tests.spawner", kwargs={
        "count": 10, "seconds": 5, "_spawn_config": {"handler": "sleepers"}}).delay()
    parent.get(timeout=TIMEOUT)
    wait_children(client_app, parent.id, 10)
    wait_for(lambda: any(r["state"] == "started" for r in children_of(client_app, parent.id)), TIMEOUT,
             what="a started child")
    operation_id = default_operation_id(parent.id)
    out = ok(backend, "cancel", operation_id, "--terminate", "--format", "json")
    result = json.loads(out)
    assert result["cancelled"] == 3 and result["revoked"] >= 1
    operation = wait_operation_done(client_app, parent.id)
    assert operation["state"] in ("cancelled", "partially_failed")
    assert all(r["state"] in s.FINAL_JOB_STATES for r in children_of(client_app, parent.id))
    again = ok(backend, "cancel", parent.id)
    assert again.strip() == f"cancelled 0 waiting and revoked 0 running jobs below {parent.id}"


def test_cancel_refuses_unknown_and_malformed_ids(backend, worker):
    assert "no spawned job or operation has id" in fails(backend, 1, "cancel", "no-such-job")
    fails(backend, 2, "cancel", "bad id; DROP TABLE spawn_jobs")


def test_cancel_needs_the_app(backend, worker):
    assert "-A" in fails(backend, 2, "cancel", "anything", app=None)
