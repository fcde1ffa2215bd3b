"""Rendering: text trees with glyphs, colour only when asked, and JSON, Mermaid and DOT that parse."""
from __future__ import annotations

import json
import re
import sys
from datetime import datetime

import click
import pytest

from celery_spawn import render

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def node(job_id, state="succeeded", task="tests.child", queue="q", depth=1, children=(), **extra):
    return {"id": job_id, "task_name": task, "state": state, "depth": depth, "queue": queue,
            "operation_id": "op", "position": 0, "children": list(children), **extra}


@pytest.fixture
def tree():
    return node("root", task="tests.parent", depth=0, children=[
        node("a", children=[node("a.0", depth=2), node("a.1", state="failed", depth=2, queue="other")]),
        node("b", state="pending"),
        node("c", state="started", hidden_children=7),
    ])


def chain(depth: int) -> dict:
    """A chain ``depth`` levels below its root, built without recursion."""
    root = node("n0", depth=0)
    current = root
    for level in range(1, depth + 1):
        child = node(f"n{level}", depth=level)
        current["children"].append(child)
        current = child
    return root


def test_text_tree_glyphs_and_summary(tree):
    assert render.tree_text(tree) == "\n".join([
        "tests.parent  succeeded  root  queue=q",
        "├── tests.child  succeeded  a",
        "│   ├── tests.child  succeeded  a.0",
        "│   └── tests.child  failed  a.1  queue=other",
        "├── tests.child  pending  b",
        "└── tests.child  started  c",
        "    └── … 7 more (raise --max-depth)",
        "",
        "6 jobs, 3 levels, 7 more below (failed 1, pending 1, started 1, succeeded 3)",
    ])


def test_text_tree_colours_only_when_asked(tree):
    plain = render.tree_text(tree, highlight="a")
    coloured = render.tree_text(tree, color=True, highlight="a")
    assert not ANSI.search(plain)
    assert ANSI.search(coloured)
    assert click.style("failed", fg="red", bold=True) in coloured
    assert click.style("succeeded", fg="green") in coloured
    assert ANSI.sub("", coloured) == plain
    assert "├── tests.child  succeeded  a  ◀" in plain


def test_text_tree_without_summary_and_single_node():
    assert render.tree_text(node("x", depth=0), summary=False) == "tests.child  succeeded  x  queue=q"


def test_json_tree_round_trips(tree):
    text = render.tree_json(tree)
    assert json.loads(text) == tree
    assert len(text.splitlines()) == 6 + 2  # one line per node, and one "]}" per parent
    leaf = node("x", depth=0)
    assert json.loads(render.tree_json(leaf)) == leaf


def test_deep_trees_render_in_every_format_without_recursion():
    deep = chain(5_000)
    text = render.tree_text(deep)
    assert text.splitlines()[-1].startswith("5001 jobs, 5001 levels")
    assert "    " * 4_000 + "└── tests.child  succeeded  n4001" in text
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(25_000)  # only json.loads, the checker, recurses
    try:
        parsed = json.loads(render.tree_json(deep))
    finally:
        sys.setrecursionlimit(limit)
    depth = 0
    while parsed["children"]:
        parsed = parsed["children"][0]
        depth += 1
    assert depth == 5_000
    assert render.tree_mermaid(deep).count("-->") == 5_000
    assert render.tree_dot(deep).count("->") == 5_000


def test_mermaid(tree):
    text = render.tree_mermaid(tree)
    lines = text.splitlines()
    assert lines[0] == "graph TD"
    assert '    n0["tests.parent<br/>root<br/>succeeded"]' in lines
    assert "    n0 --> n1" in lines and "    n1 --> n2" in lines
    assert sum(1 for line in lines if "-->" in line) == 5
    assert '    n5_more["… 7 more"]' in lines and "    n5 -.-> n5_more" in lines
    assert any(line.startswith("    classDef failed fill:") for line in lines)
    assert "    class n3 failed" in lines


