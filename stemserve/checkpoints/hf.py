"""demucs 4.1.0's releases as it publishes them on Hugging Face (``demucs/hf.py``,
``tools/export_hf.py``): one ``<signature>.safetensors`` per model, its class and constructor
arguments as JSON in the file's metadata (``klass``, ``args``, ``kwargs``; a ``segment`` as
``{"_type": "fraction", ...}``), beside the bag's ``<name>.yaml``.

The file is read with stemserve's bounded safetensors reader and becomes the same package a
``.th`` release unpickles to, so its class must be a registered family's and its arguments
pass the same bounds. The diffq-packed ones (``mdx_q``, ``mdx_extra_q``: a ``structure`` that
names classes to import) are refused: their ``.th`` releases load.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

from stemserve.checkpoints.msst_state import read_safetensors
from stemserve.checkpoints.unpickle import _marker
from stemserve.errors import CheckpointError
from stemserve.models.registry import registrations
from stemserve.untrusted import brief


def read_package(path: Path) -> dict[str, Any]:
    """The training package a demucs 4.1.0 safetensors file holds: ``klass`` (the family's
    marker), ``args``, ``kwargs`` and ``state``."""
    what = str(path)
    tensors, metadata = read_safetensors(path)
    if "structure" in metadata:
        raise CheckpointError(f"{what} is a diffq-packed demucs 4.1.0 file (mdx_q, "
                              "mdx_extra_q), whose structure names classes to import; load "
                              "that release by name (-n mdx_q) or from its .th file")
    missing = [key for key in ("klass", "args", "kwargs") if key not in metadata]
    if missing:
        raise CheckpointError(f"{what}: its safetensors metadata lacks "
                              f"{', '.join(missing)}: not a demucs 4.1.0 model file")
    klass = next((_marker(registration) for registration in registrations()
                  if metadata["klass"] in registration.pickled), None)
    if klass is None:
        raise CheckpointError(f"{what} is a model of class {brief(metadata['klass'])}, "
                              "which is no family stemserve serves")
    return {"klass": klass, "args": _arguments(metadata["args"], what),
            "kwargs": _arguments(metadata["kwargs"], what), "state": tensors}


def _arguments(text: str, what: str) -> Any:
    """JSON arguments, fractions decoded as demucs' ``_decode_json`` does."""
    try:
        return _decoded(json.loads(text))
    except (ValueError, TypeError, KeyError, ZeroDivisionError, RecursionError) as exc:
        raise CheckpointError(f"{what}: its model arguments are not demucs' JSON "
                              f"({type(exc).__name__}: {brief(str(exc))})") from None


def _decoded(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("_type") == "fraction":
            return Fraction(int(value["numerator"]), int(value["denominator"]))
        return {key: _decoded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decoded(item) for item in value]
    return value
