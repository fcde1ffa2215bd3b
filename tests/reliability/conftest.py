"""Fixtures of the reliability suite: workers on ``tests.reliability.app``, private brokers, proxies, run logs.

The classes and functions they are built on are in :mod:`tests.reliability.helpers`.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import AMQP_URL, REDIS_URL, Backend, check_broker, throwaway_database
from tests.reliability.helpers import RelBackend, RelWorker, delete_amqp_queue, new_queue, private_redis
from tests.reliability.proxy import TcpProxy


@pytest.fixture
def start_worker(artifacts, request):
    """``start_worker(backend, name, concurrency=2)``: a RelWorker, stopped at teardown."""
    started: list[RelWorker] = []

    def start(backend: Backend, name: str = "w", concurrency: int = 2, **kwargs) -> RelWorker:
        test = request.node.name.replace("/", "_")[:60]
        log = artifacts / f"rel-{test}-{name}-{uuid.uuid4().hex[:6]}.log"
        worker = RelWorker(backend, log, concurrency=concurrency, **kwargs)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


@pytest.fixture
def fresh_postgres():
    with throwaway_database("postgresql") as url:
        yield url


@pytest.fixture
def fresh_mariadb():
    with throwaway_database("mysql") as url:
        yield url


@pytest.fixture(scope="session")
def shared_redis() -> str:
    check_broker(REDIS_URL)
    return REDIS_URL


@pytest.fixture(scope="session")
def shared_amqp() -> str:
    check_broker(AMQP_URL)
    return AMQP_URL


@pytest.fixture
def own_redis(tmp_path) -> Iterator[int]:
    with private_redis(tmp_path) as port:
        yield port


@pytest.fixture
def proxies() -> Iterator[callable]:
    """``proxies(upstream_port)``: a TcpProxy stopped at teardown."""
    made: list[TcpProxy] = []

    def make(upstream_port: int) -> TcpProxy:
        proxy = TcpProxy(upstream_port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()


#: The two stacks of the load tests: (store kind, broker).
LOAD_STACKS = {"postgresql": ("postgresql", "redis"), "mariadb": ("mysql", "amqp")}


@pytest.fixture(params=sorted(LOAD_STACKS))
def load_backend(request, shared_redis, shared_amqp):
    kind, broker = LOAD_STACKS[request.param]
    queue = new_queue()
    broker_url = f"{shared_redis}/0" if broker == "redis" else shared_amqp
    with throwaway_database(kind) as url:
        yield RelBackend(f"{broker}-{request.param}", broker_url, f"{shared_redis}/1", url, queue)
    if broker == "amqp":
        delete_amqp_queue(AMQP_URL, queue)
