"""The ``celery spawn`` command group (registered through the ``celery.commands`` entry point).

Kept light: every ``celery`` invocation, ``worker`` included, imports this
module, so SQLAlchemy, the store and the renderers are imported inside the
commands.

Which store a command reads, in order: ``--database-url/-u`` (or the
``CELERY_SPAWN_DATABASE_URL`` environment variable); the ``spawn_database_url``
of the app given to ``celery -A``; the default SQLite file in the working
directory. Without ``-A``, Celery hands plugins a silent app named
``'default'``: its settings are never taken for the user's.

Other modules add commands to the group with ``spawn.add_command(command)``
(``cancel``, ``serve``); :func:`open_store`, :func:`store_options`,
:data:`JOB_ID` and the ``RET_*`` exit codes are theirs to reuse.
"""
from __future__ import annotations

import contextlib
import functools
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click
from celery.bin.base import CeleryCommand

if TYPE_CHECKING:
    from celery import Celery

    from .store import SpawnStore

#: Exit codes.
RET_OK = 0
RET_NOT_FOUND = 1     # no job or operation has the given id
RET_USAGE = 2         # click's usage error: a malformed id, a negative limit, ...
RET_STORE = 3         # the store could not be reached, or has no tables

#: What a job or operation id may look like: Celery's uuids and any other id the store can hold.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
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
    """A job or operation id: 1 to 64 characters of ``[A-Za-z0-9._:-]``."""

    name = "JOB_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not JOB_ID_PATTERN.fullmatch(text):
            self.fail(f"{text[:80]!r} is not a job id (1 to 64 characters of A-Z a-z 0-9 . _ : -)", param, ctx)
        return text


