"""How the documentation marks its Python examples (:mod:`tests.doc_examples`): grouping, skips, mistakes."""
from __future__ import annotations

import pytest

from tests.doc_examples import ROOT, collect, parse

FENCE = "```"


def _doc(*parts: str) -> str:
    return "\n".join(parts) + "\n"


def _python(code: str, marker: str | None = None) -> str:
    head = f"<!-- example: {marker} -->\n" if marker is not None else ""
    return f"{head}{FENCE}python\n{code}\n{FENCE}\n"


def test_blocks_run_alone_unless_they_continue():
    examples, errors = parse(_doc(
        "Intro.", "", _python("# proj.py\nx = 1"), "text", _python("from proj import x", "continues; children 2"),
        _python("print(2)"),
    ), "doc.md")
    assert errors == []
    assert [len(example.blocks) for example in examples] == [2, 1]
    first = examples[0]
    assert first.modules() == {"proj": "# proj.py\nx = 1\n"}
    assert first.script() == "from proj import x\n"
    assert first.expected_children() == 2
    assert examples[1].expected_children() is None
    assert first.name == "doc.md:3"


def test_blocks_naming_one_module_are_joined_and_the_worker_comes_from_the_text():
    examples, errors = parse(_doc(
        _python("# proj.py\na = 1"), _python("# proj.py, continued\nb = 2", "continues"),
        _python("# with a worker running: celery -A proj worker\nfrom proj import a, b", "continues"),
    ), "doc.md")
    assert errors == []
    (example,) = examples
    assert example.modules() == {"proj": "# proj.py\na = 1\n\n\n# proj.py, continued\nb = 2\n"}
    assert example.worker() == "proj"


def test_a_skip_keeps_its_reason_even_with_a_semicolon_in_it():
    examples, errors = parse(_python("import flask", "skip (reason: needs Flask; and a server)"), "doc.md")
    assert errors == []
    assert examples[0].skip_reason == "needs Flask; and a server"


@pytest.mark.parametrize(("text", "complaint"), [
    (_python("x = 1", "skip"), "must say why"),
    (_python("x = 1", "skip (reason: )"), "must say why"),
    (_python("x = 1", "continues"), "no example comes before it"),
    (_python("x = 1", "children many"), "unknown example directive"),
    (_python("x = 1", "after examples/nowhere/run.py"), "names no file"),
    (_python("x = 1", "skip (reason: no)") + _python("y = 2", "continues"), "continues a skipped example"),
    (_python("x = 1") + _python("y = 2", "continues; after examples/fanout/run.py"), "first block"),
    ("<!-- example: continues -->\n\nSome text.\n", "not followed by a ```python fence"),
    ("<!-- example: continues -->\n", "not followed by a ```python fence"),
    (f"<!-- example: continues -->\n{FENCE}bash\nls\n{FENCE}\n", "before a ```bash fence"),
    (f"{FENCE}\nfrom celery import Celery\n{FENCE}\n", "fence it as ```python"),
])
def test_mistakes_in_the_markers_are_reported(text, complaint):
    _, errors = parse(text, "doc.md")
    assert any(complaint in error for error in errors), errors


def test_shell_and_output_blocks_are_not_examples():
    text = f"{FENCE}console\n$ celery -A app spawn list\n{FENCE}\n{FENCE}\ngraph TD\n{FENCE}\n"
    examples, errors = parse(text, "doc.md")
    assert examples == [] and errors == []


def test_the_repository_documents_are_read():
    examples, _ = collect(ROOT)
    documents = {example.blocks[0].document for example in examples}
    assert {"README.md", "docs/cli.md", "docs/web.md"} <= documents


def test_every_block_of_the_repository_documents_compiles():
    examples, _ = collect(ROOT)
    for example in examples:  # skipped ones too: a skip excuses running, not a syntax error
        for block in example.blocks:
            compile(block.code, f"{block.document}:{block.line}", "exec")
