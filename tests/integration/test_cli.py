"""``celery -A tests.app spawn ...`` as a real subprocess, against trees a real worker produced.

Runs on each broker/store combination (the ``backend`` fixture: embedded
SQLite, Redis + PostgreSQL, RabbitMQ + MariaDB). The last part drives the
same commands through click's ``CliRunner`` for exact output.
"""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import types
import uuid
from datetime import timedelta

import pytest
from click.testing import CliRunner

from celery_spawn import get_state
from celery_spawn.cli import RET_NOT_FOUND, RET_OK, RET_STORE, RET_USAGE, spawn
from celery_spawn.handlers import child_id
from celery_spawn.store import SpawnStore, queries
from celery_spawn.store.migrations import head_revision
from tests.harness import ROOT, StoreBuilder, wait_for
from tests.integration.helpers import fails, ok, run
from tests.sample_trees import make_sample_trees

TIMEOUT = 90
NASTY_QUEUE = "q'; DROP TABLE spawn_jobs; --\"`"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def count_nodes(tree: dict) -> int:
    total, stack = 0, [tree]
    while stack:
        node = stack.pop()
        total += 1
        stack.extend(node["children"])
    return total


# ---- trees a real worker produced -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trees(backend, worker, client_app):
    """The sample trees (a fan-out, a nested tree, a refused spawn) and rows no worker would make."""
    made = make_sample_trees(client_app, "ds-cli", TIMEOUT)
    store = get_state(client_app).store

    # Rows no worker would make: held children bound for a queue whose name is SQL-looking data.
    builder = StoreBuilder(store)
    builder.job("nasty-root", task="tests.parent", queue=NASTY_QUEUE)
    builder.spawn("nasty-root", 3, operation="nasty-op", states=["held"], queue=NASTY_QUEUE, handler="nasty")
    builder.flush()
    made.queue = backend.queue
    return made


def test_list(backend, trees):
    text = ok(backend, "list")
    header, *rows = text.splitlines()
    assert header.split()[:3] == ["CREATED", "(UTC)", "OPERATION"]
    dataset_row = next(row for row in rows if trees.dataset_op in row)
    assert dataset_row.split()[3:] == [trees.dataset, "dataset_processor", trees.queue, "succeeded", "11/11", "100%"]
    assert any(trees.refused in row and "failed" in row for row in rows)
    assert len(rows) == 1 + 7 + 1 + 1  # dataset, nested (1 + 2 + 4 spawns), refused, nasty

    data = json.loads(ok(backend, "list", "--format", "json", "--limit", "50"))
    dataset = next(op for op in data if op["id"] == trees.dataset_op)
    assert dataset["parent_id"] == trees.dataset and dataset["handler"] == "dataset_processor"
    assert dataset["counts"] == {"succeeded": 11} and dataset["progress"] == {"done": 11, "total": 11,
                                                                            "percent": 100.0}
    assert dataset["created_at"].endswith("Z")
    assert len(json.loads(ok(backend, "list", "--recent", "--limit", "2", "-f", "json"))) == 2
    refused = json.loads(ok(backend, "list", "--state", "failed", "-f", "json"))
    assert [op["parent_id"] for op in refused] == [trees.refused]
    assert "too many spawn failures" in refused[0]["error"]

    detailed = ok(backend, "list", "--detailed", "--queue", trees.queue)
    assert "children: succeeded 11;" in detailed and "error: " in detailed
    assert "nasty-op" not in detailed
    assert ok(backend, "list", "--queue", "no-such-queue").strip() == "No spawn operations."


