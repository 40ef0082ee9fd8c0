"""How the checkpoint loader words what it reports: a value by its kind, the start of a long
torch error, and warnings that point at the caller's line rather than the loader's."""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch

_PACKAGE = __package__  # stemserve.checkpoints: its frames are skipped by _warn


def _kind(value: Any) -> str:
    """What ``value`` is, for a message: "an int", "an empty dict", "a torch.int64 ... tensor"."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} {value.layout} tensor on {value.device.type}"
    name = type(value).__name__
    if isinstance(value, (Mapping, list, tuple, str, bytes)) and not value:
        return f"an empty {name}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _warn(message: str) -> None:
    """Warn at the caller's line outside this package, however deep the loader's call chain."""
    frame, level = inspect.currentframe(), 1
    while frame is not None and _inside(frame.f_globals.get("__name__")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _inside(module: Any) -> bool:
    return isinstance(module, str) and (module == _PACKAGE or module.startswith(_PACKAGE + "."))


def _first_lines(exc: Exception, count: int = 4, limit: int = 1000) -> str:
    """The start of a long torch error (it lists every mismatching tensor)."""
    text = "\n".join(str(exc).strip().splitlines()[:count])
    return text if len(text) <= limit else text[:limit] + " ..."
