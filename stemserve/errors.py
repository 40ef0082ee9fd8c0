"""stemserve's one family of exceptions, and the one way every entry point prints them.

Every failure a user can meet is a :class:`StemserveError`: bad input, a missing model, a
server that does not answer, a full queue. Its message says what is wrong and, where one
exists, the fix; the file or URL at fault is a field of its own, so a caller can add the
file it was working on without losing the error's class.
"""
from __future__ import annotations

import copy
import sys
from typing import IO, TypeVar

Error = TypeVar("Error", bound="StemserveError")


class StemserveError(Exception):
    """A user-facing failure. ``where`` is the file, folder or URL it is about, if any;
    ``str()`` puts it in front of the message."""

    def __init__(self, message: str, *, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def about(self: Error, where: object) -> Error:
        """This error, of the same class, said about ``where`` (a track, a URL); one that
        already names a place keeps it and gains the outer one in front."""
        error = copy.copy(self)
        outer = str(where)
        if self.where and self.where != outer:
            error.message = f"{self.where}: {self.message}"
        error.where = outer
        return error


class InputError(StemserveError):
    """An input track or array that cannot be separated (missing, not audio, too short, an
    odd sample rate or channel count)."""


class OutputError(StemserveError):
    """Stems that cannot be written where they were asked to go (disk full, permissions,
    names that clash)."""


class SpecError(StemserveError):
    """A model sidecar (``model.json``, or a server's ``stemserve_spec``) that is missing,
    unreadable or of another version."""


class ModelError(StemserveError):
    """A model that cannot be found, exported or opened by a backend."""


class CheckpointError(ModelError):
    """A checkpoint that cannot be resolved, downloaded, verified or loaded safely."""


class RepositoryError(StemserveError):
    """A Triton model repository whose config, model file and sidecar do not belong together."""


class ServerError(StemserveError):
    """A Triton server that refused or failed a request, or cannot be started."""


class ServerUnreachable(ServerError):
    """No Triton server answers at the URL (the CLI may fall back to in-process ONNX)."""


class TransientError(ServerError):
    """A request failed for a reason that may pass: the server is down, restarting, overloaded
    or too slow. Another server, or this one later, may well answer it."""


class UnknownJob(InputError):
    """No web job has this id (it may have expired), or the job has no such file."""


class JobNotDone(StemserveError):
    """A web job's results were asked for before it was done."""


class TooLarge(InputError):
    """An upload over the size limit, or a track longer than the duration limit."""


class JobFailed(StemserveError):
    """The separation a web caller waited for failed; the message is the job's error."""


class QueueFull(StemserveError):
    """Every queue slot of the web service is taken: try again once some jobs have run."""


class StoreFull(StemserveError):
    """The web service's disk budget is used up by jobs still queued or running."""


def print_error(error: BaseException, stream: IO[str] | None = None) -> None:
    """How every entry point reports a failure: ``stemserve: error: <message>``."""
    print(f"stemserve: error: {error}", file=stream or sys.stderr)
