"""The Celery app of the reliability suite: ``tests.app`` plus tasks and handlers built to be broken.

Run by real workers as ``celery -A tests.reliability.app worker``. On top of
:func:`tests.app.make_app` it adds:

* ``rel.fanout`` (a SpawnTask that retries on StoreError) spawning ``count``
  ``rel.unit`` children through the ``rel_many`` handler, optionally slowly
  and with a log line halfway, so that a test can break something mid-spawn;
* ``rel.unit``, a SpawnTask child that appends one line per execution of its
  body to a file (``SPAWN_TEST_RUNS_DIR``): the proof of "ran exactly once"
  that does not depend on the store or the broker under test
  (``rel.plain_unit``: the same as a plain task, ``fanout(plain=True)``);
* ``rel.broken``, a parent whose handler raises (``rel_halfway``) or hangs
  (``rel_hang``) after yielding some children.

Extra environment (besides what :class:`tests.harness.Backend` sets):
``SPAWN_TEST_VISIBILITY_TIMEOUT`` (seconds, Redis brokers) and
``SPAWN_TEST_RUNS_DIR``.
"""
from __future__ import annotations

import logging
import os
import time

from celery import Celery

from celery_spawn import SpawnConfig, SpawnTask, StoreError, get_state
from tests.app import make_app, settings_from_environment

logger = logging.getLogger("tests.reliability")

#: Marker logged by the ``rel_many`` handler when it reaches ``marker_at``.
HALFWAY = "rel-halfway"
#: Marker logged by ``rel.stall`` once its result is stored and it stalls.
STALLED = "rel-result-stored"
#: Largest spawn of this app (the 1,000-child scenario, with room).
MAX_CHILDREN = 5_000