def test_queue_names_are_just_data(backend, trees):
    listed = json.loads(ok(backend, "list", "--queue", NASTY_QUEUE, "-f", "json"))
    assert [op["id"] for op in listed] == ["nasty-op"] and listed[0]["queue"] == NASTY_QUEUE
    pending = json.loads(ok(backend, "pending", "--queue", NASTY_QUEUE, "-f", "json"))
    assert [(e["operation_id"], e["held"]) for e in pending] == [("nasty-op", 3)]
    stats = json.loads(ok(backend, "stats", "--queue", NASTY_QUEUE, "-f", "json"))
    assert stats["operations"] == 1 and stats["by_queue"][0]["queue"] == NASTY_QUEUE
    ok(backend, "monitor", "--queue", NASTY_QUEUE, "--iterations", "1")
    # The tables are all still there.
    assert json.loads(ok(backend, "tree", trees.dataset, "-f", "json"))["id"] == trees.dataset


def test_tree_text(backend, trees):
    lines = ok(backend, "tree", trees.dataset).splitlines()
    assert lines[0] == f"tests.process_dataset  succeeded  {trees.dataset}  queue={trees.queue}"
    children = [child_id(trees.dataset_op, i) for i in range(11)]
    for index, child in enumerate(children):
        glyph = "└──" if index == 10 else "├──"
        assert lines[1 + index] == f"{glyph} tests.process_chunk  succeeded  {child}"
    assert lines[-1] == "12 jobs, 2 levels (succeeded 12)"


def test_tree_json_mermaid_dot(backend, trees):
    tree = json.loads(ok(backend, "tree", trees.nested, "--format", "json"))
    assert tree["id"] == trees.nested and tree["task_name"] == "tests.nest" and tree["depth"] == 0
    assert count_nodes(tree) == 15
    assert [len(n["children"]) for n in tree["children"]] == [2, 2]
    leaves = [leaf for mid in tree["children"] for low in mid["children"] for leaf in low["children"]]
    assert len(leaves) == 8 and {leaf["task_name"] for leaf in leaves} == {"tests.square"}
    assert {leaf["depth"] for leaf in leaves} == {3} and {leaf["state"] for leaf in leaves} == {"succeeded"}

    mermaid = ok(backend, "tree", trees.nested, "--format", "mermaid").splitlines()
    assert mermaid[0] == "graph TD"
    assert sum(1 for line in mermaid if re.fullmatch(r"    n\d+ --> n\d+", line)) == 14
    assert sum(1 for line in mermaid if re.fullmatch(r'    n\d+\["tests\.\w+<br/>[\w-]+<br/>succeeded"\]', line)) == 15
    assert "    classDef succeeded fill:#d1e7dd,stroke:#555,color:#000" in mermaid

    dot = ok(backend, "tree", trees.nested, "--format", "dot").splitlines()
    assert dot[0] == "digraph spawn_tree {" and dot[-1] == "}"
    assert sum(1 for line in dot if re.fullmatch(r'    "[\w-]+" -> "[\w-]+";', line)) == 14
    assert f'    "{trees.nested}" [label="tests.nest\\n{trees.nested[:8]}\\nsucceeded", fillcolor="#d1e7dd"];' in dot


def test_tree_options(backend, trees):
    cut = ok(backend, "tree", trees.nested, "--max-depth", "1").splitlines()
    assert cut[1].startswith("├── tests.nest  succeeded  ") and cut[2] == "│   └── … 2 more (raise --max-depth)"
    assert cut[-1] == "3 jobs, 2 levels, 4 more below (succeeded 3)"
    cut_json = json.loads(ok(backend, "tree", trees.nested, "-m", "1", "-f", "json"))
    assert [c["hidden_children"] for c in cut_json["children"]] == [2, 2]

    full = ok(backend, "tree", trees.deepest, "--full").splitlines()
    assert full[0].startswith(f"tests.nest  succeeded  {trees.nested}")
    marked = [line for line in full if line.endswith("◀")]
    assert len(marked) == 1 and trees.deepest in marked[0] and "tests.square" in marked[0]
    assert full[-1] == "15 jobs, 4 levels (succeeded 15)"

    only = ok(backend, "tree", trees.middle, "--children-only").splitlines()
    assert only[0].split()[:4] == ["#", "JOB", "TASK", "STATE"] and len(only) == 3
    assert all("tests.square" in line and "succeeded" in line for line in only[1:])
    rows = json.loads(ok(backend, "tree", trees.middle, "--children-only", "-f", "json"))
    assert [r["position"] for r in rows] == [0, 1] and {r["parent_id"] for r in rows} == {trees.middle}
    assert ok(backend, "tree", trees.middle, "-c", "-f", "mermaid").count("-->") == 2
    sub = json.loads(ok(backend, "tree", trees.middle, "-f", "json"))
    assert sub["id"] == trees.middle and count_nodes(sub) == 3


