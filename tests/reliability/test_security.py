"""Nobody reaches the data who should not, and no secret leaks out.

* The API token rule: without a token, reads are open and every mutating
  endpoint answers 403 (and ``serve`` binds loopback only); with a token,
  every API endpoint but the OpenAPI document wants it (401 otherwise).
* Responses never carry a stack trace, SQL, or a database URL with its password
  (a store that is down answers 503, a crash 500, both with one line of text).
* A worker whose store URL carries a password never prints it, through a
  normal spawn, a refused spawn and a store outage; neither do the CLI nor
  ``serve``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import sqlalchemy as sa

from celery_spawn.store import SpawnStore
from celery_spawn.store import schema as s
from tests.harness import PG_ADMIN_URL, ROOT, StoreBuilder, throwaway_database, wait_for
from tests.reliability.app import HALFWAY
from tests.reliability.helpers import (
    RelBackend,
    callback_rows,
    ensure_callback_table,
    new_queue,
    operation,
    serve_command,
    url_port,
    via,
)
from tests.reliability.proxy import TcpProxy

TOKEN = "s3cr3t-t0ken-" + uuid.uuid4().hex[:8]
READS = ["/api/spawn/operations", "/api/spawn/operations/op-a", "/api/spawn/stats", "/api/jobs/root-a/spawn-tree",
         "/api/jobs/root-a/children", "/api/jobs/root-a.1/parent"]
CANCEL = "/api/spawn/operations/op-a/cancel"
WRONG_AUTHORIZATIONS = [
    None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN.upper()}", f"Token {TOKEN}", "Bearer " + "x" * 10_000, "Bearer ünïcødé", f"{TOKEN}",
    f"Bearer {TOKEN}\x00",
]


@pytest.fixture(scope="module")
def store_url():
    """PostgreSQL store with one finished operation and one with children still waiting (op-a)."""
    with throwaway_database("postgresql") as url:
        store = SpawnStore(url)
        store.migrate()
        builder = StoreBuilder(store)
        builder.job("root-a")
        builder.spawn("root-a", 3, operation="op-a", states=["succeeded", "pending", "held"])
        builder.job("root-b")
        builder.spawn("root-b", 2, operation="op-b", op_state="succeeded")
        builder.flush()
        store.dispose()
        yield url


def states(url: str, operation_id: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(s.jobs.c.state).where(s.jobs.c.operation_id == operation_id)
                                     .order_by(s.jobs.c.position)).scalars())
    finally:
        engine.dispose()


@contextlib.contextmanager
def api_client(url: str, token: str | None):
    from celery_spawn.web import create_app
    from celery_spawn.web.api import web_state

    flask_app = create_app(database_url=url, token=token)
    try:
        yield flask_app.test_client()
    finally:
        web_state(flask_app).store.dispose()


def no_leak(response, *secrets: str) -> None:
    body = response.get_data(as_text=True)
    for leak in ("Traceback", "[SQL:", "sqlalche.me", "psycopg2", "OperationalError", "File \"", *secrets):
        assert leak not in body, f"{leak!r} in {response.status_code} {body[:400]}"


# ---- the token rule ------------------------------------------------------------------------------
def test_without_a_token_reads_are_open_and_nothing_may_change(store_url):
    before = states(store_url, "op-a")
    with api_client(store_url, None) as client:
        for path in READS:
            assert client.get(path).status_code == 200, path
        for authorization in (None, f"Bearer {TOKEN}", "Bearer anything"):
            headers = {"Authorization": authorization} if authorization else {}
            response = client.post(CANCEL, headers=headers)
            assert response.status_code == 403, response.get_data(as_text=True)
            assert "token" in response.get_json()["error"]
            for method in ("PUT", "PATCH", "DELETE"):
                assert client.open(CANCEL, method=method, headers=headers).status_code in (403, 405)
        assert client.get("/api/openapi.json").status_code == 200
    assert states(store_url, "op-a") == before


def test_with_a_token_every_endpoint_wants_it(store_url):
    before = states(store_url, "op-a")
    with api_client(store_url, TOKEN) as client:
        for path in READS:
            for authorization in WRONG_AUTHORIZATIONS:
                headers = {"Authorization": authorization} if authorization is not None else {}
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (path, authorization, response.status_code)
                assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
                no_leak(response, TOKEN)
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        for authorization in WRONG_AUTHORIZATIONS:
            headers = {"Authorization": authorization} if authorization is not None else {}
            assert client.post(CANCEL, headers=headers).status_code == 401
        assert states(store_url, "op-a") == before  # nothing changed without the token
        assert client.get("/api/openapi.json").status_code == 200  # the document is public
        response = client.post(CANCEL, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.get_data(as_text=True)
        no_leak(response, TOKEN)
    assert states(store_url, "op-a") == ["succeeded", "cancelled", "cancelled"]


# ---- serve: loopback only without a token -------------------------------------------------------
def env_for(url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SPAWN_")}
    if url:
        env["CELERY_SPAWN_DATABASE_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_serve_refuses_a_public_address_without_a_token(store_url, host):
    done = subprocess.run(serve_command("--host", host, "--port", "0"), cwd=ROOT, env=env_for(store_url),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "without an API token" in done.stderr
    assert "Traceback" not in done.stderr


@contextlib.contextmanager
def serving(url: str, *args: str, log_path=None):
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(serve_command("--port", "0", *args), cwd=ROOT, env=env_for(url), stdout=subprocess.PIPE,
                            stderr=log, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        base = None
        while time.monotonic() < deadline and base is None:
            with contextlib.suppress(queue.Empty):
                found = re.search(r" on (http://\S+?)/ ", lines.get(timeout=0.5))
                base = found.group(1) if found else None
            assert proc.poll() is None, "serve exited"
        assert base, "serve did not start"
        yield base
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()
        if log is not subprocess.DEVNULL:
            log.close()


def http(method: str, url: str, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_on_loopback_without_a_token_reads_but_never_writes(store_url):
    before = states(store_url, "op-b")
    with serving(store_url) as base:
        assert base.startswith("http://127.0.0.1:")
        status, body = http("GET", base + "/api/spawn/operations")
        assert status == 200 and json.loads(body)["count"] >= 1
        status, body = http("POST", base + "/api/spawn/operations/op-b/cancel")
        assert status == 403
        # DNS rebinding: a loopback server answers only to loopback host names.
        status, body = http("GET", base + "/api/spawn/operations", {"Host": "evil.example"})
        assert status == 400
    assert states(store_url, "op-b") == before


# ---- no leaks in responses ---------------------------------------------------------------------------
@pytest.fixture
def secret_url_down(store_url):
    """The store's URL with a password, through a proxy that is cut: every connection fails."""
    proxy = TcpProxy(url_port(store_url))
    proxy.cut()
    password = "pw-" + uuid.uuid4().hex
    url = sa.make_url(via(store_url, proxy)).set(username="spawn_reader", password=password)
    yield url.render_as_string(hide_password=False), password
    proxy.stop()


