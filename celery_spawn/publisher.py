"""Publishing recorded children through Celery, one producer for a whole page of them."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from kombu.utils.json import loads

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


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
    published: list[str] = []
    with app.producer_or_acquire() as producer:
        for child in children:
            message = decode_message(child["message"])
            app.send_task(
                message["task"],
                args=message.get("args") or (),
                kwargs=message.get("kwargs") or {},
                task_id=child["id"],
                producer=producer,
                parent_id=child["parent_id"],
                root_id=child["root_id"],
                add_to_parent=False,
                **message.get("options", {}),
            )
            published.append(child["id"])
    return published


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