def test_mermaid_and_dot_escape_labels():
    nasty = node("x", depth=0, task='evil"]; click x call alert() <b>&', children=[node('y"\\', task="a\nb")])
    mermaid = render.tree_mermaid(nasty)
    label = re.search(r'n0\["(.*)"\]', mermaid).group(1)
    assert '"' not in label and "<b>" not in label and "#quot;" in label and "#lt;b#gt;" in label
    assert "a b" in mermaid  # no raw newline inside a label
    dot = render.tree_dot(nasty)
    assert 'label="evil\\"]; click x call alert() <b>&\\n' in dot
    assert '"y\\"\\\\"' in dot  # the id is quoted, its quote and backslash escaped
    assert "a\\nb" in dot


def test_dot(tree):
    text = render.tree_dot(tree)
    lines = text.splitlines()
    assert lines[0] == "digraph spawn_tree {" and lines[-1] == "}"
    assert '    "root" [label="tests.parent\\nroot\\nsucceeded", fillcolor="#d1e7dd"];' in lines
    assert '    "a" -> "a.1";' in lines
    assert sum(1 for line in lines if re.match(r'    "[^"]+" -> "[^"]+";$', line)) == 5
    assert '    "c…more" [label="… 7 more", style="dashed"];' in lines
    assert text.count("{") == text.count("}")


def test_render_tree_dispatches(tree):
    assert render.render_tree(tree, "dot") == render.tree_dot(tree)
    assert render.render_tree(tree, "mermaid") == render.tree_mermaid(tree)
    assert render.render_tree(tree, "json") == render.tree_json(tree)
    assert render.render_tree(tree, "text", highlight="b") == render.tree_text(tree, highlight="b")
    with pytest.raises(ValueError):
        render.render_tree(tree, "svg")


def test_jsonable_turns_datetimes_into_iso_utc():
    when = datetime(2026, 1, 2, 3, 4, 5, 6000)
    assert render.jsonable({"at": when, "list": [when], "n": 1}) == {
        "at": "2026-01-02T03:04:05.006000Z", "list": ["2026-01-02T03:04:05.006000Z"], "n": 1}
    assert json.loads(render.to_json([{"at": when}])) == [{"at": "2026-01-02T03:04:05.006000Z"}]
    assert render.tree_json(node("x", created_at=when)).count("2026-01-02T03:04:05.006000Z") == 1


def test_lineage_tree_wraps_the_chain():
    job = {"id": "j", "task_name": "t", "state": "started", "depth": 2, "queue": "q"}
    up = [{"id": "p", "task_name": "t", "state": "succeeded", "depth": 1, "queue": "q"},
          {"id": "r", "task_name": "t", "state": "succeeded", "depth": 0, "queue": "q"}]
    combined = render.lineage_tree(job, up, None)
    assert combined["id"] == "r" and combined["children"][0]["id"] == "p"
    assert combined["children"][0]["children"][0]["id"] == "j"
    text = render.tree_text(combined, highlight="j")
    assert text.splitlines()[2] == "    └── t  started  j  ◀"


OPERATION = {
    "id": "op-1", "parent_id": "p-1", "root_id": "p-1", "parent_task": "tests.parent", "handler": "fan",
    "queue": "q'; DROP", "depth": 0, "state": "failed", "total": 4, "error": "HandlerError: boom",
    "created_at": datetime(2026, 1, 1, 12, 0, 0), "updated_at": datetime(2026, 1, 1, 12, 0, 0),
    "finished_at": datetime(2026, 1, 1, 12, 0, 3), "counts": {"failed": 1, "succeeded": 3},
    "progress": {"done": 4, "total": 4, "percent": 100.0},
}


def test_operations_text():
    text = render.operations_text([OPERATION])
    header, row = text.splitlines()
    assert header.split() == ["CREATED", "(UTC)", "OPERATION", "PARENT", "JOB", "HANDLER", "QUEUE", "STATE",
                              "PROGRESS"]
    assert row.split() == ["2026-01-01", "12:00:00", "op-1", "p-1", "fan", "q';", "DROP", "failed", "4/4", "100%"]
    detailed = render.operations_text([OPERATION], detailed=True).splitlines()
    assert detailed[2] == "    task tests.parent, depth 0, root p-1"
    assert detailed[3] == "    children: failed 1, succeeded 3; finished 2026-01-01 12:00:03 (3.00s)"
    assert detailed[4] == "    error: HandlerError: boom"
    assert render.operations_text([]) == "No spawn operations."
    coloured = render.operations_text([OPERATION], color=True)
    assert ANSI.sub("", coloured) == text