def test_stats(backend, trees):
    text = ok(backend, "stats")
    assert text.startswith("Spawn statistics, last 24 h (")
    assert re.search(r"^  operations +10 +\(failed 1, running 1, succeeded 8\)$", text, re.M)
    assert re.search(r"^  children +28 +\(held 3, succeeded 25\)$", text, re.M)
    assert "By queue" in text and trees.queue in text and "By handler" in text

    data = json.loads(ok(backend, "stats", "--hours", "1", "--detailed", "-f", "json"))
    assert data["window"]["hours"] == 1.0
    handlers = {g["handler"]: g for g in data["by_handler"]}
    assert handlers["dataset_processor"]["children"] == 11 and handlers["dataset_processor"]["success_rate"] == 1.0
    assert handlers["nested"]["operations"] == 7 and handlers["nested"]["children"] == 14
    assert handlers["safe_spawner"]["success_rate"] == 0.0
    tasks = {t["task_name"]: t for t in data["by_task"]}
    assert tasks["tests.process_chunk"]["jobs"] == 11 and tasks["tests.square"]["jobs"] == 8
    assert data["child_success_rate"] == 1.0 and data["durations"]["child_avg_seconds"] >= 0
    assert data["largest"][0]["total"] == 11
    queue_only = json.loads(ok(backend, "stats", "--queue", trees.queue, "-f", "json"))
    assert queue_only["operations"] == 9 and queue_only["children"] == 25


def test_lineage(backend, trees):
    text = ok(backend, "lineage", trees.middle).splitlines()
    assert text[0].startswith(f"tests.nest  succeeded  {trees.nested}")
    assert text[1].startswith("└── tests.nest  succeeded  ")
    assert text[2] == f"    └── tests.nest  succeeded  {trees.middle}  ◀"
    assert text[3].startswith("        ├── tests.square  succeeded  ")
    assert text[-1] == "5 jobs, 4 levels (succeeded 5)"

    data = json.loads(ok(backend, "lineage", trees.deepest, "--format", "json"))
    assert data["job"]["id"] == trees.deepest and data["job"]["depth"] == 3
    assert [a["distance"] for a in data["ancestors"]] == [1, 2, 3]
    assert data["ancestors"][0]["id"] == trees.middle and data["ancestors"][-1]["id"] == trees.nested
    assert data["descendants"] == []

    up = json.loads(ok(backend, "lineage", trees.deepest, "--ancestors", "--depth", "2", "-f", "json"))
    assert "descendants" not in up and up["ancestors"][0]["id"] == trees.middle
    assert len(up["ancestors"]) == 2
    down = json.loads(ok(backend, "lineage", trees.nested, "--descendants", "-f", "json"))
    assert "ancestors" not in down and len(down["descendants"]) == 14
    assert ok(backend, "lineage", trees.middle, "--format", "mermaid").count("-->") == 4
    assert ok(backend, "lineage", trees.middle, "--ancestors", "--format", "dot").count('" -> "') == 2


def test_pending(backend, trees):
    text = ok(backend, "pending")
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["OPERATION", "PARENT", "JOB", "HANDLER"]
    assert lines[1].split()[:5] == ["nasty-op", "nasty-root", "nasty", "0", "3"]
    assert lines[2].startswith("  ├── #0 nasty-root.0  tests.child  held  queue=")
    assert lines[4].startswith("  └── #2 nasty-root.2")
    assert ok(backend, "pending", "--queue", trees.queue).strip().startswith("Nothing pending")


