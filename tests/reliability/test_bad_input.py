"""Every CLI option and API parameter with SQL metacharacters, huge and negative numbers, unicode, empty strings.

Each value must be refused with a clear message (exit 2 on the command line,
HTTP 400 from the API; exit 1 / 404 for an id that merely does not exist) or
treated as data: no traceback, no HTTP 500, nothing but bound parameters
reaching SQL. Afterwards the tables still exist and hold what they held. A
queue literally named ``x'; DROP TABLE spawn_jobs; --`` must come back as data.

The command line runs as real ``celery -A tests.app spawn ...`` subprocesses
(the whole matrix on PostgreSQL with ``--run-slow``; one value per option always) and, for
the whole matrix always, through Celery's own root command in click's
CliRunner. The API runs through the Flask test client of
:func:`celery_spawn.web.create_app`. Stores: SQLite, PostgreSQL, MariaDB.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import urllib.parse

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from celery_spawn.store import SpawnStore
from celery_spawn.store import schema as s
from tests.harness import ROOT, StoreBuilder, throwaway_database
from tests.reliability.helpers import serve_command, tables_exist

NASTY_QUEUE = "x'; DROP TABLE spawn_jobs; --"
UNICODE_QUEUE = "ünïcødé ☃ 🚀"
TOKEN = "t0ken-for-the-bad-input-suite"

#: Values thrown at every option and parameter.
VALUES = {
    "sql-drop": NASTY_QUEUE,
    "sql-or": "1 OR 1=1",
    "sql-delete": "\"; DELETE FROM spawn_operations; --",
    "sql-union": "' UNION SELECT id, id FROM spawn_jobs --",
    "like-wildcards": "%_%",
    "paramstyle": "%s %(x)s :x ?",
    "huge": "9" * 40,
    "huge-exact": str(2 ** 63),
    "negative": "-1",
    "huge-negative": "-" + "9" * 30,
    "zero": "0",
    "overflow-float": "1e309",
    "nan": "nan",
    "inf": "inf",
    "unicode": UNICODE_QUEUE,
    "rtl-override": "\u202eevil",
    "fullwidth": "ＳＥＬＥＣＴ",
    "empty": "",
    "space": " ",
    "long": "x" * 5000,
    "newline": "a\nb",
    "escape": "\x1b[31mred",
}
#: The one value per option the always-on subprocess runs use (the rest run in-process, and all with --run-slow).
SUBPROCESS_SHORT = ("sql-drop", "huge", "negative", "unicode", "empty")

#: (command, arguments with {} for the value): every option of every read command.
SLOTS = [
    ("list", ["--limit", "{}"]), ("list", ["--queue", "{}"]), ("list", ["--state", "{}"]),
    ("list", ["--format", "{}"]), ("list", ["--recent", "--detailed", "--queue", "{}"]),
    ("tree", ["{}"]), ("tree", ["root-a", "--max-depth", "{}"]), ("tree", ["root-a", "--format", "{}"]),
    ("tree", ["{}", "--full", "--children-only"]),
    ("stats", ["--hours", "{}"]), ("stats", ["--queue", "{}"]), ("stats", ["--detailed", "--format", "{}"]),
    ("lineage", ["{}"]), ("lineage", ["root-a.1", "--depth", "{}"]), ("lineage", ["root-a.1", "--format", "{}"]),
    ("pending", ["--queue", "{}"]), ("pending", ["--limit", "{}"]), ("pending", ["--format", "{}"]),
    ("monitor", ["--iterations", "1", "--interval", "{}"]), ("monitor", ["--iterations", "1", "--queue", "{}"]),
    ("monitor", ["--iterations", "1", "--limit", "{}"]),
    ("recover", ["--grace", "{}"]), ("recover", ["--limit", "{}"]),
    ("list", ["--database-url", "{}"]),
]
STORES = ["sqlite", "postgresql", "mariadb"]
#: Values that once made ``recover --grace`` end in a traceback (fixed; see the regression test below).
GRACE_OVERFLOW = ("huge", "huge-exact", "overflow-float", "inf", "nan")


def slot_id(slot) -> str:
    command, args = slot
    at = args.index("{}")
    return f"{command} {args[at - 1] if at and args[at - 1].startswith('--') else 'ID'}"


# ---- the store under attack ---------------------------------------------------------------------
def populate(url: str) -> dict:
    """A store with trees on a SQL-looking queue and a unicode queue; returns the row counts."""
    store = SpawnStore(url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("root-a", queue=NASTY_QUEUE)
    builder.spawn("root-a", 3, operation="op-a", queue=NASTY_QUEUE, op_state="succeeded")
    builder.job("root-b", queue=UNICODE_QUEUE)
    builder.spawn("root-b", 2, operation="op-b", queue=UNICODE_QUEUE, states=["pending", "held"])
    builder.flush()
    counts = row_counts(store)
    store.dispose()
    return counts


def row_counts(store: SpawnStore) -> dict:
    with store.read() as conn:
        return {table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
                for table in (s.operations, s.jobs, s.dependencies)}


@pytest.fixture(scope="module", params=STORES)
def attacked(request, tmp_path_factory):
    """(kind, url, counts before) for a populated store of each kind; checks it is intact afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('bad-input') / 'spawn.sqlite3'}"
        yield request.param, url, populate(url)
        assert_intact(url)
        return
    with throwaway_database("postgresql" if request.param == "postgresql" else "mysql") as url:
        counts = populate(url)
        yield request.param, url, counts
        assert_intact(url, counts)


