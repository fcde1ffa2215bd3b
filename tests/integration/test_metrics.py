"""Prometheus metrics from a real prefork worker (``spawn_metrics_port``) and from ``celery spawn serve``.

After a known run, the worker's ``/metrics`` (the sum over its pool processes
and its background process, in the client's multiprocess mode) and serve's
store-backed gauges give exact counts.
"""
from __future__ import annotations

import urllib.request
import uuid

import pytest

from tests.harness import COMBINATIONS, Worker, free_port, wait_for
from tests.integration.helpers import TIMEOUT, children_of
from tests.web.helpers import served

prometheus_parser = pytest.importorskip("prometheus_client.parser")

MEASURED = [c for c in COMBINATIONS if c in ("embedded", "redis-postgresql")]
pytestmark = pytest.mark.parametrize("observed_backend", MEASURED, indirect=True, scope="module")


@pytest.fixture(scope="module")
def metrics_worker(observed_backend, artifacts):
    backend = observed_backend
    port = free_port()
    log = artifacts / f"worker-metrics-{backend.name}-{uuid.uuid4().hex[:6]}.log"
    proc = Worker(backend, log, app="tests.observed_app", env={"CELERY_SPAWN_METRICS_PORT": str(port)})
    proc.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker makes a directory of its own
    proc.start()
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield proc
    proc.stop()


def scrape(url: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of a /metrics page."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def all_final(app, parent_id: str, count: int) -> bool:
    rows = children_of(app, parent_id)
    return len(rows) == count and all(r["state"] == "succeeded" for r in rows)


def test_worker_and_serve_metrics_count_a_known_run(metrics_worker, obs_client, observed_backend,
                                                    artifacts):
    backend = observed_backend
    url = metrics_worker.metrics_url
    spawn = {"handler": "numbers"}
    parents = [obs_client.signature("tests.numbers", args=(list(range(50)),), kwargs={"_spawn_config": spawn}).delay()
               for _ in range(2)]
    refused = obs_client.signature("tests.numbers", args=([1, 2, 3],),
                                   kwargs={"_spawn_config": {"handler": "numbers", "max_spawn_count": 2}}).delay()
    chain = obs_client.signature("tests.run_workflow", kwargs={"workflow_type": "etl_pipeline"}).delay()
    lost = obs_client.signature("tests.count", args=(3,), kwargs={"_spawn_config": {"handler": "lose_once"}}).delay()
    for parent in parents:
        wait_for(lambda p=parent: all_final(obs_client, p.id, 50), TIMEOUT, what="50 children to succeed")
    refused.get(timeout=TIMEOUT)
    wait_for(lambda: all_final(obs_client, chain.id, 3), TIMEOUT, what="the chain")
    wait_for(lambda: all_final(obs_client, lost.id, 3), TIMEOUT, what="the children the sweep published")

    def counted():
        samples = scrape(url)
        return samples if value(samples, "celery_spawn_children_finished_total", state="succeeded") >= 106 else None

    samples = wait_for(counted, TIMEOUT, what="the finishes to be counted")
    assert value(samples, "celery_spawn_spawns_total", handler="numbers", outcome="recorded") == 2
    assert value(samples, "celery_spawn_spawns_total", handler="numbers", outcome="refused") == 1
    assert value(samples, "celery_spawn_spawns_total", handler="workflow", outcome="recorded") == 1
    assert value(samples, "celery_spawn_children_spawned_total", handler="numbers") == 100
    assert value(samples, "celery_spawn_children_spawned_total", handler="workflow") == 3
    assert value(samples, "celery_spawn_children_finished_total", state="succeeded") == 106
    assert value(samples, "celery_spawn_spawn_seconds_count", handler="numbers") == 3
    # the chain's second and third steps were released by their dependency's finish
    assert value(samples, "celery_spawn_dependency_release_seconds_count") == 2
    assert value(samples, "celery_spawn_sweep_republished_total", reason="stranded") == 3
    assert value(samples, "celery_spawn_tracking_events_dropped_total") == 0
    assert ("celery_spawn_tracking_queue_depth", ()) in samples

    # serve: the store-backed gauges, after a spawn that leaves two children scheduled far ahead
    delayed = obs_client.signature("tests.numbers", args=([7, 8, 9],), kwargs={
        "_spawn_config": {"handler": "numbers", "spawn_delay_ms": 600_000}}).delay()
    wait_for(lambda: [r["state"] for r in children_of(obs_client, delayed.id)] == ["succeeded", "scheduled",
                                                                                  "scheduled"],
             TIMEOUT, what="one child run and two scheduled")
    env = {**backend.env()}
    with served(env, "--port", "0", log=artifacts / f"serve-metrics-{backend.name}.log") as server:
        gauges = scrape(f"{server.url}/metrics")
    assert value(gauges, "celery_spawn_children", state="scheduled") == 2
    for state in ("held", "pending", "dispatched", "started"):
        assert value(gauges, "celery_spawn_children", state=state) == 0, state
    assert value(gauges, "celery_spawn_operations_running") == 1
