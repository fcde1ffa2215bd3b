"""Runs fault schedules against a real worker: one rig per stack, reused by its schedules.

A rig is what one stack needs: a broker and a store, each behind a
:class:`~tests.reliability.proxy.TcpProxy` the explorer owns (a ``redis-server``
of its own, or its own queue on the shared RabbitMQ; a throwaway PostgreSQL
or MariaDB database), a history database beside the store, and one prefork
worker (concurrency 2) that is restarted at once when a fault kills it, as a
supervisor would; a ``clock-skew`` fault adds a second worker, its wall clock
10 minutes ahead, for the fault's duration. Each schedule sends its root, injects its faults at their
moments, heals everything (outages ended, a worker running and ready), waits
for every operation of its tree to complete and every callback to run, then
hands over to :mod:`tests.chaos.checker`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import sqlalchemy as sa

from celery_spawn import get_state
from celery_spawn.engine.completion import completion_task_id
from celery_spawn.store import schema as s
from tests.chaos import history
from tests.chaos.app import make_chaos_app, root_signature
from tests.chaos.checker import ScheduleResult, check, tree_operations
from tests.chaos.schedule import (
    BROKER_CUT,
    BROKER_HANG,
    CLOCK_SKEW,
    KILL_CHILD,
    KILL_WORKER,
    STORE_CUT,
    Fault,
    Schedule,
)
from tests.harness import AMQP_URL, REDIS_URL, ROOT, check_broker, fast_clock_env, throwaway_database
from tests.reliability.helpers import (
    RELIABILITY_APP,
    RelBackend,
    RelWorker,
    delete_amqp_queue,
    private_redis,
    url_port,
    via,
)
from tests.reliability.proxy import TcpProxy

CHAOS_APP = "tests.chaos.app"
#: Redis's visibility timeout for the workers: messages a killed worker held come back after it.
VISIBILITY_TIMEOUT = 5
#: Seconds a (re)started worker may take to become ready once its broker is reachable.
READY_TIMEOUT = 90
#: Seconds a healed schedule may take to complete every operation and callback.
COMPLETION_TIMEOUT = 150
#: What a worker logs when it gives up: kombu 5.7's Redis transport can fail a lost connection with
#: "Unrecoverable error: AttributeError(... 'hostname')", and the worker may then hang while stopping
#: ("Error on stopping Hub") instead of exiting. A supervisor's health check would replace it; so does the runner.
GIVING_UP = ("Unrecoverable error:", "Error on stopping Hub")
#: Seconds to wait after completion for late copies (a message Redis hands out again after its visibility
#: timeout) before checking; copies later still are caught by the re-check at the end of the run.
SETTLE = 2.0


@dataclasses.dataclass
class ChaosBackend(RelBackend):
    """A RelBackend whose workers run ``tests.chaos.app`` and write their history to ``history_url``."""

    history_url: str = ""

    def env(self) -> dict[str, str]:
        return {**super().env(), history.HISTORY_URL_ENV: self.history_url}

    def make_app(self, database_url: str | None = None, broker: str | None = None):
        return make_chaos_app(broker or self.broker, self.result_backend, database_url or self.database_url,
                              self.queue, self.fs_folder, self.visibility_timeout)


class ChaosWorker(RelWorker):
    """A ``celery -A tests.chaos.app worker`` that can be launched without waiting (its broker may be cut)."""

    def __init__(self, backend: ChaosBackend, log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(backend, log_path, concurrency=2, env=env)
        self.args[self.args.index(RELIABILITY_APP)] = CHAOS_APP

    def launch(self) -> ChaosWorker:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def going_down(self) -> bool:
        """Whether the worker gave up (kombu's Redis transport can, on a lost connection) and may hang stopping."""
        return any(marker in self.log() for marker in GIVING_UP)

    def ready(self) -> bool:
        return self.alive() and " ready." in self.log()


class Rig:
    """One stack's services, proxies, history and worker; see the module docstring."""

    def __init__(self, stack: str, backend: ChaosBackend, broker_proxy: TcpProxy, store_proxy: TcpProxy,
                 store_url: str, broker_url: str, logs: Path, say: Callable[[str], None]) -> None:
        self.stack = stack
        self.backend = backend
        self.proxies = {"broker": broker_proxy, "store": store_proxy}
        self.app = backend.make_app(database_url=store_url, broker=broker_url)  # the explorer goes direct
        self.history = history.engine_for(backend.history_url)
        self.logs = logs
        self.say = say
        self.worker: ChaosWorker | None = None
        #: The second worker of a ``clock-skew`` fault, its wall clock ahead (tests.harness.fast_clock_env).
        self.skewed: ChaosWorker | None = None
        self.workers = 0
        #: Times the worker died without being killed (kombu's Redis transport can, on a lost connection).
        self.exits = 0
        self._outages: dict[str, list[str]] = {"broker": [], "store": []}
        #: The root task id (and history tag) of the last schedule run.
        self.last_tag = ""

    # ---- the worker ------------------------------------------------------------------------------
    def launch_worker(self) -> None:
        if self.worker is not None and not self.worker.alive():
            self.worker.stop()  # a killed worker: closes its log file
        self.workers += 1
        log = self.logs / f"chaos-{self.stack}-{self.backend.queue}-w{self.workers}.log"
        self.worker = ChaosWorker(self.backend, log).launch()

    def supervise(self) -> None:
        """Start a new worker if the last one died by itself, or gave up and hangs on its way out."""
        if self.worker is None:
            return
        if self.worker.alive() and self.worker.going_down():
            self.worker.kill()
            self.say(f"  the worker gave up ({self.worker.log_path.name}: {GIVING_UP[0]!r}); killed it")
        if not self.worker.alive():
            self.exits += 1
            self.say(f"  the worker exited by itself (exit {self.worker.proc.returncode}, log "
                     f"{self.worker.log_path.name}); starting another")
            self.launch_worker()

    def launch_skewed_worker(self) -> None:
        self.stop_skewed_worker()
        log = self.logs / f"chaos-{self.stack}-{self.backend.queue}-w{self.workers}-skewed.log"
        self.skewed = ChaosWorker(self.backend, log, env=fast_clock_env()).launch()

    def stop_skewed_worker(self) -> None:
        """A warm shutdown, as a deploy that retires a host: its tasks finish, its prefetched messages go back."""
        if self.skewed is not None:
            self.skewed.stop()
            self.skewed = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.supervise()
            if self.worker is not None and self.worker.ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"the worker did not become ready in {READY_TIMEOUT}s; see {self.worker.log_path}")

    # ---- faults ----------------------------------------------------------------------------------
    def start_fault(self, fault: Fault, rng: random.Random) -> bool:
        """Inject ``fault`` (an outage's start); False when there was nothing to inject it into."""
        if fault.kind == KILL_WORKER:
            if not (self.worker and self.worker.alive()):
                return False
            self.worker.kill()
            self.launch_worker()
            return True
        if fault.kind == CLOCK_SKEW:
            self.launch_skewed_worker()
            return True
        if fault.kind == KILL_CHILD:
            forked = self.worker.pool_children() if self.worker and self.worker.alive() else []
            if not forked:
                return False
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(sorted(forked)), signal.SIGKILL)
            return True
        side = "broker" if fault.kind in (BROKER_CUT, BROKER_HANG) else "store"
        self._outages[side].append(fault.kind)
        self._apply(side)
        return True

    def end_fault(self, fault: Fault) -> None:
        if fault.kind == CLOCK_SKEW:
            self.stop_skewed_worker()
            return
        side = "broker" if fault.kind in (BROKER_CUT, BROKER_HANG) else "store"
        self._outages[side].remove(fault.kind)
        self._apply(side)

    def _apply(self, side: str) -> None:
        proxy, active = self.proxies[side], self._outages[side]
        if not active:
            # A hang ends with every connection reset, as a peer that stopped answering is in the end:
            # the proxy swallowed what was sent meanwhile, so those connections can never be whole again.
            proxy.cut()
            proxy.resume()
        elif BROKER_CUT in active or STORE_CUT in active:
            proxy.cut()
        else:
            proxy.hang()

    def heal(self) -> None:
        self.stop_skewed_worker()
        for side, active in self._outages.items():
            active.clear()
            self._apply(side)
        self.wait_ready()

    # ---- one schedule ----------------------------------------------------------------------------
    def run(self, schedule: Schedule) -> ScheduleResult:
        started = time.monotonic()
        tag = self.last_tag = f"chaos-{schedule.seed}-{uuid.uuid4().hex[:8]}"
        rng = random.Random(schedule.seed * 7919)
        self.wait_ready()
        workers_before, exits_before = self.workers, self.exits
        timeline = sorted([(f.at, 1, f) for f in schedule.faults] +
                          [(f.at + f.duration, 0, f) for f in schedule.faults if f.duration],
                          key=lambda item: (item[0], item[1]))
        injected: list[Fault] = []
        skipped: list[Fault] = []
        root_signature(self.app, tag, schedule.plan).apply_async(task_id=tag)
        t0 = time.monotonic()
        for at, is_start, fault in timeline:
            while time.monotonic() < t0 + at:
                time.sleep(min(0.05, max(0.0, t0 + at - time.monotonic())))
            if not is_start:
                self.end_fault(fault)
            else:
                (injected if self.start_fault(fault, rng) else skipped).append(fault)
            self.supervise()
        self.heal()
        completed = self.wait_completed(tag, schedule)
        time.sleep(SETTLE)
        result = check(self.app, self.history, schedule, tag)
        result.injected = [f.kind for f in injected]
        result.skipped = [f.kind for f in skipped]
        result.workers_started = self.workers - workers_before
        result.worker_exits = self.exits - exits_before
        if not completed:
            result.problems.insert(0, f"the tree did not complete within {COMPLETION_TIMEOUT}s of healing")
        result.seconds = time.monotonic() - started
        return result

    def wait_completed(self, tag: str, schedule: Schedule) -> bool:
        """Every operation of the tree completed and its callback run, within the timeout.

        A callback has run when the history has it, or, as the checker counts it, when the result backend
        holds its success (its process was killed between Celery storing the result and ``task_success``).
        """
        deadline = time.monotonic() + COMPLETION_TIMEOUT
        while time.monotonic() < deadline:
            self.supervise()
            ops = tree_operations(self.app, tag)
            if len(ops) >= schedule.operations and all(op["completed"] for op in ops):
                with self.history.connect() as conn:
                    called = {r.job_id for r in conn.execute(
                        sa.select(history.history.c.job_id).where(history.history.c.tag == tag,
                                                                 history.history.c.event == history.CALLBACK))}
                if all(op["id"] in called or self.callback_stored(op["id"]) for op in ops):
                    return True
            time.sleep(0.5)
        return False

    def callback_stored(self, operation_id: str) -> bool:
        """Whether the result backend holds the success of the operation's ``on_complete``."""
        return self.app.AsyncResult(completion_task_id(operation_id)).state == "SUCCESS"

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.resume()
        self.stop_skewed_worker()
        if self.worker is not None:
            self.worker.stop()
        self.history.dispose()
        get_state(self.app).store.dispose()


