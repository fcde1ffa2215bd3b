"""``on_complete`` exactly once, with real prefork workers on Redis and PostgreSQL.

The broker may hand a callback's message out twice (Redis restores an
unacknowledged message by the clock of whichever worker looks; RabbitMQ
redelivers after a lost connection), and may lose one it already accepted
(a consumer killed between taking it off the list and recording it as
unacknowledged). Every delivery claims the callback's start in the store, so
a second one is dropped; a callback sent and never started while its queue
stands idle is sent again by the recovery sweep.
"""
from __future__ import annotations

import dataclasses
import time

import pytest

from celery_spawn import get_state
from celery_spawn.engine.completion import completion_task_id
from celery_spawn.handlers import default_operation_id
from celery_spawn.protocol import HEADER_CALLBACK
from celery_spawn.store import schema as s
from tests.app import callbacks
from tests.harness import wait_for
from tests.reliability.app import REDELIVER_AFTER
from tests.reliability.helpers import callback_rows, drop_message, new_queue, operation, redis_crash_rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory, postgres_url):
    with redis_crash_rig(tmp_path_factory, postgres_url) as (backend, app, _):
        with get_state(app).store.begin() as conn:  # (tests.record_callback creates it on its first run)
            callbacks.create(conn, checkfirst=True)
        yield backend, app


def spawn_with_callback(app, callback_queue: str | None = None) -> tuple[object, str]:
    options = {"queue": callback_queue} if callback_queue else {}
    config = {"on_complete": dict(app.signature("tests.record_callback", **options))}
    parent = app.signature("rel.fanout", kwargs={"count": 2, "_spawn_config": config}).delay()
    return parent, default_operation_id(parent.id)


def test_an_on_complete_delivered_again_never_runs_again(rig, start_worker):
    backend, app = rig
    worker = start_worker(backend, "twice")
    parent, operation_id = spawn_with_callback(app)
    wait_for(lambda: callback_rows(app, operation_id), 60, what="the on_complete callback")
    wait_for(lambda: (operation(app, parent.id) or {}).get("callback_run") == s.CALLBACK_ENDED, 30,
             what="the callback's run to be recorded as ended")
    # The same message once more, as a broker that hands it out again delivers it.
    app.signature("tests.record_callback", args=({"operation_id": operation_id},)).apply_async(
        task_id=completion_task_id(operation_id), headers={HEADER_CALLBACK: operation_id}, queue=backend.queue)
    wait_for(lambda: f"the on_complete of operation {operation_id} already ran" in worker.log(), 30,
             what="the second delivery to be dropped")
    time.sleep(1)
    assert len(callback_rows(app, operation_id)) == 1


def test_an_on_complete_the_broker_lost_is_sent_again_and_runs_once(rig, start_worker):
    """The callback goes to a queue of its own that no worker reads yet; its message is taken away there.
    A worker that reads that queue starts, the queue stands idle, and the sweep sends the callback again."""
    backend, app = rig
    callback_queue = new_queue()
    worker = start_worker(backend, "children")
    parent, operation_id = spawn_with_callback(app, callback_queue)
    wait_for(lambda: (operation(app, parent.id) or {}).get("callback_state") == s.CALLBACK_SENT, 60,
             what="the on_complete callback to be sent")
    assert drop_message(backend.broker, callback_queue, completion_task_id(operation_id))
    reader = start_worker(dataclasses.replace(backend, queue=callback_queue), "callbacks")
    wait_for(lambda: callback_rows(app, operation_id), REDELIVER_AFTER + 60, what="the callback sent again")
    time.sleep(3)  # a second run would show now
    assert len(callback_rows(app, operation_id)) == 1
    logs = worker.log() + reader.log()
    assert f"published again the on_complete callback of operation {operation_id}" in logs
    got = operation(app, parent.id)
    assert (got["callback_run"], got["callback_sends"]) == (s.CALLBACK_ENDED, 2)
