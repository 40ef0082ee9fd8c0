"""The restricted unpickler: torch's ``weights_only`` loader with a short allowlist.

Checkpoints are pickles, and a pickle can name any callable. Only torch's tensor machinery
and what demucs packages hold are allowed: the model class unpickles to an inert marker, and
a ``Fraction`` segment, numpy numbers and omegaconf configurations to stand-ins that only keep
data, so no pickled code runs. What a package holds is then bounded as plain data
(:func:`_plain`, :func:`_package_field`) before anything reads it.
"""
from __future__ import annotations

import argparse
import io
import re
import threading
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, NoReturn

import torch

from stemserve.checkpoints.messages import _kind
from stemserve.errors import CheckpointError
from stemserve.models.registry import FamilyRegistration, registrations
from stemserve.releases import is_number as _is_number
from stemserve.untrusted import TooLarge, brief, check_size


class _Refused(Exception):
    """Raised by a placeholder while unpickling: the file asks for what no checkpoint does."""


class _ClassMarker:
    """What a checkpoint's reference to a model class unpickles to: a marker, never a model.

    A training package names the class and never calls it. A pickle that calls it would
    build a network from unchecked arguments while unpickling (a 41-byte file can ask for
    gigabytes), so calling the marker fails; the model is built later from checked kwargs.
    """

    family: ClassVar[str]
    label: ClassVar[str]

    def __new__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise _Refused(f"calls the {cls.label} class while unpickling, which no checkpoint "
                       f"does (it only names it); refused before building anything")


_MARKERS: dict[tuple[str, str], type[_ClassMarker]] = {}


def _marker(registration: FamilyRegistration) -> type[_ClassMarker]:
    """The marker a registered family's pickled class names unpickle to (one per family)."""
    key = registration.name, registration.label
    if key not in _MARKERS:
        _MARKERS[key] = type(f"_{registration.name}_class", (_ClassMarker,),
                             {"family": registration.name, "label": registration.label})
    return _MARKERS[key]


def _fraction(numerator: Any, denominator: Any = 1) -> Fraction:
    """``fractions.Fraction`` as pickled (htdemucs' 39/5 s segment): ``('39/5',)`` before
    Python 3.11, ``(39, 5)`` since. Small numbers only: ``Fraction('1e999999999')`` alone
    would compute for minutes."""
    if (isinstance(numerator, str) and denominator == 1
            and re.fullmatch(r"-?\d{1,30}(/\d{1,30})?", numerator)):
        return Fraction(numerator)
    if (all(_is_number(n, integer=True) and abs(n) < 10**30 for n in (numerator, denominator))
            and denominator != 0):
        return Fraction(numerator, denominator)
    raise _Refused(f"holds a fraction of {brief(numerator)} and {brief(denominator)}, not a "
                   f"ratio of two small integers")


class _NumpyDType:
    """``numpy.dtype`` as a pickled numpy number names it: a type code and a byte order."""

    def __init__(self, code: Any, align: Any = False, copy: Any = False) -> None:
        self.code, self.order = code, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1:
            self.order = state[1]


# Plain numbers: what demucs' exported metrics hold (numpy float64 test scores).
_NUMPY_NUMBERS = frozenset({"b1", "f2", "f4", "f8", "i1", "i2", "i4", "i8",
                            "u1", "u2", "u4", "u8"})


def _numpy_scalar(dtype: Any, data: Any) -> bool | int | float:
    """A pickled numpy number (``numpy.core.multiarray.scalar``) as the Python number it is.

    demucs' ``tools/export.py`` stores the test metrics beside the weights, numpy floats.
    """
    import numpy

    if not (isinstance(dtype, _NumpyDType) and isinstance(dtype.code, str)
            and dtype.code in _NUMPY_NUMBERS
            and dtype.order in ("<", ">", "|", "=") and isinstance(data, bytes)):
        raise _Refused(f"holds a numpy scalar of type {brief(getattr(dtype, 'code', dtype))}; "
                       f"only numbers ({', '.join(sorted(_NUMPY_NUMBERS))}) are read")
    kind = numpy.dtype(dtype.code).newbyteorder("=" if dtype.order == "|" else dtype.order)
    if len(data) != kind.itemsize:
        raise _Refused(f"holds a numpy {dtype.code} scalar of {len(data)} bytes")
    return numpy.frombuffer(data, kind)[0].item()


