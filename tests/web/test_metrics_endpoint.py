"""``/metrics`` of the web app: the store-backed gauges, exact for a known store, under the API's token rules."""
from __future__ import annotations

import pytest

from celery_spawn.store import SpawnStore
from celery_spawn.web import create_app
from tests.harness import StoreBuilder

parser = pytest.importorskip("prometheus_client.parser")

TOKEN = "correct horse battery staple"


@pytest.fixture
def store_url(sqlite_url):
    store = SpawnStore(sqlite_url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("root", task="tests.parent")
    builder.spawn("root", 7, operation="op-1",
                  states=["succeeded", "started", "held", "held", "pending", "dispatched", "scheduled"])
    builder.job("root-2", task="tests.parent")
    builder.spawn("root-2", 2, operation="op-2", states=["succeeded", "failed"])
    builder.flush()
    store.dispose()
    return sqlite_url


def gauges(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_metrics_reads_the_backlog_from_the_store(store_url):
    client = create_app(database_url=store_url).test_client()
    response = client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    found = gauges(response.get_data(as_text=True))
    expected = {"held": 2, "scheduled": 1, "pending": 1, "dispatched": 1, "started": 1}
    for state, count in expected.items():
        assert found[("celery_spawn_children", (("state", state),))] == count
    running = found[("celery_spawn_operations_running", ())]
    assert running == 2  # StoreBuilder leaves both operations running


def test_metrics_follow_the_token_rules_of_reads(store_url):
    client = create_app(database_url=store_url, token=TOKEN).test_client()
    denied = client.get("/metrics")
    assert denied.status_code == 401 and denied.json["error"].startswith("missing or wrong API token")
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_metrics_of_a_missing_sqlite_store_is_unavailable(tmp_path):
    client = create_app(database_url=f"sqlite:///{tmp_path / 'none.sqlite3'}").test_client()
    assert client.get("/metrics").status_code == 503
    assert not (tmp_path / "none.sqlite3").exists()


def test_metrics_without_the_client_names_the_extra(store_url, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # an import of it raises ImportError
    response = create_app(database_url=store_url).test_client().get("/metrics")
    assert response.status_code == 501
    assert "pip install 'celery-spawn[metrics]'" in response.json["error"]
