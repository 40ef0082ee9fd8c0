"""Bounds on a checkpoint's configuration, checked before anything is built.

A small file must not make the loader allocate gigabytes: every constructor argument is
bounded, and the network is laid out on torch's ``meta`` device (:func:`_skeleton`) to count
its parameters before any weight is allocated.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from stemserve.checkpoints.messages import _first_lines, _kind, _warn
from stemserve.errors import CheckpointError
from stemserve.defaults import SOURCES
from stemserve.model import REGISTRATION as V2
from stemserve.models.arguments import Rule, choice, flag, integers, numbers, text
from stemserve.models.registry import by_name
from stemserve.releases import is_number as _is_number
from stemserve.spec import MAX_SEGMENT_SECONDS, MAX_SOURCES, valid_length
from stemserve.untrusted import brief



class _Range(NamedTuple):
    low: float
    high: float
    releases: str
    integer: bool = True


# Bounds on a checkpoint's Demucs configuration, checked before anything is built. Every
# demucs 2.0.3 release uses the defaults (depth 6, kernel 8, stride 4, growth 2, 2 LSTM
# layers, context 3, stereo, 44.1 kHz, 40 s segments, 265.7 M parameters) but for channels
# (64; 48 for demucs48_hq, 4 for demucs_unittest). The bounds leave room for custom trainings
# (twice the channels, two more layers, any common sample rate) and refuse what only a broken
# or hostile file asks for: 65536 channels make a single allocation of terabytes.
_LIMITS: dict[str, _Range] = {
    "audio_channels": _Range(1, 2, "2"),
    "channels": _Range(1, 128, "4, 48 or 64"),
    "depth": _Range(1, 8, "6"),
    "kernel_size": _Range(1, 16, "8"),
    "stride": _Range(1, 8, "4"),
    "growth": _Range(1, 4, "2", integer=False),
    "lstm_layers": _Range(0, 4, "2"),
    "context": _Range(1, 9, "3"),
    "rescale": _Range(0, 10, "0.1", integer=False),  # only shapes the random init
    "samplerate": _Range(8000, 192000, "44100"),
}
_FLAGS = ("rewrite", "glu", "resample", "normalize")
# Source names become the stems' file names: no separators, no leading dot.
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,31}")
# Channels grow by ``growth`` per layer, so the bounds above still allow 10**13 parameters;
# this caps the model itself at 2.6 times the largest release (2.8 GB of float32 weights).
_MAX_PARAMETERS = 700_000_000
_QAT_BITS = range(0, 17)  # 0: no quantization-aware training, as demucs' --qat default


# A demucs 4 quantized state names its diffq quantizer and the arguments to rebuild it with
# (demucs passes min_size and group_size, 0.2 and 8 in its training configuration); these
# bound them, by the name the quantizer class unpickles to.
_PATTERNS = Rule(lambda v: isinstance(v, (list, tuple)) and len(v) <= 64
                  and all(isinstance(p, str) and len(p) <= 256 for p in v),
                  "lists of up to 64 names of up to 256 characters", "[]")
_QUANTIZER_RULES: dict[str, dict[str, Rule]] = {
    "diffq.diffq.DiffQuantizer": {
        "min_size": numbers(0, 1e6, "0.2"),
        "float16": flag("False"),
        "group_size": integers(0, 1024, "8"),
        "min_bits": numbers(1, 15, "2"),
        "max_bits": numbers(1, 15, "15"),
        "param": choice(("bits", "noise"), "bits"),
        "noise": choice(("gaussian", "uniform"), "gaussian"),
        "init_bits": numbers(1, 15, "8"),
        "extra_bits": numbers(0, 15, "0"),
        "suffix": text(r"[A-Za-z_][A-Za-z0-9_]{0,31}", "names of letters, digits and _",
                        "_diffq"),
        "exclude": _PATTERNS,
        "detect_bound": flag("True"),
    },
    "diffq.uniform.UniformQuantizer": {
        "bits": numbers(1, 15, "8"),
        "min_size": numbers(0, 1e6, "0.2"),
        "float16": flag("False"),
        "qat": flag("False"),
        "exclude": _PATTERNS,
        "detect_bound": flag("True"),
    },
}


def _configuration(args: Any, kwargs: Any, what: str) -> dict[str, Any]:
    """Every :class:`Demucs` argument of ``args`` and ``kwargs``, checked against the bounds."""
    used = _bind(V2.model_class, args, kwargs, what)
    used["sources"] = _sources(used["sources"], what)
    for name, limit in _LIMITS.items():
        value = used[name]
        if not (_is_number(value, integer=limit.integer) and limit.low <= value <= limit.high):
            raise CheckpointError(f"{what}: {name}={brief(value)} is out of bounds: stemserve "
                                  f"loads {'integers' if limit.integer else 'numbers'} from "
                                  f"{limit.low} to {limit.high} (the releases use "
                                  f"{limit.releases})")
    for name in _FLAGS:
        if not isinstance(used[name], bool):
            raise CheckpointError(f"{what}: {name}={brief(used[name])} is not True or False")
    _check_segment(used, what)
    return used


def _configuration_v4(family: str, args: Any, kwargs: Any, what: str) -> dict[str, Any]:
    """Every argument of ``family``'s class, checked against its registration's rules."""
    registration = by_name(family)
    used = _bind(registration.model_class, args, kwargs, what)
    used["sources"] = _sources(used["sources"], what)
    for name, value in used.items():
        rule = registration.rules[name] if name != "sources" else None
        if rule is not None and not rule.accepts(value):
            raise CheckpointError(f"{what}: {name}={brief(value)} is out of bounds: stemserve "
                                  f"loads {rule.accepted} (the releases use {rule.releases})")
    return used


def _bind(klass: type, args: Any, kwargs: Any, what: str) -> dict[str, Any]:
    """``klass``'s arguments from ``args`` and ``kwargs``, defaults filled in; unknown keyword
    arguments are dropped with a warning, as demucs' ``load_model`` does."""
    name = klass.__name__
    if not isinstance(args, (tuple, list)):
        raise CheckpointError(f"{what}: 'args' is {_kind(args)}, not a tuple of {name} "
                              f"arguments")
    kwargs = dict(_mapping(kwargs, "kwargs", what, name))
    parameters = inspect.signature(klass).parameters
    for key in [key for key in kwargs if key not in parameters]:
        _warn(f"{what}: dropping unknown {name} parameter {brief(key)}")
        del kwargs[key]
    try:
        bound = inspect.signature(klass).bind(*args, **kwargs)
    except TypeError as exc:
        raise CheckpointError(f"{what}: bad {name} arguments ({exc})") from exc
    bound.apply_defaults()
    return dict(bound.arguments)