@contextlib.contextmanager
def open_rig(stack: str, workdir: Path, logs: Path, say: Callable[[str], None]) -> Iterator[Rig]:
    """The rig of ``stack``: ``redis-postgresql`` or ``amqp-mysql``."""
    with contextlib.ExitStack() as stack_of:
        if stack == "redis-postgresql":
            folder = workdir / f"redis-{uuid.uuid4().hex[:6]}"
            folder.mkdir(parents=True)
            port = stack_of.enter_context(private_redis(folder))
            broker, results, kind = f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1", "postgresql"
        else:
            check_broker(AMQP_URL)
            broker, results, kind = AMQP_URL, f"{REDIS_URL}/1", "mysql"
        store_url = stack_of.enter_context(throwaway_database(kind))
        history_url = stack_of.enter_context(throwaway_database(kind))
        history.create(history_url)
        broker_proxy = stack_of.enter_context(TcpProxy(url_port(broker) if broker.startswith("redis") else 5672))
        store_proxy = stack_of.enter_context(TcpProxy(url_port(store_url)))
        queue = f"spawn-chaos-{uuid.uuid4().hex[:8]}"
        backend = ChaosBackend(stack, via(broker, broker_proxy), results, via(store_url, store_proxy), queue,
                               visibility_timeout=VISIBILITY_TIMEOUT if broker.startswith("redis") else None,
                               history_url=history_url)
        if not broker.startswith("redis"):
            stack_of.callback(delete_amqp_queue, broker, queue)
        rig = Rig(stack, backend, broker_proxy, store_proxy, store_url, broker, logs, say)
        stack_of.callback(rig.close)
        with get_state(rig.app).store.read() as conn:  # creates the spawn tables before the first worker
            conn.execute(sa.select(sa.func.count()).select_from(s.jobs))
        rig.launch_worker()
        rig.wait_ready()
        yield rig


