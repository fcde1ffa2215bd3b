"""The token rules of the web API.

* With a token (``spawn_api_token``, ``CELERY_SPAWN_API_TOKEN`` or
  ``serve --token``), every ``/api/`` endpoint but the OpenAPI document wants
  ``Authorization: Bearer <token>``: 401 without it or with a wrong one.
* Without a token, reads are open and mutating endpoints answer 403: nothing
  can change a tree through an unauthenticated server.
* ``serve`` refuses to bind anything but loopback without a token, or with
  one shorter than :data:`MIN_PUBLIC_TOKEN_LENGTH`, and refuses a token that
  no ``Authorization`` header can carry (:func:`token_problem`).
* A loopback server answers only to a ``Host`` header naming this machine
  (:func:`is_loopback_host`), so no web page reaches it through DNS rebinding.

Tokens are compared with :func:`hmac.compare_digest` (constant time). No Flask here.
"""
from __future__ import annotations

import hmac
import ipaddress
import re

__all__ = ["LOOPBACK_NAMES", "MIN_PUBLIC_TOKEN_LENGTH", "SCHEME", "bearer", "is_loopback", "is_loopback_host",
           "token_matches", "token_problem"]

#: Host names that always mean this machine (besides 127.0.0.0/8 and ::1).
LOOPBACK_NAMES = ("localhost",)
#: The ``Authorization`` scheme the API takes.
SCHEME = "Bearer"
#: The shortest token a server reachable from other machines accepts.
MIN_PUBLIC_TOKEN_LENGTH = 16
#: What a token may hold: visible ASCII, and spaces or tabs between them (an HTTP header's characters).
_HEADER_TEXT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?")
#: A ``Host`` header: a name or IPv4 address, or an IPv6 address in brackets, then an optional port.
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public interface


def is_loopback_host(header: str) -> bool:
    """Whether a ``Host`` header (``host[:port]``, IPv6 in brackets) names this machine.

    Every address of ``127.0.0.0/8``, ``[::1]`` and ``localhost`` do; any other name
    may be a DNS-rebinding page pointing its own name at this machine.
    """
    found = _HOST_HEADER.fullmatch(header.strip())
    if found is None:
        return False
    name, port = found.groups()
    if port is not None and not 0 < int(port) < 65536:
        return False
    if name.startswith("["):
        return _is_loopback_ip(name[1:-1], version=6)
    return name.lower() in LOOPBACK_NAMES or _is_loopback_ip(name, version=4)


def _is_loopback_ip(text: str, version: int) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == version and address.is_loopback


def token_problem(token: str, *, public: bool) -> str | None:
    """Why ``token`` cannot guard a server (``public``: one reachable from other machines), or None.

    The answer never quotes the token. A token no request can present
    (blank, not ASCII, holding a control character, or with whitespace at an
    end, which :func:`bearer` strips) would lock every client out.
    """
    if not token.strip():
        return "the API token is blank"
    if not token.isascii():
        return "the API token holds a character that is not ASCII, which no HTTP header carries"
    if _HEADER_TEXT.fullmatch(token) is None:
        if token != token.strip():
            return "the API token begins or ends with whitespace, which an Authorization header drops"
        return "the API token holds a control character, which no HTTP header carries"
    if public and len(token) < MIN_PUBLIC_TOKEN_LENGTH:
        return f"the API token is shorter than {MIN_PUBLIC_TOKEN_LENGTH} characters"
    return None


def bearer(header: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != SCHEME.lower():
        return None
    return credentials.strip() or None


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token``, compared in constant time."""
    given = bearer(header)
    if given is None:
        return False
    # Bytes: compare_digest refuses non-ASCII str, and a header may hold anything.
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8"))