def _mapping(value: Any, field_name: str, what: str, klass: str = "Demucs") -> Mapping[str, Any]:
    if not (isinstance(value, Mapping) and all(isinstance(key, str) for key in value)):
        raise CheckpointError(f"{what}: {field_name!r} is {_kind(value)}, not a dict of {klass} "
                              f"arguments by name")
    return value


def _sources(sources: Any, what: str) -> list[str]:
    if not (isinstance(sources, (list, tuple)) and 1 <= len(sources) <= MAX_SOURCES
            and all(isinstance(name, str) and _SOURCE_NAME.fullmatch(name) for name in sources)
            and len(set(sources)) == len(sources)):
        raise CheckpointError(f"{what}: sources={brief(sources)} is not a list of 1 to "
                              f"{MAX_SOURCES} distinct names (letters, digits, _ and -; the "
                              f"releases use {list(SOURCES)})")
    return list(sources)


def _check_segment(used: Mapping[str, Any], what: str) -> None:
    """Bound the training segment and the input the network needs for it (its valid length),
    which every export and every request is sized by: stride**depth can make it hours."""
    segment, rate = used["segment_length"], used["samplerate"]
    if not (_is_number(segment, integer=True) and 0 < segment <= MAX_SEGMENT_SECONDS * rate):
        raise CheckpointError(f"{what}: segment_length={brief(segment)} is out of bounds: "
                              f"stemserve loads 1 sample to {MAX_SEGMENT_SECONDS} s (the releases "
                              f"use 40 s)")
    padded = valid_length(segment, **{key: used[key] for key in
                                      ("resample", "depth", "kernel_size", "stride", "context")})
    _check_padded(padded, segment / rate, used, what)


def _check_padded(padded: int, segment_s: float, used: Mapping[str, Any], what: str) -> None:
    rate = used["samplerate"]
    if padded > 2 * MAX_SEGMENT_SECONDS * rate:
        raise CheckpointError(f"{what}: its network needs {padded / rate:.0f} s of input for "
                              f"its {segment_s:g} s segment (stride {used['stride']}, "
                              f"depth {used['depth']}); stemserve loads at most "
                              f"{2 * MAX_SEGMENT_SECONDS} s")


def _describe(config: Mapping[str, Any], family: str = V2.name) -> str:
    registration = by_name(family)
    defaults = inspect.signature(registration.model_class).parameters
    changed = [f"{key}={brief(value)}" for key, value in config.items()
               if key != "sources" and value != defaults[key].default]
    name = registration.label
    return f"{name}({', '.join(changed)})" if changed else f"{name} with its default arguments"


def _skeleton(family: str, used: Mapping[str, Any], what: str) -> torch.nn.Module:
    """The network laid out on torch's meta device: its exact size, without allocating it.

    Building it also runs the class's own checks of its arguments against each other.
    """
    registration = by_name(family)
    try:
        with torch.device("meta"):
            skeleton = registration.model_class(**used)
    except (AssertionError, ArithmeticError, IndexError, KeyError, RuntimeError, TypeError,
            ValueError) as exc:
        raise CheckpointError(f"{what}: {_describe(used, family)} cannot be built "
                              f"({type(exc).__name__}: {_first_lines(exc)})") from exc
    count = _parameter_count(skeleton)
    if count > _MAX_PARAMETERS:
        raise CheckpointError(f"{what}: {_describe(used, family)} has {count / 1e6:.0f} M "
                              f"parameters; stemserve loads at most {_MAX_PARAMETERS / 1e6:.0f} "
                              f"M (the largest release has 266 M)")
    if registration.input_needed is not None:
        _check_padded(registration.input_needed(skeleton), float(used["segment"]), used, what)
    return skeleton


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
