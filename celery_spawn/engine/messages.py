"""Celery protocol-2 messages for recorded children: what Celery would send, built once per kind.

Siblings of a spawn differ only in their ids and, often, their arguments.
``app.amqp.as_task_v2`` builds every header again for each of them and
``saferepr`` walks the arguments twice; here the message of the first child
of a kind (same task and options) is built by ``as_task_v2`` itself and
reused: a sibling gets a copy of its headers with its own ``id``,
``root_id``, ``parent_id``, ``argsrepr`` and ``kwargsrepr``, and its body is
serialized with kombu's serializer once per distinct stored message. The
result is the message ``send_task`` would publish for the same child.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery.utils.saferepr import saferepr
from kombu.serialization import dumps as serialize
from kombu.utils.json import loads

if TYPE_CHECKING:
    from celery import Celery

#: Options a plan turns into routing; a child with any other option is published by ``send_task``.
PLAIN_OPTIONS = frozenset({"queue", "priority", "headers", "routing_key", "exchange"})
#: Routed options the direct path applies itself (anything else: ``amqp.send_task_message``).
_DIRECT_ROUTED = frozenset({"queue", "priority", "exchange", "routing_key", "serializer", "compression",
                            "delivery_mode"})
#: Scalars whose ``saferepr`` is plain text (exact types: JSON gives no subclasses).
_SCALARS = (str, int, float, bool, type(None))
#: Distinct (task, options) kinds remembered per builder.
MAX_PLANS = 16


def fast_saferepr(value: Any, maxlen: int, maxlevels: int | None) -> str:
    """``saferepr(value, maxlen, maxlevels=maxlevels)``, without its token stream for flat arguments.

    A tuple, list or dict of plain scalars whose full text fits in
    ``maxlen`` is shown in full by ``saferepr``; that text is built here
    directly. Anything else (nesting, other types, text too long to show
    whole) goes to ``saferepr`` itself.
    """
    text = _flat_repr(value) if not maxlevels or maxlevels >= 1 else None
    if text is not None and len(text) <= maxlen:
        return text
    return saferepr(value, maxlen, maxlevels=maxlevels)  # type: ignore[arg-type]


def _scalar(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return "'" + value.replace("'", "\\'") + "'"
    if kind in _SCALARS:
        return str(value)  # int, float, bool: str(); None: 'None' (saferepr's repr())
    return None


def _flat_repr(value: Any) -> str | None:
    kind = type(value)
    parts: list[str] = []
    if kind is dict:
        for key, item in value.items():
            key_text, item_text = _scalar(key), _scalar(item)
            if key_text is None or item_text is None:
                return None
            parts.append(f"{key_text}: {item_text}")
        return "{" + ", ".join(parts) + "}"
    if kind is tuple or kind is list:
        for item in value:
            text = _scalar(item)
            if text is None:
                return None
            parts.append(text)
        if kind is list:
            return "[" + ", ".join(parts) + "]"
        return "(" + ", ".join(parts) + (",)" if len(parts) == 1 else ")")
    return None


@dataclass
class Plan:
    """How the children of one kind (task name and publish options) are routed, and their common message."""

    name: str
    options: dict
    routed: dict
    #: Published straight through ``producer.publish`` (a direct queue, nothing Celery must add per message).
    direct: bool
    queue: Any
    time_limit: Any
    soft_time_limit: Any
    ignore_result: bool
    custom_headers: dict
    #: as_task_v2's headers, properties and body extras for this kind (copied per child).
    headers: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)
    embed: dict = field(default_factory=dict)
    serializer: str | None = None
    compression: str | None = None
    delivery_mode: Any = None


@dataclass
class Prepared:
    """One child's message, ready for ``producer.publish``."""

    headers: dict
    properties: dict
    payload: Any
    content_type: str
    content_encoding: str


