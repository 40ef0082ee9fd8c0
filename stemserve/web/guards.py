"""What every request passes before it reaches a route: who may write, and how much.

Both guards are plain ASGI middleware, so they answer before FastAPI reads a body: a refused
upload never reaches the disk. :class:`AccessGuard` refuses cross-site writes (a page on
another site posting a form to this unauthenticated API) and, with a token configured,
``/api/`` requests without it, and makes guessing the token slow (:class:`TokenThrottle`,
shared with ``POST /api/login``). :class:`UploadGuard` holds request bodies to the upload
limit and multipart uploads to the jobs folder's disk budget while they are spooled.
"""
from __future__ import annotations

import collections
import dataclasses
import hmac
import ipaddress
import math
import time
from typing import Callable, Iterable
from urllib.parse import urlsplit

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import Request, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stemserve.errors import QueueFull, StemserveError, StoreFull
from stemserve.web.jobs import Reservation
from stemserve.web.refusals import refusal
from stemserve.web.service import JobService

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TOKEN_COOKIE = "stemserve_token"
PUBLIC_API = frozenset({"/api/login"})
"""``/api/`` paths open without the token: the page logs in there."""
RESERVATION = "upload_reservation"
"""Where :class:`UploadGuard` leaves an upload's :class:`Reservation` in the request state."""


# ---------------------------------------------------------------------------------------------
# Who may write

def parse_origins(origins: Iterable[str]) -> frozenset[str]:
    """``--allow-origin`` values as browsers send them in ``Origin``: ``scheme://host[:port]``."""
    parsed = set()
    for origin in origins:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc \
                or parts.path.strip("/") or parts.query or parts.fragment:
            raise StemserveError(f"--allow-origin {origin!r} is not an origin: give the "
                                 "page's scheme, host and port, e.g. https://music.example.com")
        parsed.add(f"{parts.scheme}://{parts.netloc}".lower())
    return frozenset(parsed)