def record_run(job_id: str) -> None:
    """Append ``<job id> <epoch seconds> <pid>`` to this process's runs file, in one write."""
    folder = os.environ.get("SPAWN_TEST_RUNS_DIR")
    if not folder:
        return
    line = f"{job_id} {time.time():.6f} {os.getpid()}\n".encode()
    fd = os.open(os.path.join(folder, f"runs-{os.getpid()}.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class StallAfterResult(SpawnTask):
    """A SpawnTask whose first run stalls in ``on_success``: after Celery stored the result, before
    celery-spawn's ``task_success`` receiver records it (a window a test kills the pool process in)."""

    def on_success(self, retval, task_id, args, kwargs):
        folder = os.environ.get("SPAWN_TEST_RUNS_DIR")
        marker = os.path.join(folder, f"stalled-{task_id}") if folder else None
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            logger.warning("%s %s pid=%d", STALLED, task_id, os.getpid())
            time.sleep(120)


#: Kinds of handler output ``rel_junk`` returns; none of them is a list of plain signatures.
JUNK = ("none-item", "text-item", "dict-form", "group", "chain", "non-json-argument", "nameless", "one-signature",
        "number", "string", "raising-generator", "long-task-id")


def junk_output(app: Celery, kind: str):
    from celery import chain, group

    good = app.signature("rel.unit", args=(0,))
    outputs = {
        "none-item": lambda: [good, None],
        "text-item": lambda: [good, "rel.unit"],
        "dict-form": lambda: [good, dict(app.signature("rel.unit", args=(1,)))],
        "group": lambda: [good, group(app.signature("rel.unit", args=(1,)), app.signature("rel.unit", args=(2,)))],
        "chain": lambda: [good, chain(app.signature("rel.unit", args=(1,)), app.signature("rel.unit", args=(2,)))],
        "non-json-argument": lambda: [good, app.signature("rel.unit", args=(object(),))],
        "nameless": lambda: [good, app.signature("", args=(1,))],
        "one-signature": lambda: good,
        "number": lambda: 42,
        "string": lambda: "rel.unit",
        "raising-generator": lambda: _raising([good, good]),
        "long-task-id": lambda: [good, app.signature("rel.unit", args=(1,)).set(task_id="x" * 65)],
    }
    return outputs[kind]()


def register_fuzz_targets(app: Celery) -> None:
    """The tasks and handlers the fuzz tests' real-worker variants name (see :mod:`tests.fuzzing`)."""
    from tests.fuzzing import FUZZ_CHILD, FUZZ_PARENT, fuzz_handlers, unpack_output

    manager = get_state(app).manager
    for name, handler in fuzz_handlers(lambda *args: app.signature(FUZZ_CHILD, args=args), FUZZ_PARENT).items():
        manager.register_handler(name, handler)
    manager.register_handler("fz.out", lambda context: unpack_output(context.parent.kwargs["output"]))

    @app.task(shared=False, name=FUZZ_PARENT, base=SpawnTask)
    def fuzz_parent(value, **_):
        return value

    @app.task(shared=False, name=FUZZ_CHILD)
    def fuzz_child(*args, **kwargs):
        return len(args)


def _raising(items):
    yield from items
    raise LookupError("the catalogue is gone")


#: Seconds before the sweep publishes again a dispatched child lost by the broker (an hour by default).
REDELIVER_AFTER = 8.0


def make_reliability_app(broker: str, backend: str | None, database_url: str, queue: str = "celery",
                         fs_folder: str | None = None, visibility_timeout: float | None = None) -> Celery:
    app = make_app(broker, backend, database_url, queue, fs_folder)
    # A dispatched child no worker started for this long, its siblings idle, is published again.
    app.conf.spawn_redeliver_after = REDELIVER_AFTER
    get_state(app).reload()
    if visibility_timeout and broker.startswith("redis"):
        # kombu scans for abandoned messages every interval x throttle seconds (100 s by default), under
        # a Redis lock that a worker killed mid-scan leaves taken for unacked_mutex_expire (300 s by default).
        app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout,
                                             "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
                                             "unacked_mutex_expire": 10}
    manager = get_state(app).manager

    @manager.handler("rel_many")
    def many(context):
        """``count`` rel.unit children; ``pause`` seconds before each; a log line at ``marker_at``."""
        kwargs = context.parent.kwargs
        pause, marker_at = kwargs.get("pause") or 0, kwargs.get("marker_at")
        child_pause, stall_at = kwargs.get("child_pause") or 0, kwargs.get("stall_at")
        unit = "rel.plain_unit" if kwargs.get("plain") else "rel.unit"
        for index in range(kwargs["count"]):
            if index == marker_at:
                logger.warning("%s %s", HALFWAY, context.parent.id)
            if pause:
                time.sleep(pause)
            if index == stall_at:
                yield context.app.signature("rel.stall", args=(index,))
            else:
                yield context.app.signature(unit, args=(index,), kwargs={"pause": child_pause})

    @manager.handler("rel_halfway")
    def halfway(context):
        """``good`` children, then the data source fails."""
        for index in range(context.parent.kwargs["good"]):
            yield context.app.signature("rel.unit", args=(index,))
        raise RuntimeError(f"data source went away after {context.parent.kwargs['good']} children")

    @manager.handler("rel_hang")
    def hang(context):
        """``good`` children, then the handler waits for something that never comes."""
        for index in range(context.parent.kwargs["good"]):
            yield context.app.signature("rel.unit", args=(index,))
        logger.warning("rel-hanging %s", context.parent.id)
        time.sleep(3600)

    @manager.handler("rel_junk")
    def junk(context):
        """What a buggy handler returns, by ``kind`` (see JUNK)."""
        return junk_output(context.app, context.parent.kwargs["kind"])

    @manager.handler("rel_deep")
    def deep(context):
        """One rel.unit child whose kwargs nest ``levels`` dicts deep (built here: no message could carry it)."""
        payload: object = "leaf"
        for _ in range(context.parent.kwargs["levels"]):
            payload = {"k": payload}
        return [context.app.signature("rel.unit", args=(0,), kwargs={"payload": payload})]

    register_fuzz_targets(app)

    @app.task(shared=False, name="rel.fanout", base=SpawnTask, bind=True, spawn_handler="rel_many",
              spawn_config=SpawnConfig(max_spawn_count=MAX_CHILDREN, batch_size=50),
              autoretry_for=(StoreError,), retry_kwargs={"max_retries": 60, "countdown": 1})
    def fanout(self, count, pause=0, marker_at=None, child_pause=0, stall_at=None, plain=False):
        return count

    @app.task(shared=False, name="rel.stall", base=StallAfterResult, bind=True)
    def stall(self, index):
        record_run(self.request.id)
        return index

    @app.task(shared=False, name="rel.unit", base=SpawnTask, bind=True)
    def unit(self, index, pause=0):
        record_run(self.request.id)
        if pause:
            time.sleep(pause)
        return index

    @app.task(shared=False, name="rel.plain_unit", bind=True)
    def plain_unit(self, index, pause=0):
        """``rel.unit`` as a plain task: no claim of its own, the worker's guard claims for its copies."""
        record_run(self.request.id)
        if pause:
            time.sleep(pause)
        return index

    @app.task(shared=False, name="rel.pid")
    def pid():
        """A task that needs no store: which pool process ran it."""
        return os.getpid()

    @app.task(shared=False, name="rel.broken", base=SpawnTask, bind=True)
    def broken(self, good, **_):
        return f"parent result {good}"

    return app


def _from_environment() -> Celery:
    timeout = os.environ.get("SPAWN_TEST_VISIBILITY_TIMEOUT")
    app = make_reliability_app(**settings_from_environment(), visibility_timeout=float(timeout) if timeout else None)
    # A test about something else than lost or stranded messages keeps the sweep out of its way.
    redeliver_after = os.environ.get("SPAWN_TEST_REDELIVER_AFTER")
    recovery_grace = os.environ.get("SPAWN_TEST_RECOVERY_GRACE")
    if redeliver_after:
        app.conf.spawn_redeliver_after = float(redeliver_after)
    if recovery_grace:
        app.conf.spawn_recovery_grace = float(recovery_grace)
    if redeliver_after or recovery_grace:
        get_state(app).reload()
    return app


app = _from_environment()
