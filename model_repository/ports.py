"""TCP ports for servers: free ones to start on, and a clear error for one in use."""
from __future__ import annotations

import collections
import errno
import logging
import random
import socket
import threading
from pathlib import Path
from typing import Callable, TypeVar

from stemserve.errors import ServerError

logger = logging.getLogger(__name__)

T = TypeVar("T")

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10000
"""Free ports are drawn from here up to the kernel's ephemeral range (Linux: 32768)."""
PORT_TRIES = 3
"""Starts on fresh ports before a port taken in the meantime is reported."""
IN_USE_TEXT = ("already in use", "Address already in use", "address in use")
"""How a server's own error says it could not bind (tritonserver: "Socket '...' already in
use"), for a port taken after :func:`check_port_free` passed."""


_handed_out: collections.deque[int] = collections.deque(maxlen=1024)
"""Ports :func:`free_ports` returned lately: not returned again, so that servers started
one after another from this process (``local_servers``) never get the same port."""
_lock = threading.Lock()


class PortInUse(ServerError):
    """A port a server was to listen on is taken."""


def _ephemeral_range() -> tuple[int, int] | None:
    """The kernel's range for connections' local ports (Linux), or None where unknown."""
    try:
        low, high = map(int, EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free right now (held open together, then released).

    For servers started beside others (tests, benchmarks, ``separate --serve``), so no run
    fights over Triton's default 8000-8002. The ports are drawn at random below the
    kernel's ephemeral range where it leaves room (10000 to 32767 on Linux's default), never
    from it: a port bound to 0 comes from that range, which is also where every outgoing
    connection takes its local port, so a released one could be taken by any client's
    connect() before the server binds it. Outside it, only a server binding that very port
    can; :func:`start_on_free_ports` starts again on fresh ports when that happens.
    """
    span = _ephemeral_range()
    sockets: list[socket.socket] = []
    try:
        if span is not None and span[0] - LOWEST_PORT >= 64 * count:
            for port in random.sample(range(LOWEST_PORT, span[0]), 64 * count):
                if port in _handed_out:
                    continue
                sock = socket.socket()
                try:
                    sock.bind((host, port))  # no SO_REUSEADDR: skips ports in TIME_WAIT too
                except OSError:
                    sock.close()
                    continue
                sockets.append(sock)
                if len(sockets) == count:
                    break
        while len(sockets) < count:  # no room below the ephemeral range: let the kernel pick
            sock = socket.socket()
            sockets.append(sock)
            sock.bind((host, 0))
        ports = [sock.getsockname()[1] for sock in sockets]
        with _lock:
            _handed_out.extend(ports)
        return ports
    finally:
        for sock in sockets:
            sock.close()


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail before starting when ``port`` is taken: the server's own error is buried in logs.

    SO_REUSEADDR, as the server binds: a port left in TIME_WAIT by a stopped server is free
    to reuse, one that something listens on is not. Raises :class:`PortInUse` for a port
    in use, :class:`ServerError` for any other reason.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"{what} port {port} is already in use on {host}: stop whatever listens "
                    f"there or choose another with --{what.lower()}-port") from None
            raise ServerError(f"cannot use {what} port {port} on {host}: {err}") from None


def port_in_use(error: BaseException) -> bool:
    """Whether a failed start failed for a taken port: :func:`check_port_free`'s refusal, or
    the server's own log quoted in its error (a port taken after that check)."""
    return isinstance(error, PortInUse) or (
        isinstance(error, ServerError) and any(text in str(error) for text in IN_USE_TEXT))


def start_on_free_ports(start: Callable[[list[int]], T], count: int = 3, *,
                        host: str = "127.0.0.1", tries: int = PORT_TRIES) -> T:
    """``start(ports)`` with ``count`` fresh :func:`free_ports`, again on fresh ones (up to
    ``tries`` in all) while it fails for a port taken between the pick and the server's
    bind (:func:`port_in_use`); any other error is raised at once."""
    attempt = 1
    while True:
        try:
            return start(free_ports(count, host))
        except ServerError as err:
            if attempt >= tries or not port_in_use(err):
                raise
            logger.info("a port was taken before the server bound it (%s); starting again on "
                        "other ports", err)
        attempt += 1
