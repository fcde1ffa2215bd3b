"""The Python examples of the user documentation, read from the Markdown the way a reader sees them.

Every ```` ```python ```` block of ``README.md``, ``docs/`` and ``examples/`` is
an example, or a part of one. An HTML comment on the line just before a fence
says how the block is run, with directives separated by ``;``::

    <!-- example: skip (reason: needs your Flask project) -->   not run; the reason is required
    <!-- example: continues -->                                 part of the example of the block before it
    <!-- example: continues; children 15 -->                    ... and it spawns 15 children
    <!-- example: after examples/fanout/run.py -->             runs once that script has run, in its folder

Within an example, a block whose first line is ``# NAME.py`` is the source of
module ``NAME`` (blocks naming the same module are joined in order); the other
blocks, joined in order, are a script run with ``python`` next to the modules.
A comment ``celery -A NAME worker`` in any block is the worker the reader
starts before running the script; the test starts it too.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The documents whose examples run: the README, then docs/ and examples/ (Markdown only).
DOCUMENT_GLOBS = ("README.md", "docs/**/*.md", "examples/**/*.md")
PYTHON_LANGUAGES = ("python", "py", "python3")

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*example:(.*?)-->\s*$")
_SKIP = re.compile(r"^skip\s*\(\s*reason:\s*(.*?)\s*\)$", re.S)
_MODULE = re.compile(r"^#\s*([A-Za-z_]\w*)\.py\b")
_WORKER = re.compile(r"celery\s+-A\s+([\w.:]+)\s+worker\b")
#: The first line of a block in another language that shows it is Python after all.
_LOOKS_LIKE_PYTHON = re.compile(r"^(from \w[\w.]* import |import \w|@\w+|def \w+\(|class \w+)")


@dataclasses.dataclass
class Block:
    """One fenced Python block and the directives of the marker before it."""

    document: str
    line: int
    code: str
    continues: bool = False
    skip_reason: str | None = None
    children: int | None = None
    after: str | None = None

    @property
    def module(self) -> str | None:
        """The module this block is the source of (``# NAME.py`` on its first line), or None for script code."""
        first = self.code.lstrip("\n").split("\n", 1)[0]
        match = _MODULE.match(first)
        return match.group(1) if match else None


@dataclasses.dataclass
class Example:
    """Blocks of one document that run together."""

    blocks: list[Block]

    @property
    def name(self) -> str:
        return f"{self.blocks[0].document}:{self.blocks[0].line}"

    @property
    def skip_reason(self) -> str | None:
        return self.blocks[0].skip_reason

    @property
    def after(self) -> str | None:
        return self.blocks[0].after

    def modules(self) -> dict[str, str]:
        """Module name -> source, in the order the modules first appear."""
        sources: dict[str, list[str]] = {}
        for block in self.blocks:
            if block.module:
                sources.setdefault(block.module, []).append(block.code)
        return {name: "\n\n".join(parts) for name, parts in sources.items()}

    def script(self) -> str:
        return "\n\n".join(block.code for block in self.blocks if not block.module)

    def worker(self) -> str | None:
        """The app of the ``celery -A NAME worker`` the example tells its reader to start, if any."""
        for block in self.blocks:
            match = _WORKER.search(block.code)
            if match:
                return match.group(1)
        return None

    def expected_children(self) -> int | None:
        counts = [block.children for block in self.blocks if block.children is not None]
        return sum(counts) if counts else None


def documents(root: Path = ROOT) -> list[Path]:
    found: list[Path] = []
    for pattern in DOCUMENT_GLOBS:
        found += [path for path in sorted(root.glob(pattern)) if path not in found]
    return found


def _split(text: str) -> list[str]:
    """``text`` cut at each ``;`` outside parentheses (a skip's reason may hold one)."""
    parts, current, depth = [], [], 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == ";" and depth <= 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    return [*parts, "".join(current)]


def _directives(text: str, where: str, block: Block, errors: list[str]) -> None:
    for raw in _split(text):
        directive = raw.strip()
        if not directive:
            continue
        skip = _SKIP.match(directive)
        if skip:
            if not skip.group(1):
                errors.append(f"{where}: a skipped example must say why: skip (reason: ...)")
            block.skip_reason = skip.group(1) or None
        elif directive.startswith("skip"):
            errors.append(f"{where}: a skipped example must say why: skip (reason: ...), not {directive!r}")
        elif directive == "continues":
            block.continues = True
        elif re.fullmatch(r"children \d+", directive):
            block.children = int(directive.split()[1])
        elif directive.startswith("after "):
            block.after = directive[len("after "):].strip()
        else:
            errors.append(f"{where}: unknown example directive {directive!r}")


def parse(text: str, document: str, root: Path = ROOT) -> tuple[list[Example], list[str]]:
    """The examples of one Markdown document, and what is wrong with its markers (empty when nothing is)."""
    examples: list[Example] = []
    errors: list[str] = []
    lines = text.split("\n")
    marker: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        match = _MARKER.match(line)
        if match:
            if marker is not None:
                errors.append(f"{document}:{marker[0]}: example marker not followed by a ```python fence")
            marker = (index + 1, match.group(1))
            index += 1
            continue
        fence = _FENCE.match(line)
        if not fence:
            if marker is not None and line.strip():
                errors.append(f"{document}:{marker[0]}: example marker not followed by a ```python fence")
                marker = None
            index += 1
            continue
        opening, language = fence.group(1), fence.group(2).lower()
        start = index + 1
        end = start
        while end < len(lines) and not lines[end].startswith(opening[0] * len(opening)):
            end += 1
        code = "\n".join(lines[start:end]) + "\n"
        where = f"{document}:{start}"
        if language in PYTHON_LANGUAGES:
            block = Block(document, start, code)
            if marker is not None:
                _directives(marker[1], f"{document}:{marker[0]}", block, errors)
            _place(block, examples, errors, where, root)
        else:
            if marker is not None:
                errors.append(f"{document}:{marker[0]}: example marker before a ```{language} fence, not ```python")
            first = next((text_line.strip() for text_line in lines[start:end] if text_line.strip()), "")
            if _LOOKS_LIKE_PYTHON.match(first):
                errors.append(f"{where}: this block looks like Python: fence it as ```python")
        marker = None
        index = end + 1
    if marker is not None:
        errors.append(f"{document}:{marker[0]}: example marker not followed by a ```python fence")
    return examples, errors


def _place(block: Block, examples: list[Example], errors: list[str], where: str, root: Path) -> None:
    if block.after is not None and not (root / block.after).is_file():
        errors.append(f"{where}: 'after {block.after}' names no file of the repository")
    if not block.continues:
        examples.append(Example([block]))
        return
    if not examples:
        errors.append(f"{where}: 'continues', but no example comes before it in this document")
        examples.append(Example([block]))
        return
    previous = examples[-1]
    if previous.skip_reason is not None and block.skip_reason is None:
        errors.append(f"{where}: continues a skipped example: skip it too, with its reason")
    if block.after is not None:
        errors.append(f"{where}: 'after' belongs on the first block of an example")
    previous.blocks.append(block)


def collect(root: Path = ROOT) -> tuple[list[Example], list[str]]:
    """Every example of the documentation, and every marker problem."""
    examples: list[Example] = []
    errors: list[str] = []
    for path in documents(root):
        found, wrong = parse(path.read_text(encoding="utf-8"), str(path.relative_to(root)), root)
        examples += found
        errors += wrong
    return examples, errors