def test_stats_text():
    stats = {
        "window": {"hours": 24, "since": datetime(2026, 1, 1), "until": datetime(2026, 1, 2)}, "queue": None,
        "operations": 3, "children": 12, "avg_children_per_spawn": 4.0, "max_children_per_spawn": 6,
        "success_rate": 0.5, "operations_by_state": {"running": 1, "succeeded": 2},
        "children_by_state": {"succeeded": 12}, "child_success_rate": 1.0,
        "durations": {"operation_avg_seconds": 7.0, "operation_max_seconds": 10.0, "child_avg_seconds": 0.25,
                      "child_max_seconds": 200.0},
        "by_queue": [{"queue": "images", "operations": 3, "children": 12, "avg_children_per_spawn": 4.0,
                      "max_children_per_spawn": 6, "success_rate": 0.5, "avg_duration_seconds": 7.0,
                      "max_duration_seconds": 10.0}],
        "by_handler": [],
    }
    text = render.stats_text(stats)
    assert "Spawn statistics, last 24 h (2026-01-01 00:00:00 to 2026-01-02 00:00:00 UTC), all queues" in text
    assert "  operations          3  (running 1, succeeded 2)" in text
    assert "  children per spawn  avg 4, max 6" in text
    assert "  success rate        50.0% of finished operations, 100.0% of finished children" in text
    assert "  child run time      avg 250ms, max 3.3m" in text
    assert "By queue" in text and "By handler" not in text
    assert re.search(r"  images +3 +12 +4 +6 +50.0% +7.00s +10.00s", text)


def test_pending_and_jobs_text():
    job = {"id": "p.1", "position": 1, "task_name": "tests.child", "state": "held", "pending_deps": 2,
           "queue": "q", "started_at": None, "finished_at": None}
    later = {"id": "p.2", "position": 2, "task_name": "tests.child", "state": "scheduled", "pending_deps": 0,
             "queue": "q", "not_before": datetime(2026, 1, 1, 0, 5)}
    entries = [{"operation_id": "op", "parent_id": "p", "handler": "h", "pending": 1, "held": 2, "scheduled": 1,
                "oldest": datetime(2026, 1, 1), "updated_at": datetime(2026, 1, 1, 0, 1), "jobs": [job, later]}]
    lines = render.pending_text(entries).splitlines()
    assert lines[0].split()[4:7] == ["PENDING", "HELD", "SCHEDULED"]
    assert lines[1].split() == ["op", "p", "h", "1", "2", "1", "2026-01-01", "00:00:00", "2026-01-01", "00:01:00"]
    assert lines[2] == "  ├── #1 p.1  tests.child  held, waits on 2  queue=q"
    assert lines[3] == "  ├── #2 p.2  tests.child  scheduled, due 2026-01-01 00:05:00  queue=q"
    assert lines[4] == "  └── … 2 more"
    assert render.pending_text([]).startswith("Nothing pending")
    table = render.jobs_text([job]).splitlines()
    assert table[1].split() == ["1", "p.1", "tests.child", "held", "q", "-", "-"]


# ---- control characters from the store never reach a terminal raw ---------------------------------
#: A retitle (OSC ... BEL), a clear screen (CSI 2J), a one-byte C1 CSI, DEL, a carriage return, a newline,
#: a tab and a right-to-left override: every one of them must come out written as an escape.
HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\x9b31m\x7f\r\nline2\t\u202e"
WRITTEN = "evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x7f\\r\\nline2\\t\\u202e"
RAW = re.compile(f"[{render.escape.UNSAFE}]")