def test_monitor_refreshes_and_stops(backend, trees):
    text = ok(backend, "monitor", "--interval", "0.2", "--iterations", "2")
    assert text.count("celery spawn monitor: ") == 2
    assert "Running operations (1)" in text and "nasty-op" in text
    assert "waiting to dispatch: 3 children in 1 operations" in text


def test_monitor_exits_cleanly_on_ctrl_c(backend, trees):
    command = [sys.executable, "-m", "celery", "-A", "tests.app", "spawn", "monitor", "--interval", "0.3"]
    # A terminal's Ctrl-C: SIGINT handled as the shell would (a suite started in the background inherits it
    # ignored, and a Python started with SIGINT ignored never turns it into KeyboardInterrupt).
    proc = subprocess.Popen(command, cwd=ROOT, env=backend.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum("celery spawn monitor" in line for line in seen) < 2:
            seen.append(proc.stdout.readline())
        assert sum("celery spawn monitor" in line for line in seen) == 2, seen
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == RET_OK, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_colours_only_on_a_terminal(backend, trees):
    piped = ok(backend, "tree", trees.dataset)
    assert not ANSI.search(piped)

    def on_terminal(*global_args: str) -> str:
        command = [sys.executable, "-m", "celery", *global_args, "-A", "tests.app", "spawn", "tree", trees.dataset]
        master, slave = pty.openpty()
        proc = subprocess.Popen(command, cwd=ROOT, env=backend.env(), stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        chunks = []
        try:
            while True:
                ready, _, _ = select.select([master], [], [], 60)
                if not ready:
                    break
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(master)
            proc.wait(30)
        assert proc.returncode == RET_OK
        return b"".join(chunks).decode()

    coloured = on_terminal()
    assert "\x1b[32msucceeded\x1b[0m" in coloured
    assert ANSI.sub("", coloured).replace("\r\n", "\n").strip() == piped.strip()
    assert not ANSI.search(on_terminal("--no-color"))


def test_migrate_and_recover(backend, trees, client_app):
    assert ok(backend, "migrate").strip().endswith(f"is up to date (revision {head_revision()})")
    store = get_state(client_app).store
    # A child recorded but never published, as after a crash between commit and publish.
    operation = f"stranded-{uuid.uuid4().hex[:8]}"
    builder = StoreBuilder(store)
    builder.job(f"{operation}-root", task="tests.parent", queue=trees.queue)
    builder.operation(operation, f"{operation}-root", total=1, queue=trees.queue)
    child = builder.job(f"{operation}-child", f"{operation}-root", operation=operation, state="pending",
                        task="tests.square", queue=trees.queue)
    child["message"] = json.dumps({"task": "tests.square", "args": [7], "kwargs": {}, "options": {
        "queue": trees.queue, "headers": {"spawn_operation": operation, "spawn_depth": 1}}})
    builder.flush()
    # At once: the worker's own sweep leaves it alone for spawn_recovery_grace (5 s in tests.app).
    out = ok(backend, "recover", "--grace", "0")
    assert re.fullmatch(r"published [1-9]\d* stranded child(ren)? from \S+\n"
                        r"published again \d+ child(ren)? lost by the broker, \d+ on_complete callbacks?; "
                        r"filled in \d+ outcomes? from the result backend\n", out), out
    assert client_app.AsyncResult(child["id"]).get(timeout=TIMEOUT) == 49
    wait_for(lambda: job_state(store, child["id"]) == "succeeded", TIMEOUT, what="recovered child succeeded")


def job_state(store, job_id: str) -> str | None:
    with store.read() as conn:
        job = queries.get_job(conn, job_id)
    return job["state"] if job else None


def test_bad_input(backend, trees):
    env = backend.env()
    unknown = one_line(fails(env, RET_NOT_FOUND, "tree", "no-such-job"))
    assert unknown == "Error: no spawned job has id 'no-such-job'"
    assert one_line(fails(env, RET_NOT_FOUND, "lineage", "no-such-job")) == unknown
    assert "operation id" in one_line(fails(env, RET_NOT_FOUND, "tree", trees.dataset_op))
    for args in (["tree", "bad id"], ["tree", "x" * 65], ["tree", "x';--"], ["lineage", "a/b"],
                 ["list", "--limit", "-1"], ["list", "--limit", "0"], ["stats", "--hours", "-5"],
                 ["stats", "--hours", "0"], ["pending", "--limit", "-3"], ["tree", trees.dataset, "--max-depth", "-1"],
                 ["list", "--format", "yaml"], ["list", "--state", "bogus"]):
        err = fails(env, RET_USAGE, *args)
        assert "Error:" in err and "Usage:" in err, args


# ---- without a worker: store resolution, unreachable stores --------------------------------------
def plain_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_SPAWN_") and k not in ("APP", "CELERY_APP")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://spawn:s3cret-pw@127.0.0.1:1/nowhere",
    "mysql+mysqldb://spawn:s3cret-pw@127.0.0.1:1/nowhere",
])
def test_unreachable_store_is_one_line_without_password(url):
    for args in (["list"], ["tree", "abc"], ["stats"], ["pending"], ["lineage", "abc"],
                 ["monitor", "--iterations", "1"], ["migrate"]):
        line = one_line(fails(plain_env(), RET_STORE, *args, "--database-url", url))
        assert "s3cret-pw" not in line and "***" in line and "127.0.0.1:1/nowhere" in line, line
        assert line.startswith("Error: ")


