"""The HTTP server of ``celery spawn serve``: werkzeug's threaded server, with every error in JSON.

Two things the Flask application cannot do itself:

* errors raised before a request reaches it (a request line over 64 KB:
  414; a header line over 64 KB or more than 100 headers: 431; a malformed
  request line: 400) are answered by the request handler, which writes
  ``{"error": ...}`` instead of ``http.server``'s HTML page;
* on a loopback bind, :class:`LoopbackHostsOnly` answers 400 to a ``Host``
  header naming anything but this machine (DNS rebinding), before Flask runs.

Imported by ``serve`` only when it runs: it imports werkzeug.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler
from werkzeug.serving import make_server as _werkzeug_server

from . import auth
from .api import SECURITY_HEADERS

__all__ = ["JSONErrorRequestHandler", "LoopbackHostsOnly", "make_server"]

#: Headers of every error answered outside Flask (besides :data:`~celery_spawn.web.api.SECURITY_HEADERS`).
ERROR_HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-store"}


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("ascii")


class JSONErrorRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, answering the errors of ``http.server`` (414, 431, 400, ...) in JSON."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer ``code`` with ``{"error": ...}`` and close the connection."""
        short = self.responses.get(code, ("Error", ""))[0]
        text = short if not message or message == short else f"{short}: {message}"
        self.log_error("code %d, message %s", code, text)
        if self.request_version == "HTTP/0.9":  # an unreadable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        self.send_response(code, short)  # the standard reason phrase: no client text in the status line
        self.send_header("Connection", "close")
        body = _error_body(text)
        for name, value in {**ERROR_HEADERS, **SECURITY_HEADERS}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class LoopbackHostsOnly:
    """WSGI middleware: a request whose ``Host`` header names another machine gets 400 (JSON).

    A request without a ``Host`` header (HTTP/1.0) is let through: a browser
    always sends one, so DNS rebinding cannot come that way.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if host is None or auth.is_loopback_host(host):
            return self.app(environ, start_response)
        body = _error_body("this server answers only to a Host header naming this machine: localhost, "
                           "an address of 127.0.0.0/8 or [::1]")
        headers = [*ERROR_HEADERS.items(), *SECURITY_HEADERS.items(), ("Content-Length", str(len(body)))]
        start_response("400 Bad Request", headers)
        return [body]


def make_server(host: str, port: int, app: Callable[..., Iterable[bytes]], *, loopback: bool) -> BaseWSGIServer:
    """A threaded server of ``app`` on ``host:port``; on a loopback bind, it checks ``Host`` headers."""
    if loopback:
        app = LoopbackHostsOnly(app)
    return _werkzeug_server(host, port, app, threaded=True, request_handler=JSONErrorRequestHandler)