def assert_clean(text: str, lines: int | None = None) -> None:
    """No control character but our own colour codes and the line breaks between lines."""
    for line in ANSI.sub("", text).split("\n"):
        assert not RAW.search(line), repr(line)
    if lines is not None:
        assert len(text.split("\n")) == lines, text


def test_printable_writes_control_characters_as_escapes():
    assert render.printable(HOSTILE) == WRITTEN
    assert render.printable(WRITTEN) == WRITTEN  # already written: unchanged, so applying it twice is harmless
    for plain in ("tests.child", "q'; DROP TABLE spawn_jobs; --", "émoji 🌳 \\ back\\slash", ""):
        assert render.printable(plain) == plain
    assert render.printable("\x00\x1f\x80\x9f\u2028\u2029\u2066") == "\\x00\\x1f\\x80\\x9f\\u2028\\u2029\\u2066"
    assert render.printable(None) == "None" and render.printable(7) == "7"
    assert render.printable("a\nb\x1b", keep="\n") == "a\nb\\x1b"


@pytest.fixture
def hostile_tree():
    return node(HOSTILE + "root", task=HOSTILE, queue=HOSTILE, depth=0, children=[
        node("a" + HOSTILE, task=HOSTILE, state=HOSTILE, queue="plain", hidden_children=2),
        node("b", state="failed", queue=HOSTILE),
    ])


def test_text_tree_escapes_control_characters(hostile_tree):
    plain = render.tree_text(hostile_tree, highlight="b")
    assert_clean(plain, lines=6)
    assert plain.splitlines()[0] == f"{WRITTEN}  succeeded  {WRITTEN}root  queue={WRITTEN}"
    assert f"├── {WRITTEN}  {WRITTEN}  a{WRITTEN}  queue=plain" in plain
    assert f"({WRITTEN} 1, failed 1, succeeded 1)" in plain
    coloured = render.tree_text(hostile_tree, color=True, highlight="b")
    assert_clean(coloured, lines=6)
    assert click.style(WRITTEN, bold=True) in coloured and click.style("failed", fg="red", bold=True) in coloured
    assert ANSI.sub("", coloured) == plain


def test_diagrams_escape_control_characters(hostile_tree):
    mermaid = render.tree_mermaid(hostile_tree)
    assert_clean(mermaid)
    assert mermaid.count("\n") == render.tree_mermaid(node("r", depth=0, children=[
        node("a", hidden_children=2), node("b", state="failed")])).count("\n")  # no line was forged
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x7f\\r line2\\t\\u202e" in mermaid  # a newline is a space there
    dot = render.tree_dot(hostile_tree)
    assert_clean(dot)
    # Written, then quoted for DOT (its backslashes doubled); the newline is a DOT line break.
    assert "evil\\\\x1b]0;pwned\\\\x07\\\\x1b[2J\\\\x9b31m\\\\x7f\\\\r\\nline2\\\\t\\\\u202e" in dot
    assert all(line.startswith(("    ", "digraph", "}")) for line in dot.splitlines())


def test_json_escapes_control_characters_itself(hostile_tree):
    for text in (render.tree_json(hostile_tree), render.to_json({"queue": HOSTILE, "ops": [OPERATION]}),
                 render.render_tree(hostile_tree, "json")):
        assert not RAW.search(text.replace("\n", "")), text
        assert "\\u001b]0;pwned\\u0007" in text
    assert json.loads(render.tree_json(hostile_tree)) == hostile_tree
    assert json.loads(render.to_json({"queue": HOSTILE}))["queue"] == HOSTILE


def hostile_operation(**extra):
    return {**OPERATION, "id": "op" + HOSTILE, "label": HOSTILE, "parent_id": "p" + HOSTILE, "root_id": HOSTILE,
            "parent_task": HOSTILE, "handler": HOSTILE, "queue": HOSTILE, "state": HOSTILE, "error": HOSTILE,
            "counts": {HOSTILE: 1, "failed": 2}, "progress": {"done": 1, "total": 3, "percent": 33.3}, **extra}


