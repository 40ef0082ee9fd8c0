"""Bounds on a checkpoint's configuration, checked before anything is built.

A small file must not make the loader allocate gigabytes: every constructor argument is
bounded, and the network is laid out on torch's ``meta`` device (:func:`_skeleton`) to count
its parameters before any weight is allocated.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from stemserve.checkpoints.messages import _first_lines, _kind, _warn
from stemserve.errors import CheckpointError
from stemserve.defaults import SOURCES
from stemserve.model import Demucs
from stemserve.models import DemucsV3, HDemucs, HTDemucs
from stemserve.releases import SEGMENTS as _SEGMENTS
from stemserve.releases import is_number as _is_number
from stemserve.releases import is_segment as _is_segment
from stemserve.spec import MAX_SEGMENT_SECONDS, MAX_SOURCES, valid_length
from stemserve.untrusted import brief

MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {
    "demucs": Demucs, "demucs_v3": DemucsV3, "hdemucs": HDemucs, "htdemucs": HTDemucs}
"""The class of each :attr:`.bags.CheckpointInfo.family`:
``MODEL_CLASSES[info.family](**info.config)`` rebuilds a loaded model's network."""


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


class _Rule(NamedTuple):
    """A bound on one argument: what passes, and the words for the error and the README."""

    accepts: Callable[[Any], bool]
    accepted: str
    releases: str


def _integers(low: int, high: int, releases: str) -> _Rule:
    return _Rule(lambda v: _is_number(v, integer=True) and low <= v <= high,
                 f"integers from {low} to {high}", releases)


def _numbers(low: float, high: float, releases: str) -> _Rule:
    return _Rule(lambda v: _is_number(v) and low <= v <= high,
                 f"numbers from {low:g} to {high:g}", releases)


def _flag(releases: str) -> _Rule:
    return _Rule(lambda v: isinstance(v, bool), "True or False", releases)


def _flag_or_integer(high: int, releases: str) -> _Rule:
    """demucs' ``Union[bool, int]`` norms: off, on, or a number of groups."""
    return _Rule(lambda v: isinstance(v, bool) or (_is_number(v, integer=True) and 0 <= v <= high),
                 f"True, False or an integer from 0 to {high}", releases)


def _or_none(rule: _Rule) -> _Rule:
    return _Rule(lambda v: v is None or rule.accepts(v), f"None or {rule.accepted}",
                 rule.releases)


def _choice(values: Sequence[str], releases: str) -> _Rule:
    return _Rule(lambda v: isinstance(v, str) and v in values, f"one of {', '.join(values)}",
                 releases)


def _number_list(low_count: int, high_count: int, low: float, high: float,
                 releases: str) -> _Rule:
    def accepts(value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and low_count <= len(value) <= high_count
                and all(_is_number(v) and low <= v <= high for v in value))
    return _Rule(accepts, f"lists of {low_count} to {high_count} numbers from {low:g} to "
                          f"{high:g}", releases)


def _text(pattern: str, accepted: str, releases: str) -> _Rule:
    compiled = re.compile(pattern)
    return _Rule(lambda v: isinstance(v, str) and compiled.fullmatch(v) is not None, accepted,
                 releases)


