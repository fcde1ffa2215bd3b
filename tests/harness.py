"""Test harness: real services (throwaway databases, isolated queues) and real ``celery worker`` processes."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))

PG_ADMIN_URL = os.environ.get("SPAWN_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URL = os.environ.get("SPAWN_TEST_MYSQL_URL", "mysql+mysqldb://root@127.0.0.1:3306/mysql")
REDIS_URL = os.environ.get("SPAWN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("SPAWN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

#: The combinations the core must run on: (broker, store). SPAWN_TEST_BACKENDS narrows them (tox envs).
#: ``redis-postgresql`` reaches PostgreSQL through psycopg2, ``redis-postgresql-psycopg`` through psycopg (3).
ALL_COMBINATIONS = ["embedded", "redis-postgresql", "redis-postgresql-psycopg", "rabbitmq-mariadb"]
COMBINATIONS = [c for c in os.environ.get("SPAWN_TEST_BACKENDS", ",".join(ALL_COMBINATIONS)).split(",") if c]
STORE_OF = {"embedded": "sqlite", "redis-postgresql": "postgresql", "redis-postgresql-psycopg": "postgresql-psycopg",
             "rabbitmq-mariadb": "mariadb"}
STORES = [STORE_OF[c] for c in COMBINATIONS]
#: The SQLAlchemy driver of each PostgreSQL store variant.
PG_DRIVERS = {"postgresql": "psycopg2", "postgresql-psycopg": "psycopg"}


def service_missing(what: str, exc: BaseException) -> None:
    """Skip on a laptop without the service; fail in CI, where every backend must run."""
    message = f"{what} is not reachable: {exc}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def throwaway_database(kind: str) -> Iterator[str]:
    """A fresh, uniquely named database on the local PostgreSQL or MariaDB; dropped afterwards."""
    name = f"spawn_test_{uuid.uuid4().hex[:10]}"
    admin_url = PG_ADMIN_URL if kind == "postgresql" else MYSQL_ADMIN_URL
    options = {"isolation_level": "AUTOCOMMIT"}
    try:
        admin = sa.create_engine(admin_url, **options)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except Exception as exc:  # noqa: BLE001 - any failure means the service is not usable
        service_missing(kind, exc)
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with contextlib.suppress(Exception), admin.connect() as conn:
            if kind == "postgresql":
                conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


def with_driver(url: str, driver: str) -> str:
    """``url`` with its PostgreSQL driver set (``psycopg2`` or ``psycopg``)."""
    return sa.make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


@contextlib.contextmanager
def throwaway_store(variant: str) -> Iterator[str]:
    """A fresh database for a store variant: ``postgresql``, ``postgresql-psycopg`` or ``mariadb``."""
    if variant in PG_DRIVERS:
        with throwaway_database("postgresql") as url:
            yield with_driver(url, PG_DRIVERS[variant])
    else:
        with throwaway_database("mysql") as url:
            yield url


def check_broker(url: str) -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001
        service_missing(url.split(":")[0], exc)


@dataclasses.dataclass
class Backend:
    """One combination of broker, result backend and lineage store."""

    name: str
    broker: str
    result_backend: str | None
    database_url: str
    queue: str
    fs_folder: str | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SPAWN_")}
        env.update({
            "SPAWN_TEST_BROKER": self.broker,
            "SPAWN_TEST_RESULT_BACKEND": self.result_backend or "",
            "CELERY_SPAWN_DATABASE_URL": self.database_url,
            "SPAWN_TEST_QUEUE": self.queue,
            "SPAWN_TEST_FS_FOLDER": self.fs_folder or "",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        })
        return env

    def make_app(self):
        from tests.app import make_app

        return make_app(self.broker, self.result_backend, self.database_url, self.queue, self.fs_folder)


class Worker:
    """A real ``celery worker`` subprocess, stopped (or killed) by the test."""

    def __init__(self, backend: Backend, log_path: Path, concurrency: int = 2, pool: str = "prefork",
                 extra_args: tuple[str, ...] = (), hostname: str | None = None,
                 env: dict[str, str] | None = None, app: str = "tests.app") -> None:
        self.backend = backend
        self.env = {**backend.env(), **(env or {})}
        self.log_path = log_path
        self.hostname = hostname or f"w{uuid.uuid4().hex[:6]}@%h"
        self.args = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool,
                     "-c", str(concurrency), "-Q", backend.queue, "-n", self.hostname,
                     "--loglevel", "INFO", "--without-gossip", "--without-mingle", *extra_args]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Worker:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"worker did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30, warm: bool = False) -> None:
        """SIGTERM to the whole process group: pool processes die mid-task, as in a container's stop. ``warm``:
        to the main process only, Celery's warm shutdown (running tasks finish first); the rest is killed after."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if warm:
                    os.kill(self.proc.pid, signal.SIGTERM)
                else:
                    os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()  # the main process, if still there, and any orphaned pool child of its group
        if not self._log.closed:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL to the process group: the main process and whatever of its own outlived it."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


