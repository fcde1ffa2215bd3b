"""``celery [-A proj] spawn serve``: the web API and dashboard on werkzeug's threaded server.

Flask is imported when the command runs, never when this module is imported:
every ``celery`` invocation loads the ``spawn`` group. The server binds to
loopback unless told otherwise, and refuses any other address without an API
token of at least 16 characters. It refuses a token no request could present,
and it only reads the store: a SQLite file that does not exist is an error,
and no table is created or migrated. For production, mount
:func:`celery_spawn.web.create_app` in a WSGI server of your choice instead
(see ``docs/web.md``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import click
from celery.bin.base import CeleryCommand

from ..options import RET_STORE, store_options, user_app

if TYPE_CHECKING:
    pass

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "RET_BIND", "RET_MISSING_EXTRA", "RET_OK", "RET_STORE", "RET_USAGE",
           "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080

#: Exit codes.
RET_OK = 0
RET_USAGE = 2          # click's usage error: a non-loopback bind without a token, a token that cannot work, ...
#: RET_STORE (3): the store's SQLite file does not exist (serve never creates one).
RET_MISSING_EXTRA = 4  # Flask is not installed
RET_BIND = 5           # the address is taken or cannot be bound


class ServeError(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]


@click.command(cls=CeleryCommand)
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on. Anything but loopback needs a token.")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to listen on (0: any free port).")
@store_options
@click.option("--token", envvar="CELERY_SPAWN_API_TOKEN", metavar="TOKEN", default=None,
              help="Bearer token for the API (env CELERY_SPAWN_API_TOKEN; default: the app's spawn_api_token). "
                   "Required off loopback (16 characters at least) and to cancel.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, database_url: str | None, token: str | None) -> None:
    """Serve the JSON API and the dashboard (Ctrl-C to stop)."""
    from ..render.escape import printable
    from .auth import is_loopback, token_problem

    app = user_app(ctx)
    try:
        from .api import create_app, web_state
        from .serving import make_server
    except ModuleNotFoundError as exc:
        raise ServeError(f"the web server needs {exc.name!r}: pip install 'celery-spawn[web]'",
                         RET_MISSING_EXTRA) from None
    if app is not None:
        from ..state import get_state

        celery_state = get_state(app)
        # Cancel must act on the store shown, and never create or upgrade its tables.
        celery_state.reload(database_url=database_url, auto_migrate=False)
        celery_state.store.auto_migrate = False
    flask_app = create_app(app, database_url=database_url, token=token)
    state = web_state(flask_app)
    loopback = is_loopback(host)
    named, shown = printable(host), printable(f"[{host}]" if ":" in host else host)
    if token == "":
        raise click.UsageError("refusing to serve: the API token given with --token is blank")
    if state.token is not None:
        problem = token_problem(state.token, public=not loopback)
        if problem:
            raise click.UsageError(f"refusing to serve on {named}: {problem} (it comes from --token, "
                                   "spawn_api_token or CELERY_SPAWN_API_TOKEN)")
    elif not loopback:
        raise click.UsageError(f"refusing to listen on {named} without an API token: give --token "
                               "(or set spawn_api_token / CELERY_SPAWN_API_TOKEN), or listen on 127.0.0.1")
    if state.store.is_missing_file():
        raise ServeError(f"no spawn store at {printable(state.safe_url)}: the file does not exist (serve only "
                         "reads a store: create it with `celery spawn migrate`, or give --database-url)", RET_STORE)
    try:
        server = make_server(host, port, flask_app, loopback=loopback)
    except (OSError, SystemExit) as exc:  # werkzeug exits when the port is taken
        raise ServeError(f"cannot listen on {named}:{port}: {exc}", RET_BIND) from None
    click.echo(f"celery-spawn web: serving {printable(state.safe_url)} on http://{shown}:{server.server_port}/ "
               f"({'token required' if state.token else 'no token: reads open, cancel refused'}; "
               f"cancel {'through Celery' if state.celery_app is not None else 'in the store only'})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        state.store.dispose()