@pytest.mark.parametrize("color", [False, True])
def test_operations_and_jobs_tables_escape_control_characters(color):
    text = render.operations_text([hostile_operation(), OPERATION], color=color)
    assert_clean(text, lines=3)
    assert "op" + WRITTEN in text and WRITTEN[:29] + "…" in text  # the handler clipped after it was written
    detailed = render.operations_text([hostile_operation()], detailed=True, color=color)
    assert_clean(detailed, lines=5)
    assert f"    task {WRITTEN}, depth 0, root {WRITTEN}" in ANSI.sub("", detailed)
    assert f"    error: {WRITTEN}" in ANSI.sub("", detailed)
    job = {"id": HOSTILE, "position": 0, "task_name": HOSTILE, "state": HOSTILE, "queue": HOSTILE,
           "started_at": HOSTILE, "finished_at": None}
    jobs = render.jobs_text([job], color=color)
    assert_clean(jobs, lines=2)
    assert WRITTEN in jobs


def hostile_stats():
    group = {"operations": 1, "children": 2, "avg_children_per_spawn": 2.0, "max_children_per_spawn": 2,
             "success_rate": 1.0, "avg_duration_seconds": 1.0, "max_duration_seconds": 1.0}
    return {
        "window": {"hours": 24, "since": datetime(2026, 1, 1), "until": datetime(2026, 1, 2)}, "queue": HOSTILE,
        "operations": 1, "children": 2, "avg_children_per_spawn": 2.0, "max_children_per_spawn": 2,
        "success_rate": 1.0, "operations_by_state": {HOSTILE: 1}, "children_by_state": {"succeeded": 2},
        "child_success_rate": 1.0,
        "durations": {"operation_avg_seconds": 1.0, "operation_max_seconds": 1.0, "child_avg_seconds": 0.5,
                      "child_max_seconds": 0.5},
        "by_queue": [{"queue": HOSTILE, **group}], "by_handler": [{"handler": HOSTILE, **group}],
        "by_task": [{"task_name": HOSTILE, "jobs": 2, "succeeded": 2, "failed": 0, "success_rate": 1.0,
                     "avg_seconds": 0.5, "max_seconds": 0.5}],
        "largest": [{"id": HOSTILE, "parent_id": HOSTILE, "handler": HOSTILE, "total": 2}],
        "slowest": [{"id": HOSTILE, "parent_id": HOSTILE, "handler": HOSTILE, "seconds": 1.0}],
    }


@pytest.mark.parametrize("color", [False, True])
def test_stats_text_escapes_control_characters(color):
    text = render.stats_text(hostile_stats(), color=color)
    assert_clean(text, lines=25)
    plain = ANSI.sub("", text)
    assert "all queues" not in plain and f"queue {WRITTEN}" in plain
    assert f"({WRITTEN} 1)" in plain
    assert f"  {WRITTEN}  parent {WRITTEN}  " in plain


@pytest.mark.parametrize("color", [False, True])
def test_pending_text_escapes_control_characters(color):
    job = {"id": HOSTILE, "position": 0, "task_name": HOSTILE, "state": HOSTILE, "pending_deps": 0,
           "queue": HOSTILE}
    entries = [{"operation_id": HOSTILE, "parent_id": HOSTILE, "handler": HOSTILE, "pending": 1, "held": 0,
                "scheduled": 0, "oldest": HOSTILE, "updated_at": datetime(2026, 1, 1), "jobs": [job]}]
    text = render.pending_text(entries, color=color)
    assert_clean(text, lines=3)
    assert f"  └── #0 {WRITTEN}  {WRITTEN}  " in ANSI.sub("", text)


@pytest.mark.parametrize("color", [False, True])
def test_monitor_text_escapes_control_characters(color):
    snapshot = {"store": "sqlite:///" + HOSTILE, "queue": HOSTILE, "at": datetime(2026, 1, 1), "interval": 2.0,
                "stats": {**hostile_stats(), "children_by_state": {HOSTILE: 2}},
                "pending_children": 1, "pending_operations": 1,
                "running": [{**hostile_operation(), "state": "running"}], "error": HOSTILE}
    text = render.monitor_text(snapshot, color=color)
    assert_clean(text, lines=10)
    plain = ANSI.sub("", text)
    assert f"celery spawn monitor: sqlite:///{WRITTEN}, queue {WRITTEN}" in plain
    assert f"  op{WRITTEN}  " in plain and f"parent p{WRITTEN}" in plain
    assert f"store error: {WRITTEN}" in plain


