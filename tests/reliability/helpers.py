"""Helpers of the reliability suite: workers on ``tests.reliability.app``, private brokers, proxies, run logs.

Every scenario runs real ``celery worker`` processes against the local
services; whatever a test breaks sits behind a :class:`~tests.reliability.proxy.TcpProxy`
it owns, or is a ``redis-server`` it started on a free port. The shared
services are never stopped or reconfigured. The fixtures built on these
helpers are in ``tests/reliability/conftest.py``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import shutil
import subprocess
import sys
import uuid
from datetime import timezone
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa

from celery_spawn import get_state
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import schema as s
from tests.app import callbacks
from tests.harness import (
    Backend,
    Worker,
    free_port,
    port_open,
    service_missing,
    wait_for,
)
from tests.reliability.proxy import TcpProxy

TIMEOUT = 120
RELIABILITY_APP = "tests.reliability.app"
#: What a worker logs when its recovery sweep does something (see celery_spawn.engine.recovery/redelivery).
SWEEP_WORK = ("recovery published", "published again", "recovery applied", "are lost", " is lost:")


# ---- backends and workers ---------------------------------------------------------------------
@dataclasses.dataclass
class RelBackend(Backend):
    """A Backend whose workers run ``tests.reliability.app`` with extra environment."""

    visibility_timeout: float | None = None
    runs_dir: str | None = None
    extra_env: dict = dataclasses.field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.visibility_timeout:
            env["SPAWN_TEST_VISIBILITY_TIMEOUT"] = str(self.visibility_timeout)
        if self.runs_dir:
            env["SPAWN_TEST_RUNS_DIR"] = self.runs_dir
        env.update(self.extra_env)
        return env

    def make_app(self, database_url: str | None = None, broker: str | None = None):
        """The test process's own app; it may talk to the services directly while workers go through proxies."""
        from tests.reliability.app import make_reliability_app

        return make_reliability_app(broker or self.broker, self.result_backend, database_url or self.database_url,
                                    self.queue, self.fs_folder, self.visibility_timeout)


class RelWorker(Worker):
    """A real ``celery -A tests.reliability.app worker``; stopped fast, killed for real."""

    def __init__(self, backend: Backend, log_path: Path, concurrency: int = 2, **kwargs) -> None:
        super().__init__(backend, log_path, concurrency=concurrency, **kwargs)
        self.args[self.args.index("tests.app")] = RELIABILITY_APP

    def stop(self, timeout: float = 30, warm: bool = True) -> None:
        """Warm shutdown by default: SIGTERM to the main process alone (the pool's children follow it)."""
        super().stop(timeout, warm=warm)

    def pool_children(self) -> list[int]:
        """Pids of the prefork pool's processes."""
        if self.proc is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    found.append(int(entry.name))
        return found

    def succeeded(self, task: str, task_id: str) -> int:
        return self.log().count(f"Task {task}[{task_id}] succeeded")

    def diagnosis(self, log_lines: int = 40) -> str:
        """What a stuck worker is doing: every thread's stack in its processes (py-spy), and its last log lines.

        For a failure message: a hang seen once on a loaded machine is explained by this, not by a re-run.
        """
        lines = [line for line in self.log().splitlines() if not line.endswith(" received")]
        parts = ["--- the worker's last log lines:", *lines[-log_lines:]]
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if self.proc is not None and self.proc.poll() is None and Path(spy).exists():
            for pid in [self.proc.pid, *self.pool_children()]:
                try:
                    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                                          timeout=30)
                    parts += [f"--- py-spy dump of {pid}:", dump.stdout.strip() or dump.stderr.strip()]
                except (OSError, subprocess.SubprocessError) as exc:
                    parts.append(f"--- py-spy dump of {pid} failed: {exc}")
        return "\n".join(parts)


# ---- services -------------------------------------------------------------------------------------
@contextlib.contextmanager
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of our own on a free loopback port (never persisted); its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server", FileNotFoundError("redis-server is not installed"))
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 20, what=f"redis-server on port {port}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def url_port(url: str) -> int:
    return sa.make_url(url).port


def via(url: str, proxy: TcpProxy) -> str:
    """``url`` (SQLAlchemy or broker URL) pointed at the proxy's port."""
    if "://" in url and url.split("://", 1)[0] in ("redis", "amqp", "pyamqp"):
        scheme, rest = url.split("://", 1)
        auth, _, hostpath = rest.rpartition("@")
        hostport, _, path = hostpath.partition("/")
        host = hostport.rsplit(":", 1)[0]
        return f"{scheme}://{auth + '@' if auth else ''}{host}:{proxy.port}/{path}"
    return sa.make_url(url).set(port=proxy.port).render_as_string(hide_password=False)


#: ``celery spawn serve`` through a launcher, while celery_spawn/cli.py does not register it in the group.
SERVE_LAUNCHER = (
    "from celery_spawn.cli import spawn\n"
    "from celery_spawn.web.command import serve\n"
    "if 'serve' not in spawn.commands:\n"
    "    spawn.add_command(serve)\n"
    "from celery.__main__ import main\n"
    "main()\n"
)


def serve_command(*args: str) -> list[str]:
    """The command line of ``celery spawn serve ARGS``."""
    import sys

    return [sys.executable, "-c", SERVE_LAUNCHER, "spawn", "serve", *args]


def new_queue() -> str:
    return f"spawn-rel-{uuid.uuid4().hex[:8]}"


def delete_amqp_queue(url: str, queue: str) -> None:
    """Remove a test queue from the shared RabbitMQ (our own queue only)."""
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(url, connect_timeout=3) as conn:
        conn.default_channel.queue_delete(queue)