# Bounds on the arguments of demucs 4.0.1's HTDemucs, HDemucs and (v3) Demucs, by name (the
# classes share most; `sources` is checked on its own). The releases' values are in the last
# column; the bounds leave room for custom trainings and refuse what would allocate or compute
# without measure. Cross-argument constraints (heads dividing channels, nfft against depth)
# are the classes' own: building the network on the meta device checks them for free.
_V4_RULES: dict[str, _Rule] = {
    # All three
    "audio_channels": _integers(1, 2, "2"),
    "channels": _integers(1, 128, "48; 64 (the time-domain models of mdx)"),
    "growth": _numbers(1, 4, "2"),
    "depth": _integers(1, 8, "4 (htdemucs), 6"),
    "rewrite": _flag("True"),
    "kernel_size": _integers(1, 16, "8"),
    "stride": _integers(1, 8, "4"),
    "context": _integers(0, 9, "1"),
    "norm_starts": _integers(0, 16, "4"),
    "norm_groups": _integers(1, 16, "4"),
    "dconv_mode": _integers(0, 3, "1; 3 (htdemucs)"),
    "dconv_depth": _integers(0, 8, "2"),
    "dconv_comp": _numbers(1, 64, "4; 8 (htdemucs)"),
    "dconv_attn": _integers(0, 16, "4"),
    "dconv_lstm": _integers(0, 16, "4"),
    "dconv_init": _numbers(0, 1, "1e-4; 1e-3 (hybrid)"),
    "rescale": _numbers(0, 10, "0.1"),  # only shapes the random init
    "samplerate": _integers(8000, 192000, "44100"),
    "segment": _Rule(_is_segment, _SEGMENTS, "7.8 (htdemucs), 40 or 44"),
    # The hybrid models: HTDemucs, HDemucs
    "channels_time": _or_none(_integers(1, 128, "None")),
    "nfft": _Rule(lambda v: _is_number(v, integer=True) and 256 <= v <= 16384
                  and v & (v - 1) == 0, "powers of two from 256 to 16384", "4096"),
    "wiener_iters": _integers(-16, 16, "0"),
    "end_iters": _integers(-16, 16, "0"),
    "wiener_residual": _flag("False"),
    "cac": _flag("True; False in some MDX models"),
    "hybrid": _flag("True"),
    "hybrid_old": _flag("False; True in some MDX models"),
    "multi_freqs": _or_none(_number_list(0, 4, 0, 1, "[] or None")),
    "multi_freqs_depth": _integers(0, 8, "2 or 3"),
    "freq_emb": _numbers(0, 1, "0.2"),
    "emb_scale": _numbers(0, 100, "10"),
    "emb_smooth": _flag("True"),
    "time_stride": _integers(1, 8, "2"),
    "context_enc": _integers(0, 9, "0"),
    # HTDemucs: the cross-domain transformer
    "bottom_channels": _integers(0, 2048, "512"),
    "t_layers": _integers(0, 16, "5"),
    "t_emb": _choice(("sin", "cape", "scaled"), "sin"),
    "t_hidden_scale": _numbers(0, 16, "4"),
    "t_heads": _integers(1, 32, "8"),
    "t_dropout": _numbers(0, 1, "0.02"),
    "t_max_positions": _integers(1, 100_000, "10000"),
    "t_norm_in": _flag("True"),
    "t_norm_in_group": _flag_or_integer(64, "False"),
    "t_group_norm": _flag_or_integer(64, "False"),
    "t_norm_first": _flag("True"),
    "t_norm_out": _flag_or_integer(64, "True"),
    "t_max_period": _numbers(1, 1e6, "10000"),
    "t_weight_decay": _numbers(0, 1, "0"),
    "t_lr": _or_none(_numbers(0, 1, "None")),
    "t_layer_scale": _flag("True"),
    "t_gelu": _flag("True"),
    "t_weight_pos_embed": _numbers(0, 100, "1"),
    "t_sin_random_shift": _integers(0, 10_000, "0"),
    "t_cape_mean_normalize": _flag("True"),
    "t_cape_augment": _flag("True"),
    "t_cape_glob_loc_scale": _number_list(3, 3, 0, 1e6, "[5000, 1, 1.4]"),
    "t_sparse_self_attn": _flag("False"),
    "t_sparse_cross_attn": _flag("False"),
    "t_mask_type": _text(r"(diag|jmask|random|global)(_(diag|jmask|random|global)){0,3}",
                         "diag, jmask, random, global or several joined by _", "diag"),
    "t_mask_random_seed": _integers(0, 2**32 - 1, "42"),
    "t_sparse_attn_window": _integers(1, 100_000, "400"),
    "t_global_window": _integers(1, 100_000, "100"),
    "t_sparsity": _numbers(0, 1, "0.95"),
    "t_auto_sparsity": _flag("False"),
    "t_cross_first": _flag("False"),
    "use_train_segment": _flag("True"),
    # The v3 Demucs (time domain)
    "lstm_layers": _integers(0, 4, "0"),
    "gelu": _flag("True"),
    "glu": _flag("True"),
    "normalize": _flag("False; True (repro_mdx_a)"),
    "resample": _flag("True"),
}

