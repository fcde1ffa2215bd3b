"""``celery spawn serve`` as a real server: loopback binds, token rules, errors in JSON, a store only read.

Every server here is a real process (or, for a crash, the same server in this
process) answering on a real socket; the oversized requests are written with
raw sockets, as no HTTP client sends them.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from celery_spawn.store import SpawnStore
from celery_spawn.web import auth, create_app
from celery_spawn.web.api import web_state
from celery_spawn.web.command import RET_STORE, RET_USAGE
from tests.harness import ROOT, StoreBuilder
from tests.web.helpers import CELERY, clean_env, served

TOKEN = "a-token-of-24-characters"


@pytest.fixture
def store_url(sqlite_url):
    store = SpawnStore(sqlite_url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("root", task="tests.parent")
    builder.spawn("root", 2, operation="op-1", states=["succeeded", "pending"])
    builder.flush()
    store.dispose()
    return sqlite_url


def run_serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CELERY, "spawn", "serve", "--port", "0", *args], cwd=ROOT, env=env or clean_env(),
                          capture_output=True, text=True, timeout=60, check=False)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def request(address: str, port: int, path: str = "/api/spawn/operations", method: str = "GET",
            headers: dict | None = None) -> tuple[int, dict, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection(address, port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response
    finally:
        connection.close()


def can_bind(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


# ---- every loopback address works -----------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.254.3.9", "::1", "localhost"])
def test_every_loopback_address_serves(store_url, host, artifacts):
    """Without a token, on any loopback address, requests naming that address (or another loopback name) get
    their data; a Host header naming another machine gets 400, in JSON."""
    if host == "::1" and not (socket.has_ipv6 and can_bind("::1")):
        pytest.skip("this machine has no IPv6 loopback")
    with served(clean_env(), "--host", host, "-u", store_url, app=None,
                log=artifacts / f"serve-loopback-{host.replace(':', '_')}.log") as server:
        port = port_of(server.url)
        address = "127.0.0.1" if host == "localhost" else host
        status, body, _ = request(address, port)  # http.client sends Host: [::1]:port for IPv6
        assert status == 200 and body["count"] == 1, body
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"127.9.8.7:{port}", f"[::1]:{port}", "[::1]",
                     f"LOCALHOST:{port}", "127.0.0.2"):
            status, body, _ = request(address, port, headers={"Host": name})
            assert status == 200 and body["count"] == 1, (name, body)
        for name in (f"evil.example:{port}", "[::2]", f"127.0.0.1.evil.example:{port}", f"0.0.0.0:{port}",
                     "localhost.evil.example", f"[::ffff:7f00:1]:{port}", ""):
            status, body, response = request(address, port, headers={"Host": name})
            assert status == 400 and "Host header" in body["error"], (name, body)
            assert response.getheader("Content-Type") == "application/json"


# ---- the token rules at start -----------------------------------------------------------------------
@pytest.mark.parametrize("token", ["x", "fifteen-chars-x", "correct horse"])
def test_a_public_bind_needs_a_token_of_16_characters(store_url, token):
    for env, args in ((clean_env(), ["--token", token]), (clean_env(CELERY_SPAWN_API_TOKEN=token), [])):
        result = run_serve("--host", "0.0.0.0", "-u", store_url, *args, env=env)
        assert result.returncode == RET_USAGE, result
        assert "the API token is shorter than 16 characters" in result.stderr
        assert token not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "serving" not in result.stdout


def test_a_public_bind_with_16_characters_serves(store_url, artifacts):
    token = "sixteen-chars-ok"
    assert len(token) == auth.MIN_PUBLIC_TOKEN_LENGTH
    with served(clean_env(), "--host", "0.0.0.0", "--token", token, "-u", store_url, app=None,
                log=artifacts / "serve-public-16.log") as server:
        port = port_of(server.url)
        assert request("127.0.0.1", port)[0] == 401
        status, body, _ = request("127.0.0.1", port, headers={"Authorization": f"Bearer {token}",
                                                             "Host": f"spawn.example:{port}"})
        assert status == 200 and body["count"] == 1


@pytest.mark.parametrize("token", [
    "   ", "\t", "é" * 20, "tøken-tøken-tøken-tøken", "tok\x01en-tok-en-token", "token\nwith-a-newline-in",
    " leading-space-token-xyz", "trailing-space-token-xyz ", "del\x7fete-token-token-token",
], ids=["spaces", "tab", "accents", "non-ascii", "control", "newline", "leading-space", "trailing-space", "del"])
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_token_that_cannot_match_is_refused_at_start(store_url, token, host):
    for env, args in ((clean_env(), ["--token", token]), (clean_env(CELERY_SPAWN_API_TOKEN=token), [])):
        result = run_serve("--host", host, "-u", store_url, *args, env=env)
        assert result.returncode == RET_USAGE, (result.stdout, result.stderr)
        assert "Error: refusing to serve on" in result.stderr and "API token" in result.stderr
        assert not token.strip() or token.strip() not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "serving" not in result.stdout


def test_an_empty_token_option_is_refused(store_url):
    result = run_serve("--token", "", "-u", store_url)
    assert result.returncode == RET_USAGE and "the API token given with --token is blank" in result.stderr


@pytest.mark.parametrize(("token", "public", "problem"), [
    ("", False, "blank"), ("  \t ", False, "blank"), ("ünïcødé-token-123", False, "not ASCII"),
    ("a\x00b" * 8, True, "control character"), ("a\x1b[2Jb" * 4, False, "control character"),
    (" padded-token-for-serve", True, "whitespace"), ("tiny-tok", True, "shorter than 16"),
    ("tiny-tok", False, None), ("correct horse battery staple", True, None), ("tab\tinside-a-long-token", True, None),
])
def test_token_problem(token, public, problem):
    found = auth.token_problem(token, public=public)
    assert (found is None) if problem is None else (problem in found), found
    assert found is None or not token.strip() or token.strip() not in found


# ---- every error is JSON ------------------------------------------------------------------------------
def raw_exchange(port: int, payload: bytes, address: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """Send ``payload`` as is, read the whole answer: (status, JSON body, raw head)."""
    with socket.create_connection((address, port), timeout=30) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(payload)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"\r\ncontent-type: application/json" in head.lower(), head
    return status, json.loads(body), head


@pytest.fixture(scope="module")
def running(tmp_path_factory, artifacts):
    """One loopback server over a small store, for the error checks."""
    url = f"sqlite:///{tmp_path_factory.mktemp('serve-errors') / 'spawn.sqlite3'}"
    store = SpawnStore(url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("root")
    builder.flush()
    store.dispose()
    with served(clean_env(), "-u", url, app=None, log=artifacts / "serve-errors.log") as server:
        yield port_of(server.url)


def test_a_70_kb_url_is_414_in_json(running):
    status, body, head = raw_exchange(running, b"GET /api/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 414 and body == {"error": "Request-URI Too Long"}
    assert b"<html" not in head.lower() and b"aaaa" not in head


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"v" * 100_000 + b"\r\n",                                      # one 100 KB line
    b"".join(b"X-Header-%d: %s\r\n" % (i, b"v" * 1000) for i in range(100)),  # 100 KB in 100 headers
], ids=["one-line", "many-headers"])
def test_100_kb_of_headers_is_431_in_json(running, headers):
    status, body, _ = raw_exchange(running, b"GET /api/spawn/stats HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
    assert status == 431 and body["error"].startswith("Request Header Fields Too Large")


@pytest.mark.parametrize("line", [b"GARBAGE", b"GET / HTTP/1.1 extra words", b"GET / HTTP/x.y", b"GET / \x1b[2J"])
def test_a_bad_request_line_is_400_in_json(running, line):
    status, body, head = raw_exchange(running, line + b"\r\nHost: localhost\r\n\r\n")
    assert status == 400 and body["error"].startswith("Bad Request"), body
    assert b"\x1b" not in head


def test_routes_and_methods_answer_in_json(running):
    for method, path, expected in (("GET", "/nowhere", 404), ("GET", "/static/missing.js", 404),
                                   ("GET", "/api/jobs/unknown/parent", 404), ("DELETE", "/api/spawn/stats", 405),
                                   ("GET", "/api/spawn/operations?limit=0", 400)):
        status, body, response = request("127.0.0.1", running, path, method=method)
        assert status == expected and set(body) == {"error"}, (method, path, body)
        assert response.getheader("Content-Type") == "application/json"


def test_a_crash_is_500_in_json_on_the_server(store_url, monkeypatch):
    """The server ``serve`` runs, in this process, over a query that raises."""
    from celery_spawn.web import api
    from celery_spawn.web.serving import make_server

    def boom(*args, **kwargs):
        raise RuntimeError("SELECT secret")

    monkeypatch.setattr(api.queries, "stats", boom)
    flask_app = create_app(database_url=store_url)
    server = make_server("127.0.0.1", 0, flask_app, loopback=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, body, response = request("127.0.0.1", server.server_port, "/api/spawn/stats")
        assert status == 500 and body == {"error": "internal server error"}
        assert response.getheader("Content-Type") == "application/json"
        status, body, _ = raw_exchange(server.server_port, b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n")
        assert status == 414 and set(body) == {"error"}
    finally:
        server.shutdown()
        server.server_close()
        web_state(flask_app).store.dispose()


# ---- serve only reads a store -----------------------------------------------------------------------
def sqlite_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_serving_a_sqlite_file_that_does_not_exist_leaves_no_file(tmp_path):
    missing = tmp_path / "missing.sqlite3"
    for app_args, env in (([], clean_env()), (["-A", "tests.app"], clean_env()),
                          ([], clean_env(CELERY_SPAWN_DATABASE_URL=f"sqlite:///{missing}"))):
        args = [] if "CELERY_SPAWN_DATABASE_URL" in env else ["-u", f"sqlite:///{missing}"]
        result = subprocess.run([*CELERY, *app_args, "spawn", "serve", "--port", "0", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == RET_STORE, (result.stdout, result.stderr)
        assert "missing.sqlite3: the file does not exist" in result.stderr and "Traceback" not in result.stderr
        assert "serving" not in result.stdout
        assert sqlite_files(tmp_path) == []


def test_the_api_never_creates_a_sqlite_file(tmp_path):
    """Mounted, without ``serve``'s check at start: a missing file is 503 on every data endpoint, never created."""
    flask_app = create_app(database_url=f"sqlite:///{tmp_path / 'missing.sqlite3'}", token=TOKEN)
    client = flask_app.test_client()
    try:
        for method, path in (("GET", "/api/spawn/operations"), ("GET", "/api/spawn/stats"),
                             ("GET", "/api/jobs/root/spawn-tree"), ("POST", "/api/spawn/operations/op-1/cancel")):
            response = client.open(path, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 503, (path, response.get_data(as_text=True))
            assert response.get_json() == {"error": "the spawn store is unavailable"}
        assert client.get("/api/spawn/stats").status_code == 401  # the token still comes first
        assert client.get("/api/openapi.json").status_code == 200 and client.get("/").status_code == 200
    finally:
        web_state(flask_app).store.dispose()
    assert sqlite_files(tmp_path) == []


def test_serve_never_creates_or_migrates_tables(tmp_path, monkeypatch):
    """A database without spawn tables stays without them, and the Celery app's store (the one cancel uses)
    is not upgraded either: serve turns its auto-migration off."""
    from celery import Celery
    from celery.bin.base import CLIContext

    from celery_spawn import get_state
    from celery_spawn.store.migrations import current_revision
    from celery_spawn.web import serving
    from celery_spawn.web.command import serve

    path = tmp_path / "bare.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE unrelated (x INTEGER)")
    url = f"sqlite:///{path}"
    answers = []

    class Server:
        server_port = 8080

        def __init__(self, app):
            self.app = app

        def serve_forever(self):
            from werkzeug.test import Client

            client = Client(self.app)
            headers = {"Host": "localhost", "Authorization": f"Bearer {TOKEN}"}
            answers.append(client.get("/api/spawn/operations", headers=headers).status_code)
            answers.append(client.post("/api/spawn/operations/op-1/cancel", headers=headers).status_code)

        def server_close(self):
            pass

    monkeypatch.setattr(serving, "make_server", lambda host, port, app, loopback: Server(app))
    app = Celery("serve_reads", broker="memory://", set_as_current=False)
    app.conf.spawn_database_url = url
    result = CliRunner().invoke(serve, ["--token", TOKEN], obj=CLIContext(app=app, no_color=True, workdir=None))
    assert result.exit_code == 0, result.output
    assert answers == [503, 503]
    state = get_state(app)
    assert state.store.auto_migrate is False
    state.store.engine  # what cancel through the app would touch first  # noqa: B018
    assert current_revision(state.store.holder.get()) is None
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"unrelated"}
    state.store.dispose()
