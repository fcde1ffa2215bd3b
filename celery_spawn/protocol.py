"""The words celery-spawn's parts share: job and operation states, message headers, option names.

Pure constants and the few rules over them that every layer applies the
same way (an operation's final state, what counts as final). Nothing here
imports anything of the package.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

# ---- job states, in the order a job moves through them --------------------------------------
PENDING = "pending"        # recorded, not yet published
HELD = "held"              # recorded, waiting for dependencies
SCHEDULED = "scheduled"    # recorded, published by a worker once its not_before time comes (spawn_delay)
DISPATCHED = "dispatched"  # published to the broker
STARTED = "started"        # a worker runs it
RETRYING = "retrying"      # failed and will be retried by Celery
SUCCEEDED = "succeeded"
FAILED = "failed"
REVOKED = "revoked"
CANCELLED = "cancelled"    # never ran: a dependency failed, fail_fast, or cancel
LOST = "lost"              # its message was lost and could not be sent again (counts as a failure)

JOB_STATES = (PENDING, HELD, SCHEDULED, DISPATCHED, STARTED, RETRYING, SUCCEEDED, FAILED, REVOKED, CANCELLED, LOST)
FINAL_JOB_STATES = frozenset({SUCCEEDED, FAILED, REVOKED, CANCELLED, LOST})
UNDISPATCHED_JOB_STATES = frozenset({PENDING, HELD, SCHEDULED})
#: Final states as a sorted tuple (for ``IN`` lists).
FINAL = tuple(sorted(FINAL_JOB_STATES))
NON_FINAL = tuple(state for state in JOB_STATES if state not in FINAL_JOB_STATES)
#: States a job may be (re)started from: a redelivery after a crash restarts a started job.
STARTABLE = (PENDING, HELD, SCHEDULED, DISPATCHED, STARTED, RETRYING)

#: Per final job state, the column of the operations table that counts the children of a complete
#: operation that ended in it (``children_succeeded``, ...).
CHILD_COUNT_COLUMNS = {state: f"children_{state}" for state in sorted(FINAL_JOB_STATES)}

# ---- operation states ------------------------------------------------------------------------
OP_RUNNING = "running"
OP_SUCCEEDED = "succeeded"
OP_FAILED = "failed"
OP_PARTIALLY_FAILED = "partially_failed"
OP_CANCELLED = "cancelled"
OPERATION_STATES = (OP_RUNNING, OP_SUCCEEDED, OP_FAILED, OP_PARTIALLY_FAILED, OP_CANCELLED)

#: ``on_complete`` callback states: claimed but not yet published, published, unusable.
CALLBACK_PENDING = "pending"
CALLBACK_SENT = "sent"
CALLBACK_FAILED = "failed"
#: What became of a published ``on_complete``'s run (``callback_run``), apart from its publishing: sent and
#: not started yet, started (by ``callback_worker``), ended for good, or given up after being sent again
#: ``spawn_redeliver_limit`` times without ever starting.
CALLBACK_WAITING = "waiting"
CALLBACK_STARTED = "started"
CALLBACK_ENDED = "ended"
CALLBACK_LOST = "lost"
#: Run states in which the callback may (still) start.
CALLBACK_STARTABLE = (CALLBACK_WAITING, CALLBACK_LOST)

# ---- message headers and call options ---------------------------------------------------------
#: Message headers every spawned child carries: its operation and its depth.
HEADER_OPERATION = "spawn_operation"
HEADER_DEPTH = "spawn_depth"
#: The strictest ``max_depth`` of the spawns above a child: nested spawns may not lift it.
HEADER_MAX_DEPTH = "spawn_max_depth"
#: Set on a message the recovery sweep sends (again): it may be a copy, so the child claims its start
#: in the store before its body runs, whatever its task class.
HEADER_RECOVERED = "spawn_recovered"
#: How many times a copy was sent back to look again later because its child was running elsewhere.
HEADER_DEFERRALS = "spawn_deferrals"
#: Carried by an ``on_complete`` callback's message: the operation whose callback it is. Every delivery
#: claims the callback's start in the store before the body runs, so it runs once however often it comes.
HEADER_CALLBACK = "spawn_callback"

#: The task keyword argument that carries a call's spawn configuration.
SPAWN_CONFIG_KWARG = "_spawn_config"
#: Signature options ``depends_on`` sets (read by the spawn, never published).
DEPENDS_ON_OPTION = "spawn_depends_on"
IGNORE_FAILURE_OPTION = "spawn_ignore_failure_of"

#: The one grammar of the ids celery-spawn records and its tools accept (jobs, operations, labels): Celery's
#: uuids, ``label~hash`` operation ids, and whatever else fits in a URL path segment and a terminal as is.
ID_PATTERN = re.compile(r"[A-Za-z0-9._:~-]{1,64}")
#: The same, in words, for error messages.
ID_RULE = "1 to 64 characters of A-Z a-z 0-9 . _ : ~ -"


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is an id of the one grammar (:data:`ID_PATTERN`)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


#: The deepest spawn nesting any configuration may allow (and the deepest tree walk).
HARD_MAX_DEPTH = 1_000

#: Longest error text stored on a job.
MAX_ERROR_TEXT = 4000


def operation_state(counts: Mapping[str, int]) -> str:
    """The final state of an operation whose children ended with these counts per state."""
    total = sum(counts.values())
    ok = counts.get(SUCCEEDED, 0)
    bad = counts.get(FAILED, 0) + counts.get(LOST, 0)
    stopped = counts.get(CANCELLED, 0) + counts.get(REVOKED, 0)
    if ok == total:
        return OP_SUCCEEDED
    if bad == 0 and stopped:
        return OP_CANCELLED if ok == 0 else OP_PARTIALLY_FAILED
    return OP_FAILED if ok == 0 else OP_PARTIALLY_FAILED


def error_text(error: object) -> str | None:
    """An exception or reason as the one line stored with a job."""
    if error is None:
        return None
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}"
    else:
        text = str(error)
    return text[:MAX_ERROR_TEXT]


def request_headers(request: object) -> dict:
    """Custom message headers of a task request, in a worker and in eager mode alike."""
    headers = getattr(request, "headers", None) or {}
    return headers if isinstance(headers, dict) else {}


def request_header(request: object, name: str) -> Any:
    """One spawn header of a request: in ``request.headers`` (eager) or as an attribute (worker)."""
    return request_headers(request).get(name) or getattr(request, name, None)
