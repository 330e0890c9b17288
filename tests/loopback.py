"""A free TCP port on 127.0.0.1, for tests that start a real server."""

import socket


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