def test_database_without_tables(tmp_path):
    from tests.harness import throwaway_database

    with throwaway_database("postgresql") as url:
        line = one_line(fails(plain_env(), RET_STORE, "list", "-u", url))
    assert line.endswith("has no spawn tables (run `celery spawn migrate`)")
    missing = f"sqlite:///{tmp_path / 'missing.sqlite3'}"
    line = one_line(fails(plain_env(), RET_STORE, "stats", "-u", missing))
    assert "missing.sqlite3: the file does not exist" in line
    assert not (tmp_path / "missing.sqlite3").exists()


@pytest.fixture
def app_dir(tmp_path):
    """A project with its own app module whose spawn_database_url names a store with one operation."""
    url = f"sqlite:///{tmp_path / 'app-store.sqlite3'}"
    (tmp_path / "cliapp.py").write_text(
        "from celery import Celery\n"
        "app = Celery('cliapp', broker='memory://', set_as_current=False)\n"
        f"app.conf.spawn_database_url = {url!r}\n"
    )
    store = SpawnStore(url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("app-root")
    builder.spawn("app-root", 2, operation="app-op")
    builder.flush()
    store.dispose()
    return tmp_path


def test_store_from_the_app_given_with_dash_a(app_dir):
    env = plain_env(PYTHONPATH=os.pathsep.join([str(app_dir), str(ROOT)]))
    listed = run(env, "list", "-f", "json", app="cliapp", cwd=app_dir)
    assert listed.returncode == RET_OK, listed.stderr
    assert [op["id"] for op in json.loads(listed.stdout)] == ["app-op"]
    # The app may come from the environment too.
    from_env = run({**env, "CELERY_APP": "cliapp"}, "tree", "app-root", app=None, cwd=app_dir)
    assert from_env.returncode == RET_OK and from_env.stdout.startswith("tests.node  succeeded  app-root")
    # --database-url (or CELERY_SPAWN_DATABASE_URL) wins over the app's setting.
    other = app_dir / "other.sqlite3"
    line = one_line(fails(env, RET_STORE, "list", "-u", f"sqlite:///{other}", app="cliapp", cwd=app_dir))
    assert "other.sqlite3" in line
    line = one_line(fails({**env, "CELERY_SPAWN_DATABASE_URL": f"sqlite:///{other}"}, RET_STORE, "list",
                          app="cliapp", cwd=app_dir))
    assert "other.sqlite3" in line


def test_without_dash_a_the_default_app_is_not_taken_for_yours(tmp_path):
    line = one_line(fails(plain_env(), RET_STORE, "list", app=None, cwd=tmp_path))
    assert line == ("Error: no spawn store at sqlite:///celery_spawn.sqlite3: the file does not exist "
                    "(give --database-url or -A, or create it with `celery spawn migrate`)")
    assert not (tmp_path / "celery_spawn.sqlite3").exists()
    migrated = run(plain_env(), "migrate", app=None, cwd=tmp_path)
    assert migrated.returncode == RET_OK
    assert migrated.stdout == ("spawn store sqlite:///celery_spawn.sqlite3 migrated from nothing to revision "
                               f"{head_revision()}\n")
    assert run(plain_env(), "list", app=None, cwd=tmp_path).stdout == "No spawn operations.\n"
    usage = fails(plain_env(), RET_USAGE, "recover", app=None, cwd=tmp_path)
    assert "give it with `celery -A proj spawn recover`" in usage


def test_spawn_help_lists_every_command():
    result = run(plain_env(), "--help", app=None)
    assert result.returncode == RET_OK
    for command in ("list", "tree", "stats", "monitor", "lineage", "pending", "migrate", "recover"):
        assert re.search(rf"^  {command} ", result.stdout, re.M), command
    assert "--iterations" not in run(plain_env(), "monitor", "--help", app=None).stdout


# ---- CliRunner: the same commands in process, for exact output -------------------------------------
@pytest.fixture
def built(sqlite_url):
    store = SpawnStore(sqlite_url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("root", task="tests.parent", queue="q")
    builder.spawn("root", 3, operation="op-root", states=["succeeded", "failed", "pending"], handler="fan")
    builder.spawn("root.0", 2, operation="op-child", handler="fan", op_state="succeeded",
                  finished=builder.now + timedelta(seconds=3))
    builder.flush()
    store.dispose()
    return types.SimpleNamespace(url=sqlite_url, now=builder.now)


def invoke(*args: str):
    return CliRunner().invoke(spawn, list(args), catch_exceptions=False)


def test_runner_tree_text(built):
    result = invoke("tree", "root", "-u", built.url)
    assert result.exit_code == RET_OK
    assert result.output == "\n".join([
        "tests.parent  succeeded  root  queue=q",
        "├── tests.child  succeeded  root.0",
        "│   ├── tests.child  succeeded  root.0.0",
        "│   └── tests.child  succeeded  root.0.1",
        "├── tests.child  failed  root.1",
        "└── tests.child  pending  root.2",
        "",
        "6 jobs, 3 levels (failed 1, pending 1, succeeded 4)",
        "",
    ])


def test_runner_lineage_and_pending(built):
    result = invoke("lineage", "root.0.1", "-u", built.url)
    assert result.output.splitlines()[:3] == [
        "tests.parent  succeeded  root  queue=q",
        "└── tests.child  succeeded  root.0",
        "    └── tests.child  succeeded  root.0.1  ◀",
    ]
    result = invoke("pending", "-u", built.url, "-f", "json")
    [entry] = json.loads(result.output)
    assert entry["operation_id"] == "op-root" and entry["pending"] == 1 and entry["jobs"][0]["id"] == "root.2"


def test_runner_list_and_stats(built):
    data = json.loads(invoke("list", "-u", built.url, "-f", "json").output)
    assert [op["id"] for op in data] == ["op-root", "op-child"]
    assert data[0]["counts"] == {"failed": 1, "pending": 1, "succeeded": 1}
    stats = json.loads(invoke("stats", "-u", built.url, "-f", "json", "--hours", "0.5").output)
    assert stats["operations"] == 2 and stats["children"] == 5 and stats["max_children_per_spawn"] == 3
    assert stats["durations"]["operation_max_seconds"] == pytest.approx(3.0, abs=0.01)


def test_runner_lineage_cut_names_its_own_option(built):
    text = invoke("lineage", "root", "--depth", "1", "-u", built.url).output
    assert "└── … 2 more (raise --depth)" in text and "--max-depth" not in text
    assert "… 2 more (raise --max-depth)" in invoke("tree", "root", "--max-depth", "1", "-u", built.url).output


def test_runner_database_url_before_the_command(built, tmp_path, monkeypatch):
    """``celery spawn -u URL list`` as well as ``celery spawn list -u URL``; the command's own -u wins."""
    before = invoke("-u", built.url, "list", "-f", "json")
    assert before.exit_code == RET_OK and [op["id"] for op in json.loads(before.output)] == ["op-root", "op-child"]
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}"
    monkeypatch.setenv("CELERY_SPAWN_DATABASE_URL", elsewhere)
    assert "root.0.0" in invoke("-u", built.url, "tree", "root").output  # the flag beats the environment
    own = CliRunner().invoke(spawn, ["-u", built.url, "list", "-u", elsewhere])
    assert own.exit_code == RET_STORE and "elsewhere.sqlite3" in own.output
    assert CliRunner().invoke(spawn, ["list"]).exit_code == RET_STORE  # the environment alone


def test_runner_errors(built):
    missing = CliRunner().invoke(spawn, ["tree", "nope", "-u", built.url])
    assert missing.exit_code == RET_NOT_FOUND and missing.output == "Error: no spawned job has id 'nope'\n"
    bad = CliRunner().invoke(spawn, ["tree", "no pe", "-u", built.url])
    assert bad.exit_code == RET_USAGE
    negative = CliRunner().invoke(spawn, ["stats", "--hours", "-1", "-u", built.url])
    assert negative.exit_code == RET_USAGE


def test_runner_labels(built):
    """``list --operation LABEL`` shows every operation of a label; ``tree LABEL`` the newest, noting the others."""
    store = SpawnStore(built.url)
    builder = StoreBuilder(store, now=built.now)
    for parent, operation, seconds in (("night-1", "nightly", 20), ("night-2", "nightly~0a1b2c3d", 10)):
        builder.job(parent, task="tests.parent", queue="q")
        builder.spawn(parent, 1, operation=operation, label="nightly", handler="fan",
                      created=built.now - timedelta(seconds=seconds))
    builder.flush()
    store.dispose()
    listed = invoke("list", "--operation", "nightly", "-u", built.url)
    assert [line.split()[2:5] for line in listed.stdout.splitlines()] == [
        ["OPERATION", "LABEL", "PARENT"], ["nightly~0a1b2c3d", "nightly", "night-2"], ["nightly", "nightly", "night-1"]]
    everything = invoke("list", "-u", built.url, "-f", "json").stdout
    assert {op["id"]: op["label"] for op in json.loads(everything)}["op-root"] is None
    tree = invoke("tree", "nightly", "-u", built.url)
    assert tree.exit_code == RET_OK and tree.stdout.splitlines()[0] == "tests.parent  succeeded  night-2  queue=q"
    assert tree.stderr == ("label 'nightly' names 2 operations; showing the newest (nightly~0a1b2c3d), 1 other: "
                           "celery spawn list --operation nightly\n")
    by_job = invoke("tree", "night-1", "-u", built.url)
    assert by_job.stdout.splitlines()[1] == "└── tests.child  succeeded  night-1.0" and by_job.stderr == ""
    unknown = CliRunner().invoke(spawn, ["tree", "nightly~ffffffff", "-u", built.url])
    assert unknown.exit_code == RET_NOT_FOUND  # '~' is in the id grammar: not found, not a usage error


def test_runner_uses_the_app_in_the_celery_context(built):
    """Invoked as Celery would: ctx.obj is Celery's CLIContext holding the -A app."""
    from celery import Celery
    from celery.bin.base import CLIContext

    app = Celery("runner", set_as_current=False)
    app.conf.spawn_database_url = built.url
    context = CLIContext(app=app, no_color=False, workdir=None)
    result = CliRunner().invoke(spawn, ["list"], obj=context)
    assert result.exit_code == RET_OK, result.output
    assert "op-root" in result.output and "op-child" in result.output


def test_commands_can_be_added_to_the_group(built):
    import click

    from celery_spawn.cli import JOB_ID, open_store, store_options

    @click.command(name="echo-id")
    @click.argument("job_id", type=JOB_ID)
    @store_options
    @click.pass_context
    def echo_id(ctx, job_id, database_url):
        with open_store(ctx, database_url) as store:
            click.echo(f"{job_id} in {store.safe_url}")

    spawn.add_command(echo_id)
    try:
        result = invoke("echo-id", "root", "-u", built.url)
        assert result.output == f"root in {built.url}\n"
    finally:
        spawn.commands.pop("echo-id")


# ---- control characters in stored names never reach the terminal raw -------------------------------
#: A terminal retitle (OSC ... BEL), a clear screen (CSI 2J), a one-byte C1 CSI and a forged line.
HOSTILE = "x\x1b]0;pwned\x07\x1b[2J\x9b2J\r\nforged"


@pytest.fixture
def hostile_store(sqlite_url):
    """A store whose task names, queues, handlers, child ids and error texts hold terminal escapes."""
    store = SpawnStore(sqlite_url)
    store.migrate()
    builder = StoreBuilder(store)
    builder.job("hostile-root", task="tests." + HOSTILE, queue=HOSTILE)
    builder.spawn("hostile-root", 3, operation="op" + HOSTILE, states=["held", "pending", "failed"],
                  task=HOSTILE, queue=HOSTILE, handler=HOSTILE, prefix="kid" + HOSTILE, label=HOSTILE)
    builder.operations["op" + HOSTILE]["error"] = HOSTILE
    builder.job("other-root", task="tests.parent", queue="q")
    builder.operation("op-failed", "other-root", handler=HOSTILE, queue=HOSTILE, state="failed", error=HOSTILE,
                      finished=builder.now)
    builder.flush()
    store.dispose()
    return sqlite_url


@pytest.mark.parametrize("args", [
    ["tree", "hostile-root"], ["tree", "hostile-root", "-f", "mermaid"], ["tree", "hostile-root", "-f", "dot"],
    ["tree", "hostile-root", "--children-only"], ["lineage", "hostile-root"],
    ["list"], ["list", "--detailed"], ["stats"], ["stats", "--detailed"], ["stats", "--queue", HOSTILE],
    ["monitor", "--iterations", "1"], ["monitor", "--iterations", "1", "--queue", HOSTILE], ["pending"],
    ["list", "--state", HOSTILE],
], ids=lambda args: "-".join(a if a.isprintable() else "HOSTILE" for a in args))
def test_no_command_writes_a_control_character_from_the_store(hostile_store, args):
    command = [sys.executable, "-m", "celery", "spawn", *args, "-u", hostile_store]
    done = subprocess.run(command, cwd=ROOT, env=plain_env(), capture_output=True, timeout=60)  # piped: bytes
    assert "Traceback".encode() not in done.stderr, done.stderr
    for stream in (done.stdout, done.stderr):
        for raw in (b"\x1b", b"\x07", b"\r", "\x9b".encode()):
            assert raw not in stream, (args, stream)
    output = (done.stdout + done.stderr).decode()
    assert "\\x1b]0;pwned\\x07" in output or "\\\\x1b]0;pwned\\\\x07" in output, output  # written, not dropped
    assert not any(line.startswith("forged") for line in output.splitlines()), output


def test_json_output_escapes_control_characters_itself(hostile_store):
    for args in (["tree", "hostile-root", "-f", "json"], ["list", "-f", "json"], ["stats", "-f", "json"],
                 ["pending", "-f", "json"]):
        done = subprocess.run([sys.executable, "-m", "celery", "spawn", *args, "-u", hostile_store], cwd=ROOT,
                              env=plain_env(), capture_output=True, timeout=60)
        assert done.returncode == RET_OK, done.stderr
        assert b"\x1b" not in done.stdout and b"\x07" not in done.stdout and b"\r" not in done.stdout
        found, stack = [], [json.loads(done.stdout)]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                stack.extend([*value.keys(), *value.values()])
            elif isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, str) and HOSTILE in value:
                found.append(value)
        assert found, args  # the data comes back whole
