"""Text from the store made safe for a terminal: control characters written out, never sent raw.

A task name, queue, handler, id or error text is data anyone who can spawn
may choose. Sent raw, ``ESC ] 0 ; … BEL`` retitles the terminal, ``ESC [ 2 J``
clears it, and a newline or carriage return forges lines of output. Every
text renderer passes each such value through :func:`printable` before it
pads or styles it, so the colours the renderers add themselves still work.
"""
from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["UNSAFE", "has_control", "printable"]

#: What is never written raw: C0 controls, DEL, C1 controls (``\x9b`` is a one-byte CSI), the Unicode
#: line and paragraph separators, and the bidirectional embeddings, overrides and isolates, which
#: reorder how the rest of a line looks.
UNSAFE = "\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


@functools.lru_cache(maxsize=None)
def _pattern(keep: str) -> re.Pattern[str]:
    unsafe = f"[{UNSAFE}]"
    if keep:
        unsafe = f"(?![{re.escape(keep)}]){unsafe}"
    return re.compile(unsafe)


def _written(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(value: Any, keep: str = "") -> str:
    """``str(value)`` with every control character written as an escape: ``\\x1b``, ``\\x07``, ``\\n``, ``\\x9b``.

    ``keep`` names characters to leave as they are (a diagram format that
    escapes newlines its own way). Text without control characters comes
    back unchanged, so the function costs one regex search on the usual path.
    """
    text = value if value.__class__ is str else str(value)
    pattern = _pattern(keep) if keep else _UNSAFE
    if pattern.search(text) is None:
        return text
    return pattern.sub(_written, text)


def has_control(text: str) -> bool:
    """Whether :func:`printable` would change ``text`` (one search for a whole row of cells)."""
    return _UNSAFE.search(text) is not None


_UNSAFE = _pattern("")
