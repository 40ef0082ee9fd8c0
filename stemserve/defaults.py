"""Defaults every layer shares, with no imports beyond the standard library.

The release a user gets without ``-n``, where exports, model repositories and prepared
servers live, and the names of the environment variables that change them. Everything
else in stemserve imports these from here, so a default is stated once.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

DEFAULT_MODEL = "htdemucs"
"""The release separated, served and exported without ``-n``: demucs 4's default, Hybrid
Transformer Demucs. The original docker image's ``demucs_quantized`` (demucs 2.0.3's
default) works by name."""

CACHE_ENV = "STEMSERVE_CACHE"
"""Environment variable naming stemserve's cache folder (exports, repositories, servers)."""


def cache_root() -> Path:
    """stemserve's cache: ``$STEMSERVE_CACHE``, else ``$XDG_CACHE_HOME/stemserve``, else
    ``~/.cache/stemserve``. Absolute, so a model is found from any working directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "stemserve").resolve()


def export_root() -> Path:
    """Where ``stemserve export`` writes ``<model>/model.{onnx,json}`` by default, and where
    every command looks an export up by model name."""
    return cache_root() / "export"


def repository_root() -> Path:
    """Where ``stemserve serve`` fills its Triton model repositories by default."""
    return cache_root() / "model_repository"


SOURCES = ("drums", "bass", "other", "vocals")
"""What every Demucs v2 release separates, in its output order (and most v3/v4 releases)."""
STEM_NAMES = SOURCES + ("guitar", "piano")
"""Every stem a release separates: htdemucs_6s adds guitar and piano."""
TRITON_MODEL = "demucs"
"""The model's name in every Triton model repository stemserve fills."""
STREAM_MODEL = "separate"
"""The decoupled model beside it that runs the whole pipeline and streams the stems back."""
DEFAULT_URL = "127.0.0.1:8001"
"""Triton's gRPC address when none is given: a `stemserve serve` on this host."""
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"
"""Where a track's stems go under the output folder, as demucs lays them out."""
BLOCK_FRAMES = 1 << 16
"""Frames per block read, resampled and written; the server's streaming model cuts a mix
into the same blocks, so its whole-track statistics are the client's to the last bit."""
STDIN = "-"
"""The track name that means stdin, and the ``-o`` that means stdout (stemserve.pipes)."""
DEFAULT_IN_FLIGHT = 4
"""Segment requests in flight per track (and per Triton server): twice the CPU server's
max_batch_size of 2, so one batch runs while the next forms. The client's memory follows it:
each request in flight holds its input, a shared-memory region, its answer and a stride of
the overlap-add, so the window bounds how much a long track costs over a short one
(docs/decisions/0003-in-flight-window.md). A GPU server (max_batch_size 8) forms full
batches with ``--in-flight 16 --server-window 16``."""
REQUEST_TIMEOUT = 600.0
"""Seconds one segment request to a server may take. A CPU server may run the full model
slower than real time, so a 40-second segment queued behind a batch waits minutes; a
shorter limit would re-send healthy requests and only add load. A dead server is reported
by gRPC at once, and a frozen one by the client's health probes, not by this limit."""
RETRIES = 3
"""Further attempts of a request after a transient gRPC error (on another server when
there are several), before its segment fails."""
BACKOFF = 0.5
"""Seconds before the first retry of a request (doubling after each), and the first pause
between probes of a server taken out of a fleet."""

TRITON_URL_ENV = "STEMSERVE_TRITON_URL"
"""Triton gRPC address(es) for `separate` and `web`: ``host:port``, several comma-separated,
or ``@file``."""
OLD_TRITON_URLS_ENV = "STEMSERVE_TRITON_URLS"
"""The name `separate` read before 0.2; still read, with a deprecation warning."""
CHECKPOINT_URL_ENV = "STEMSERVE_CHECKPOINT_URL"
"""Replaces the official download root: an http(s) or file:// URL, or a folder (mirrors)."""
WEB_TOKEN_ENV = "STEMSERVE_WEB_TOKEN"
"""The bearer token `stemserve web` requires, when set (kept out of the process list)."""
FAMILY_MODULES_ENV = "STEMSERVE_FAMILY_MODULES"
"""Python modules (comma-separated names or ``.py`` paths) that register model families of
their own: every
process that meets one of their models (the exporter, a client, a Triton server's python
model) imports them, so that a family is one registration on every machine."""


def family_modules() -> tuple[str, ...]:
    """The modules named by :data:`FAMILY_MODULES_ENV`."""
    return tuple(name.strip() for name in os.environ.get(FAMILY_MODULES_ENV, "").split(",")
                 if name.strip())


def triton_url_from_env() -> str | None:
    """The Triton address(es) the environment names, if any: :data:`TRITON_URL_ENV`, else
    the deprecated :data:`OLD_TRITON_URLS_ENV` (with a warning)."""
    if os.environ.get(TRITON_URL_ENV):
        return os.environ[TRITON_URL_ENV]
    if os.environ.get(OLD_TRITON_URLS_ENV):
        logging.getLogger(__name__).warning(
            "$%s is deprecated: set $%s (it takes several addresses too)", OLD_TRITON_URLS_ENV,
            TRITON_URL_ENV)
        return os.environ[OLD_TRITON_URLS_ENV]
    return None
