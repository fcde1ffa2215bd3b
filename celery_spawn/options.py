"""What the two faces share: which store and app a command or server uses, the id grammar, the exit
codes, and the click options and output helpers for them.

``celery_spawn.cli`` and ``celery_spawn.web`` both build on this module and
never on each other. Kept light like the CLI: SQLAlchemy, the store and the
renderers are imported inside the functions that need them.

Which store a command reads, in order: ``--database-url/-u`` (or the
``CELERY_SPAWN_DATABASE_URL`` environment variable); the ``spawn_database_url``
of the app given to ``celery -A``; the default SQLite file in the working
directory. Without ``-A``, Celery hands plugins a silent app named
``'default'``: its settings are never taken for the user's.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .protocol import ID_PATTERN, ID_RULE

if TYPE_CHECKING:
    from celery import Celery

    from .store import SpawnStore

#: Exit codes.
RET_OK = 0
RET_NOT_FOUND = 1     # no job or operation has the given id
RET_USAGE = 2         # click's usage error: a malformed id, a negative limit, ...
RET_STORE = 3         # the store could not be reached, or has no tables

#: What a job or operation id (or a label) may look like: the one grammar a spawn checks (protocol.ID_PATTERN).
JOB_ID_PATTERN = ID_PATTERN
#: Seconds to wait for a database server before saying it is unreachable.
CONNECT_TIMEOUT = 10
#: Operations per ``list`` when --limit is not given, and the most any listing returns.
DEFAULT_LIMIT = 20
MAX_LIMIT = 10_000
#: Hours ``list --recent`` looks back.
RECENT_HOURS = 24
#: Hours the ``monitor`` stats cover.
MONITOR_HOURS = 1
TREE_FORMATS = ("text", "json", "mermaid", "dot")
LIST_FORMATS = ("text", "json")


class JobIdType(click.ParamType):
    """A job or operation id, or a label: 1 to 64 characters of ``[A-Za-z0-9._:~-]``."""

    name = "JOB_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not JOB_ID_PATTERN.fullmatch(text):
            self.fail(f"{text[:80]!r} is not a job id ({ID_RULE})", param, ctx)
        return text


JOB_ID = JobIdType()


class DurationType(click.ParamType):
    """A duration: ``30d``, ``12h``, ``90m``, ``45s`` or a number of seconds; read as seconds."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from .settings import parse_duration

        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = DurationType()


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and infinity (click's range lets nan through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class CommandError(click.ClickException):
    """A one-line error with its own exit code (``Error: ...`` on stderr, no traceback).

    The message may quote the store (a driver's error, a URL): its control characters are written as escapes.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        from .render.escape import printable

        super().__init__(printable(message))
        self.exit_code = exit_code  # type: ignore[misc]  # click declares a class default


# ---- store resolution -----------------------------------------------------------------------
def user_app(ctx: click.Context) -> Celery | None:
    """The app given with ``celery -A`` (or ``CELERY_APP``), or None."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        return None
    root = ctx.find_root()
    if "app" in root.params:  # under `celery`: -A (or CELERY_APP) given, or ctx.obj.app is the silent app
        return app if root.params["app"] is not None else None
    from celery import _state

    # Called another way (``manage.py spawn``, click's runner): only Celery's silent app is not the user's.
    # The user's app may be the default one too (Celery's Django fixup makes it so), hence the name check.
    if app is _state.default_app and app.main == "default":  # type: ignore[attr-defined]
        return None
    return app


def resolve_database_url(ctx: click.Context, explicit: str | None) -> tuple[str, dict]:
    """The store URL this command uses, and the engine options that go with it."""
    if explicit:
        return explicit, {}
    app = user_app(ctx)
    if app is not None:
        from .state import get_state

        settings = get_state(app).settings
        return settings.database_url, dict(settings.engine_options or {})
    from .settings import DEFAULT_DATABASE_URL

    return DEFAULT_DATABASE_URL, {}


@contextlib.contextmanager
def open_store(ctx: click.Context, database_url: str | None, *, create: bool = False) -> Iterator[SpawnStore]:
    """The store for one command; store errors become one line and :data:`RET_STORE`.

    The CLI never creates tables unless ``create`` (``migrate``): a read
    command pointed at the wrong database must not leave an empty store behind.
    """
    from .errors import StoreError
    from .store import SpawnStore

    url, options = resolve_database_url(ctx, database_url)
    try:
        store = SpawnStore(url, options, auto_migrate=False, connect_timeout=CONNECT_TIMEOUT)
    except StoreError as exc:
        raise CommandError(str(exc), RET_STORE) from None
    if not create and store.is_missing_file():
        raise CommandError(f"no spawn store at {store.safe_url}: the file does not exist "
                           "(give --database-url or -A, or create it with `celery spawn migrate`)", RET_STORE)
    try:
        yield store
    except StoreError as exc:
        raise CommandError(explain(store, exc), RET_STORE) from None
    finally:
        store.dispose()


def explain(store: SpawnStore, exc: Exception) -> str:
    """The store error, with a hint when the database is reachable but has no spawn tables."""
    if store.has_tables() is False:
        return f"the database at {store.safe_url} has no spawn tables (run `celery spawn migrate`)"
    return str(exc)


# ---- shared options and output ----------------------------------------------------------------
#: Where the group's own ``--database-url`` (``celery spawn -u URL list``) waits for the command.
GROUP_URL_KEY = "celery_spawn.database_url"
_DATABASE_URL_HELP = ("SQLAlchemy URL of the spawn store (env CELERY_SPAWN_DATABASE_URL; "
                     "default: the -A app's spawn_database_url, else sqlite:///celery_spawn.sqlite3).")


def _database_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A command's ``-u``, else the group's (``celery spawn -u URL list``), else the environment's."""
    if ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE:
        return value
    return ctx.meta.get(GROUP_URL_KEY) or value


def store_options(fn: Callable) -> Callable:
    """``--database-url/-u``: the option every command takes, after its name or before it (on the group)."""
    return click.option("--database-url", "-u", envvar="CELERY_SPAWN_DATABASE_URL", metavar="URL", default=None,
                        callback=_database_url, help=_DATABASE_URL_HELP)(fn)


def format_option(choices: tuple[str, ...]) -> Callable:
    """``--format/-f``, and ``--json/-j`` for ``--format json``: the command receives ``fmt`` alone."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def with_json(*args: Any, as_json: bool = False, **kwargs: Any) -> Any:
            if as_json:
                ctx = click.get_current_context()
                if ctx.get_parameter_source("fmt") is click.core.ParameterSource.COMMANDLINE \
                        and kwargs.get("fmt") != "json":
                    raise click.UsageError(f"--json is --format json: it cannot go with --format {kwargs['fmt']}")
                kwargs["fmt"] = "json"
            return fn(*args, **kwargs)

        with_json = click.option("--json", "-j", "as_json", is_flag=True, help="Same as --format json.")(with_json)
        return click.option("--format", "-f", "fmt", type=click.Choice(choices), default="text",
                            show_default=True, help="Output format.")(with_json)

    return decorate


def limit_option(default: int, help_text: str) -> Callable:
    return click.option("--limit", "-l", type=click.IntRange(min=1, max=MAX_LIMIT), default=default,
                        show_default=True, help=help_text)


def queue_option(help_text: str) -> Callable:
    return click.option("--queue", "-Q", default=None, metavar="QUEUE", help=help_text)


def use_colour(ctx: click.Context) -> bool:
    """Colours only on a terminal, and never with ``celery --no-color`` / ``NO_COLOR``."""
    if getattr(ctx.obj, "no_color", False):
        return False
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def emit(ctx: click.Context, text: str) -> None:
    click.echo(text, color=use_colour(ctx))


def note_label(token: str, operation_id: str, others: int, doing: str = "showing") -> None:
    """On stderr (stdout may be JSON): which operation a label named, when it names more than one."""
    if not others:
        return
    from .render.escape import printable

    click.echo(f"label {token!r} names {others + 1} operations; {doing} the newest ({printable(operation_id)}), "
               f"{others} other{'s' if others != 1 else ''}: celery spawn list --operation {token}", err=True)


def fail_not_found(what: str, some_id: str, hint: str = "") -> NoReturn:
    raise CommandError(f"no spawned {what} has id {some_id!r}{hint}", RET_NOT_FOUND)


def usage_errors(fn: Callable) -> Callable:
    """Turn a ValueError from the queries (bad argument) into a usage error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            from .render.escape import printable

            raise click.UsageError(printable(exc)) from None

    return wrapper
