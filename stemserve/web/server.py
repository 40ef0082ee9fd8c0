"""Running the web service: uvicorn with deadlines for slow clients, security headers on
every answer, and a clean shutdown on Ctrl-C, SIGTERM or SIGHUP.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import signal
import socket
import tempfile
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from stemserve.errors import StemserveError
from stemserve.web.app import create_app
from stemserve.web.settings import Settings

logger = logging.getLogger(__name__)

MIN_BODY_RATE = 16 << 10
"""Bytes per second a request body must average, after its first ``body_timeout`` seconds."""
SPOOL = ".uploads"
"""Folder in the jobs folder where uploads are spooled while they arrive."""
GRACEFUL_SHUTDOWN_SECONDS = 10
"""How long open requests (a legacy upload waiting for its stems) may delay a shutdown."""
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'self'; object-src 'none'; base-uri 'none'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
]
"""On every response: no type sniffing, only this server's own scripts, styles and media, no
framing by other sites, and no job URL leaked in a Referer."""
TRITON_PORTS = {8000: ("HTTP", "--http-port"), 8001: ("gRPC", "--grpc-port"),
                8002: ("metrics", "--metrics-port")}
"""``stemserve serve``'s default ports, each with the flag that moves it."""


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with deadlines for the parts of a request still arriving.

    uvicorn only times out idle keep-alive connections, so a client that sends its headers
    or its body a byte at a time (slowloris) holds a connection for as long as it likes.
    Here a request's line and headers must arrive within ``head_timeout`` seconds of its
    first byte (or of the connection), and its body may pause for at most ``body_timeout``
    seconds and must average :data:`MIN_BODY_RATE` after its first ``body_timeout``
    seconds. Otherwise the client gets 408 (when no answer has begun) and the connection
    is closed.
    """

    def __init__(self, *args: Any, head_timeout: float, body_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self._phase: Literal["head", "body"] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch(0)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(len(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _watch(self, received: int) -> None:
        """Set the deadline for what the client still owes: the head, the body, or nothing."""
        state = self.conn.their_state
        if self.transport.is_closing():
            self._cancel()
        elif state is h11.IDLE:
            if self._phase != "head":
                self._arm("head", self.head_timeout)
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._body_started, self._body_bytes = self.loop.time(), 0
            self._body_bytes += received
            self._arm("body", self._body_delay())
        else:
            self._cancel()

    def _body_delay(self) -> float:
        owed_by = self._body_started + self.body_timeout + self._body_bytes / MIN_BODY_RATE
        return max(0.0, min(self.body_timeout, owed_by - self.loop.time()))

    def _arm(self, phase: Literal["head", "body"], delay: float) -> None:
        self._cancel()
        self._phase = phase
        self._deadline = self.loop.call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self) -> None:
        phase = self._phase
        self._deadline = None
        if self.transport.is_closing():
            return
        if phase == "body" and self.flow.read_paused:
            # uvicorn stopped reading because the app is behind, not the client: wait on.
            self._arm("body", self.body_timeout)
            return
        if phase == "head":
            detail = f"The request headers did not arrive within {self.head_timeout:g} s."
        else:
            detail = (f"The upload was too slow and was cut off: the server waits at most "
                      f"{self.body_timeout:g} s for more data and needs "
                      f"{MIN_BODY_RATE >> 10} KB/s on average.")
        logger.info("closing a slow connection from %s: %s",
                    "%s:%d" % self.client if self.client else "?", detail)
        cycle = self.cycle if phase == "body" else None
        if cycle is None or not cycle.response_started:
            self.transport.write(self._timeout_response(detail))
        if cycle is not None:
            cycle.disconnected = True  # the app's own answer, if any, goes nowhere
            cycle.message_event.set()
        self.transport.close()

    def _timeout_response(self, detail: str) -> bytes:
        """408 with the usual headers, written by hand: h11 cannot answer a request it has
        not fully received."""
        body = json.dumps({"detail": detail}).encode()
        lines = [b"HTTP/1.1 408 Request Timeout"]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [b"content-type: application/json", b"content-length: %d" % len(body),
                  b"connection: close"]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


def listen(host: str, port: int) -> socket.socket:
    """The service's socket, bound before anything else starts (and handed to uvicorn), so
    that a taken port stops the start with what to do instead of uvicorn's bare "address
    already in use" after the server was announced."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts at once
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise StemserveError(_unbound(_address(host, port), port, err)) from None
    return sock


def _unbound(address: str, port: int, err: OSError) -> str:
    """Why ``address`` cannot be listened on, and what to do."""
    if err.errno == errno.EADDRINUSE:
        message = f"cannot listen on {address}: the port is in use; pick another with --port"
        if port in TRITON_PORTS:
            kind, flag = TRITON_PORTS[port]
            message += (f" ({port} is the {kind} port of `stemserve serve`: a local Triton may "
                        f"hold it, and can move with `stemserve serve {flag}`)")
        return message
    if err.errno == errno.EACCES:
        return (f"cannot listen on {address}: ports below 1024 need root; pick another with "
                "--port")
    return f"cannot listen on {address}: {err.strerror or err}; check --host and --port"


def _address(host: str, port: int) -> str:
    """``host:port`` as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(settings: Settings) -> None:
    """Run the web service with uvicorn until Ctrl-C, SIGTERM or SIGHUP.

    The port is bound first (:func:`listen`): one in use stops the start with a
    :class:`StemserveError` before a model is opened or the server announced. Uploads are
    spooled inside the jobs folder (``.uploads``), where the disk budget is kept, never in a
    ``/tmp`` that may be small or in memory. All three signals shut down alike (SIGHUP: a
    closed terminal, an ssh session ending): open requests get
    :data:`GRACEFUL_SHUTDOWN_SECONDS`, then the queue and backends are closed, and the
    signal goes on to the command line's own handler. uvicorn's access log (a line per
    request, and the players make a range request per chunk) is on with ``-v`` only.
    """
    import uvicorn

    with listen(settings.host, settings.port) as sock:
        app = create_app(settings)
        spool = settings.jobs_dir / SPOOL
        spool.mkdir(exist_ok=True)
        tempfile.tempdir = str(spool)  # this process's temporary files are its uploads' spools
        protocol = functools.partial(TimedH11Protocol, head_timeout=settings.header_timeout,
                                     body_timeout=settings.body_timeout)
        verbose = logging.getLogger("stemserve").isEnabledFor(logging.DEBUG)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                access_log=verbose,
                                http=protocol,  # type: ignore[arg-type]
                                headers=SECURITY_HEADERS,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
        logger.info("stemserve web on http://%s (jobs in %s)",
                    _address(settings.host, sock.getsockname()[1]), settings.jobs_dir)
        previous = signal.signal(signal.SIGHUP, _as_sigterm)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            signal.signal(signal.SIGHUP, previous)


def _as_sigterm(signum: int, frame: object) -> None:
    """uvicorn shuts down gracefully on SIGINT and SIGTERM only; SIGHUP is made a SIGTERM."""
    signal.raise_signal(signal.SIGTERM)