# ---- reading the store ----------------------------------------------------------------------------
def rows(app, query) -> list[dict]:
    with get_state(app).store.read() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def children(app, parent_id: str) -> list[dict]:
    return rows(app, sa.select(s.jobs).where(s.jobs.c.parent_id == parent_id).order_by(s.jobs.c.position))


def operation(app, parent_id: str) -> dict | None:
    found = rows(app, sa.select(s.operations).where(s.operations.c.id == default_operation_id(parent_id)))
    return found[0] if found else None


def operations_of(app, parent_id: str) -> list[dict]:
    return rows(app, sa.select(s.operations).where(s.operations.c.parent_id == parent_id))


def state_counts(app, parent_id: str) -> dict[str, int]:
    found = rows(app, sa.select(s.jobs.c.state, sa.func.count().label("n"))
                 .where(s.jobs.c.parent_id == parent_id).group_by(s.jobs.c.state))
    return {r["state"]: r["n"] for r in found}


def wait_completed(app, parent_id: str, timeout: float = TIMEOUT) -> dict:
    return wait_for(lambda: (op := operation(app, parent_id)) and op["completed"] and op, timeout,
                    interval=0.5, what=f"the operation of {parent_id} to complete "
                                       f"(children: {state_counts(app, parent_id)})")


def assert_worker_still_works(app, worker) -> None:
    """The worker process lives, and a new spawn of three children runs to completion."""
    assert worker.proc.poll() is None, "the worker died"
    parent = app.signature("rel.fanout", kwargs={"count": 3}).delay()
    assert parent.get(timeout=TIMEOUT) == 3
    assert wait_completed(app, parent.id)["state"] == s.OP_SUCCEEDED


def ensure_callback_table(app) -> None:
    with get_state(app).store.begin() as conn:
        callbacks.create(conn, checkfirst=True)



@contextlib.contextmanager
def redis_crash_rig(tmp_path_factory, postgres_url: str) -> Iterator[tuple[RelBackend, object, Path]]:
    """A redis-server of our own (5 s visibility timeout, so a dead worker's messages come back quickly) with
    a PostgreSQL store: the backend, its app and the folder the children's runs are written to."""
    with private_redis(tmp_path_factory.mktemp("redis")) as port:
        runs = tmp_path_factory.mktemp("runs")
        backend = RelBackend("redis-postgresql", f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1",
                             postgres_url, new_queue(), visibility_timeout=5, runs_dir=str(runs))
        yield backend, backend.make_app(), runs

def drop_message(broker_url: str, queue: str, task_id: str) -> bool:
    """Remove one task message from a Redis queue, as a consumer killed right after BRPOP loses it."""
    import json

    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        for raw in client.lrange(queue, 0, -1):
            if json.loads(raw)["headers"].get("id") == task_id:
                return bool(client.lrem(queue, 1, raw))
        return False
    finally:
        client.close()


def drop_unacked(broker_url: str, task_id: str) -> bool:
    """Remove one task message from kombu's unacknowledged hash on Redis, so that it never comes back to a
    queue: what the fault explorer saw of a child whose whole worker was killed while it ran."""
    import json

    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        for tag, raw in client.hgetall("unacked").items():
            if json.loads(raw)[0]["headers"].get("id") == task_id:
                client.zrem("unacked_index", tag)
                return bool(client.hdel("unacked", tag))
        return False
    finally:
        client.close()


def callback_rows(app, operation_id: str | None = None) -> list[dict]:
    query = sa.select(callbacks)
    if operation_id is not None:
        query = query.where(callbacks.c.operation_id == operation_id)
    return rows(app, query)


def tables_exist(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


# ---- body executions (rel.unit writes one line per run) ------------------------------------------
def body_runs(folder: Path) -> dict[str, list[float]]:
    """Start times of every execution of a ``rel.unit`` body, by job id."""
    runs: dict[str, list[float]] = collections.defaultdict(list)
    for path in folder.glob("runs-*.txt"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:  # a line cut short by SIGKILL cannot be a whole write, but be safe
                runs[parts[0]].append(float(parts[1]))
    return runs


def epoch(naive_utc) -> float:
    return naive_utc.replace(tzinfo=timezone.utc).timestamp()


#: Seconds between a child's claim in the store and the first line of its body. The recovery sweep may
#: record a success it read from the result backend (a run that died after storing it) inside that
#: window, while a redelivered copy, rightly claimed, starts; a copy delivered after a recorded success
#: comes seconds later (visibility timeout, republishing) and is what this suite looks for.
CLAIM_WINDOW = 1.0


def runs_after_success(app, parent_id: str, folder: Path) -> list[tuple[str, float, float]]:
    """Body executions that started after the store recorded the child's success: must be none.

    Returns (child id, run start, recorded finish) for each, epoch seconds.
    """
    runs = body_runs(folder)
    late = []
    for child in children(app, parent_id):
        if child["state"] != s.SUCCEEDED or child["finished_at"] is None:
            continue
        finished = epoch(child["finished_at"])
        late.extend((child["id"], at, finished) for at in runs.get(child["id"], []) if at > finished + CLAIM_WINDOW)
    return late


def log_counts(logs: list[str], task: str, ids: list[str]) -> collections.Counter:
    """How often each id's ``Task <task>[<id>] succeeded`` line appears in the given worker logs."""
    text = "\n".join(logs)
    return collections.Counter({job_id: text.count(f"Task {task}[{job_id}] succeeded") for job_id in ids})


def assert_no_traceback_in(log: str, *allowed: str) -> None:
    """No Python traceback in a worker log, except under one of the ``allowed`` markers."""
    blocks = log.split("Traceback (most recent call last):")[1:]
    for block in blocks:
        head = block[:4000]
        assert any(marker in head for marker in allowed), f"unexpected traceback in worker log:\n{head[:2000]}"