class _OmegaConfNode:
    """An omegaconf ``DictConfig``, ``ListConfig`` or ``AnyNode`` as pickled: only what it
    holds (``_content``, or ``_val``) is kept, for :func:`_plain`; nothing of omegaconf runs."""

    held: Any = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise _Refused(f"holds an omegaconf node whose state is {_kind(state)}")
        self.held = state.get("_val" if isinstance(self, _OmegaConfValue) else "_content")


class _OmegaConfDict(_OmegaConfNode):
    pass


class _OmegaConfList(_OmegaConfNode):
    pass


class _OmegaConfValue(_OmegaConfNode):
    pass


class _OmegaConfMetadata:
    """omegaconf's node metadata (types, flags, the parent's key): not needed, dropped."""

    def __setstate__(self, state: Any) -> None:
        pass


def _omegaconf_cache(*args: Any) -> dict:
    """The ``collections.defaultdict`` of omegaconf's resolver cache, as an empty dict."""
    return {}


# What a demucs checkpoint may name besides torch's own tensor machinery. A training package
# pickles its model class (stemserve's name for it when stemserve made the package) and its
# training arguments: an argparse.Namespace (v2, paths included), a dict or an omegaconf
# DictConfig (demucs 4). A quantized state names its quantizer class, which is never called,
# so it resolves to a plain string; so do the types in omegaconf's metadata. htdemucs' segment
# is a Fraction; demucs 4's export adds test metrics, numpy floats.
_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    # Pure paths: building one touches nothing; concrete Windows paths cannot exist on POSIX.
    # Python 3.13 moved the classes to pathlib._local.
    *((pure, f"{module}.{prefix}{flavour}Path")
      for module in ("pathlib", "pathlib._local")
      for prefix in ("", "Pure")
      for flavour, pure in (("Posix", PurePosixPath), ("Windows", PureWindowsPath))),
    *((name, name) for name in ("diffq.diffq.DiffQuantizer", "diffq.uniform.UniformQuantizer")),
    (_fraction, "fractions.Fraction"),
    (_NumpyDType, "numpy.dtype"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_OmegaConfDict, "omegaconf.dictconfig.DictConfig"),
    (_OmegaConfList, "omegaconf.listconfig.ListConfig"),
    (_OmegaConfValue, "omegaconf.nodes.AnyNode"),
    (_OmegaConfMetadata, "omegaconf.base.ContainerMetadata"),
    (_OmegaConfMetadata, "omegaconf.base.Metadata"),
    (_omegaconf_cache, "collections.defaultdict"),
    *((name, name) for name in ("typing.Any", "builtins.dict", "builtins.list", "builtins.int")),
]
# torch keeps the allowlist in one process-wide set; serialise our additions to it.
_SAFE_GLOBALS_LOCK = threading.Lock()
_MAX_NESTING = 32  # of a configuration: demucs' is 3 deep
# Items of a package's args, kwargs or training_args counted as a tree (shared references
# each time they are reached): demucs 4's whole training configuration (conf/config.yaml,
# what serialize_model stores as training_args) counts about 500.
_MAX_CONFIG_ITEMS = 10_000


