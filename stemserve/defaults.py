"""Defaults every layer shares, with no imports beyond the standard library.

The release a user gets without ``-n``, where exports, model repositories and prepared
servers live, and the names of the environment variables that change them. Everything
else in stemserve imports these from here, so a default is stated once.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "demucs_quantized"
"""The release separated without ``-n``: the demucs 2.0.3 CLI's default, as the original
docker image served it."""

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
