"""What the read queries share: limits, the columns they return, argument checks and row shaping.

Used by :mod:`.queries` (operations, jobs, trees) and :mod:`.stats`
(statistics, undispatched work); no function here runs a statement.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any


from ..protocol import HARD_MAX_DEPTH
from . import schema as s
from .clock import utcnow as server_now
from .treerows import TREE_FIELDS  # noqa: F401  (re-exported with the other columns)

#: Rows a listing returns unless asked otherwise, and the most it will return.
DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000
#: Children shown in :func:`get_operation` unless asked otherwise.
DEFAULT_CHILDREN_LIMIT = 1_000
#: Undispatched children shown per operation in :func:`pending`.
DEFAULT_JOBS_PER_OPERATION = 20
#: Levels a recursive query follows at most: no spawn config can nest deeper, and a
#: corrupt ``parent_id`` cycle cannot make a query loop. MySQL's ``cte_max_recursion_depth``
#: and MariaDB's ``max_recursive_iterations`` both default to this value.
MAX_LEVELS = HARD_MAX_DEPTH
#: Rows of the biggest and slowest operations in detailed stats.
TOP_N = 10

#: Columns of a job as the queries return it (``message``, which holds the payload, is left out).
JOB_FIELDS = ("id", "parent_id", "root_id", "operation_id", "position", "depth", "task_name", "queue",
              "priority", "state", "pending_deps", "retries", "error", "created_at", "dispatched_at",
              "started_at", "finished_at", "not_before")
#: Columns of an operation in listings (``config`` and ``on_complete`` are in :func:`get_operation`).
OPERATION_FIELDS = ("id", "label", "parent_id", "root_id", "parent_task", "handler", "queue", "depth", "state",
                    "total", "error", "wait_for_descendants", "fail_fast", "completed", "created_at",
                    "updated_at", "finished_at")

_FINAL = tuple(sorted(s.FINAL_JOB_STATES))
_UNDISPATCHED = (s.PENDING, s.HELD, s.SCHEDULED)
_OP_FINISHED = tuple(state for state in s.OPERATION_STATES if state != s.OP_RUNNING)

_jobs = s.jobs
_ops = s.operations


# ---- argument checks --------------------------------------------------------------------------
def _positive(name: str, value: int | None, *, allow_none: bool = True, maximum: int | None = None) -> int | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be 1 or more, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, not {value}")
    return value


def _non_negative(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, not {value}")
    return value


def _states(value: str | Iterable[str] | None, allowed: Iterable[str], what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    states = (value,) if isinstance(value, str) else tuple(value)
    allowed = tuple(allowed)
    unknown = [v for v in states if v not in allowed]
    if unknown or not states:
        raise ValueError(f"unknown {what} state {unknown[0] if unknown else ''!r}; known: {', '.join(allowed)}")
    return states


def _as_utc(value: datetime) -> datetime:
    """Naive UTC, as stored: aware datetimes are converted, naive ones taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def _utcnow() -> datetime:
    return server_now()


# ---- small helpers ------------------------------------------------------------------------------
def _num(value: Any) -> Any:
    """Plain int/float from driver numbers (MySQL sums and averages are Decimal)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def seconds_value(value: Any) -> float | None:
    """A float rounded to microseconds (durations), or None."""
    return None if value is None else round(float(value), 6)


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _row(mapping: Any, fields: Iterable[str]) -> dict:
    return {field: _num(mapping[field]) for field in fields}


def _bool_fields(row: dict) -> dict:
    for field in ("wait_for_descendants", "fail_fast", "completed"):
        if field in row and row[field] is not None:
            row[field] = bool(row[field])
    return row


def _parse_json(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def progress(counts: dict[str, int], total: int | None = None) -> dict:
    """``{"done", "total", "percent"}`` from child counts per state; percent is None when total is 0."""
    done = sum(n for state, n in counts.items() if state in s.FINAL_JOB_STATES)
    total = total if total else sum(counts.values())
    return {"done": done, "total": total, "percent": round(100.0 * done / total, 1) if total else None}