def is_loopback(host: str | None) -> bool:
    """``localhost`` (and ``*.localhost``), 127.0.0.0/8 or ::1."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cross_site(headers: Headers, allowed: frozenset[str], loopback: bool) -> str | None:
    """Why a write from a page on another site is refused, or None when it may go on.

    Browsers send ``Origin`` with every POST and ``Sec-Fetch-Site`` with every request;
    curl and scripts (the demucs image's API clients) send neither and cannot be made to
    post by a page, so they pass. Same-origin means the ``Origin`` names the ``Host`` the
    request went to; on a loopback server the origin must also be a loopback name, or a
    page that rebinds its own name to 127.0.0.1 would pass as same-origin.
    """
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site")
    if origin is None and site is None:
        return None
    if origin is not None and origin.lower() in allowed:
        return None
    source = f"a page on {origin}" if origin else "a page on another site"
    message = (f"Refused: {source} may not send requests here. Only this server's own page "
               "may, or the origins given with --allow-origin.")
    if site in ("cross-site", "same-site"):
        return message
    if origin is None:
        return None
    parts = urlsplit(origin)
    if parts.netloc.lower() != headers.get("host", "").lower():
        return message
    if loopback and not is_loopback(parts.hostname):
        return message
    return None


# ---------------------------------------------------------------------------------------------
# Who may guess the token, how often

FREE_FAILURES = 5
"""Wrong tokens an address may send before it has to wait."""
FIRST_WAIT = 1.0
"""Seconds to wait after the last free failure; each further one doubles the wait."""
MAX_WAIT = 900.0
FORGET_AFTER = 60.0
"""Seconds after its last failure (or the end of its wait) when an address starts afresh."""
TRACKED_ADDRESSES = 4096
"""The most addresses whose failures are kept: the least recently failing go first."""


@dataclasses.dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    until: float = 0.0


def client_key(scope: Scope) -> str:
    """Who a request counts against: its peer's address; an IPv6 peer by its /64, which
    one host usually has whole (a proxy in front makes every client one address)."""
    host = (scope.get("client") or ("?",))[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


class TokenThrottle:
    """Makes guessing the token slow, per client address (:func:`client_key`), in memory.

    After :data:`FREE_FAILURES` wrong tokens, an address must wait :data:`FIRST_WAIT`
    seconds, twice as long after each further wrong token (at most :data:`MAX_WAIT`);
    while it waits, every token it sends, the right one too, is refused unchecked, so that
    nothing is learned from guesses made then. A right token is never counted and never
    resets the count: another client behind the same address (a NAT) polling the page would
    otherwise give a guesser new free tries. Failures are forgotten :data:`FORGET_AFTER`
    seconds after the last one or its wait; at most ``capacity`` addresses are tracked.
    """

    def __init__(self, *, capacity: int = TRACKED_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.clock = clock
        self._failures: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def wait(self, client: str) -> float:
        """Seconds ``client`` must still wait before its token is checked; 0 when none."""
        now = self.clock()
        failures = self._current(client, now)
        return max(0.0, failures.until - now) if failures else 0.0

    def failed(self, client: str) -> None:
        """Count a wrong token from ``client``."""
        now = self.clock()
        failures = self._current(client, now) or _Failures()
        failures.count += 1
        failures.last = now
        if failures.count >= FREE_FAILURES:
            doublings = min(failures.count - FREE_FAILURES, 32)  # past MAX_WAIT: no overflow
            failures.until = now + min(FIRST_WAIT * 2.0 ** doublings, MAX_WAIT)
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > self.capacity:
            self._failures.popitem(last=False)

    def _current(self, client: str, now: float) -> _Failures | None:
        failures = self._failures.get(client)
        if failures is not None and now - max(failures.last, failures.until) > FORGET_AFTER:
            del self._failures[client]
            return None
        return failures


def throttled(wait: float) -> JSONResponse:
    """The answer to a token sent while its address must wait."""
    seconds = max(1, math.ceil(wait))
    return JSONResponse({"detail": f"Too many wrong tokens from this address: try again in "
                                   f"{seconds} s."}, 429, headers={"Retry-After": str(seconds)})


class AccessGuard:
    """Refuses cross-site writes (403) and, with a ``token``, ``/api/`` requests that lack it
    (401), before anything is read; an address that sent too many wrong tokens waits (429,
    ``throttle``).

    The token comes as ``Authorization: Bearer <token>`` or, for the page (whose audio
    elements and download links cannot send headers), in the cookie ``POST /api/login`` sets.
    """

    def __init__(self, app: ASGIApp, *, allowed: frozenset[str], loopback: bool,
                 token: str | None, throttle: TokenThrottle):
        self.app = app
        self.allowed = allowed
        self.loopback = loopback
        self.token = token
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["method"] in MUTATING:
            reason = cross_site(headers, self.allowed, self.loopback)
            if reason is not None:
                await JSONResponse({"detail": reason}, 403)(scope, receive, send)
                return
        path = scope["path"]
        if self.token and path.startswith("/api/") and path not in PUBLIC_API:
            client = client_key(scope)
            wait = self.throttle.wait(client)
            if wait:
                await throttled(wait)(scope, receive, send)
                return
            credentials = self.credentials(headers)
            if not same_token(credentials, self.token):
                if credentials:  # a guess; no token at all is a page not logged in yet
                    self.throttle.failed(client)
                response = JSONResponse(
                    {"detail": "This server needs its token: enter it on the page, or send "
                               "'Authorization: Bearer <token>'."}, 401,
                    headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def credentials(headers: Headers) -> str:
        """The token the request sends, in its ``Authorization`` header or its cookie."""
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            credentials = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE, "")
        return credentials.strip()


def same_token(candidate: str, token: str) -> bool:
    """Compared in constant time, so answer times say nothing about the token."""
    return hmac.compare_digest(candidate.encode(), token.encode())


# ---------------------------------------------------------------------------------------------
# How much

def upload_reservation(request: Request) -> Reservation | None:
    """The disk budget :class:`UploadGuard` holds for this request's upload, if any."""
    return getattr(request.state, RESERVATION, None)


def _is_multipart(headers: Headers) -> bool:
    return headers.get("content-type", "").lower().startswith("multipart/form-data")


class UploadGuard:
    """Holds POST bodies to ``max_bytes`` and multipart uploads to the disk budget.

    Starlette spools an upload to a temporary file before the endpoint runs, so checks in
    the endpoint alone would let a client fill the disk first. A declared ``Content-Length``
    over the limit is refused before the body is read, a chunked body as soon as it passes
    the limit. A multipart upload's size (declared, else the limit) is held in the jobs'
    disk budget (:func:`upload_reservation`) until the service takes the upload into its job
    folder or the request ends, so concurrent uploads cannot overrun the budget while they
    are spooled; a full queue or budget is refused before the body is read.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, message: str, service: JobService):
        self.app = app
        self.max_bytes = max_bytes
        self.message = message
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self.message}, 413)(scope, receive, send)
            return
        reservation = None
        if _is_multipart(headers):
            size = int(declared) if declared.isdigit() else self.max_bytes
            try:
                reservation = await run_in_threadpool(self.service.reserve, size)
            except (QueueFull, StoreFull) as err:
                await refusal(err)(scope, receive, send)
                return
            scope.setdefault("state", {})[RESERVATION] = reservation
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI passes an HTTPException from the body on to its handler.
                raise HTTPException(413, self.message)
            return message

        try:
            await self.app(scope, receive_limited, send)
        finally:
            if reservation is not None:
                self.service.release(reservation)
