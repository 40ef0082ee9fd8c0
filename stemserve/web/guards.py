"""What every request passes before it reaches a route: who may write, and how much.

Both guards are plain ASGI middleware, so they answer before FastAPI reads a body: a refused
upload never reaches the disk. :class:`AccessGuard` refuses cross-site writes (a page on
another site posting a form to this unauthenticated API) and, with a token configured,
``/api/`` requests without it. :class:`UploadGuard` holds request bodies to the upload limit
and multipart uploads to the jobs folder's disk budget while they are spooled.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Iterable
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


class AccessGuard:
    """Refuses cross-site writes (403) and, with a ``token``, ``/api/`` requests that lack it
    (401), before anything is read.

    The token comes as ``Authorization: Bearer <token>`` or, for the page (whose audio
    elements and download links cannot send headers), in the cookie ``POST /api/login`` sets.
    """

    def __init__(self, app: ASGIApp, *, allowed: frozenset[str], loopback: bool,
                 token: str | None):
        self.app = app
        self.allowed = allowed
        self.loopback = loopback
        self.token = token

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
        if self.token and path.startswith("/api/") and path not in PUBLIC_API \
                and not self.authorized(headers):
            response = JSONResponse(
                {"detail": "This server needs its token: enter it on the page, or send "
                           "'Authorization: Bearer <token>'."}, 401,
                headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, headers: Headers) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            credentials = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE, "")
        return self.token is not None and same_token(credentials.strip(), self.token)


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
