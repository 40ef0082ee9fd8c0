"""How the client reaches Triton: one value for every command, the library and the web page.

Each field with a ``help`` is also a flag (:func:`stemserve.client.options.add_options`),
as in :class:`~stemserve.pipeline.SeparationOptions`; ``url`` has none, each command
writing its own ``--url`` (the environment variable, a choice of in-process instead).
Torch-free and light: the web settings nest it.
"""
from __future__ import annotations

import dataclasses

from stemserve.defaults import BACKOFF, DEFAULT_IN_FLIGHT, DEFAULT_URL, REQUEST_TIMEOUT, RETRIES


@dataclasses.dataclass(frozen=True)
class ConnectionOptions:
    """Where Triton is and how requests to it are made, kept in flight and retried."""

    url: str = DEFAULT_URL
    """One gRPC address, or several (``host:port,host:port`` or ``@file``: see
    :func:`~stemserve.client.backends.fleet.parse_endpoints`)."""
    server_window: int = dataclasses.field(default=DEFAULT_IN_FLIGHT, metadata={
        "help": "requests in flight per Triton server, and its shared-memory regions",
        "metavar": "N"})
    shared_memory: bool | None = dataclasses.field(default=None, metadata={
        "help": "pass tensors to Triton through system shared memory (default: when the "
                "server is this host and can map it)"})
    timeout: float = dataclasses.field(default=REQUEST_TIMEOUT, metadata={
        "help": "seconds one Triton request may take", "metavar": "SECONDS"})
    retries: int = dataclasses.field(default=RETRIES, metadata={
        "help": "retries of a request after a transient gRPC error, on another server when "
                "there are several", "metavar": "N"})
    backoff: float = dataclasses.field(default=BACKOFF, metadata={
        "help": "seconds before the first retry, doubling after each; also the first pause "
                "between probes of a server taken out", "metavar": "SECONDS"})
