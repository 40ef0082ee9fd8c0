"""How refusals look over HTTP: the one table from the service's errors to status codes.

Every refusal answers ``{"detail": "..."}``, one sentence for the user, whether the service,
a guard or FastAPI's validation refused: :func:`refusal` for the service's errors,
:func:`validation_message` for a form that does not validate, and :func:`documented` for
the OpenAPI entries that say so.
"""
from __future__ import annotations

from typing import Any, Sequence

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from stemserve.errors import (InputError, JobFailed, JobNotDone, ModelError, QueueFull,
                              StemserveError, StoreFull, TooLarge, UnknownJob)

STATUS: dict[type[StemserveError], int] = {
    UnknownJob: 404, JobNotDone: 409, TooLarge: 413, JobFailed: 500, QueueFull: 503,
    StoreFull: 507, InputError: 400, ModelError: 400, StemserveError: 500}
"""The most specific class of an error that is listed decides its status."""
RETRY_LATER = (QueueFull, StoreFull)
RETRY_AFTER_SECONDS = 30
DESCRIPTIONS = {400: "not audio, an unknown model or a malformed form",
                401: "the token is missing or wrong", 403: "a write from another site",
                404: "no such job (it may have expired)", 409: "the job is not done",
                413: "file too large or track too long", 422: "a bad option",
                429: "too many wrong tokens from this address: retry after Retry-After "
                     "seconds",
                500: "the separation failed", 503: "queue full: retry later",
                507: "disk budget used up: retry later"}


class Refusal(BaseModel):
    """Every refusal: what went wrong, in a sentence for the user."""

    detail: str


def status_of(err: StemserveError) -> int:
    return next(STATUS[kind] for kind in type(err).__mro__ if kind in STATUS)


def refusal(err: StemserveError) -> JSONResponse:
    """The answer to a refused request; a full queue or disk budget is worth retrying."""
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if isinstance(err, RETRY_LATER) else None
    return JSONResponse({"detail": str(err)}, status_of(err), headers=headers)


def validation_message(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one sentence naming each field, like every refusal."""
    def field(location: Sequence[Any]) -> str:
        names = [str(part) for part in location
                 if part not in ("body", "query", "path", "header", "cookie")]
        return ".".join(names) or "request"

    return "; ".join(f"{field(error['loc'])}: {error['msg']}" for error in errors)


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for refusal ``codes``, with the shape they really have."""
    return {code: {"model": Refusal, "description": DESCRIPTIONS[code]} for code in codes}