def wait_for(predicate: Callable[[], object], timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class StoreBuilder:
    """Writes lineage rows straight into a store (no worker): trees of any shape for query and CLI tests.

    Every row carries every column, so a whole batch goes in one executemany.
    """

    def __init__(self, store, now=None) -> None:
        from datetime import datetime, timezone

        self.store = store
        self.now = now or datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
        self.jobs: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.edges: list[dict] = []
        self._pending_jobs: list[dict] = []
        self._pending_ops: list[dict] = []

    def job(self, job_id: str, parent: str | None = None, *, operation: str | None = None, position: int = 0,
            state: str = "succeeded", task: str = "tests.node", queue: str | None = "q", created=None,
            started=None, finished=None, pending_deps: int = 0, error: str | None = None) -> dict:
        from datetime import timedelta

        created = created or self.now
        final = state in ("succeeded", "failed", "revoked", "cancelled")
        parent_row = self.jobs.get(parent) if parent else None
        row = {
            "id": job_id, "parent_id": parent, "root_id": parent_row["root_id"] if parent_row else (parent or job_id),
            "operation_id": operation, "position": position, "depth": parent_row["depth"] + 1 if parent_row else 0,
            "task_name": task, "queue": queue, "priority": None, "state": state, "pending_deps": pending_deps,
            "retries": 0, "message": None, "error": error, "created_at": created, "dispatched_at": None,
            "started_at": started if started is not None else (created if state not in ("pending", "held") else None),
            "finished_at": finished if finished is not None else (created + timedelta(seconds=2) if final else None),
        }
        self.jobs[job_id] = row
        self._pending_jobs.append(row)
        return row

    def operation(self, operation_id: str, parent: str, *, handler: str | None = "handler", queue: str | None = "q",
                  state: str = "running", total: int = 0, created=None, finished=None, error: str | None = None,
                  config: str | None = None, label: str | None = None) -> dict:
        created = created or self.now
        parent_row = self.jobs[parent]
        row = {
            "id": operation_id, "label": label, "parent_id": parent, "root_id": parent_row["root_id"],
            "parent_task": parent_row["task_name"], "handler": handler, "queue": queue,
            "depth": parent_row["depth"], "state": state, "total": total, "config": config, "error": error,
            "on_complete": None, "wait_for_descendants": False, "fail_fast": False,
            "completed": state != "running", "created_at": created, "updated_at": created, "finished_at": finished,
        }
        self.operations[operation_id] = row
        self._pending_ops.append(row)
        return row

    def spawn(self, parent: str, count: int, *, operation: str | None = None, states=None, task: str = "tests.child",
              queue: str | None = "q", handler: str | None = "handler", op_state: str = "running", created=None,
              finished=None, prefix: str | None = None, label: str | None = None) -> list[str]:
        """One operation of ``count`` children under ``parent``; returns their ids in spawn order."""
        operation = operation or f"op-{parent}"
        self.operation(operation, parent, handler=handler, queue=queue, state=op_state, total=count,
                       created=created, finished=finished, label=label)
        ids = []
        for position in range(count):
            state = states[position % len(states)] if states else "succeeded"
            child = f"{prefix or parent}.{position}"
            self.job(child, parent, operation=operation, position=position, state=state, task=task, queue=queue,
                     created=created)
            ids.append(child)
        return ids

    def depends(self, job_id: str, depends_on: str, satisfied: bool = False) -> None:
        self.edges.append({"job_id": job_id, "depends_on_id": depends_on, "ignore_failure": False,
                           "satisfied": satisfied})

    def flush(self) -> StoreBuilder:
        from celery_spawn.store import schema as s

        with self.store.begin() as conn:
            for table, rows in ((s.operations, self._pending_ops), (s.jobs, self._pending_jobs),
                                (s.dependencies, self.edges)):
                for start in range(0, len(rows), 2000):
                    conn.execute(table.insert(), rows[start:start + 2000])
        self._pending_jobs, self._pending_ops, self.edges = [], [], []
        return self


def make_backend(name: str, tmp_path_factory) -> tuple[Backend, object]:
    """Build a Backend for a combination name; returns it with the context that owns its database."""
    queue = f"spawn-test-{uuid.uuid4().hex[:8]}"
    if name == "embedded":
        folder = tmp_path_factory.mktemp("broker")
        database = tmp_path_factory.mktemp("store") / "spawn.sqlite3"
        results = tmp_path_factory.mktemp("results")
        return Backend(name, "spawnfs://", f"file://{results}", f"sqlite:///{database}", queue,
                       fs_folder=str(folder)), None
    if name in ("redis-postgresql", "redis-postgresql-psycopg"):
        check_broker(REDIS_URL)
        db = throwaway_store(STORE_OF[name])
        return Backend(name, f"{REDIS_URL}/0", f"{REDIS_URL}/1", db.__enter__(), queue), db
    if name == "rabbitmq-mariadb":
        check_broker(AMQP_URL)
        db = throwaway_database("mysql")
        return Backend(name, AMQP_URL, f"{REDIS_URL}/1", db.__enter__(), queue), db
    raise ValueError(name)


# ---- a process with a fast clock (libfaketime) ---------------------------------------------------
#: How far ahead the fast clock runs.
SKEW = datetime.timedelta(minutes=10)
#: Where Debian's ``faketime`` package puts the library, by architecture.
LIBFAKETIME = [Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
               Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
               Path("/usr/lib/faketime/libfaketime.so.1")]


def libfaketime() -> str:
    """The path of libfaketime; a skip on a laptop without it, a failure in CI."""
    for path in LIBFAKETIME:
        if path.exists():
            return str(path)
    message = "libfaketime is not installed (Debian package faketime; scripts/system-deps.sh installs it)"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


#: Sleeps that bypass libfaketime (see the file's comment); built once per source version.
REAL_SLEEP_SOURCE = Path(__file__).with_name("realsleep.c")


def real_sleep_library() -> str:
    """Compile :data:`REAL_SLEEP_SOURCE` into a shared library, once, and return its path.

    The file name carries the source's hash, and the library is renamed into place, so test
    processes running side by side build it at most once each and never load half a file.
    """
    source = REAL_SLEEP_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    library = Path(tempfile.gettempdir()) / f"celery-spawn-realsleep-{digest}.so"
    if not library.exists():
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(partial), str(REAL_SLEEP_SOURCE)],
                       check=True, capture_output=True)
        os.replace(partial, library)
    return str(library)


def fast_clock_env() -> dict[str, str]:
    """Environment that runs a process (and its children) with a clock :data:`SKEW` ahead.

    Only the wall clock moves: the monotonic clock stays true, and sleeps go to the kernel
    unchanged (libfaketime's own ``clock_nanosleep`` fails them; see ``tests/realsleep.c``).
    """
    return {"LD_PRELOAD": f"{real_sleep_library()}:{libfaketime()}",
            "FAKETIME": f"+{int(SKEW.total_seconds())}s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_RESET": "1"}


@contextlib.contextmanager
def counting(store):
    """Counts the SELECT/WITH statements run inside the block."""
    seen: list[str] = []

    def listener(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append(statement)

    engine = store.engine
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
