"""The token rules of the web API.

* With a token (``spawn_api_token``, ``CELERY_SPAWN_API_TOKEN`` or
  ``serve --token``), every ``/api/`` endpoint but the OpenAPI document wants
  ``Authorization: Bearer <token>``: 401 without it or with a wrong one.
* Without a token, reads are open and mutating endpoints answer 403: nothing
  can change a tree through an unauthenticated server.
* ``serve`` refuses to bind anything but loopback without a token.

Tokens are compared with :func:`hmac.compare_digest` (constant time). No Flask here.
"""
from __future__ import annotations

import hmac
import ipaddress

__all__ = ["LOOPBACK_NAMES", "SCHEME", "bearer", "is_loopback", "token_matches"]

#: Host names that always mean this machine (besides 127.0.0.0/8 and ::1).
LOOPBACK_NAMES = ("localhost",)
#: The ``Authorization`` scheme the API takes.
SCHEME = "Bearer"


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
