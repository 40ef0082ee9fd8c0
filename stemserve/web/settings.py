"""What ``stemserve web`` is configured with: one frozen value shared by the app and the CLI."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from stemserve.defaults import cache_root

MB = 1 << 20
TOKEN_ENV = "STEMSERVE_WEB_TOKEN"
"""Environment variable with the API token (``--token``), kept out of the process list."""


def default_jobs_dir() -> Path:
    """Uploads and stems live in the stemserve cache, not in the working directory."""
    return cache_root() / "web-jobs"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Limits and wiring of the web service.

    ``triton_url`` is the Triton gRPC address; None separates in-process with ONNX Runtime.
    ``model`` is the default model (a release name, checkpoint file or export folder); with
    Triton it may name the served model's export folder, whose sidecar the client then uses.
    ``config`` is the release whose configuration a plain state-dict ``model`` has.
    ``token``, when set, is required by every ``/api/`` request; ``allow_origins`` are the
    other sites (``https://host[:port]``) whose pages may post to this one.
    ``header_timeout`` bounds the wait for a request's headers, ``body_timeout`` the longest
    pause in a request body.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    triton_url: str | None = None
    model: str | None = None
    config: str | None = None
    max_upload_mb: float = 100.0
    max_duration: float = 900.0
    workers: int = 1
    queue_size: int = 8
    job_ttl: float = 3600.0
    jobs_dir: Path = dataclasses.field(default_factory=default_jobs_dir)
    max_disk_mb: float = 10240.0
    token: str | None = dataclasses.field(default=None, repr=False)
    allow_origins: tuple[str, ...] = ()
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_disk_bytes(self) -> int:
        return int(self.max_disk_mb * MB)
