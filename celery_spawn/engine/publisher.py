"""The one publisher: every message celery-spawn sends goes through :meth:`Publisher.publish`.

Children at spawn, dependents released by a finish, the sweep's
republishes and redeliveries, and the ``on_complete`` callback are all
rows handed to that one method, and :meth:`Publisher.headers` is the one
place where headers are added before a message leaves.

Recorded children go through Celery a page at a time.

A spawn knows all its children at once, so it publishes them through one
producer inside kombu's ``Producer.batch()`` (pipelined on Redis) and skips
the per-message work a ``group`` pays for: the result-backend subscription
and the queue declaration (once per page instead), and building each message
from scratch (see :mod:`celery_spawn.messages`). Children with unusual
options (countdown, eta, expires, links, ...) go through ``app.send_task``
unchanged, and exchanges or connected publish signals through Celery's
``send_task_message``, so every Celery option keeps its meaning.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from kombu.utils.json import loads

from .. import tracing
from ..protocol import HEADER_CALLBACK, HEADER_RECOVERED
from .messages import PLAIN_OPTIONS, MessageBuilder, Plan

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


def decode_message(raw: str) -> dict[str, Any]:
    return loads(raw)


#: Seconds an ``on_complete`` publish waits for an AMQP broker's confirm before it counts as not sent.
CONFIRM_TIMEOUT = 10.0
#: Connections with publisher confirms kept per process, for callbacks sent from several threads at once.
CONFIRMING_CONNECTIONS = 4


class Publisher:
    """Sends celery-spawn's messages for one app."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._confirms: bool | None = None  # whether the broker confirms publishes (decided on first use)
        self._confirming: tuple[int, Any] | None = None  # (pid, pool of connections with confirms)
        self._local = threading.local()  # each thread's MessageBuilder (its reply_to is the thread's own)

    def publish(self, children: Sequence[dict]) -> list[str]:
        """Publish each row's message; returns the ids that reached the broker.

        A row carries ``id``, ``parent_id``, ``root_id`` and either ``message``
        (the stored JSON form of a child: task, args, kwargs, options) or
        ``signature`` (a Celery signature, the ``on_complete`` callback). Ids
        are explicit, so a message published twice after a crash is
        recognised by the child's claim.
        """
        if not children:
            return []
        if any("signature" in child for child in children):
            return [self._apply_signature(child) for child in children]
        if self.app.conf.task_always_eager:
            return self._apply_eagerly(children)
        return self._publish_messages(children)

    def headers(self, child: dict) -> dict | None:
        """Headers added to a row's message as it leaves: the stored message carries the spawn headers, a
        row the recovery sweep sends (``recovered``) says so, so that the child claims its start before it
        runs, and a callback names its operation, whose store row every delivery claims its start in. The
        one place to add per-message headers, on every path."""
        headers: dict[str, Any] = {}
        if child.get("recovered"):
            headers[HEADER_RECOVERED] = 1
        if child.get("callback"):
            headers[HEADER_CALLBACK] = child["callback"]
        return headers or None

    def publish_callback(self, signature: Any, task_id: str, operation: dict, claimed: bool = True) -> None:
        """Publish ``operation``'s ``on_complete`` callback (already given its summary) under its
        deterministic id; ``claimed``: its message names the operation, whose run its deliveries claim."""
        self.publish([{"id": task_id, "parent_id": operation["parent_id"], "root_id": operation["root_id"],
                       "signature": signature, "callback": operation["id"] if claimed else None}])

    def _apply_signature(self, child: dict) -> str:
        signature = child["signature"]
        stored = signature.options.get("headers") or {}
        headers = {**stored, **(self.headers(child) or {})}
        options: dict[str, Any] = {"headers": tracing.keep_for_sentry(headers)} if headers else {}
        with tracing.restored(stored), self._confirmed() as connection:
            if connection is not None:
                options.update(connection=connection, confirm_timeout=CONFIRM_TIMEOUT)
            signature.apply_async(task_id=child["id"], parent_id=child["parent_id"], root_id=child["root_id"],
                                  **options)
        return child["id"]

    @contextlib.contextmanager
    def _confirmed(self) -> Iterator[Any]:
        """A connection whose publishes wait for the broker's confirm, on AMQP brokers (else None).

        An ``on_complete`` is recorded as sent once its publish returns, and
        nothing sends it again. Without confirms, a publish into an AMQP
        connection that stopped answering returns as soon as its bytes are
        written, and the callback is lost with the connection. Redis answers
        every command, so its publishes fail instead of vanishing. These
        connections are kept apart from Celery's pool, whose publishes stay
        unconfirmed (a child lost that way is sent again by the redelivery
        sweep, as it never starts).
        """
        if self._confirms is None:
            with self.app.connection_for_write() as probe:
                self._confirms = getattr(probe.transport, "driver_name", None) == "py-amqp"
        if not self._confirms or self.app.conf.task_always_eager:
            yield None
            return
        if self._confirming is None or self._confirming[0] != os.getpid():  # (a forked pool process: its own)
            connection = self.app.connection_for_write(transport_options={"confirm_publish": True})
            self._confirming = (os.getpid(), connection.Pool(limit=CONFIRMING_CONNECTIONS))
        with self._confirming[1].acquire(block=True) as connection:
            try:
                yield connection
            except BaseException:
                connection.close()  # a timed-out exchange leaves it out of step: the next use connects again
                raise

    def _publish_messages(self, children: Sequence[dict]) -> list[str]:
        app = self.app
        fast = not app.conf.task_send_sent_event
        signals = _publish_signals_connected()
        builder = self._builder()
        published: list[str] = []
        declared: set[str] = set()
        with app.producer_or_acquire() as producer, producer.batch(max_size=max(1, len(children))):
            publish = producer.publish
            last_raw = plan = None
            for child in children:
                raw = child["message"]
                message = None
                if raw != last_raw:  # siblings often share their stored message: decide once for them
                    message = decode_message(raw)
                    options = message.get("options") or {}
                    plan = builder.plan(message["task"], options) if fast and options.keys() <= PLAIN_OPTIONS else None
                    last_raw = raw
                extra = self.headers(child)
                if plan is None:
                    message = message or decode_message(raw)
                    options = dict(message.get("options") or {})
                    stored = options.get("headers")
                    if extra or stored:
                        options["headers"] = tracing.keep_for_sentry({**(stored or {}), **(extra or {})})
                    with tracing.restored(stored):
                        app.send_task(
                            message["task"], args=message.get("args") or (), kwargs=message.get("kwargs") or {},
                            task_id=child["id"], producer=producer, parent_id=child["parent_id"],
                            root_id=child["root_id"], add_to_parent=False, **options,
                        )
                    published.append(child["id"])
                    continue
                queue = plan.queue
                if queue is not None and queue.name not in declared:
                    producer.maybe_declare(queue)
                    declared.add(queue.name)
                if plan.direct and not signals:
                    # What send_task_message does for a direct queue with no publish signals connected,
                    # minus its per-message declaration and retry wrapper (the batch flushes at once).
                    prepared = builder.prepare(child, plan, message)
                    if extra:
                        prepared.headers.update(extra)
                    publish(prepared.payload, exchange="", routing_key=queue.name, headers=prepared.headers,
                            content_type=prepared.content_type, content_encoding=prepared.content_encoding,
                            compression=plan.compression, delivery_mode=plan.delivery_mode,
                            priority=plan.routed.get("priority"), retry=False, **prepared.properties)
                else:
                    self._send_task_message(producer, child, message or decode_message(raw), plan, extra)
                published.append(child["id"])
        return published

    def _builder(self) -> MessageBuilder:
        """This thread's builder: the plans of the kinds it published stay made, for a hop's one message too."""
        builder = getattr(self._local, "builder", None)
        if builder is None:
            builder = self._local.builder = MessageBuilder(self.app)
        return builder

    def _send_task_message(self, producer: Any, child: dict, message: dict, plan: Plan, extra: dict | None) -> None:
        """Celery's own message building and sending (routing through exchanges, publish signals)."""
        app = self.app
        amqp = app.amqp
        task_message = amqp.as_task_v2(
            child["id"], plan.name, tuple(message.get("args") or ()), message.get("kwargs") or {},
            parent_id=child["parent_id"], root_id=child["root_id"],
            time_limit=plan.time_limit, soft_time_limit=plan.soft_time_limit,
            reply_to=app.thread_oid, ignore_result=plan.ignore_result,
        )
        headers = {**plan.custom_headers, **(extra or {})}
        with tracing.restored(plan.custom_headers):  # publish signals see the child's own trace
            amqp.send_task_message(producer, plan.name, task_message, headers=headers or None, declare=[],
                                   **plan.routed)

    def _apply_eagerly(self, children: Sequence[dict]) -> list[str]:
        """Eager mode (tests): run each child in-process, as ``apply_async`` would."""
        done: list[str] = []
        for child in children:
            message = decode_message(child["message"])
            options = dict(message.get("options", {}))
            headers = {**(options.get("headers") or {}), **(self.headers(child) or {})}
            task = self.app.tasks[message["task"]]
            task.apply(
                args=message.get("args") or (),
                kwargs=message.get("kwargs") or {},
                task_id=child["id"],
                headers=headers or None,
            )
            done.append(child["id"])
        return done


def _publish_signals_connected() -> bool:
    from celery import signals

    return bool(signals.before_task_publish.receivers or signals.after_task_publish.receivers
                or signals.task_sent.receivers)
