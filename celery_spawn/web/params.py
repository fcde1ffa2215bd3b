"""Path and query parameters of the web API, parsed strictly.

Every endpoint names the query parameters it takes; an unknown one, a repeated
one, an empty one or a value of the wrong shape raises :class:`ParameterError`,
which the API answers with ``400 {"error": "..."}``. No Flask here: the
parsers take any multi-dict with ``getlist``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Protocol

from ..options import JOB_ID_PATTERN
from ..store import queries

__all__ = ["DEFAULT_CHILDREN_LIMIT", "DEFAULT_HOURS", "DEFAULT_OPERATIONS_LIMIT", "DEFAULT_TREE_DEPTH",
           "ID_MAX_LENGTH", "ID_PATTERN", "MAX_DEPTH", "MAX_HOURS", "MAX_LIMIT", "TEXT_MAX_LENGTH", "ParameterError",
           "Query", "check_id"]

#: What a job or operation id may look like: the CLI's rule, from the options the two faces share.
ID_PATTERN = JOB_ID_PATTERN
ID_MAX_LENGTH = 64
#: Longest queue name the store can hold (``String(255)``).
TEXT_MAX_LENGTH = 255
#: Levels of a spawn tree when ``max_depth`` is not given (the seed's client asks for 10).
DEFAULT_TREE_DEPTH = 10
#: Most levels any walk follows (the store's own bound).
MAX_DEPTH = queries.MAX_LEVELS
#: Jobs ``/children`` returns unless asked otherwise.
DEFAULT_CHILDREN_LIMIT = 1000
#: Operations ``/api/spawn/operations`` returns unless asked otherwise.
DEFAULT_OPERATIONS_LIMIT = queries.DEFAULT_LIMIT
MAX_LIMIT = queries.MAX_LIMIT
#: The stats window, in hours: default and largest.
DEFAULT_HOURS = 24.0
MAX_HOURS = float(24 * 366 * 100)

#: Control characters are never part of a queue name (and PostgreSQL refuses NUL in text).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,12}")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|\.[0-9]+([eE][-+]?[0-9]+)?")


class ParameterError(ValueError):
    """A path or query parameter is missing, unknown, repeated or malformed."""


class _MultiDict(Protocol):
    def getlist(self, key: str) -> list[str]: ...

    def keys(self) -> Iterable[str]: ...


def check_id(value: str, what: str = "job") -> str:
    """``value`` if it looks like a job or operation id, else :class:`ParameterError`."""
    if not ID_PATTERN.fullmatch(value):
        shown = value[:80] + ("…" if len(value) > 80 else "")
        raise ParameterError(f"{shown!r} is not a {what} id (1 to {ID_MAX_LENGTH} characters of "
                             "A-Z a-z 0-9 . _ : ~ -)")
    return value


class Query:
    """The query string of one request, restricted to the parameters an endpoint takes."""

    def __init__(self, args: _MultiDict, allowed: Iterable[str]) -> None:
        self.args = args
        allowed = tuple(allowed)
        unknown = sorted(key for key in args.keys() if key not in allowed)  # noqa: SIM118 - a multi-dict
        if unknown:
            takes = ", ".join(allowed) if allowed else "no query parameters"
            raise ParameterError(f"unknown query parameter {unknown[0][:80]!r}; this endpoint takes: {takes}")

    def _one(self, name: str) -> str | None:
        values = self.args.getlist(name)
        if not values:
            return None
        if len(values) > 1:
            raise ParameterError(f"{name} is given more than once")
        if values[0] == "":
            raise ParameterError(f"{name} is empty (leave it out to mean 'any')")
        return values[0]

    def text(self, name: str, *, max_length: int = TEXT_MAX_LENGTH) -> str | None:
        """A free-text value (a queue name): no control characters, at most ``max_length`` characters."""
        value = self._one(name)
        if value is None:
            return None
        if len(value) > max_length:
            raise ParameterError(f"{name} is longer than {max_length} characters")
        if _CONTROL.search(value):
            raise ParameterError(f"{name} contains a control character")
        return value

    def integer(self, name: str, *, default: int | None, low: int, high: int) -> int | None:
        """A whole number between ``low`` and ``high`` (written in plain digits)."""
        value = self._one(name)
        if value is None:
            return default
        if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
            raise ParameterError(f"{name} must be a whole number from {low} to {high}, not {value[:40]!r}")
        return int(value)

    def number(self, name: str, *, default: float, above: float, high: float) -> float:
        """A decimal number greater than ``above`` and at most ``high``."""
        value = self._one(name)
        if value is None:
            return default
        number = float(value) if _NUMBER.fullmatch(value) else math.nan
        if not (number > above and number <= high):
            raise ParameterError(f"{name} must be a number above {above:g} and at most {high:g}, not {value[:40]!r}")
        return number

    def choice(self, name: str, choices: Iterable[str], *, default: str | None = None) -> str | None:
        """One of ``choices``."""
        value = self._one(name)
        if value is None:
            return default
        choices = tuple(choices)
        if value not in choices:
            raise ParameterError(f"{name} must be one of {', '.join(choices)}, not {value[:40]!r}")
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        """``true`` or ``false``, as JSON and OpenAPI write booleans."""
        value = self._one(name)
        if value is None:
            return default
        if value in ("true", "false"):
            return value == "true"
        raise ParameterError(f"{name} must be true or false, not {value[:40]!r}")
