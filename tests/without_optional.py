"""A pytest plugin (``-p tests.without_optional``) that makes the optional libraries unimportable.

``python -m pytest -p tests.without_optional tests/unit`` runs tests as if
neither OpenTelemetry, prometheus-client nor Sentry's SDK were installed: an
import of any of them raises ImportError. Tests that need one skip.
"""
from __future__ import annotations

import importlib.abc
import sys

#: The top-level packages of the optional extras (otel, metrics, sentry).
OPTIONAL = ("opentelemetry", "prometheus_client", "sentry_sdk")


class _Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by tests.without_optional)",
                                      name=name)
        return None


def block() -> None:
    """From now on, importing an optional library fails (and none is imported yet)."""
    loaded = [name for name in sys.modules if name.split(".")[0] in OPTIONAL]
    if loaded:
        raise RuntimeError(f"already imported: {', '.join(sorted(loaded))}")
    sys.meta_path.insert(0, _Unimportable())


def loaded_optional() -> list[str]:
    """The optional libraries this process has imported."""
    return sorted({name.split(".")[0] for name in sys.modules if name.split(".")[0] in OPTIONAL})


def pytest_configure(config) -> None:
    block()