def plan_schedules(count: int, seed: int, stack: str) -> list[Schedule]:
    """Schedule ``i`` has seed ``seed + i``; with ``both``, the stacks take turns."""
    from tests.chaos.schedule import STACKS, generate

    stacks = STACKS if stack == "both" else (stack,)
    return [generate(seed + i, stacks[i % len(stacks)]) for i in range(count)]


def explore(schedules: list[Schedule], workdir: Path, logs: Path, say: Callable[[str], None] = print,
            results: list[ScheduleResult] | None = None) -> list[ScheduleResult]:
    """Run every schedule, one rig per stack, and check each; a last re-check catches copies that came late.

    Each result is appended to ``results`` as soon as its schedule is checked, so a run that is stopped
    still leaves what it found there.
    """
    results = [] if results is None else results
    logs.mkdir(parents=True, exist_ok=True)
    for stack in dict.fromkeys(sch.stack for sch in schedules):
        mine = [sch for sch in schedules if sch.stack == stack]
        say(f"== {stack}: {len(mine)} schedules")
        with open_rig(stack, workdir, logs, say) as rig:
            done: list[tuple[Schedule, ScheduleResult, str]] = []
            for schedule in mine:
                say(f"  {schedule.describe()}")
                result = rig.run(schedule)
                done.append((schedule, result, rig.last_tag))
                results.append(result)
                say(f"    {summary_line(result)}")
                if not result.ok:
                    say(f"    replay: {schedule.replay()}")
            time.sleep(VISIBILITY_TIMEOUT + SETTLE)  # the last copies Redis could still hand out
            for schedule, result, tag in done:
                late = check(rig.app, rig.history, schedule, tag)
                new = [p for p in late.problems if p not in result.problems]
                if new:
                    say(f"  seed {schedule.seed}, checked again at the end: {new}")
                    result.problems.extend(f"at the end of the run: {p}" for p in new)
                    result.doubled = sorted(set(result.doubled) | set(late.doubled))
                    result.callbacks_once = min(result.callbacks_once, late.callbacks_once)
    return results


def summary_line(result: ScheduleResult) -> str:
    verdict = "ok" if result.ok else "FAILED"
    skipped = f" ({len(result.skipped)} found nothing to hit)" if result.skipped else ""
    line = (f"{verdict} in {result.seconds:.1f}s: {len(result.injected)} faults{skipped}, {result.children} children "
            f"({result.reruns} ran more than once before succeeding, {result.backend_only} known from the result "
            f"backend only), lost {len(result.lost)}, doubled {len(result.doubled)}, callbacks once "
            f"{result.callbacks_once}/{result.operations}"
            + (f" ({result.callbacks_backend_only} known from the result backend only)"
               if result.callbacks_backend_only else "")
            + f", workers started {result.workers_started}")
    if result.worker_exits:
        line += f" ({result.worker_exits} exited by themselves)"
    for problem in result.problems[:10]:
        line += f"\n      {problem}"
    return line
