"""The Celery app the integration tests run in real worker processes (``celery -A tests.app worker``).

``make_app()`` builds it from explicit settings, so that a test process can
talk to several backends; the module-level ``app`` is built from the
environment the test harness gives the worker.
"""
from __future__ import annotations

import json
import os
import time

import sqlalchemy as sa

from celery import Celery

from celery_spawn import SpawnConfig, SpawnHandler, SpawnManager, SpawnTask, depends_on, get_state, install
from celery_spawn.transport.spawnfs import folder_options

#: Where ``tests.record_callback`` logs each call (no primary key: duplicates must be visible).
callbacks = sa.Table(
    "test_callbacks", sa.MetaData(),
    sa.Column("operation_id", sa.String(64)), sa.Column("summary", sa.Text), sa.Column("at", sa.Float),
)

#: One row per run of ``tests.record_run``, so a test can prove each child ran exactly once.
runs = sa.Table(
    "test_runs", sa.MetaData(),
    sa.Column("key", sa.String(64)), sa.Column("job_id", sa.String(64)), sa.Column("at", sa.Double),
)

WORKFLOWS = {
    "etl_pipeline": [("extract", {"source": "database"}), ("transform", {"rules": "business_rules.json"}),
                     ("load", {"target": "data_warehouse"})],
    "ml_training": [("preprocess", {"features": ["feature_1", "feature_2"]}), ("train", {"algorithm": "rf"}),
                    ("validate", {"test_split": 0.2}), ("deploy", {"environment": "staging"})],
}
IMAGE_SIZES = ("thumbnail", "medium", "large")


class DatasetProcessor(SpawnHandler):
    """Fan-out in chunks (the seed's first pattern)."""

    def validate_spawn(self, parent, config):
        if "dataset_id" not in parent.kwargs:
            raise ValueError("parent job missing required dataset_id")

    def spawn_jobs(self, context):
        size = context.parent.kwargs["size"]
        chunk = context.parent.kwargs.get("chunk_size", 1000)
        for index, start in enumerate(range(0, size, chunk)):
            yield context.app.signature("tests.process_chunk", kwargs={
                "chunk_id": index, "start_index": start, "end_index": min(start + chunk, size),
                "dataset_id": context.parent.kwargs["dataset_id"]})


class ImageProcessor(SpawnHandler):
    """Size variants of each image (the seed's second pattern)."""

    def spawn_jobs(self, context):
        kwargs = context.parent.kwargs
        return [context.app.signature("tests.resize_image", kwargs={
                    "image_id": image_id, "target_size": size,
                    "source_bucket": kwargs["source_bucket"], "output_bucket": kwargs["output_bucket"]})
                for image_id in kwargs["image_ids"] for size in IMAGE_SIZES]


class WorkflowDecomposer(SpawnHandler):
    """Steps that depend on each other (the seed's third pattern)."""

    def spawn_jobs(self, context):
        workflow = context.parent.kwargs["workflow_type"]
        if workflow not in WORKFLOWS:
            raise ValueError(f"unknown workflow type: {workflow}")
        previous = context.parent.id
        for step, config in WORKFLOWS[workflow]:
            sig = context.app.signature("tests.workflow_step", args=(step, config))
            context.freeze(sig)
            depends_on(sig, previous)
            previous = sig.id
            yield sig


class SafeSpawner(SpawnHandler):
    """Skips children it cannot build and gives up after three failures (the seed's error handling)."""

    def spawn_jobs(self, context):
        failures, children = 0, []
        for item in context.parent.kwargs["items"]:
            if not isinstance(item, int):
                failures += 1
                if failures > 3:
                    raise RuntimeError("too many spawn failures")
                continue
            children.append(context.app.signature("tests.square", args=(item,)))
        return children


class Diamond(SpawnHandler):
    """A -> B, A -> C, B + C -> D."""

    def spawn_jobs(self, context):
        step = lambda name, pause: context.app.signature("tests.record_step", args=(name, pause))  # noqa: E731
        a, b, c, d = step("A", 0.2), step("B", 0.5), step("C", 0.1), step("D", 0)
        for sig in (a, b, c, d):
            context.freeze(sig)
        depends_on(b, a)
        depends_on(c, a)
        depends_on(d, b, c)
        return [d, c, b, a]  # order of return must not matter