def test_text_from_flat_rows_in_any_order_and_in_chunks(tree, monkeypatch):
    """Rows as the store reads them (no set order, siblings out of spawn order) draw the nested tree's text."""
    rows = [("a.1", "a", "tests.child", "failed", 2, "other", "op", 1),
            ("c", "root", "tests.child", "started", 1, "q", "op", 2),
            ("a.0", "a", "tests.child", "succeeded", 2, "q", "op", 0),  # after its later sibling
            ("elsewhere", "gone", "tests.other", "pending", 5, "q", "op", 0),  # detached: not drawn
            ("b", "root", "tests.child", "pending", 1, "q", "op", 1),
            ("root", None, "tests.parent", "succeeded", 0, "q", "op", 0),
            ("a", "root", "tests.child", "succeeded", 1, "q", "op", 0)]
    whole = render.tree_text(tree)
    assert "".join(render.tree_text_chunks(rows, "root", {"c": 7})) == whole + "\n"
    monkeypatch.setattr("celery_spawn.render.trees.CHUNK_LINES", 2)
    chunks = list(render.tree_text_chunks(rows, "root", {"c": 7}))
    assert len(chunks) > 3 and all(chunk.endswith("\n") for chunk in chunks)
    assert "".join(chunks) == whole + "\n"
    assert list(render.tree_text_chunks(rows, "missing")) == []


def test_json_from_flat_rows_in_any_order_and_in_chunks(tree, monkeypatch):
    """The JSON written from flat rows is the nested tree's JSON, whatever the chunk size; cut nodes say so."""
    import json

    rows = [("a.1", "a", "tests.child", "failed", 2, "other", "op", 1),
            ("c", "root", "tests.child", "started", 1, "q", "op", 2),
            ("a.0", "a", "tests.child", "succeeded", 2, "q", "op", 0),
            ("elsewhere", "gone", "tests.other", "pending", 5, "q", "op", 0),  # detached: not written
            ("b", "root", "tests.child", "pending", 1, "q", "op", 1),
            ("root", None, "tests.parent", "succeeded", 0, "q", "op", 0),
            ("a", "root", "tests.child", "succeeded", 1, "q", "op", 0)]
    whole = "".join(render.tree_json_chunks(rows, "root", {"c": 7}))
    parsed = json.loads(whole)
    assert [kid["id"] for kid in parsed["children"]] == ["a", "b", "c"]
    assert [kid["id"] for kid in parsed["children"][0]["children"]] == ["a.0", "a.1"]
    assert parsed["children"][2]["hidden_children"] == 7 and "elsewhere" not in whole
    monkeypatch.setattr("celery_spawn.render.trees.CHUNK_LINES", 2)
    chunks = list(render.tree_json_chunks(rows, "root", {"c": 7}))
    assert len(chunks) > 2 and "".join(chunks) == whole and whole.endswith("}\n")
    assert list(render.tree_json_chunks(rows, "missing")) == []
    deep = [(f"n{i}", f"n{i - 1}" if i else None, "t", "succeeded", i, None, None, 0) for i in range(1_500)]
    written = "".join(render.tree_json_chunks(deep, "n0"))  # no recursion in the writer, 1,500 levels deep
    assert written.count('"children": [\n') == 1_499 and '"id": "n1499"' in written


def test_flat_rows_escape_control_characters_only_where_they_are(monkeypatch):
    monkeypatch.setattr("celery_spawn.render.trees.CHUNK_LINES", 1)
    rows = [("r", None, "tests.parent", "succeeded", 0, None, None, 0),
            ("x", "r", HOSTILE, "failed", 1, None, None, 0)]
    text = "".join(render.tree_text_chunks(rows, "r", summary=False))
    assert text == f"tests.parent  succeeded  r\n└── {WRITTEN}  failed  x\n"
    assert_clean(text)
