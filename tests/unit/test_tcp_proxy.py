"""The fault tests' TCP proxy relays every connection, however many files the process holds open."""
from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest

from tests.reliability.proxy import TcpProxy


@pytest.fixture
def echo_port():
    """A loopback server that sends back whatever it receives."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a cut resets the connection
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(payload)
        return client.recv(4096)


def test_the_proxy_relays_and_cuts(echo_port):
    with TcpProxy(echo_port) as proxy:
        assert roundtrip(proxy.port) == b"ping"
        with proxy.outage():
            with pytest.raises(OSError):
                roundtrip(proxy.port)
        assert roundtrip(proxy.port, b"again") == b"again"


def test_the_proxy_relays_sockets_numbered_past_1024(echo_port):
    """A long fault run holds more than 1,024 files; ``select`` refuses such descriptors, and a relay built on
    it dropped healthy connections (a broker "lost" in the middle of a schedule with no broker fault)."""
    pipes = [os.pipe() for _ in range(560)]  # the sockets opened next get descriptors above 1,024
    try:
        with TcpProxy(echo_port) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                assert client.fileno() > 1024
                for n in range(3):
                    client.sendall(b"x%d" % n)
                    assert client.recv(4096) == b"x%d" % n
    finally:
        for read, write in pipes:
            os.close(read)
            os.close(write)
