"""Operation labels: the caller's ``operation_id``, which the spawns of several parents may share.

The first spawn with a label has the label as its id; a later parent's spawn
has a ``label~hash`` id (:func:`celery_spawn.handlers.labelled_operation_id`).
The faces take a label wherever they take an operation id, and it names the
newest of its operations. Reads use ``ix_spawn_operations_label_created``
(``label, created_at``) and the primary key; values reach SQL as bound
parameters.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .rows import OPERATION_FIELDS, _bool_fields, _ops, _row

__all__ = ["matches", "resolve_operation"]


def matches(token: str) -> sa.ColumnElement[bool]:
    """Operations that ``token`` names: those labelled with it, and the one whose id it is."""
    return sa.or_(_ops.c.label == token, _ops.c.id == token)


def resolve_operation(conn: Connection, token: str) -> tuple[dict | None, int]:
    """The operation a label or an operation id names, and how many other operations share that label.

    Operations labelled ``token`` come first: the newest of them (by
    ``created_at``, then id) is the one, and the count is of the older ones.
    Otherwise ``token`` is taken as an operation id (exact match, count 0);
    ``(None, 0)`` when it is neither. The dict has the
    :data:`~celery_spawn.store.rows.OPERATION_FIELDS`. One statement for a
    label, two for an id.
    """
    fields = [_ops.c[f] for f in OPERATION_FIELDS]
    newest = (sa.select(*fields, sa.func.count().over().label("matches"))
              .where(_ops.c.label == token)
              .order_by(_ops.c.created_at.desc(), _ops.c.id.desc())
              .limit(1))
    row = conn.execute(newest).mappings().first()
    if row is not None:
        return _bool_fields(_row(row, OPERATION_FIELDS)), int(row["matches"]) - 1
    row = conn.execute(sa.select(*fields).where(_ops.c.id == token)).mappings().first()
    return (_bool_fields(_row(row, OPERATION_FIELDS)) if row is not None else None), 0