def _torch_load(source: Path | bytes, what: str) -> Any:
    """Unpickle a torch file without executing anything it names outside the allowlist.

    Globals are listed up front (zip format, i.e. torch >= 1.6) to name the culprit; the
    ``weights_only`` unpickler is what enforces the allowlist, for every format.
    """
    def opened() -> Path | io.BytesIO:
        return io.BytesIO(source) if isinstance(source, bytes) else source

    # Every registered family's class names, each to its marker, and the stand-ins of data.
    allowed = [*((_marker(family), name) for family in registrations()
                 for name in family.pickled), *_SAFE_GLOBALS]
    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(allowed):
        try:
            forbidden = torch.serialization.get_unsafe_globals_in_checkpoint(opened())
        except Exception:  # not a zip checkpoint: the restricted load below says why
            forbidden = []
        if forbidden:
            raise CheckpointError(_refusal(what, sorted(forbidden)))
        try:
            return torch.load(opened(), map_location="cpu", weights_only=True)
        except _Refused as exc:
            raise CheckpointError(f"{what} {exc}") from None
        except Exception as exc:
            refused = re.search(r"GLOBAL (\S+)", str(exc))  # torch's refusal of a global
            if refused:
                raise CheckpointError(_refusal(what, [refused.group(1)])) from exc
            raise CheckpointError(f"{what} is not a model checkpoint that can be loaded "
                                  f"safely: {_load_failure(exc)}") from exc


def _refusal(what: str, names: list[str]) -> str:
    message = (f"{what} refers to {', '.join(names)}, which a model checkpoint never needs; "
               f"refused without running it")
    if any(name.startswith("torch.nn.modules.") for name in names):
        message += (". It looks like a whole pickled model (torch.save(model)); save "
                    "model.state_dict() instead")
    return message


def _load_failure(exc: Exception) -> str:
    """The reason inside torch's weights_only error, without its advice to unpickle unsafely."""
    paragraphs = [text.strip() for text in str(exc).split("\n\n")
                  if text.strip() and not text.strip().startswith("Check the documentation")]
    return f"{type(exc).__name__}: {paragraphs[-1]}" if paragraphs else type(exc).__name__


def _package_field(package: Mapping[str, Any], key: str, what: str,
                   default: Any = None) -> Any:
    """``package[key]`` as plain data (:func:`_plain`), refused when it holds more than
    :data:`_MAX_CONFIG_ITEMS` counted as a tree: whatever reads it later walks a tree."""
    value = _plain(package.get(key, default), what)
    try:
        check_size(value, _MAX_CONFIG_ITEMS)
    except TooLarge:
        raise CheckpointError(f"{what}: its {key!r} holds more than {_MAX_CONFIG_ITEMS} items "
                              f"(shared references counted each time they are reached); "
                              f"demucs stores a few hundred") from None
    return value


def _plain(value: Any, what: str, depth: int = 0,
           done: dict[tuple[int, int], Any] | None = None) -> Any:
    """``value`` with omegaconf placeholders replaced by the dicts, lists and values they
    hold, as ``OmegaConf.to_container`` does (interpolations stay strings).

    A pickle can reference one object many times: it is converted once per depth it is
    reached at (``done``) and the result shared, so the work is bounded by the file's size
    times :data:`_MAX_NESTING`, not by the tree it unfolds to (:func:`_package_field` bounds
    that), and the nesting is counted as in that tree.
    """
    if depth > _MAX_NESTING:
        raise CheckpointError(f"{what}: its configuration nests deeper than {_MAX_NESTING} "
                              f"levels")
    done = {} if done is None else done
    if (id(value), depth) in done:
        return done[id(value), depth]
    original = value
    if isinstance(value, _OmegaConfNode):
        held = value.held
        if isinstance(value, _OmegaConfValue) or held is None or isinstance(held, str):
            return _plain(held, what, depth + 1, done)  # a value, None, '???' or '${...}'
        value = held
    if isinstance(value, Mapping):
        result: Any = {key: _plain(item, what, depth + 1, done) for key, item in value.items()}
    elif isinstance(value, (list, tuple)):
        items = [_plain(item, what, depth + 1, done) for item in value]
        result = tuple(items) if isinstance(value, tuple) else items
    else:
        return value
    done[id(original), depth] = result
    return result