def test_a_store_that_is_down_answers_503_without_details(secret_url_down, caplog):
    url, password = secret_url_down
    with caplog.at_level(logging.DEBUG), api_client(url, None) as client:
        for path in READS:
            response = client.get(path)
            assert response.status_code == 503, (path, response.get_data(as_text=True))
            assert response.get_json() == {"error": "the spawn store is unavailable"}
            no_leak(response, password, url, "127.0.0.1")
    assert password not in caplog.text  # the server's own log names the store without its password
    assert "spawn_reader:***@" in caplog.text


def test_a_crash_answers_500_without_details(store_url, monkeypatch):
    from celery_spawn.web import api

    secret = "postgresql://admin:hunter2@db.internal/spawn"

    def boom(*args, **kwargs):
        raise RuntimeError(f"SELECT * FROM spawn_jobs WHERE id = 'x' -- {secret}")

    monkeypatch.setattr(api.queries, "list_operations", boom)
    with api_client(store_url, None) as client:
        response = client.get("/api/spawn/operations")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error"}
    no_leak(response, secret, "hunter2", "SELECT", "RuntimeError")


def test_documents_and_pages_name_no_store(store_url):
    with api_client(store_url, TOKEN) as client:
        for path in ("/api/openapi.json", "/"):
            response = client.get(path)
            assert response.status_code == 200
            body = response.get_data(as_text=True)
            assert store_url not in body and sa.make_url(store_url).database not in body
            assert TOKEN not in body