# A demucs 4 quantized state names its diffq quantizer and the arguments to rebuild it with
# (demucs passes min_size and group_size, 0.2 and 8 in its training configuration); these
# bound them, by the name the quantizer class unpickles to.
_PATTERNS = _Rule(lambda v: isinstance(v, (list, tuple)) and len(v) <= 64
                  and all(isinstance(p, str) and len(p) <= 256 for p in v),
                  "lists of up to 64 names of up to 256 characters", "[]")
_QUANTIZER_RULES: dict[str, dict[str, _Rule]] = {
    "diffq.diffq.DiffQuantizer": {
        "min_size": _numbers(0, 1e6, "0.2"),
        "float16": _flag("False"),
        "group_size": _integers(0, 1024, "8"),
        "min_bits": _numbers(1, 15, "2"),
        "max_bits": _numbers(1, 15, "15"),
        "param": _choice(("bits", "noise"), "bits"),
        "noise": _choice(("gaussian", "uniform"), "gaussian"),
        "init_bits": _numbers(1, 15, "8"),
        "extra_bits": _numbers(0, 15, "0"),
        "suffix": _text(r"[A-Za-z_][A-Za-z0-9_]{0,31}", "names of letters, digits and _",
                        "_diffq"),
        "exclude": _PATTERNS,
        "detect_bound": _flag("True"),
    },
    "diffq.uniform.UniformQuantizer": {
        "bits": _numbers(1, 15, "8"),
        "min_size": _numbers(0, 1e6, "0.2"),
        "float16": _flag("False"),
        "qat": _flag("False"),
        "exclude": _PATTERNS,
        "detect_bound": _flag("True"),
    },
}


def _configuration(args: Any, kwargs: Any, what: str) -> dict[str, Any]:
    """Every :class:`Demucs` argument of ``args`` and ``kwargs``, checked against the bounds."""
    used = _bind(Demucs, args, kwargs, what)
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
    """Every argument of ``family``'s class, checked against :data:`_V4_RULES`."""
    used = _bind(MODEL_CLASSES[family], args, kwargs, what)
    used["sources"] = _sources(used["sources"], what)
    for name, value in used.items():
        rule = _V4_RULES[name] if name != "sources" else None
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


def _describe(config: Mapping[str, Any], family: str = "demucs") -> str:
    klass = MODEL_CLASSES[family]
    defaults = inspect.signature(klass).parameters
    changed = [f"{key}={brief(value)}" for key, value in config.items()
               if key != "sources" and value != defaults[key].default]
    name = "Demucs (v3)" if family == "demucs_v3" else klass.__name__
    return f"{name}({', '.join(changed)})" if changed else f"{name} with its default arguments"


def _skeleton(family: str, used: Mapping[str, Any], what: str) -> torch.nn.Module:
    """The network laid out on torch's meta device: its exact size, without allocating it.

    Building it also runs the class's own checks of its arguments against each other.
    """
    try:
        with torch.device("meta"):
            skeleton = MODEL_CLASSES[family](**used)
    except (AssertionError, ArithmeticError, IndexError, KeyError, RuntimeError, TypeError,
            ValueError) as exc:
        raise CheckpointError(f"{what}: {_describe(used, family)} cannot be built "
                              f"({type(exc).__name__}: {_first_lines(exc)})") from exc
    count = _parameter_count(skeleton)
    if count > _MAX_PARAMETERS:
        raise CheckpointError(f"{what}: {_describe(used, family)} has {count / 1e6:.0f} M "
                              f"parameters; stemserve loads at most {_MAX_PARAMETERS / 1e6:.0f} "
                              f"M (the largest release has 266 M)")
    if family == "demucs_v3":
        rate = used["samplerate"]
        _check_padded(skeleton.valid_length(int(used["segment"] * rate)),
                      float(used["segment"]), used, what)
    return skeleton


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
