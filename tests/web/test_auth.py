"""The token rules: reads and writes with and without a token, constant-time compare, loopback-only binds.

The store here is written by the harness's StoreBuilder (the rules do not
depend on who made the tree); the servers are real: Flask's test client and
``celery spawn serve`` as a subprocess.
"""
from __future__ import annotations

import hmac
import http.client
import json
import subprocess
import sys

import pytest
from celery import Celery

from celery_spawn.store import SpawnStore
from celery_spawn.web import auth, create_app
from celery_spawn.web.api import web_state
from tests.harness import ROOT, StoreBuilder
from tests.web.helpers import CELERY, clean_env, get_json, served

TOKEN = "correct horse battery staple"


@pytest.fixture
def store_url(sqlite_url):
    store = SpawnStore(sqlite_url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("root", task="tests.parent")
    builder.spawn("root", 4, operation="op-1", states=["succeeded", "started", "held", "pending"])
    builder.flush()
    store.dispose()
    return sqlite_url


@pytest.fixture
def make_client():
    apps = []

    def make(*args, **kwargs):
        flask_app = create_app(*args, **kwargs)
        apps.append(flask_app)
        return flask_app.test_client()

    yield make
    for flask_app in apps:
        web_state(flask_app).store.dispose()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ---- with a token ---------------------------------------------------------------------------------
def test_with_a_token_reads_need_it(store_url, make_client):
    client = make_client(database_url=store_url, token=TOKEN)
    for path in ("/api/spawn/operations", "/api/spawn/stats", "/api/jobs/root/spawn-tree", "/api/jobs/root/parent",
                 "/api/jobs/root/children", "/api/spawn/operations/op-1"):
        for headers in ({}, bearer("wrong"), bearer(TOKEN + "x"), bearer(TOKEN[:-1]), {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}, bearer("é" * 5)):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.get_json() == {"error": "missing or wrong API token: send 'Authorization: Bearer <token>'"}
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="celery-spawn"'
        assert client.get(path, headers=bearer(TOKEN)).status_code == 200
    assert client.get("/api/spawn/stats", headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200
    # Auth comes before parameters: a stranger learns nothing from a 400.
    assert client.get("/api/spawn/operations?limit=bad").status_code == 401
    # The document and the dashboard's files hold no data.
    assert client.get("/api/openapi.json").status_code == 200
    assert client.get("/").status_code == 200 and client.get("/static/dashboard.js").status_code == 200


def test_with_a_token_cancel_needs_it(store_url, make_client):
    client = make_client(database_url=store_url, token=TOKEN)
    for headers in ({}, bearer("wrong")):
        assert client.post("/api/spawn/operations/op-1/cancel", headers=headers).status_code == 401
    assert client.post("/api/spawn/operations/unknown/cancel", headers=bearer(TOKEN)).status_code == 404
    response = client.post("/api/spawn/operations/op-1/cancel", headers=bearer(TOKEN))
    assert response.status_code == 200
    result = response.get_json()
    assert result["mode"] == "store" and result["cancelled"] == 2 and result["still_running"] == 1
    states = {c["id"]: c["state"] for c in client.get("/api/jobs/root/children", headers=bearer(TOKEN))
              .get_json()["children"]}
    assert states == {"root.0": "succeeded", "root.1": "started", "root.2": "cancelled", "root.3": "cancelled"}


def test_without_a_token_reads_are_open_and_cancel_is_refused(store_url, make_client):
    client = make_client(database_url=store_url)
    assert client.get("/api/spawn/operations").status_code == 200
    for operation in ("op-1", "unknown"):
        for headers in ({}, bearer(TOKEN)):
            response = client.post(f"/api/spawn/operations/{operation}/cancel", headers=headers)
            assert response.status_code == 403 and "no API token" in response.get_json()["error"]
    states = {c["state"] for c in client.get("/api/jobs/root/children").get_json()["children"]}
    assert "cancelled" not in states


def test_token_from_settings_and_environment(store_url, make_client, monkeypatch):
    app = Celery("auth_test", broker="memory://", set_as_current=False)
    app.conf.spawn_database_url = store_url
    app.conf.spawn_api_token = "from-conf"
    client = make_client(app)
    assert client.get("/api/spawn/stats").status_code == 401
    assert client.get("/api/spawn/stats", headers=bearer("from-conf")).status_code == 200
    explicit = make_client(app, token="explicit")
    assert explicit.get("/api/spawn/stats", headers=bearer("from-conf")).status_code == 401
    assert explicit.get("/api/spawn/stats", headers=bearer("explicit")).status_code == 200

    monkeypatch.setenv("CELERY_SPAWN_API_TOKEN", "from-env")
    from_env = make_client(database_url=store_url)
    assert from_env.get("/api/spawn/stats").status_code == 401
    assert from_env.get("/api/spawn/stats", headers=bearer("from-env")).status_code == 200


def test_tokens_are_compared_in_constant_time(store_url, make_client, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    client = make_client(database_url=store_url, token=TOKEN)
    assert client.get("/api/spawn/stats", headers=bearer("x" * len(TOKEN))).status_code == 401
    assert client.get("/api/spawn/stats", headers=bearer(TOKEN)).status_code == 200
    assert calls == [(b"x" * len(TOKEN), TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("10.0.0.1", False),
    ("example.com", False), ("localhost.example.com", False), ("", False),
])
def test_loopback_addresses(host, loopback):
    assert auth.is_loopback(host) is loopback


# ---- the serve command --------------------------------------------------------------------------
def run_serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CELERY, "spawn", "serve", *args], cwd=ROOT,
                          env=env or clean_env(), capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "example.com"])
def test_serve_refuses_a_public_bind_without_a_token(store_url, host):
    result = run_serve("--host", host, "--port", "0", "-u", store_url)
    assert result.returncode == 2, result
    assert f"refusing to listen on {host} without an API token" in result.stderr
    assert "Traceback" not in result.stderr and "serving" not in result.stdout


def test_serve_on_a_public_address_with_a_token(store_url, artifacts):
    log = artifacts / "serve-public.log"
    with served(clean_env(CELERY_SPAWN_API_TOKEN=TOKEN), "--host", "0.0.0.0", "--port", "0", "-u", store_url,
                app=None, log=log) as server:
        assert "token required" in server.output[0]
        url = server.url.replace("0.0.0.0", "127.0.0.1")
        assert get_json(f"{url}/api/spawn/stats")[0] == 401
        status, stats = get_json(f"{url}/api/spawn/stats", token=TOKEN)
        assert status == 200 and stats["children"] == 4


def test_a_loopback_server_answers_only_to_loopback_names(store_url, artifacts):
    """Without a token, a Host header naming another site is refused: no DNS rebinding into the API."""
    with served(clean_env(), "--port", "0", "-u", store_url, app=None, log=artifacts / "serve-loopback.log") as server:
        assert "no token" in server.output[0]
        port = int(server.url.rsplit(":", 1)[1])
        for host, expected in ((f"evil.example:{port}", 400), (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/api/spawn/operations", headers={"Host": host})
            response = connection.getresponse()
            body = json.loads(response.read())
            connection.close()
            assert response.status == expected, (host, body)
            assert "error" in body if expected == 400 else body["count"] == 1
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/api/spawn/operations/op-1/cancel", headers=bearer(TOKEN))
        assert connection.getresponse().status == 403


def test_the_serve_command_does_not_import_flask():
    code = ("import sys, celery_spawn.cli, celery_spawn.web, celery_spawn.web.command\n"
            "assert 'flask' not in sys.modules and 'werkzeug' not in sys.modules, 'flask imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