def test_cli_never_prints_the_password(secret_url_down):
    url, password = secret_url_down
    for args in (["list"], ["stats"], ["tree", "root-a"], ["pending"], ["list", "--database-url", url]):
        done = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.app", "spawn", *args], cwd=ROOT,
                              env=env_for(url), capture_output=True, text=True, timeout=120)
        assert done.returncode == 3, done.stderr
        assert password not in done.stdout + done.stderr
        assert "spawn_reader:***@" in done.stderr and "Traceback" not in done.stderr


def test_serve_log_never_prints_the_password(secret_url_down, tmp_path):
    url, password = secret_url_down
    log = tmp_path / "serve.log"
    with serving(url, log_path=log) as base:
        status, body = http("GET", base + "/api/spawn/operations")
        assert status == 503 and password not in body
    text = log.read_text()
    assert password not in text
    assert "spawn_reader:***@" in text


# ---- no password in worker logs ---------------------------------------------------------------------
@pytest.fixture
def secret_store():
    """A throwaway database owned by a role with a password, reached through a proxy; (url, password, proxy)."""
    role = f"rel_{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with throwaway_database("postgresql") as url:
            database = sa.make_url(url).database
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
                conn.exec_driver_sql(f"ALTER DATABASE {database} OWNER TO {role}")
            proxy = TcpProxy(url_port(url))
            secret = sa.make_url(via(url, proxy)).set(username=role, password=password)
            # The test reads directly, as the same role, so that the tables it may create belong to the role.
            direct = sa.make_url(url).set(username=role, password=password)
            try:
                yield (secret.render_as_string(hide_password=False), direct.render_as_string(hide_password=False),
                       password, proxy)
            finally:
                proxy.stop()
    finally:
        with contextlib.suppress(Exception), admin.connect() as conn:
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        admin.dispose()


def test_worker_log_never_prints_the_store_password(secret_store, shared_redis, start_worker, tmp_path):
    secret_url, direct_url, password, proxy = secret_store
    runs = tmp_path / "runs"
    runs.mkdir()
    backend = RelBackend("redis-postgresql", f"{shared_redis}/0", f"{shared_redis}/1", secret_url, new_queue(),
                         runs_dir=str(runs))
    app = backend.make_app(database_url=direct_url)
    ensure_callback_table(app)
    worker = start_worker(backend, "secret")
    on_complete = {"on_complete": dict(app.signature("tests.record_callback"))}
    # A normal spawn, and a refused one.
    ok = app.signature("rel.fanout", kwargs={"count": 20, "_spawn_config": on_complete}).delay()
    refused = app.signature("rel.broken", kwargs={"good": 3, "_spawn_config": {"handler": "rel_halfway"}}).delay()
    assert ok.get(timeout=60) == 20 and refused.get(timeout=60) == "parent result 3"
    wait_for(lambda: callback_rows(app), 60, what="the callback")
    # A store outage mid-spawn and while children finish: errors get logged, with the store's URL in them.
    cut = app.signature("rel.fanout", kwargs={"count": 200, "pause": 0.002, "marker_at": 50, "child_pause": 0.01,
                                              "_spawn_config": on_complete}).delay()
    wait_for(lambda: f"{HALFWAY} {cut.id}" in worker.log(), 60, interval=0.01, what="the spawn to be halfway")
    with proxy.outage():
        wait_for(lambda: f"Task rel.fanout[{cut.id}] retry" in worker.log(), 30, what="a logged store error")
        time.sleep(3)  # long enough for the recovery sweep (every 2 s) to fail too
    assert cut.get(timeout=90) == 200
    wait_for(lambda: (op := operation(app, cut.id)) and op["total"] == 200, 60, what="the spawn after the outage")
    with proxy.outage():  # and once more while children run
        time.sleep(2)
    time.sleep(3)
    worker.stop()
    log = worker.log()
    assert "StoreError" in log and "recovery sweep failed" in log  # errors were logged...
    role = sa.make_url(secret_url).username
    assert f"{role}:***@" in log  # ...naming the store, without its password
    assert password not in log
    assert password not in json.dumps(callback_rows(app))