JOB_ID = JobIdType()


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and infinity (click's range lets nan through)."""

    def convert(self, value, param, ctx):  # type: ignore[override]
        number = super().convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class CommandError(click.ClickException):
    """A one-line error with its own exit code (``Error: ...`` on stderr, no traceback)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ---- store resolution -----------------------------------------------------------------------
def user_app(ctx: click.Context) -> Celery | None:
    """The app given with ``celery -A`` (or ``CELERY_APP``), or None."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        return None
    root = ctx.find_root()
    if "app" in root.params and root.params["app"] is None:
        return None  # `celery spawn ...` without -A: ctx.obj.app is Celery's silent 'default' app
    from celery import _state

    if app is _state.default_app:
        return None
    return app


def resolve_database_url(ctx: click.Context, explicit: str | None) -> tuple[str, dict]:
    """The store URL this command uses, and the engine options that go with it."""
    if explicit:
        return explicit, {}
    app = user_app(ctx)
    if app is not None:
        from .app import get_state

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
        store = SpawnStore(url, _with_timeout(url, options), auto_migrate=False)
    except StoreError as exc:
        raise CommandError(str(exc), RET_STORE) from None
    if not create:
        _require_sqlite_file(store)
    try:
        yield store
    except StoreError as exc:
        raise CommandError(_explain(store, exc), RET_STORE) from None
    finally:
        store.dispose()


def _with_timeout(url: str, options: dict) -> dict:
    """Bound the wait for an unreachable server (the drivers' defaults can be minutes)."""
    from sqlalchemy.engine import make_url

    try:
        backend = make_url(url).get_backend_name()
    except Exception:
        return options
    if backend in ("postgresql", "mysql", "mariadb") and "connect_args" not in options:
        return {**options, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    return options


def _require_sqlite_file(store: SpawnStore) -> None:
    url = store.holder.url
    database = url.database
    if store.backend == "sqlite" and database and database != ":memory:" and not database.startswith("file:"):
        from pathlib import Path

        if not Path(database).expanduser().exists():
            raise CommandError(f"no spawn store at {store.safe_url}: the file does not exist "
                               "(give --database-url or -A, or create it with `celery spawn migrate`)", RET_STORE)


def _explain(store: SpawnStore, exc: Exception) -> str:
    """The store error, with a hint when the database is reachable but has no spawn tables."""
    message = str(exc)
    with contextlib.suppress(Exception):
        import sqlalchemy as sa

        with store.holder.get().connect() as conn:
            if not sa.inspect(conn).has_table("spawn_jobs"):
                return f"the database at {store.safe_url} has no spawn tables (run `celery spawn migrate`)"
    return message


# ---- shared options and output ----------------------------------------------------------------
#: Where the group's own ``--database-url`` (``celery spawn -u URL list``) waits for the command.
_GROUP_URL = "celery_spawn.database_url"
_DATABASE_URL_HELP = ("SQLAlchemy URL of the spawn store (env CELERY_SPAWN_DATABASE_URL; "
                     "default: the -A app's spawn_database_url, else sqlite:///celery_spawn.sqlite3).")


def _database_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A command's ``-u``, else the group's (``celery spawn -u URL list``), else the environment's."""
    if ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE:
        return value
    return ctx.meta.get(_GROUP_URL) or value


def store_options(fn: Callable) -> Callable:
    """``--database-url/-u``: the option every command takes, after its name or before it (on the group)."""
    return click.option("--database-url", "-u", envvar="CELERY_SPAWN_DATABASE_URL", metavar="URL", default=None,
                        callback=_database_url, help=_DATABASE_URL_HELP)(fn)


def format_option(choices: tuple[str, ...]) -> Callable:
    return click.option("--format", "-f", "fmt", type=click.Choice(choices), default="text", show_default=True,
                        help="Output format.")


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


def _fail_not_found(what: str, some_id: str, hint: str = "") -> None:
    raise CommandError(f"no spawned {what} has id {some_id!r}{hint}", RET_NOT_FOUND)


def _commands(fn: Callable) -> Callable:
    """Turn a ValueError from the queries (bad argument) into a usage error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None

    return wrapper


# ---- the group ----------------------------------------------------------------------------------
@click.group(name="spawn")
@click.option("--database-url", "-u", "group_url", metavar="URL", default=None,
              help="The store of every command below, as if given to it (a command's own -u wins).")
@click.pass_context
def spawn(ctx: click.Context, group_url: str | None) -> None:
    """Inspect and manage spawn trees recorded by celery-spawn.

    \b
    Exit codes: 0 ok, 1 unknown id, 2 usage error, 3 store unreachable.
    """
    if group_url:
        ctx.meta[_GROUP_URL] = group_url


@spawn.command(name="list", cls=CeleryCommand)
@click.option("--recent", is_flag=True, help=f"Only operations created in the last {RECENT_HOURS} hours.")
@limit_option(DEFAULT_LIMIT, "Operations to show, newest first.")
@queue_option("Only operations whose parent ran on this queue.")
@click.option("--state", "-s", default=None, metavar="STATE",
              help="Only operations in this state (running, succeeded, failed, partially_failed, cancelled).")
@click.option("--detailed", "-d", is_flag=True, help="Show counts per state, timing and errors.")
@format_option(LIST_FORMATS)
@store_options
@click.pass_context
@_commands
def list_command(ctx: click.Context, recent: bool, limit: int, queue: str | None, state: str | None,
                 detailed: bool, fmt: str, database_url: str | None) -> None:
    """Spawn operations: parent, handler, state and progress."""
    from datetime import datetime, timedelta, timezone

    from . import render
    from .store import queries

    since = None
    if recent:
        since = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=RECENT_HOURS)
    with open_store(ctx, database_url) as store, store.read() as conn:
        operations = queries.list_operations(conn, limit=limit, queue=queue, state=state, since=since)
    if fmt == "json":
        emit(ctx, render.to_json(operations))
    else:
        emit(ctx, render.operations_text(operations, detailed=detailed, color=use_colour(ctx)))


@spawn.command(cls=CeleryCommand)
@click.argument("job_id", type=JOB_ID)
@format_option(TREE_FORMATS)
@click.option("--max-depth", "-m", type=click.IntRange(min=0, max=1000), default=None,
              help="Levels to show below the job (0: the job alone).")
@click.option("--full", is_flag=True, help="Start from the root of the job's tree.")
@click.option("--children-only", "-c", is_flag=True, help="Only the job's direct children, in spawn order.")
@store_options
@click.pass_context
@_commands
def tree(ctx: click.Context, job_id: str, fmt: str, max_depth: int | None, full: bool, children_only: bool,
         database_url: str | None) -> None:
    """The spawn tree below JOB_ID.

    With --full, the whole tree JOB_ID belongs to, from its root, with JOB_ID
    marked ◀.
    """
    from . import render
    from .store import queries

    with open_store(ctx, database_url) as store, store.read() as conn:
        if children_only:
            start = job_id
            if full:
                found = queries.spawn_tree(conn, job_id, max_depth=0, full=True)
                start = found["id"] if found else job_id
            data: Any = queries.spawn_tree(conn, start, max_depth=1)
            rows = queries.children(conn, start) if data is not None and fmt in ("text", "json") else []
        else:
            data = queries.spawn_tree(conn, job_id, max_depth=max_depth, full=full)
        kind = None if data is not None else queries.find_kind(conn, job_id)
    if data is None:
        hint = (" (that is an operation id: `celery spawn list` shows its parent job)"
                if kind == "operation" else "")
        _fail_not_found("job", job_id, hint)
    if children_only and fmt == "json":
        emit(ctx, render.to_json(rows))
    elif children_only and fmt == "text":
        emit(ctx, render.jobs_text(rows, color=use_colour(ctx)))
    else:
        emit(ctx, render.render_tree(data, fmt, color=use_colour(ctx), highlight=job_id if full else None))


@spawn.command(cls=CeleryCommand)
@click.option("--hours", "-H", type=FiniteFloatRange(min=0, min_open=True, max=24 * 366 * 100), default=24.0,
              show_default=True, help="Window: operations created in the last HOURS.")
@queue_option("Only operations whose parent ran on this queue.")
@click.option("--detailed", "-d", is_flag=True, help="Add children per task, the largest and slowest operations.")
@format_option(LIST_FORMATS)
@store_options
@click.pass_context
@_commands
def stats(ctx: click.Context, hours: float, queue: str | None, detailed: bool, fmt: str,
          database_url: str | None) -> None:
    """Operations, children per spawn, success rates, durations.

    Broken down by queue and by handler; --detailed adds children per task
    and the largest and slowest operations.
    """
    from . import render
    from .store import queries

    with open_store(ctx, database_url) as store, store.read() as conn:
        result = queries.stats(conn, hours=hours, queue=queue, detailed=detailed)
    if fmt == "json":
        emit(ctx, render.to_json(result))
    else:
        emit(ctx, render.stats_text(result, color=use_colour(ctx)))


@spawn.command(cls=CeleryCommand)
@click.option("--interval", "-i", type=FiniteFloatRange(min=0.1, max=3600), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@queue_option("Only operations and children of this queue.")
@limit_option(15, "Running operations to show.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, hidden=True,
              help="Stop after this many refreshes (for tests).")
@store_options
@click.pass_context
@_commands
def monitor(ctx: click.Context, interval: float, queue: str | None, limit: int, iterations: int | None,
            database_url: str | None) -> None:
    """A live view of running operations (Ctrl-C quits).

    The screen is redrawn in place every --interval seconds on a terminal;
    piped, each refresh is printed after a blank line.
    """
    from . import render

    colour = use_colour(ctx)
    frames = 0
    with open_store(ctx, database_url) as store:
        snapshot_of = functools.partial(_snapshot, store, queue=queue, limit=limit, interval=interval)
        first = snapshot_of()  # an unreachable store fails here, with its exit code
        try:
            while True:
                snapshot = first if frames == 0 else snapshot_of(tolerate=True)
                frame = render.monitor_text(snapshot, color=colour)
                if colour:
                    click.clear()
                elif frames:
                    click.echo("")
                emit(ctx, frame)
                frames += 1
                if iterations is not None and frames >= iterations:
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            click.echo("")
    ctx.exit(RET_OK)


def _snapshot(store: SpawnStore, *, queue: str | None, limit: int, interval: float, tolerate: bool = False) -> dict:
    """One frame's data: a bounded number of statements whatever the store's size."""
    from datetime import datetime, timezone

    from .errors import StoreError
    from .store import queries
    from .store import schema as s

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    snapshot: dict[str, Any] = {"store": store.safe_url, "queue": queue, "at": now, "interval": interval}
    try:
        with store.read() as conn:
            snapshot["running"] = queries.list_operations(conn, limit=limit, queue=queue, state=s.OP_RUNNING)
            snapshot["stats"] = queries.stats(conn, hours=MONITOR_HOURS, queue=queue, now=now)
            waiting = queries.pending(conn, queue=queue, limit=100, jobs_per_operation=1)
    except StoreError as exc:
        if not tolerate:
            raise
        return {**snapshot, "running": [], "stats": _empty_stats(), "pending_children": 0,
                "pending_operations": 0, "error": str(exc)}
    snapshot["pending_operations"] = len(waiting)
    snapshot["pending_more"] = len(waiting) >= 100
    snapshot["pending_children"] = sum(e["pending"] + e["held"] for e in waiting)
    return snapshot


def _empty_stats() -> dict:
    return {"operations": 0, "operations_by_state": {}, "children": 0, "children_by_state": {},
            "success_rate": None, "child_success_rate": None, "durations": {"child_avg_seconds": None}}


@spawn.command(cls=CeleryCommand)
@click.argument("job_id", type=JOB_ID)
@click.option("--depth", "-D", type=click.IntRange(min=1, max=1000), default=None,
              help="Levels to follow in each direction (default: all).")
@click.option("--ancestors", "only_ancestors", is_flag=True, help="Only the parent chain up to the root.")
@click.option("--descendants", "only_descendants", is_flag=True, help="Only the jobs below.")
@format_option(TREE_FORMATS)
@store_options
@click.pass_context
@_commands
def lineage(ctx: click.Context, job_id: str, depth: int | None, only_ancestors: bool, only_descendants: bool,
            fmt: str, database_url: str | None) -> None:
    """Ancestors and descendants of JOB_ID.

    Text, Mermaid and DOT draw one tree from the root down through JOB_ID
    (marked ◀); JSON gives the job and flat lists with each job's distance.
    """
    from . import render
    from .store import queries

    want_up = only_ancestors or not only_descendants
    want_down = only_descendants or not only_ancestors
    with open_store(ctx, database_url) as store, store.read() as conn:
        job = queries.get_job(conn, job_id)
        if job is None:
            kind = queries.find_kind(conn, job_id)
            hint = " (that is an operation id)" if kind == "operation" else ""
            _fail_not_found("job", job_id, hint)
        up = queries.ancestors(conn, job_id, depth=depth) if want_up else []
        if fmt == "json":
            down = queries.descendants(conn, job_id, depth=depth) if want_down else []
        else:
            subtree = queries.spawn_tree(conn, job_id, max_depth=depth) if want_down else None
    if fmt == "json":
        result: dict[str, Any] = {"job": job}
        if want_up:
            result["ancestors"] = up
        if want_down:
            result["descendants"] = down
        emit(ctx, render.to_json(result))
        return
    combined = render.lineage_tree(job, up, subtree)
    emit(ctx, render.render_tree(combined, fmt, color=use_colour(ctx), highlight=job_id,
                              cut_option="--depth"))


@spawn.command(cls=CeleryCommand)
@queue_option("Only children bound for this queue.")
@limit_option(50, "Operations to show, longest waiting first.")
@format_option(LIST_FORMATS)
@store_options
@click.pass_context
@_commands
def pending(ctx: click.Context, queue: str | None, limit: int, fmt: str, database_url: str | None) -> None:
    """Children not yet dispatched, or held on dependencies."""
    from . import render
    from .store import queries

    with open_store(ctx, database_url) as store, store.read() as conn:
        entries = queries.pending(conn, queue=queue, limit=limit)
    if fmt == "json":
        emit(ctx, render.to_json(entries))
    else:
        emit(ctx, render.pending_text(entries, color=use_colour(ctx)))


@spawn.command(cls=CeleryCommand)
@store_options
@click.pass_context
def migrate(ctx: click.Context, database_url: str | None) -> None:
    """Create or upgrade the store's tables."""
    from .store.migrations import current_revision

    with open_store(ctx, database_url, create=True) as store:
        before = _revision(store, current_revision)
        revision = store.migrate()
        if before == revision:
            emit(ctx, f"spawn store {store.safe_url} is up to date (revision {revision})")
        else:
            emit(ctx, f"spawn store {store.safe_url} migrated from {before or 'nothing'} to revision {revision}")


def _revision(store: SpawnStore, current_revision: Callable) -> str | None:
    from sqlalchemy.exc import SQLAlchemyError

    from .errors import StoreError

    try:
        return current_revision(store.holder.get())
    except SQLAlchemyError as exc:
        from .store.sql import _short

        raise StoreError(f"spawn store {store.safe_url} failed: {_short(exc)}") from exc


@spawn.command(cls=CeleryCommand)
@click.option("--grace", type=FiniteFloatRange(min=0, max=7 * 86_400), default=None,
              help="Seconds an operation must be untouched (default: the app's spawn_recovery_grace).")
@click.option("--redeliver-after", type=FiniteFloatRange(min=0, max=7 * 86_400), default=None,
              help="Seconds a dispatched SpawnTask child may go unstarted, its operation idle, before it is "
                   "published again (default: the app's spawn_redeliver_after; 0: never).")
@limit_option(50, "Operations to recover in this run.")
@store_options
@click.pass_context
def recover(ctx: click.Context, grace: float | None, redeliver_after: float | None, limit: int,
            database_url: str | None) -> None:
    """Publish children recorded but never dispatched, or dispatched and lost by the broker.

    This is what every worker's recovery sweep does; it needs the app (-A) to publish.
    """
    from .app import get_state
    from .errors import StoreError
    from .recovery import recover as recover_stranded

    app = user_app(ctx)
    if app is None:
        raise click.UsageError("recover publishes through your Celery app: give it with `celery -A proj spawn recover`")
    state = get_state(app)
    if database_url:
        state.reload(database_url=database_url)
    try:
        published = recover_stranded(app, grace_seconds=grace, limit=limit, redeliver_after=redeliver_after)
    except StoreError as exc:
        raise CommandError(_explain(state.store, exc), RET_STORE) from None
    emit(ctx, f"published {published} stranded child{'ren' if published != 1 else ''} "
              f"from {state.store.safe_url}")


@spawn.command(cls=CeleryCommand)
@click.argument("target", metavar="JOB_OR_OPERATION", type=JOB_ID)
@click.option("--terminate", is_flag=True, help="Also kill children that are running (revoke with terminate).")
@click.option("--force", is_flag=True, help="Do not ask for confirmation on a terminal.")
@format_option(("text", "json"))
@store_options
@click.pass_context
def cancel(ctx: click.Context, target: str, terminate: bool, force: bool, fmt: str,
           database_url: str | None) -> None:
    """Stop every unfinished descendant of a job or operation.

    Held and pending children are marked cancelled, dispatched and running ones
    are revoked; finished ones stay as they are. Needs the app (-A) to revoke.
    """
    from . import render
    from .app import get_state
    from .control import cancel as cancel_tree
    from .errors import JobNotFound, StoreError

    app = user_app(ctx)
    if app is None:
        raise click.UsageError("cancel revokes through your Celery app: give it with `celery -A proj spawn cancel`")
    state = get_state(app)
    if database_url:
        state.reload(database_url=database_url)
    if not force and sys.stdin.isatty():
        click.confirm(f"Cancel everything unfinished below {target}?", abort=True)
    try:
        result = cancel_tree(app, target, terminate=terminate)
    except JobNotFound:
        raise CommandError(f"no spawned job or operation has id {target}", RET_NOT_FOUND) from None
    except StoreError as exc:
        raise CommandError(_explain(state.store, exc), RET_STORE) from None
    if fmt == "json":
        emit(ctx, render.to_json(result))
    else:
        emit(ctx, f"cancelled {result['cancelled']} waiting and revoked {result['revoked']} running "
                  f"job{'s' if result['revoked'] != 1 else ''} below {target}"
                  + (" (terminated)" if terminate and result["revoked"] else ""))


def _register_serve() -> None:
    """``celery spawn serve``: the web API and dashboard (needs the ``web`` extra only when run)."""
    from .web.command import serve

    spawn.add_command(serve)


_register_serve()


def main() -> None:  # pragma: no cover - `python -m celery_spawn.cli` without Celery's root command
    spawn(prog_name="celery spawn")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