class FailingChain(SpawnHandler):
    """A fails; B needs A, C needs B (both cancelled); D ignores A's failure and runs."""

    def spawn_jobs(self, context):
        a = context.app.signature("tests.fail", args=("A",))
        b = context.app.signature("tests.record_step", args=("B", 0))
        c = context.app.signature("tests.record_step", args=("C", 0))
        d = context.app.signature("tests.record_step", args=("D", 0))
        for sig in (a, b, c, d):
            context.freeze(sig)
        depends_on(b, a)
        depends_on(c, b)
        depends_on(d, a, ignore_failure=True)
        return [a, b, c, d]


class Sleepers(SpawnHandler):
    """``count`` children that sleep, the last few held behind the first: something to cancel."""

    def spawn_jobs(self, context):
        count, seconds = context.parent.kwargs["count"], context.parent.kwargs["seconds"]
        first = context.app.signature("tests.sleep", args=(seconds,))
        context.freeze(first)
        yield first
        for index in range(1, count):
            sig = context.app.signature("tests.sleep", args=(seconds,))
            if index >= count - 3:
                depends_on(sig, first)
            yield sig


def make_app(broker: str, backend: str | None, database_url: str, queue: str = "celery",
             fs_folder: str | None = None) -> Celery:
    app = Celery("spawn_tests", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        spawn_database_url=database_url,
        spawn_recovery_interval=2.0,
        spawn_recovery_grace=5.0,
    )
    if fs_folder:
        app.conf.broker_transport_options = folder_options(fs_folder)
    if broker.startswith("redis"):
        short = os.environ.get("SPAWN_TEST_VISIBILITY_TIMEOUT")
        app.conf.broker_transport_options = {"visibility_timeout": 30} if not short else {
            # kombu puts unacknowledged messages back every interval × throttle seconds (100 by default)
            "visibility_timeout": float(short), "unacked_restore_interval": 1, "unacked_restore_throttle": 1}

    manager = SpawnManager()
    manager.register_handler("dataset_processor", DatasetProcessor)
    manager.register_handler("image_processor", ImageProcessor)
    manager.register_handler("workflow", WorkflowDecomposer)
    manager.register_handler("safe_spawner", SafeSpawner)

    @manager.handler("numbers")
    def numbers(context):
        return [context.app.signature("tests.square", args=(n,)) for n in context.parent.result]

    @manager.handler("stamps")
    def stamps(context):
        return [context.app.signature("tests.record_step", args=(str(i), 0)) for i in range(context.parent.result)]

    @manager.handler("counters")
    def counters(context):
        """Children that are SpawnTasks themselves (duplicate deliveries are skipped)."""
        return [context.app.signature("tests.count", args=(i,)) for i in range(context.parent.result)]

    @manager.handler("recorded_runs")
    def recorded_runs(context):
        """``count`` plain children that each record their run under ``key``."""
        key, count = context.parent.kwargs["key"], context.parent.kwargs["count"]
        return [context.app.signature("tests.record_run", args=(key,)) for _ in range(count)]

    @manager.handler("flaky")
    def flaky_children(context):
        return [context.app.signature("tests.flaky", args=(f"flaky-{context.parent.id}",))]

    @manager.handler("stripes")
    def stripes(context):
        """A plain ``tests.square`` child per value; each depends on the child ``stride`` places before it."""
        stride = context.parent.kwargs.get("stride", 10)
        made = []
        for n in context.parent.result:
            sig = context.app.signature("tests.square", args=(n,))
            context.freeze(sig)
            if len(made) >= stride:
                depends_on(sig, made[-stride].id)
            made.append(sig)
        return made

    @manager.handler("nested")
    def nested(context):
        """Each node spawns ``fanout`` children one level down until ``levels`` is reached."""
        levels, fanout = context.parent.kwargs["levels"], context.parent.kwargs["fanout"]
        if context.parent.depth + 1 >= levels:
            return [context.app.signature("tests.square", args=(i,)) for i in range(fanout)]
        return [context.app.signature("tests.nest", kwargs={"levels": levels, "fanout": fanout},
                                      ) for _ in range(fanout)]

    manager.register_handler("diamond", Diamond)
    manager.register_handler("failing_chain", FailingChain)
    manager.register_handler("sleepers", Sleepers)

    install(app, manager)

    @app.task(shared=False, name="tests.process_dataset", base=SpawnTask, bind=True, spawn_handler="dataset_processor",
              spawn_config=SpawnConfig(max_spawn_count=1000, batch_size=7))
    def process_dataset(self, dataset_id, size, chunk_size=1000):
        return {"dataset_id": dataset_id, "size": size}

    @app.task(shared=False, name="tests.process_chunk")
    def process_chunk(chunk_id, start_index, end_index, dataset_id):
        return {"chunk_id": chunk_id, "rows": end_index - start_index, "dataset_id": dataset_id}

    @app.task(shared=False, name="tests.process_images", base=SpawnTask, spawn_handler="image_processor")
    def process_images(image_ids, source_bucket, output_bucket):
        return len(image_ids)

    @app.task(shared=False, name="tests.resize_image")
    def resize_image(image_id, target_size, source_bucket, output_bucket):
        return f"{output_bucket}/{image_id}-{target_size}"

    @app.task(shared=False, name="tests.run_workflow", base=SpawnTask, spawn_handler="workflow")
    def run_workflow(workflow_type):
        return workflow_type

    @app.task(shared=False, name="tests.workflow_step")
    def workflow_step(step, config):
        return {"step": step, "at": time.time()}

    @app.task(shared=False, name="tests.safe_parent", base=SpawnTask, spawn_handler="safe_spawner")
    def safe_parent(items):
        return "parent-result"

    @app.task(shared=False, name="tests.numbers", base=SpawnTask)
    def numbers_task(values):
        return values

    @app.task(shared=False, name="tests.count", base=SpawnTask)
    def count(n):
        return n

    @app.task(shared=False, name="tests.flaky", bind=True, max_retries=3)
    def flaky(self, key):
        """Fails its first attempt with a retry, then succeeds."""
        if self.request.retries == 0:
            raise self.retry(countdown=0.1, exc=RuntimeError(f"first attempt of {key}"))
        return self.request.retries

    @app.task(shared=False, name="tests.square")
    def square(n):
        return n * n

    @app.task(shared=False, name="tests.nest", base=SpawnTask, spawn_handler="nested")
    def nest(levels, fanout):
        return "node"

    @app.task(shared=False, name="tests.sleep")
    def sleep(seconds):
        time.sleep(seconds)
        return seconds

    @app.task(shared=False, name="tests.record_step")
    def record_step(name, pause):
        started = time.time()
        time.sleep(pause)
        return {"step": name, "started": started, "finished": time.time()}

    @app.task(shared=False, name="tests.fail")
    def fail(name):
        raise ValueError(f"step {name} failed on purpose")

    @app.task(shared=False, name="tests.spawner", base=SpawnTask)
    def spawner(**kwargs):
        return "spawned"

    @app.task(shared=False, name="tests.record_run", bind=True)
    def record_run(self, key):
        """A plain task (no claim of its start) that writes a row per run."""
        with get_state(app).store.begin() as conn:
            conn.execute(runs.insert(), [{"key": key, "job_id": self.request.id, "at": time.time()}])
        return key

    @app.task(shared=False, name="tests.record_callback")
    def record_callback(summary):
        """Counts its own invocations in the store's database, so a test can prove exactly once."""
        store = get_state(app).store
        with store.begin() as conn:
            callbacks.create(conn, checkfirst=True)
            conn.execute(callbacks.insert(), [{"operation_id": summary["operation_id"],
                                               "summary": json.dumps(summary), "at": time.time()}])
        return summary["operation_id"]

    return app


def settings_from_environment() -> dict:
    """``make_app`` arguments from what the test harness sets for a worker it starts."""
    return {
        "broker": os.environ.get("SPAWN_TEST_BROKER", "spawnfs://"),
        "backend": os.environ.get("SPAWN_TEST_RESULT_BACKEND") or None,
        "database_url": os.environ.get("CELERY_SPAWN_DATABASE_URL", "sqlite:///celery_spawn_tests.sqlite3"),
        "queue": os.environ.get("SPAWN_TEST_QUEUE", "celery"),
        "fs_folder": os.environ.get("SPAWN_TEST_FS_FOLDER") or None,
    }


def _from_environment() -> Celery:
    return make_app(**settings_from_environment())


app = _from_environment()
