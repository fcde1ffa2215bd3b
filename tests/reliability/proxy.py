"""A small threaded TCP proxy a test controls: put it in front of a broker or a database, then cut it.

It listens on 127.0.0.1 only and forwards to one loopback upstream. A test can

* ``cut()``: close every live connection at once and refuse new ones (each
  new connection is accepted and closed at once, so clients fail fast rather
  than hang);
* ``hang()``: keep every connection open and accept new ones, but swallow
  every byte in both directions (a server that accepts and never answers);
* ``resume()``: forward new connections again (and end a hang);
* ``stop()``: close everything and stop listening.

Bounded: at most ``max_connections`` live connections (more are closed at
once), 64 KiB reads, daemon threads that end with their sockets. Sockets are
watched with ``poll``, not ``select``: a long run opens more than 1,024 file
descriptors, and ``select`` refuses those (the relay would drop a healthy
connection).
"""
from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Callable, Iterator

LOOPBACK = ("127.0.0.1", "localhost", "::1")
BUFFER = 64 * 1024
#: Seconds ``select`` waits before a relay thread looks at the proxy's state again.
POLL = 0.2


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0,
                 max_connections: int = 256) -> None:
        if upstream_host not in LOOPBACK:
            raise ValueError(f"the proxy forwards to loopback only, not {upstream_host!r}")
        self.upstream = (upstream_host, upstream_port)
        self.max_connections = max_connections
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._open = True       # forwarding (False: cut)
        self._hung = False      # swallowing every byte
        self._running = True    # listening (False: stopped)
        #: Connections accepted, and connections refused while cut (for assertions and logs).
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    # ---- control ---------------------------------------------------------------------------
    @property
    def is_cut(self) -> bool:
        return not self._open

    def live(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Drop every live connection and refuse new ones until :meth:`resume`."""
        with self._lock:
            self._open = False
            pairs, self._pairs = self._pairs, set()
            self.cuts += 1
        for pair in pairs:
            _close_pair(pair, reset=True)

    def resume(self) -> None:
        with self._lock:
            self._open = True
            self._hung = False

    def hang(self) -> None:
        """Swallow every byte from now on, on live and new connections alike, answering nothing."""
        with self._lock:
            self._hung = True

    @contextlib.contextmanager
    def outage(self) -> Iterator[TcpProxy]:
        """``with proxy.outage(): ...``: cut for the duration of the block."""
        self.cut()
        try:
            yield self
        finally:
            self.resume()

    def stop(self) -> None:
        self._running = False
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "cut" if self.is_cut else "open"
        return f"<TcpProxy 127.0.0.1:{self.port} -> {self.upstream[0]}:{self.upstream[1]} {state}>"

    # ---- plumbing --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while self._running:
            try:
                readable = _readable([self._listener], POLL)
                if not readable:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):
                if not self._running:
                    return
                continue
            with self._lock:
                refuse = not self._open or len(self._pairs) >= self.max_connections
                hung = self._hung
            if hung:  # accepted, and never answered
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            if refuse:
                self.refused += 1
                _close(client, reset=True)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                self.refused += 1
                _close(client, reset=True)
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, server)
            with self._lock:
                if not self._open:  # cut while connecting
                    _close_pair(pair, reset=True)
                    continue
                self._pairs.add(pair)
                self.accepted += 1
            threading.Thread(target=self._relay, args=(pair,), name=f"proxy-{self.port}-relay",
                             daemon=True).start()

    def _swallow(self, client: socket.socket) -> None:
        _swallow_into_void(client, lambda: self._running and self._hung)

    def _relay(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, server = pair
        peer = {client: server, server: client}
        try:
            while True:
                with self._lock:
                    if pair not in self._pairs:
                        return
                try:
                    readable = _readable([client, server], POLL)
                except (OSError, ValueError):
                    return
                for sock in readable:
                    data = sock.recv(BUFFER)
                    if not data:
                        return
                    if not self._hung:
                        peer[sock].sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._pairs.discard(pair)
            _close_pair(pair, reset=False)


def _readable(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Those of ``socks`` with something to read (or closed), waiting up to ``timeout`` seconds."""
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        fd = sock.fileno()
        if fd < 0:
            raise ValueError("a closed socket")
        poller.register(fd, select.POLLIN | select.POLLPRI)
        by_fd[fd] = sock
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000)]


def _swallow_into_void(sock: socket.socket, running: Callable[[], bool]) -> None:
    with contextlib.suppress(OSError, ValueError):
        while running():
            readable = _readable([sock], POLL)
            if readable and not sock.recv(BUFFER):
                break
    _close(sock, reset=False)


def _close(sock: socket.socket, reset: bool) -> None:
    with contextlib.suppress(OSError):
        if reset:  # RST instead of FIN: the peer sees a dead connection at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def _close_pair(pair: tuple[socket.socket, socket.socket], reset: bool) -> None:
    for sock in pair:
        _close(sock, reset)
