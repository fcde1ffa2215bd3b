"""Publishing recorded children through Celery, a page of them per producer batch.

A spawn knows all its children at once, so it publishes them through one
producer inside kombu's ``Producer.batch()`` (pipelined on Redis) and skips
the per-message work a ``group`` pays for: the result-backend subscription
and the queue declaration, which happen once per page instead. Children with
unusual options (countdown, eta, expires, links, ...) go through
``app.send_task`` unchanged, so every Celery option keeps its meaning.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from kombu.utils.json import loads

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

#: Options the fast path handles itself; anything else takes ``app.send_task``.
_FAST_OPTIONS = frozenset({"queue", "priority", "headers", "routing_key", "exchange"})


def decode_message(raw: str) -> dict[str, Any]:
    return loads(raw)


def publish_children(app: Celery, children: Sequence[dict]) -> list[str]:
    """Publish each stored child message; returns the ids that reached the broker.

    ``children`` rows carry ``id``, ``parent_id``, ``root_id`` and ``message``
    (the JSON form made by the spawner). Ids are explicit, so a message that is
    published twice after a crash is recognised by the child's claim.
    """
    if not children:
        return []
    if app.conf.task_always_eager:
        return _apply_eagerly(app, children)
    fast = not app.conf.task_send_sent_event
    published: list[str] = []
    declared: set[str] = set()
    with app.producer_or_acquire() as producer, producer.batch(max_size=max(1, len(children))):
        for child in children:
            message = decode_message(child["message"])
            options = message.get("options") or {}
            if fast and options.keys() <= _FAST_OPTIONS:
                _publish_fast(app, producer, child, message, declared)
            else:
                app.send_task(
                    message["task"], args=message.get("args") or (), kwargs=message.get("kwargs") or {},
                    task_id=child["id"], producer=producer, parent_id=child["parent_id"],
                    root_id=child["root_id"], add_to_parent=False, **options,
                )
            published.append(child["id"])
    return published


def _publish_fast(app: Celery, producer: Any, child: dict, message: dict, declared: set[str]) -> None:
    """What ``send_task`` does for a plain message, minus per-message subscription and declaration."""
    amqp = app.amqp
    name = message["task"]
    args = tuple(message.get("args") or ())
    kwargs = message.get("kwargs") or {}
    options = dict(message.get("options") or {})
    headers = options.pop("headers", None)
    task_type = app.tasks.get(name)
    time_limit = soft_time_limit = None
    ignore_result = False
    if task_type is not None:
        defaults = {k: v for k, v in task_type._get_exec_options().items() if v is not None}
        options = {**defaults, **options}
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        options.pop("expires", None)
        ignore_result = bool(options.pop("ignore_result", task_type.ignore_result))
    routed = amqp.router.route(options, name, args, kwargs, task_type)
    queue = routed.get("queue")
    queue_name = getattr(queue, "name", None)
    if queue is not None and queue_name not in declared:
        producer.maybe_declare(queue)
        declared.add(queue_name)
    task_message = amqp.as_task_v2(
        child["id"], name, args, kwargs,
        parent_id=child["parent_id"], root_id=child["root_id"],
        time_limit=time_limit, soft_time_limit=soft_time_limit,
        reply_to=app.thread_oid, ignore_result=ignore_result,
    )
    if _plain_direct(routed) and not _publish_signals_connected():
        # What send_task_message does for a direct queue with no publish signals connected,
        # without its per-message retry wrapper (the batch flushes as one pipeline).
        message_headers, properties, body, _ = task_message
        if headers:
            message_headers.update(headers)
        conf = app.conf
        producer.publish(
            body, exchange="", routing_key=queue_name, headers=message_headers,
            serializer=conf.task_serializer, compression=conf.task_compression,
            delivery_mode=_delivery_mode(queue, conf), priority=routed.get("priority"),
            retry=False, **properties,
        )
        return
    amqp.send_task_message(producer, name, task_message, headers=headers, declare=[], **routed)


def _plain_direct(routed: dict) -> bool:
    queue = routed.get("queue")
    exchange_type = getattr(getattr(queue, "exchange", None), "type", None)
    return (queue is not None and exchange_type == "direct" and not routed.get("exchange_type")
            and set(routed) <= {"queue", "priority", "exchange", "routing_key"})


def _publish_signals_connected() -> bool:
    from celery import signals

    return bool(signals.before_task_publish.receivers or signals.after_task_publish.receivers
                or signals.task_sent.receivers)


def _delivery_mode(queue: Any, conf: Any) -> Any:
    from kombu.entity import PERSISTENT_DELIVERY_MODE

    mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None)
    return mode or conf.task_default_delivery_mode or PERSISTENT_DELIVERY_MODE


def _apply_eagerly(app: Celery, children: Sequence[dict]) -> list[str]:
    """Eager mode (tests): run each child in-process, as ``apply_async`` would."""
    done: list[str] = []
    for child in children:
        message = decode_message(child["message"])
        options = dict(message.get("options", {}))
        task = app.tasks[message["task"]]
        task.apply(
            args=message.get("args") or (),
            kwargs=message.get("kwargs") or {},
            task_id=child["id"],
            headers=options.get("headers"),
        )
        done.append(child["id"])
    return done
