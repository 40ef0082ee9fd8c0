"""What ``stemserve web`` is configured with: one frozen value shared by the app and the CLI.

Each field with a ``help`` in its metadata is also its ``stemserve web`` flag
(:func:`stemserve.client.options.add_options`), so a setting is declared once, here. The
fields without one have flags the command line writes itself (noted on each). Only the
standard library and stemserve's torch-free core (defaults, precision, connection) are
imported: the bare client's command line builds its parser from this module without the
``web`` extra installed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from stemserve.connection import ConnectionOptions
from stemserve.defaults import WEB_TOKEN_ENV, cache_root
from stemserve.precision import precision_of

MB = 1 << 20


def default_jobs_dir() -> Path:
    """Uploads and stems live in the stemserve cache, not in the working directory."""
    return cache_root() / "web-jobs"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Limits and wiring of the web service."""

    host: str = dataclasses.field(default="127.0.0.1", metadata={
        "help": "address to listen on; 0.0.0.0: every interface"})
    port: int = dataclasses.field(default=8080, metadata={
        "help": "port to listen on, beside `stemserve serve`'s 8000-8002"})
    triton_url: str | None = None
    """Triton gRPC address(es); None separates in-process with ONNX Runtime. Flags: ``--url``,
    or ``--backend onnx`` to ignore ``$STEMSERVE_TRITON_URL``."""
    connection: ConnectionOptions = dataclasses.field(default_factory=ConnectionOptions)
    """How requests go to Triton (all but its URL, which is ``triton_url``). Flags: those of
    :class:`~stemserve.connection.ConnectionOptions`."""
    model: str | None = None
    """The default model: a release name, checkpoint file or export folder; with Triton it may
    name the served model's export folder, whose sidecar the client then uses. Flag:
    ``-n/--model``."""
    config: str | None = None
    """The release whose configuration a plain state-dict ``model`` has. Flag: ``--config``."""
    precision: str | None = dataclasses.field(default=None, metadata={
        "help": "the graph to separate with (fp32, fp16, int8 or bf16; int8 and bf16 are the "
                "CPU fast paths); with Triton, check that the server serves it (default: fp32 "
                "in-process, whatever Triton serves)"})
    """A :class:`~stemserve.precision.Precision` name. Flags: ``--precision``, or its aliases
    ``--int8`` and ``--bf16``."""
    max_upload_mb: float = dataclasses.field(default=100.0, metadata={
        "help": "largest upload in MB", "metavar": "MB"})
    max_duration: float = dataclasses.field(default=900.0, metadata={
        "help": "longest track in seconds", "metavar": "SECONDS"})
    workers: int = dataclasses.field(default=1, metadata={
        "help": "tracks separated at once", "metavar": "N"})
    queue_size: int = dataclasses.field(default=8, metadata={
        "help": "tracks that may wait; more are refused", "metavar": "N"})
    job_ttl: float = dataclasses.field(default=3600.0, metadata={
        "help": "seconds a finished job's files are kept", "metavar": "SECONDS"})
    jobs_dir: Path = dataclasses.field(default=None, metadata={  # type: ignore[assignment]
        "help": "folder for uploads and stems, used by one server at a time (default: "
                "<cache>/web-jobs; the cache is $STEMSERVE_CACHE or ~/.cache/stemserve)",
        "metavar": "DIR"})
    """None stands for :func:`default_jobs_dir`, resolved when the settings are made: the
    flag generated from this field takes ``default``, which a ``default_factory`` leaves
    unset."""
    max_disk_mb: float = dataclasses.field(default=10240.0, metadata={
        "help": "disk budget of the jobs folder in MB", "metavar": "MB"})
    token: str | None = dataclasses.field(default=None, repr=False, metadata={
        "help": f"require this token for every /api/ request (default: ${WEB_TOKEN_ENV}, "
                "which keeps it out of the process list; unset: no token)"})
    allow_origins: tuple[str, ...] = ()
    """Other sites (``https://host[:port]``) whose pages may post here. Flag:
    ``--allow-origin``, repeatable."""
    header_timeout: float = dataclasses.field(default=10.0, metadata={
        "help": "seconds a request's line and headers may take", "metavar": "SECONDS"})
    body_timeout: float = dataclasses.field(default=30.0, metadata={
        "help": "longest pause in an upload, in seconds", "metavar": "SECONDS"})

    def __post_init__(self) -> None:
        if self.precision is not None:
            precision_of(self.precision)
        if self.jobs_dir is None:
            object.__setattr__(self, "jobs_dir", default_jobs_dir())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_disk_bytes(self) -> int:
        return int(self.max_disk_mb * MB)
