"""Children published by celery-spawn are the messages Celery itself sends for them.

The reference is ``Task.apply_async`` with the same id, parent, root,
headers and options, published to the same memory broker; everything but
kombu's per-message delivery tag must be equal.
"""
from __future__ import annotations

import uuid

import pytest
from celery import Celery
from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.utils.json import dumps

from celery_spawn.engine.messages import fast_saferepr
from celery_spawn.engine.publisher import Publisher

HOSTILE = ["", "'", '"', "\\", "\\'", "a\nb", "tab\there", "\x00\x01", "é\u2028", "\U0001f600", "' + '", "%s{}"]


@pytest.fixture
def app():
    app = Celery("messages", broker="memory://", set_as_current=False)
    queue = f"msg-{uuid.uuid4().hex[:8]}"
    app.conf.update(task_default_queue=queue)

    @app.task(name="m.plain", shared=False)
    def plain(*args, **kwargs):
        return None

    @app.task(name="m.limited", shared=False, time_limit=30, soft_time_limit=20, ignore_result=True)
    def limited(*args, **kwargs):
        return None

    app.test_queue = queue
    return app


def drain(app, queue):
    messages = []
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        try:
            while True:
                try:
                    message = simple.get(block=False)
                except simple.Empty:
                    return messages
                message.ack()
                messages.append(message)
        finally:
            simple.close()


def not_here(*args, **kwargs):
    raise AssertionError("published through Celery's own path, not the direct one")


def shape(message) -> dict:
    properties = {k: v for k, v in message.properties.items() if k not in ("delivery_tag", "delivery_info")}
    return {"headers": message.headers, "properties": properties, "body": message.body,
            "content_type": message.content_type, "content_encoding": message.content_encoding,
            "routing_key": message.delivery_info.get("routing_key"), "priority": message.properties.get("priority")}


CASES = [
    ("m.plain", ["x"], {}, {}),
    ("m.plain", [], {}, {}),
    ("m.plain", [1, 2.5, True, None], {"k": "v", "n": 3}, {"priority": 7}),
    ("m.plain", HOSTILE, {s or "empty": s for s in HOSTILE}, {}),
    ("m.plain", [[1, [2, [3, [4]]]], {"deep": {"er": {"est": 1}}}], {"nested": [{"a": [1]}]}, {}),
    ("m.plain", ["x" * 5000], {"long": "y" * 2000}, {}),
    ("m.limited", ["limits"], {}, {"queue": "other-queue"}),
    ("m.plain", ["own header"], {}, {"headers": {"custom": "value", "spawn_depth": 2}}),
    ("m.unregistered", [1], {}, {}),
]


@pytest.mark.parametrize("name,args,kwargs,options", CASES)
def test_a_published_child_is_what_apply_async_sends(app, name, args, kwargs, options, monkeypatch):
    queue = options.get("queue", app.test_queue)
    options = dict(options)
    headers = {"spawn_operation": "op", "spawn_depth": 1, **options.pop("headers", {})}
    stored = {"task": name, "args": args, "kwargs": kwargs, "options": {**options, "headers": headers}}
    children = [{"id": f"child-{i}", "parent_id": "parent", "root_id": "root", "message": dumps(stored)}
                for i in range(3)]
    with monkeypatch.context() as patched:  # these are all plain children on direct queues: the direct path
        patched.setattr(Publisher, "_send_task_message", not_here)
        patched.setattr(app, "send_task", not_here)
        assert Publisher(app).publish(children) == [c["id"] for c in children]
    ours = [shape(m) for m in drain(app, queue)]

    for child in children:
        app.signature(name, args=args, kwargs=kwargs).apply_async(
            task_id=child["id"], parent_id="parent", root_id="root", headers=headers, add_to_parent=False,
            **options)
    theirs = [shape(m) for m in drain(app, queue)]
    assert len(ours) == len(theirs) == 3
    for mine, reference in zip(ours, theirs):
        if name == "m.unregistered":  # send_task leaves ignore_result unset for a task it does not know
            reference["headers"]["ignore_result"] = False
        assert mine == reference


def test_siblings_with_different_arguments_each_get_their_own(app):
    children = [{"id": f"c{i}", "parent_id": "p", "root_id": None,
                 "message": dumps({"task": "m.plain", "args": [i], "kwargs": {"i": i}, "options": {}})}
                for i in range(4)]
    Publisher(app).publish(children)
    messages = drain(app, app.test_queue)
    assert [m.headers["argsrepr"] for m in messages] == [f"({i},)" for i in range(4)]
    assert [m.decode()[0] for m in messages] == [[i] for i in range(4)]
    assert [m.headers["root_id"] for m in messages] == ["c0", "c1", "c2", "c3"]  # no root: its own id


def test_a_publisher_keeps_its_plans_between_calls_and_each_thread_its_own_reply_to(app, monkeypatch):
    """A hop publishes one message per call: the kind's plan (Celery's header building) is made once."""
    import threading

    made = []
    original = app.amqp.as_task_v2
    monkeypatch.setattr(app.amqp, "as_task_v2", lambda *a, **k: made.append(a[1]) or original(*a, **k))
    publisher = Publisher(app)
    stored = dumps({"task": "m.plain", "args": ["x"], "kwargs": {}, "options": {}})
    for i in range(3):
        publisher.publish([{"id": f"hop-{i}", "parent_id": "p", "root_id": "r", "message": stored}])
    assert made == ["m.plain"]
    other = threading.Thread(target=publisher.publish,
                             args=([{"id": "elsewhere", "parent_id": "p", "root_id": "r", "message": stored}],))
    other.start()
    other.join()
    assert made == ["m.plain", "m.plain"]  # another thread: its own builder
    messages = {m.headers["id"]: m for m in drain(app, app.test_queue)}
    assert sorted(messages) == ["elsewhere", "hop-0", "hop-1", "hop-2"]
    assert messages["hop-2"].properties["correlation_id"] == "hop-2"
    assert messages["hop-0"].properties["reply_to"] == messages["hop-2"].properties["reply_to"]
    assert messages["elsewhere"].properties["reply_to"] != messages["hop-0"].properties["reply_to"]


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=40), st.text(alphabet="'\"\\\n\t ", max_size=10))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.tuples(scalars), st.lists(scalars, max_size=6).map(tuple), st.lists(scalars, max_size=6),
                 st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), scalars, max_size=6),
                 st.lists(st.lists(scalars, max_size=2), max_size=3).map(tuple)),
       st.integers(min_value=1, max_value=120), st.sampled_from([None, 0, 1, 2, 3]))
def test_fast_saferepr_is_saferepr(value, maxlen, maxlevels):
    assert fast_saferepr(value, maxlen, maxlevels) == saferepr(value, maxlen, maxlevels=maxlevels)
