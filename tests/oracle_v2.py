"""The official demucs 2.0.3, the oracle of the v2 tests, installed in .venv (--no-deps).

A missing or wrong oracle fails the tests when ``CI`` is set (``.ci/run`` sets it): CI must
never pass by skipping the comparisons that matter. Elsewhere the tests are skipped, with
the command that installs it.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

VERSION = "2.0.3"
INSTALL = f"pip install --no-deps demucs=={VERSION}"


def demucs2(name: str, *, module_level: bool = False) -> ModuleType:
    """``name`` (e.g. ``demucs.model``) from the official demucs 2.0.3."""
    try:
        module = importlib.import_module(name)
        version = getattr(importlib.import_module("demucs"), "__version__", None)
    except ImportError as err:
        problem = f"the v2 oracle is missing ({err})"
    else:
        if version == VERSION:
            return module
        problem = f"the v2 oracle is demucs {version}, not {VERSION}"
    message = f"{problem}: {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=module_level)