class MessageBuilder:
    """Builds the messages of recorded children, sharing the work among siblings of one kind."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.amqp = app.amqp
        self.reply_to = app.thread_oid
        conf = app.conf
        self.repr_levels = conf.task_repr_maxlevels
        self.default_serializer = conf.task_serializer
        self.default_compression = conf.task_compression
        self.default_delivery_mode = conf.task_default_delivery_mode
        self._plans: list[Plan] = []
        #: The last distinct stored message: (raw text, payload, content type, encoding, argsrepr, kwargsrepr).
        self._last: tuple | None = None

    def plan(self, name: str, options: dict) -> Plan:
        """The plan of a kind, made once per builder."""
        for plan in self._plans:
            if plan.name == name and plan.options == options:
                return plan
        plan = self._make_plan(name, options)
        if len(self._plans) >= MAX_PLANS:
            self._plans.pop(0)
        self._plans.append(plan)
        return plan

    def _make_plan(self, name: str, options: dict) -> Plan:
        """What ``Task.apply_async``/``send_task`` do with the options of a registered task, once."""
        publish = dict(options)
        custom_headers = publish.pop("headers", None) or {}
        task_type = self.app.tasks.get(name)
        time_limit = soft_time_limit = None
        ignore_result = False
        if task_type is not None:
            defaults = {k: v for k, v in task_type._get_exec_options().items() if v is not None}  # type: ignore[attr-defined]
            publish = {**defaults, **publish}
            time_limit = publish.pop("time_limit", None)
            soft_time_limit = publish.pop("soft_time_limit", None)
            publish.pop("expires", None)
            ignore_result = bool(publish.pop("ignore_result", task_type.ignore_result))
        routed = self.amqp.router.route(publish, name, (), {}, task_type)  # type: ignore[arg-type]
        queue = routed.get("queue")
        exchange_type = getattr(getattr(queue, "exchange", None), "type", None)
        direct = (queue is not None and exchange_type == "direct" and not routed.get("exchange_type")
                  and not (routed.get("exchange") and routed.get("routing_key"))
                  and set(routed) <= _DIRECT_ROUTED)
        plan = Plan(name=name, options=options, routed=routed, direct=direct, queue=queue,
                    time_limit=time_limit, soft_time_limit=soft_time_limit, ignore_result=ignore_result,
                    custom_headers=custom_headers)
        headers, properties, body, _ = self.amqp.as_task_v2(
            "", name, (), {}, time_limit=time_limit, soft_time_limit=soft_time_limit,
            reply_to=self.reply_to, ignore_result=ignore_result)
        plan.headers, plan.properties, plan.embed = headers, properties, body[2]
        plan.serializer = routed.get("serializer") or self.default_serializer
        plan.compression = routed.get("compression") or self.default_compression
        plan.delivery_mode = (routed.get("delivery_mode") or getattr(getattr(queue, "exchange", None),
                                                                     "delivery_mode", None)
                              or self.default_delivery_mode)
        return plan

    def prepare(self, child: dict, plan: Plan, message: dict | None = None) -> Prepared:
        """The message of a stored child (``id``, ``parent_id``, ``root_id``, ``message``) of kind ``plan``.

        ``message`` is the decoded stored message when the caller has it; the
        body and the argument reprs are made once for a run of siblings with
        the same stored message.
        """
        raw = child["message"]
        last = self._last
        if last is not None and last[0] == raw:
            _, payload, content_type, encoding, argsrepr, kwargsrepr = last
        else:
            if message is None:
                message = loads(raw)
            args = tuple(message.get("args") or ())
            kwargs = message.get("kwargs") or {}
            if not isinstance(kwargs, dict):
                raise TypeError("task keyword arguments must be a mapping")
            content_type, encoding, payload = serialize((args, kwargs, plan.embed), serializer=plan.serializer)
            argsrepr = fast_saferepr(args, self.amqp.argsrepr_maxsize, self.repr_levels)
            kwargsrepr = fast_saferepr(kwargs, self.amqp.kwargsrepr_maxsize, self.repr_levels)
            self._last = (raw, payload, content_type, encoding, argsrepr, kwargsrepr)
        task_id = child["id"]
        headers = plan.headers.copy()
        headers["id"] = task_id
        headers["root_id"] = child["root_id"] or task_id
        headers["parent_id"] = child["parent_id"]
        headers["argsrepr"] = argsrepr
        headers["kwargsrepr"] = kwargsrepr
        if plan.custom_headers:
            headers.update(plan.custom_headers)
        properties = plan.properties.copy()
        properties["correlation_id"] = task_id
        return Prepared(headers, properties, payload, content_type, encoding)
