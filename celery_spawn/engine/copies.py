"""Copies of a child's message: telling whether the run that claimed the job still goes on.

A broker can hand out a child's message again while the first delivery runs
(Redis puts an unacknowledged message back once its visibility timeout has
passed; RabbitMQ after a lost connection), and the recovery sweep sends again
a message it believes the broker lost. Such a copy claims the job's start in
the store before its body runs, whatever the task's class. A job already
started there is run again only when the run that claimed it is gone (its
worker process exited, or its worker answers no ``stats`` request, or
answers without that process: a worker restarted under the same name);
otherwise the copy is dropped, so no body ever runs twice at once. When
that worker cannot be asked, the copy goes back to the broker to be looked
at again.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from ..protocol import HEADER_RECOVERED, request_header

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("celery_spawn.copies")

#: Seconds a worker's answer (or silence) to a ping is trusted, per process.
LIVENESS_TTL = 5.0

#: How many runs of each job id this process is inside right now (a threads pool runs several at once).
_running_here: collections.Counter[str] = collections.Counter()
_running_lock = threading.Lock()
#: Jobs whose start this process claimed as the store failed: the claim may have been written all the same.
_unconfirmed: set[str] = set()
#: Jobs whose unconfirmed claim is being let go: no run of them enters here meanwhile.
_freeing: set[str] = set()
_freed = threading.Condition(_running_lock)
#: Jobs whose body ended for good (succeeded or failed) in this process lately, oldest first. The store may
#: not have heard yet (the write waits for it): this process knows, and runs none of them again.
_finished_here: collections.OrderedDict[str, None] = collections.OrderedDict()
FINISHED_REMEMBERED = 10_000


def entered(job_id: str) -> None:
    with _running_lock:
        while job_id in _freeing:
            _freed.wait()
        _running_here[job_id] += 1


def left(job_id: str) -> None:
    with _running_lock:
        if _running_here[job_id] <= 1:
            _running_here.pop(job_id, None)
        else:
            _running_here[job_id] -= 1


def claim_unconfirmed(job_id: str) -> None:
    """The store failed while this process claimed ``job_id``'s start: the write may have reached it."""
    with _running_lock:
        _unconfirmed.add(job_id)


def left_unconfirmed(job_id: str) -> bool:
    """Whether the run of ``job_id`` that just left this process had claimed its start without knowing if
    the claim was written, and no other run of it goes on here (asked once: it forgets the job)."""
    with _running_lock:
        if job_id not in _unconfirmed or _running_here.get(job_id):
            return False
        _unconfirmed.discard(job_id)
        return True


@contextlib.contextmanager
def freeing(job_id: str) -> Iterator[bool]:
    """Around letting go of this process's own claim of ``job_id``: True, and no run of it enters here
    until the block ends; False when one runs here now (it holds the claim: nothing is to be let go)."""
    with _running_lock:
        free = not _running_here.get(job_id)
        if free:
            _freeing.add(job_id)
    try:
        yield free
    finally:
        if free:
            with _running_lock:
                _freeing.discard(job_id)
                _freed.notify_all()


def finished(job_id: str) -> None:
    """Remember that ``job_id``'s body ended for good in this process."""
    with _running_lock:
        _finished_here[job_id] = None
        _finished_here.move_to_end(job_id)
        while len(_finished_here) > FINISHED_REMEMBERED:
            _finished_here.popitem(last=False)


def finished_here(job_id: str) -> bool:
    """Whether ``job_id``'s body ended for good in this process (of the last FINISHED_REMEMBERED)."""
    return job_id in _finished_here


def worker_identity(nodename: str | None) -> str | None:
    """``nodename/pid`` of the process running a task (what a claim records)."""
    return f"{nodename}/{os.getpid()}" if nodename else None


def is_copy(request: Any) -> bool:
    """Whether this delivery may be a second copy: redelivered by the broker, or sent again by recovery."""
    return bool((request.delivery_info or {}).get("redelivered")) or bool(request_header(request, HEADER_RECOVERED))


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, killed and not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from ``/proc`` (Linux); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
        state, parent = text[text.rindex(")") + 2:].split()[:2]
        return state, int(parent)
    except (OSError, ValueError):
        return None


def _sibling_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process of this very worker: a sibling of this pool process, or its child.

    A worker restarted under the same name finds the claims of its former
    pool processes: those ran in another worker instance, now gone, even if
    their pid is still taken (a zombie not yet reaped, or a pid used again).
    """
    stat = _proc_stat(pid)
    if stat is None:
        return _pid_alive(pid)
    return stat[0] != "Z" and stat[1] in (os.getppid(), os.getpid())


class Liveness:
    """Answers "does the run that claimed this job still go on?" for one app's copies."""

    def __init__(self, app: Celery, ping_timeout: float = 1.0) -> None:
        self.app = app
        self.ping_timeout = ping_timeout
        #: Per worker name: its processes' pids (None: it did not answer), and when it was asked.
        self._nodes: dict[str, tuple[frozenset[int] | None, float]] = {}

    def still_runs(self, claimed_by: str | None, job_id: str, nodename: str | None) -> bool | None:
        """Whether the run recorded as ``claimed_by`` (``nodename/pid``) may still go on; None: cannot tell.

        A start recorded without a worker (by an older version, or outside a
        worker) tells nothing: the copy runs, as a redelivery always did. A
        run on another worker that cannot be asked (the broker is unreachable)
        gives None: the copy must neither run nor be dropped.
        """
        if not claimed_by or "/" not in claimed_by:
            return False
        node, _, pid_text = claimed_by.rpartition("/")
        try:
            pid = int(pid_text)
        except ValueError:
            return False
        if node == nodename:  # this worker: its processes are on this machine
            if pid == os.getpid():
                return _running_here.get(job_id, 0) > 1  # the copy itself is one of them
            return _sibling_alive(pid)
        return self.process_of(node, pid)

    def process_of(self, node: str, pid: int) -> bool | None:
        """Whether ``pid`` is a process of the worker ``node`` (its main or a pool process); None: cannot tell.

        The worker's ``stats`` reply lists them (cached for LIVENESS_TTL). A
        worker that does not answer is gone; one that answers without that
        pid was restarted under the same name, and the claim is its former
        instance's. A reply that lists no process at all is taken at its word
        that the worker lives.
        """
        known = self._nodes.get(node)
        if known is None or time.monotonic() - known[1] >= LIVENESS_TTL:
            try:
                replies = self.app.control.inspect(destination=[node], timeout=self.ping_timeout).stats() or {}
            except Exception as exc:  # the broker is unreachable: cannot tell (and nothing is cached)
                logger.warning("could not ask worker %s for its processes: %s", node, exc)
                return None
            known = (_worker_pids(replies.get(node)), time.monotonic())
            self._nodes[node] = known
        pids = known[0]
        if pids is None:
            return False
        return pid in pids or not pids


def _worker_pids(stats: Any) -> frozenset[int] | None:
    """The pids of a worker's ``stats`` reply (main process and pool processes); None when it sent none."""
    if not isinstance(stats, dict):
        return None
    pids = {stats.get("pid")}
    pool = stats.get("pool")
    if isinstance(pool, dict) and isinstance(pool.get("processes"), list):
        pids.update(pool["processes"])
    return frozenset(pid for pid in pids if isinstance(pid, int))
