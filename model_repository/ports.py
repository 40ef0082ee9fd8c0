"""TCP ports for servers: free ones to start on, and a clear error for one in use."""
from __future__ import annotations

import errno
import socket

from stemserve.errors import ServerError


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free right now (held open together, then released).

    For servers started beside others (tests, benchmarks, ``separate --serve``), so no run
    fights over Triton's default 8000-8002.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail before starting when ``port`` is taken: the server's own error is buried in logs.

    SO_REUSEADDR, as the server binds: a port left in TIME_WAIT by a stopped server is free
    to reuse, one that something listens on is not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"{what} port {port} is already in use on {host}: stop whatever listens "
                    f"there or choose another with --{what.lower()}-port") from None
            raise ServerError(f"cannot use {what} port {port} on {host}: {err}") from None