@pytest.fixture(scope="module")
def attacked_postgres():
    """A populated PostgreSQL store for the subprocess runs."""
    with throwaway_database("postgresql") as url:
        counts = populate(url)
        yield url
        assert_intact(url, counts)


def assert_intact(url: str, counts: dict | None = None) -> None:
    assert {"spawn_operations", "spawn_jobs", "spawn_dependencies"} <= tables_exist(url)
    if counts is not None:
        store = SpawnStore(url, auto_migrate=False)
        try:
            assert row_counts(store) == counts
        finally:
            store.dispose()


# ---- the command line -------------------------------------------------------------------------------
def cli_env(url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SPAWN_")}
    env.update(CELERY_SPAWN_DATABASE_URL=url, SPAWN_TEST_BROKER="memory://", NO_COLOR="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def arguments(slot, value: str) -> list[str]:
    command, args = slot
    return [command, *[value if a == "{}" else a for a in args]]


def judge_cli(slot, name: str, code: int, out: str, err: str) -> None:
    """Exit 0 (data), 1 (unknown id) or 2 (usage); 3 only for an unusable --database-url. One error line."""
    where = f"{' '.join(arguments(slot, '<' + name + '>'))} -> exit {code}\nstdout: {out[:800]}\nstderr: {err[:800]}"
    assert "Traceback" not in out + err, where
    database_url = "--database-url" in slot[1]
    allowed = {0, 1, 2, 3} if database_url else {0, 1, 2}
    assert code in allowed, where
    if code:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("Error: "), where
        assert len(lines[-1]) < len(VALUES[name]) + 300, f"error message not one line: {where}"
    if code == 3:
        assert "invalid spawn_database_url" in err or "no spawn store" in err or "failed:" in err, where


def run_in_process(url: str, slot, value: str):
    from celery.bin.celery import celery

    runner = CliRunner()
    result = runner.invoke(celery, ["-A", "tests.app", "spawn", *arguments(slot, value)], env=cli_env(url),
                           catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{arguments(slot, value)!r} raised {result.exception!r}") from result.exception
    return result.exit_code, result.stdout, result.stderr


def run_subprocess(url: str, slot, value: str):
    command = [sys.executable, "-m", "celery", "-A", "tests.app", "spawn", *arguments(slot, value)]
    done = subprocess.run(command, cwd=ROOT, env=cli_env(url), capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


#: recover publishes through the app's broker: it runs as a subprocess (memory:// broker) only.
IN_PROCESS_SLOTS = [slot for slot in SLOTS if slot[0] != "recover"]


@pytest.mark.parametrize("slot", IN_PROCESS_SLOTS, ids=[slot_id(s_) for s_ in IN_PROCESS_SLOTS])
def test_cli_option_in_process(attacked, slot):
    kind, url, _ = attacked
    for name, value in VALUES.items():
        judge_cli(slot, name, *run_in_process(url, slot, value))


def _subprocess_matrix(url: str, names) -> None:
    jobs = [(slot, name) for slot in SLOTS for name in names]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda job: (job, run_subprocess(url, job[0], VALUES[job[1]])), jobs)
        for (slot, name), outcome in results:
            judge_cli(slot, name, *outcome)


def test_cli_options_as_real_subprocesses(attacked_postgres):
    """Every option once, as ``celery -A tests.app spawn ...`` processes (four at a time)."""
    url = attacked_postgres
    names = [SUBPROCESS_SHORT[i % len(SUBPROCESS_SHORT)] for i in range(len(SLOTS))]
    jobs = list(zip(SLOTS, names))
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for (slot, name), outcome in zip(jobs, pool.map(lambda j: run_subprocess(url, j[0], VALUES[j[1]]), jobs)):
            judge_cli(slot, name, *outcome)


@pytest.mark.parametrize("name", GRACE_OVERFLOW)
def test_recover_grace_out_of_range_is_a_usage_error(attacked_postgres, name):
    """Once a traceback from timedelta(seconds=grace) in the store; now a usage error."""
    slot = ("recover", ["--grace", "{}"])
    code, out, err = run_subprocess(attacked_postgres, slot, VALUES[name])
    judge_cli(slot, name, code, out, err)
    assert code == 2, err


@pytest.mark.slow
def test_cli_matrix_as_real_subprocesses(attacked_postgres):
    """Every option with every value, as real processes (the in-process run covers every store)."""
    _subprocess_matrix(attacked_postgres, list(VALUES))


def test_sql_looking_queue_is_data_on_the_command_line(attacked):
    kind, url, _ = attacked
    code, out, err = run_subprocess(url, ("list", ["--queue", "{}", "--format", "json"]), NASTY_QUEUE)
    assert code == 0, err
    [op] = json.loads(out)
    assert op["id"] == "op-a" and op["queue"] == NASTY_QUEUE
    code, out, err = run_in_process(url, ("stats", ["--queue", "{}", "--format", "json"]), NASTY_QUEUE)
    assert code == 0, err
    stats = json.loads(out)
    assert stats["operations"] == 1 and stats["children"] == 3
    code, out, err = run_in_process(url, ("pending", ["--queue", "{}", "--format", "json"]), UNICODE_QUEUE)
    assert code == 0, err
    assert [entry["operation_id"] for entry in json.loads(out)] == ["op-b"]
    code, out, err = run_in_process(url, ("list", ["--queue", "{}", "--format", "json"]), "%")
    assert code == 0 and json.loads(out) == []  # a LIKE wildcard is not a pattern here


@pytest.mark.parametrize("name", ["sql-drop", "huge", "negative", "unicode", "empty", "nan"])
def test_serve_options(attacked_postgres, name):
    """``serve`` refuses hostile option values before it listens (exit 2, one line)."""
    value = VALUES[name]
    commands = [serve_command("--port", value), serve_command("--host", value, "--port", "0")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda cmd: subprocess.run(cmd, cwd=ROOT, env=cli_env(attacked_postgres),
                                                            capture_output=True, text=True, timeout=60), commands))
    for command, done in zip(commands, outcomes):
        where = f"{command[4:]} -> {done.returncode}: {done.stderr[-500:]}"
        assert "Traceback" not in done.stdout + done.stderr, where
        assert done.returncode == 2, where
        assert done.stderr.strip().splitlines()[-1].startswith("Error: "), where


# ---- the web API ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(attacked):
    from celery_spawn.web import create_app

    kind, url, counts = attacked
    flask_app = create_app(database_url=url, token=TOKEN)
    yield flask_app.test_client(), url
    from celery_spawn.web.api import web_state

    web_state(flask_app).store.dispose()


ENDPOINTS = [
    ("GET", "/api/spawn/operations", ("limit", "queue", "state")),
    ("GET", "/api/spawn/operations/{}", ()),
    ("POST", "/api/spawn/operations/{}/cancel", ("terminate",)),
    ("GET", "/api/spawn/stats", ("queue", "hours")),
    ("GET", "/api/jobs/{}/spawn-tree", ("format", "max_depth")),
    ("GET", "/api/jobs/{}/children", ("state", "depth", "limit")),
    ("GET", "/api/jobs/{}/parent", ()),
    ("GET", "/api/openapi.json", ()),
]
#: Query values only HTTP can carry.
HTTP_ONLY = {"nul": "a\x00b", "control": "\x07", "percent-encoded": "%27%3B"}


def judge_http(method: str, path: str, query, response, url: str) -> None:
    where = f"{method} {path} {query!r} -> {response.status_code}: {response.get_data(as_text=True)[:500]}"
    assert response.status_code in (200, 400, 404), where
    assert response.mimetype == "application/json", where
    body = response.get_data(as_text=True)
    payload = json.loads(body)
    # Values come back as data (in errors, in "queue"), so look for what only the server could have written.
    for leak in ("Traceback", "[SQL:", "[parameters:", "sqlalche.me", "psycopg2", "MySQLdb", "sqlite3.",
                 "OperationalError", "ProgrammingError", "IntegrityError", "DataError", url):
        assert leak not in body, f"{leak!r} leaked: {where}"
    if response.status_code != 200:
        assert isinstance(payload.get("error"), str) and payload["error"], where


def _request(client, method: str, path: str, query) -> object:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return client.open(path, method=method, query_string=query, headers=headers)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
def test_api_parameter(api, endpoint):
    client, url = api
    method, template, params = endpoint
    values = {**VALUES, **HTTP_ONLY}
    if "{}" in template:
        for value in values.values():
            path = template.format(urllib.parse.quote(value, safe=""))
            judge_http(method, path, None, _request(client, method, path, None), url)
    base = template.format("root-a" if "/jobs/" in template else "op-a")
    for param in (*params, "unknown'; DROP TABLE spawn_jobs; --"):
        for value in values.values():
            judge_http(method, base, {param: value}, _request(client, method, base, {param: value}), url)
        judge_http(method, base, [(param, "1"), (param, "2")], _request(client, method, base,
                                                                         [(param, "1"), (param, "2")]), url)


def test_sql_looking_queue_is_data_in_the_api(api):
    client, _ = api
    response = _request(client, "GET", "/api/spawn/operations", {"queue": NASTY_QUEUE})
    assert response.status_code == 200
    assert [op["id"] for op in response.get_json()["operations"]] == ["op-a"]
    stats = _request(client, "GET", "/api/spawn/stats", {"queue": UNICODE_QUEUE}).get_json()
    assert stats["operations"] == 1 and stats["children"] == 2
    assert _request(client, "GET", "/api/spawn/operations", {"queue": "%"}).get_json()["operations"] == []
