"""Demucs checkpoints: resolve a release, download it once, verify it, load it safely.

Two generations of releases are known by name. demucs 2.0.3's (``demucs/pretrained.py``) are
one file each, ``<name>-<sha256 prefix>.th``; demucs 4.0.1's (``demucs/remote/files.txt``
and ``remote/<name>.yaml``) are bags of one to four models whose outputs are averaged, each
model a file ``<signature>-<sha256 prefix>.th``. Every file is checked against the sha256
prefix in its name before use, exactly like ``torch.hub`` does, and lands in torch hub's
checkpoint folder under the name demucs itself gives it, so an existing cache is reused. A
local file is checked against the CRCs of its zip records instead, which torch does not read.

Checkpoints are pickles. They are read with torch's ``weights_only`` unpickler and a short
allowlist: no pickled code runs. The model class a training package names unpickles to an
inert marker, and the few other objects demucs packages hold (a ``Fraction`` segment, numpy
numbers in their metrics, omegaconf configurations) to placeholders that only keep data.
Nothing is built until the package's configuration has been checked against bounds
(:data:`_LIMITS` for v2, :data:`_V4_RULES` for the demucs 4 classes, :data:`_MAX_PARAMETERS`),
so a small file cannot make the loader allocate gigabytes: the network is laid out on torch's
``meta`` device first, and a state dict's tensors are assigned to it rather than copied into
a freshly initialised model.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import inspect
import io
import itertools
import logging
import os
import re
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, NamedTuple, NoReturn

import torch
import tqdm

from stemserve.defaults import CHECKPOINT_URL_ENV
from stemserve.errors import CheckpointError
from stemserve.files import atomic_write, file_sha256
from stemserve.model import SOURCES, Demucs
from stemserve.models import DemucsV3, HDemucs, HTDemucs
from stemserve.models.configs import HDEMUCS_MMI, HTDEMUCS, HTDEMUCS_6S
from stemserve.models.families import segment_samples
# The release tables are part of this module's API too (``from stemserve.checkpoints import
# KNOWN_MODELS``): re-exported from the torch-free module that keys exports by them.
from stemserve.releases import (BAGS, DEMUCS4_FILES, DEMUCS4_ROOT_URL, KNOWN_MODELS, RELEASES,
                                ROOT_URL, UNSUPPORTED, BagRelease, Release, RemoteFile,
                                is_bag_yaml, is_release_name, release_files, v2_file, v4_file)
from stemserve.releases import SEGMENTS as _SEGMENTS
from stemserve.releases import is_number as _is_number
from stemserve.releases import is_segment as _is_segment
from stemserve.releases import local_member as _local_member
from stemserve.releases import read_bag_yaml as _read_bag_yaml
from stemserve.spec import MAX_SEGMENT_SECONDS, MAX_SOURCES, MIN_SEGMENT_SECONDS, valid_length
from stemserve.untrusted import TooLarge, brief, check_size

logger = logging.getLogger(__name__)

URL_ENV = CHECKPOINT_URL_ENV
"""Environment variable naming a mirror to use instead of the official server: an http(s) or
file:// URL, or a folder. A mirror is flat: every file under its own name, as in torch hub's
cache folder (no ``v3.0/``, ``hybrid_transformer/`` or ``mdx_final/``)."""

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0

MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {
    "demucs": Demucs, "demucs_v3": DemucsV3, "hdemucs": HDemucs, "htdemucs": HTDemucs}
"""The class of each :attr:`CheckpointInfo.family`: ``MODEL_CLASSES[info.family](**info.config)``
rebuilds a loaded model's network."""

DEFAULT_CONFIG = "demucs"
"""Configuration assumed for a plain state dict file when none is given."""
# Plain state dicts of the single-model demucs 4 releases, with --config NAME: their family
# and constructor arguments (stemserve.models.configs).
_STATE_CONFIGS: dict[str, tuple[str, Mapping[str, Any]]] = {
    "htdemucs": ("htdemucs", HTDEMUCS), "htdemucs_6s": ("htdemucs", HTDEMUCS_6S),
    "hdemucs_mmi": ("hdemucs", HDEMUCS_MMI)}

# The checkpoint formats load_model reads, for the error that refuses any other.
_FORMATS = ("a plain state dict (tensors by parameter name) built with a release's configuration "
           "(--config RELEASE, or config= in Python; default 'demucs'); a demucs 2.x training "
           "package (klass, args, kwargs, state, training_args); a diffq-compressed state "
           "({'compressed': ...}, as in demucs_quantized); a demucs 3/4 training package "
           "(klass demucs.htdemucs.HTDemucs, demucs.hdemucs.HDemucs or demucs.demucs.Demucs, "
           "diffq-quantized or not); or {'config': arguments, 'state': state dict} with an optional "
           "'family' (demucs_v3, hdemucs, htdemucs), as stemserve's benchmarks and `stemserve "
           "demo` save it")


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


# --------------------------------------------------------------------------- unpickling


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


class _DemucsClass(_ClassMarker):
    family, label = "demucs", "Demucs"


class _DemucsV3Class(_ClassMarker):
    family, label = "demucs_v3", "Demucs (v3)"


class _HDemucsClass(_ClassMarker):
    family, label = "hdemucs", "HDemucs"


class _HTDemucsClass(_ClassMarker):
    family, label = "htdemucs", "HTDemucs"


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
    (_DemucsClass, "demucs.model.Demucs"),
    (_DemucsClass, "stemserve.model.Demucs"),
    (_DemucsV3Class, "demucs.demucs.Demucs"),
    (_HDemucsClass, "demucs.hdemucs.HDemucs"),
    (_HTDemucsClass, "demucs.htdemucs.HTDemucs"),
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


# --------------------------------------------------------------------------- public API


@dataclass
class CheckpointInfo:
    """Where a model's weights came from.

    ``name`` is the release name, a bag member's signature or the file's stem; ``sha256`` the
    full hex digest of the file; ``family`` which class the model is (a key of
    :data:`MODEL_CLASSES`: ``demucs`` for v2, ``demucs_v3``, ``hdemucs``, ``htdemucs``);
    ``config`` every argument that class was built with, as the file stores it (a bag's
    segment override is on the model, not here).
    """

    name: str
    path: Path
    sha256: str
    config: dict[str, Any]
    family: str = "demucs"


@dataclass
class Bag:
    """Models whose outputs a separation averages with per-source weights, as demucs 4's
    ``BagOfModels``: every release and every file loads as one (a single model is a bag of
    one), so that callers handle them all alike.

    ``models`` are in eval mode (a model listed twice is the same object); ``infos`` go with
    them; ``weights`` hold one row of per-source weights per model (ones when the release
    gives none); ``segment`` is the release's override in seconds, or None. Like
    ``BagOfModels``, loading sets each v3/v4 model's ``segment`` to the override.
    """

    name: str
    models: list[torch.nn.Module]
    infos: list[CheckpointInfo]
    weights: list[list[float]]
    segment: float | None

    @property
    def sources(self) -> list[str]:
        return list(self.models[0].sources)

    @property
    def samplerate(self) -> int:
        return self.models[0].samplerate

    @property
    def audio_channels(self) -> int:
        return self.models[0].audio_channels


def checkpoint_url(name: str, *, base_url: str | None = None) -> str:
    """URL of the file of single-file release ``name`` on the mirror ``base_url``, else
    $STEMSERVE_CHECKPOINT_URL, else the official server.

    A mirror is flat (every file under its own name); a base without a scheme is a folder on
    this host (a mirror on disk or a shared mount), fetched as a ``file://`` URL with the
    same verification as a download.
    """
    return _url(_single_file(name), base_url)


def checkpoint_files(name: str) -> tuple[str, ...]:
    """The names of release ``name``'s files, in torch hub's cache and on a mirror."""
    return tuple(remote.name for remote in release_files(name))


def checkpoint_cache_dir() -> Path:
    """torch hub's checkpoint folder (honours $TORCH_HOME), shared with demucs and torch.hub."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_checkpoint(name: str, *, cache_dir: str | Path | None = None,
                        base_url: str | None = None, progress: bool = True) -> Path:
    """Path of single-file release ``name``'s verified file, downloaded only when the cache
    lacks it."""
    return _fetch(_single_file(name), cache_dir, base_url, progress)[0]


def load_model(name_or_path: str | Path, *, config: str | None = None,
               cache_dir: str | Path | None = None, base_url: str | None = None,
               progress: bool = True) -> tuple[torch.nn.Module, CheckpointInfo]:
    """One model in eval mode, from a single-model release name or a local checkpoint file.

    A string naming a release (:data:`KNOWN_MODELS`) downloads or reuses that release; any
    other value is a file in one of the :data:`_FORMATS`: a plain state dict is built with the
    release configuration ``config`` (default :data:`DEFAULT_CONFIG`); the other formats carry
    their own configuration. Bags of several models load with :func:`load_bag`.
    """
    if isinstance(name_or_path, str) and is_release_name(name_or_path):
        if name_or_path in BAGS and len(BAGS[name_or_path].models) > 1:
            raise CheckpointError(f"{name_or_path!r} is a bag of "
                                  f"{len(BAGS[name_or_path].models)} models; load it with "
                                  f"load_bag()")
    elif is_bag_yaml(Path(name_or_path)):
        raise CheckpointError(f"{name_or_path} is a bag of models; load it with load_bag()")
    bag = load_bag(name_or_path, config=config, cache_dir=cache_dir, base_url=base_url,
                   progress=progress)
    return bag.models[0], bag.infos[0]


def load_bag(name_or_path: str | Path, *, config: str | None = None,
             cache_dir: str | Path | None = None, base_url: str | None = None,
             progress: bool = True) -> Bag:
    """The :class:`Bag` of a release name, a local bag YAML or a local checkpoint file.

    A release downloads (or reuses) each of its files. A YAML file in demucs 4's format
    (``models: [signatures]``, optional ``weights:`` and ``segment:``) finds each model next
    to it, as ``<signature>.th`` or ``<signature>-<sha256 prefix>.th`` (demucs' ``LocalRepo``).
    Any other path is one checkpoint file, read as :func:`load_model` reads it.
    """
    if isinstance(name_or_path, str) and is_release_name(name_or_path):
        return _release_bag(name_or_path, config, cache_dir, base_url, progress)
    path = Path(name_or_path)
    if is_bag_yaml(path):
        if config is not None:
            raise CheckpointError(f"config={config!r} applies to a single local file; the "
                                  f"models of the bag {path} carry their own configuration")
        return _local_bag(path)
    model, info = _load_local(path, config, path.stem)
    return _bag(path.stem, [(model, info)], BagRelease((path.stem,)), str(path))


# --------------------------------------------------------------------------- releases, cache


def _single_file(name: str) -> RemoteFile:
    files = release_files(name)
    if len(files) > 1:
        raise CheckpointError(f"{name!r} is a bag of {len(BAGS[name].models)} models in "
                              f"{len(files)} files ({', '.join(f.name for f in files)}); load "
                              f"it with load_bag(), list its files with checkpoint_files()")
    return files[0]


def _url(remote: RemoteFile, base_url: str | None) -> str:
    base = base_url or os.environ.get(URL_ENV)
    if not base:
        return remote.url
    if "://" not in base and not base.startswith("file:"):
        base = Path(base).expanduser().absolute().as_uri()
    return base.rstrip("/") + "/" + remote.name


def _fetch(remote: RemoteFile, cache_dir: str | Path | None, base_url: str | None,
           progress: bool) -> tuple[Path, str]:
    """Verified cached file ``remote`` and its sha256; downloads it if needed.

    A cached file that does not match its name is moved aside, never deleted: it may be a
    truncated download, or a user's own model saved under a release's name.
    """
    folder = Path(cache_dir) if cache_dir is not None else checkpoint_cache_dir()
    path = folder / remote.name
    aside = None
    if path.is_file():
        sha256 = _sha256(path)
        if sha256.startswith(remote.checksum):
            return path, sha256
        aside = _move_aside(path, sha256)
    url = _url(remote, base_url)
    try:
        return path, _download(url, path, remote.checksum, progress)
    except CheckpointError as exc:
        if aside is None:
            raise
        raise CheckpointError(f"{exc}\n(The file that was cached as {path.name} did not match "
                              f"its name and is kept as {aside}.)") from exc


def _move_aside(path: Path, sha256: str) -> Path | None:
    """Rename ``path`` to ``<stem>.mismatch-<sha8>.th`` (the first free such name) and say so.

    None when another process moved it first.
    """
    for attempt in itertools.count():
        tag = f".mismatch-{sha256[:8]}" + (f"-{attempt}" if attempt else "")
        aside = path.with_name(f"{path.stem}{tag}{path.suffix}")
        if not aside.exists():
            break
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"{path} does not match the sha256 in its name (it starts with "
                              f"{sha256[:8]}) and could not be moved aside ({exc}); move it "
                              f"away yourself") from exc
    logger.warning("%s does not match the sha256 in its name (it starts with %s): kept it as "
                   "%s and fetching the release", path, sha256[:8], aside)
    return aside


def _download(url: str, path: Path, signature: str, progress: bool) -> str:
    """Stream ``url`` (http(s) or file) next to ``path``, verify it, move it into place.

    The partial file never carries the final name (:func:`~stemserve.files.atomic_write`),
    so an interrupted or corrupt download can never be mistaken for a cached checkpoint.
    """
    digest, received, expected = hashlib.sha256(), 0, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                    length = response.headers.get("Content-Length")
                    expected = int(length) if length is not None else None
                    with tqdm.tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                   desc=path.name, disable=not progress) as bar:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise CheckpointError(_unavailable(url, exc, path)) from exc
            if expected is not None and received != expected:
                raise CheckpointError(f"download of {url} was cut short ({received} of "
                                      f"{expected} bytes); nothing was kept, try again")
            sha256 = digest.hexdigest()
            if not sha256.startswith(signature):
                raise CheckpointError(f"checksum mismatch for {url}: sha256 starts with "
                                      f"{sha256[:8]}, the file name says {signature}; "
                                      f"the download was discarded")
    except OSError as exc:
        raise CheckpointError(f"cannot write into the checkpoint cache {path.parent} "
                              f"({exc}); choose another with $TORCH_HOME or cache_dir=") \
            from exc
    return sha256


def _unavailable(url: str, exc: Exception, path: Path) -> str:
    """Why ``url`` could not be fetched, and every other way to provide the file."""
    problem = _mirror_problem(url, exc) if url.startswith("file:") else \
        f"could not download {url} ({exc})"
    return (f"{problem}, and {path.parent} holds no valid {path.name}. Connect to the network, "
            f"copy {path.name} into {path.parent}, or set {URL_ENV} to a mirror that has it "
            f"(an http(s):// or file:// URL, or a folder). Offline, a checkpoint file of your "
            f"own works too (-n my_model.th [--config RELEASE]), and `stemserve demo` writes a "
            f"random-weight model to try things with")


def _mirror_problem(url: str, exc: Exception) -> str:
    """What is wrong with a folder mirror, in its own terms rather than urllib's."""
    source = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if not source.parent.is_dir():
        return f"the mirror folder {source.parent} does not exist"
    if not source.exists():
        return f"the mirror folder {source.parent} has no {source.name}"
    return f"could not read {source} ({exc})"


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _check_zip_crcs(path: Path) -> None:
    """Refuse a zip checkpoint whose records do not match their CRC-32.

    torch reads tensor records without checking their CRCs, so flipped bits in a weight load
    silently. Releases need no such check: their sha256 is. Records with a CRC of 0 come from
    torch's ``compute_crc32=False`` and cannot be checked.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: torch's loader says what it is
    with archive:
        for member in archive.infolist():
            if member.CRC == 0:
                continue
            try:
                with archive.open(member) as record:
                    while record.read(_CHUNK):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise CheckpointError(f"{path} is corrupt: its record {member.filename} does "
                                      f"not match its CRC ({exc}); copy or download the file "
                                      f"again") from exc


# --------------------------------------------------------------------------- bags


def _release_bag(name: str, config: str | None, cache_dir: str | Path | None,
                 base_url: str | None, progress: bool) -> Bag:
    """Release ``name``'s bag: every file fetched and verified first, then each loaded once."""
    if config not in (None, name):
        raise CheckpointError(f"config={config!r} applies to local files only; "
                              f"release {name!r} has its own configuration")
    if name not in BAGS:
        path, sha256 = _fetch(v2_file(name), cache_dir, base_url, progress)  # sha256 verified
        loaded = _from_loaded(_torch_load(path, str(path)), name, str(path), config_given=False)
        return _bag(name, [_member(loaded, name, path, sha256)], BagRelease((name,)), name)
    release = BAGS[name]
    files = {signature: _fetch(v4_file(signature), cache_dir, base_url, progress)
             for signature in dict.fromkeys(release.models)}
    members = {}
    for signature, (path, sha256) in files.items():
        loaded = _from_loaded(_torch_load(path, str(path)), None, str(path), config_given=False)
        members[signature] = _member(loaded, name if len(files) == 1 else signature, path,
                                     sha256)
    return _bag(name, [members[signature] for signature in release.models], release, name)


def _local_bag(path: Path) -> Bag:
    """The bag of a demucs 4 YAML file, its models found next to it."""
    spec = _read_bag_yaml(path)
    files = {signature: _local_member(path, signature) for signature in dict.fromkeys(spec.models)}
    members = {signature: _load_local(file, None, signature, checksum)
               for signature, (file, checksum) in files.items()}
    return _bag(path.stem, [members[signature] for signature in spec.models], spec, str(path))


def _load_local(path: Path, config: str | None, name: str,
                checksum: str | None = None) -> tuple[torch.nn.Module, CheckpointInfo]:
    """A local checkpoint file's model: its name's sha256 prefix and zip CRCs checked first."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    sha256 = _sha256(path)
    if checksum is not None and not sha256.startswith(checksum):
        raise CheckpointError(f"{path} does not match the sha256 in its name: it starts with "
                              f"{sha256[:len(checksum)]}, the name says {checksum}; copy or "
                              f"download the file again")
    _check_zip_crcs(path)
    loaded = _from_loaded(_torch_load(path, str(path)), config or DEFAULT_CONFIG, str(path),
                          config_given=config is not None)
    return _member(loaded, name, path, sha256)


def _member(loaded: _Loaded, name: str, path: Path,
            sha256: str) -> tuple[torch.nn.Module, CheckpointInfo]:
    return loaded.model.eval(), CheckpointInfo(name=name, path=path, sha256=sha256,
                                               config=loaded.config, family=loaded.family)


def _bag(name: str, members: list[tuple[torch.nn.Module, CheckpointInfo]], spec: BagRelease,
         what: str) -> Bag:
    """The bag of loaded ``members``, once they agree on what they separate, as
    ``BagOfModels`` checks; the segment override is set on the models, as it does."""
    models, infos = [model for model, _ in members], [info for _, info in members]
    first = models[0]

    def separates(model: torch.nn.Module) -> tuple[list[str], int, int]:
        return list(model.sources), model.samplerate, model.audio_channels

    for model, info in zip(models[1:], infos[1:]):
        for attribute, mine, theirs in zip(("sources", "samplerate", "audio_channels"),
                                           separates(first), separates(model)):
            if mine != theirs:
                raise CheckpointError(f"{what}: its models disagree on {attribute}: "
                                      f"{infos[0].name} has {mine!r}, {info.name} has "
                                      f"{theirs!r}; a bag averages models of the same sources, "
                                      f"sample rate and audio channels")
    v2 = [info.name for info in infos if info.family == "demucs"]
    if v2 and len(v2) < len(infos):
        raise CheckpointError(f"{what}: it mixes demucs 2 models ({', '.join(v2)}) with demucs "
                              f"3/4 models, which shift and split tracks differently; a bag "
                              f"averages models of one generation")
    if spec.segment is None:
        _check_segments(members, what)
    count = len(first.sources)
    weights = [[1.] * count for _ in models] if spec.weights is None else \
        [[float(w) for w in row] for row in spec.weights]
    for row in weights:
        if len(row) != count:
            raise CheckpointError(f"{what}: its weights have a row of {len(row)}, but its "
                                  f"models separate {count} sources "
                                  f"({', '.join(first.sources)})")
    silent = [source for index, source in enumerate(first.sources)
              if not sum(row[index] for row in weights)]
    if silent:
        raise CheckpointError(f"{what}: its weights give {', '.join(silent)} no model (a "
                              f"weight of 0 in every row)")
    if spec.segment is not None:
        for model, info in members:
            if info.family != "demucs":
                model.segment = spec.segment
    return Bag(name=name, models=models, infos=infos, weights=weights, segment=spec.segment)


def _check_segments(members: list[tuple[torch.nn.Module, CheckpointInfo]], what: str) -> None:
    """Refuse a bag whose models split tracks into segments of different lengths, which no
    backend serves (the pipeline refuses it too, for exports made before this check): the
    bag's YAML has to set one ``segment`` for all."""
    lengths = {info.name: segment_samples(model) for model, info in members}
    if len(set(lengths.values())) == 1:
        return
    rate = members[0][0].samplerate
    listed = ", ".join(f"{name}: {length / rate:g} s" for name, length in lengths.items())
    trained = [Fraction(model.segment) for model, info in members if info.family == "htdemucs"]
    # demucs' own bound for a bag holding HTDemucs models (BagOfModels.max_allowed_segment):
    # no segment longer than the one they were trained on.
    bound = (f"{float(min(trained)):g}, the shortest training segment of its HTDemucs models"
             if trained else f"{MAX_SEGMENT_SECONDS}")
    raise CheckpointError(f"{what}: its models split tracks into segments of different lengths "
                          f"({listed}), and a bag's models are served on one; add "
                          f"'segment: N' to the bag's YAML, N seconds from {MIN_SEGMENT_SECONDS} to "
                          f"{bound}")


# --------------------------------------------------------------------------- unpickling


def _torch_load(source: Path | bytes, what: str) -> Any:
    """Unpickle a torch file without executing anything it names outside the allowlist.

    Globals are listed up front (zip format, i.e. torch >= 1.6) to name the culprit; the
    ``weights_only`` unpickler is what enforces the allowlist, for every format.
    """
    def opened() -> Path | io.BytesIO:
        return io.BytesIO(source) if isinstance(source, bytes) else source

    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(_SAFE_GLOBALS):
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
            raise CheckpointError(f"{what} is not a Demucs checkpoint that can be loaded "
                                  f"safely: {_load_failure(exc)}") from exc


def _refusal(what: str, names: list[str]) -> str:
    message = (f"{what} refers to {', '.join(names)}, which a Demucs checkpoint never needs; "
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


# --------------------------------------------------------------------------- formats


class _Loaded(NamedTuple):
    model: torch.nn.Module
    family: str
    config: dict[str, Any]


def _from_loaded(loaded: Any, config: str | None, what: str, *, config_given: bool) -> _Loaded:
    """Model of whichever of the :data:`_FORMATS` ``loaded`` is; anything else is refused.

    ``config`` names the configuration of a plain state dict; None: the file must carry its
    own (a demucs 4 release's files do).
    """
    if isinstance(loaded, Mapping) and ("klass" in loaded or {"config", "state"} <= loaded.keys()):
        if config_given:
            _warn(f"{what} carries its own configuration; ignoring config={config!r}")
        return _from_package(loaded, what) if "klass" in loaded else _from_saved(loaded, what)
    if isinstance(loaded, Mapping) and loaded and (
            "compressed" in loaded or all(isinstance(v, torch.Tensor) for v in loaded.values())):
        if config is None:
            raise CheckpointError(f"{what} holds a plain state dict without its configuration, "
                                  f"where a training package was expected")
        return _from_state(loaded, config, what)
    if isinstance(loaded, Mapping):
        keys = list(loaded)
        holds = (f"a dict with keys {', '.join(map(brief, keys[:6]))}"
                 f"{' ...' if len(keys) > 6 else ''}" if keys else "an empty dict")
    else:
        holds = f"a {type(loaded).__name__}"
    raise CheckpointError(f"{what} holds {holds}, which is no checkpoint format stemserve "
                          f"loads. It loads {_FORMATS}.")


def _from_state(state: Mapping[str, Any], config: str, what: str) -> _Loaded:
    """Model of release configuration ``config`` holding a plain or compressed state dict."""
    if config in _STATE_CONFIGS:
        family, kwargs = _STATE_CONFIGS[config]
        used = _configuration_v4(family, (), kwargs, what)
        return _Loaded(_assign(family, used, _state_dict(state, what), what,
                               f"the {config!r} configuration, {_describe(used, family)}"),
                       family, used)
    if config not in RELEASES:
        kind = ("a bag of models, not one configuration" if config in BAGS else
                "a ConvTasNet model" if config in UNSUPPORTED else "no release")
        raise CheckpointError(f"{what}: {config!r} is {kind}; a plain state dict is built "
                              f"with the configuration of one of "
                              f"{', '.join([*RELEASES, *_STATE_CONFIGS])} (--config)")
    release = RELEASES[config]
    used = _configuration((), {"sources": SOURCES, **release.config}, what)
    fits = f"the {config!r} configuration, {_describe(used)}"
    if "compressed" in state:
        # demucs_quantized, as demucs/pretrained.py restores it.
        return _Loaded(_restore_quantized(
            used, state, lambda diffq, m: diffq.DiffQuantizer(m, group_size=8, min_size=1),
            what, fits), "demucs", used)
    return _Loaded(_assign("demucs", used, _state_dict(state, what), what, fits,
                           hint=lambda: _release_hint(state, config)), "demucs", used)


def _from_package(package: Mapping[str, Any], what: str) -> _Loaded:
    """Model of a demucs training package, restored like demucs' ``load_model``."""
    klass = package["klass"]
    if not (isinstance(klass, type) and issubclass(klass, _ClassMarker)):
        raise CheckpointError(f"{what} is a training package of {brief(klass)}, not of "
                              f"demucs.model.Demucs or demucs 4's HTDemucs, HDemucs or Demucs")
    missing = [key for key in ("kwargs", "state") if key not in package]
    if missing:
        raise CheckpointError(f"{what} is a training package without "
                              f"{' or '.join(map(repr, missing))}")
    args = _package_field(package, "args", what, ())
    kwargs = _package_field(package, "kwargs", what)
    if klass.family != "demucs":
        return _from_package_v4(package, klass.family, args, kwargs, what)
    used = _configuration(args, kwargs, what)
    fits = f"its own configuration, {_describe(used)}"
    make_quantizer = _package_quantizer(package.get("training_args"), what)
    state = package["state"]
    if make_quantizer is None:
        if isinstance(state, Mapping) and "compressed" in state:
            raise CheckpointError(f"{what}: its state is compressed, but its training_args "
                                  f"name no quantizer (diffq or qat) to restore it with")
        return _Loaded(_assign("demucs", used, _state_dict(state, what), what, fits), "demucs",
                       used)
    return _Loaded(_restore_quantized(used, state, make_quantizer, what, fits), "demucs", used)


def _from_package_v4(package: Mapping[str, Any], family: str, args: Any, kwargs: Any,
                     what: str) -> _Loaded:
    """Model of a demucs 3/4 package (``demucs.states.serialize_model``): a half-precision
    state dict, or a diffq-quantized state that names its quantizer (``set_state``)."""
    training = _package_field(package, "training_args", what)
    if training is not None and not isinstance(training, Mapping):
        raise CheckpointError(f"{what}: 'training_args' is {_kind(training)}, not the dict "
                              f"(or omegaconf DictConfig) demucs saves")
    used = _configuration_v4(family, args, kwargs, what)
    fits = f"its own configuration, {_describe(used, family)}"
    state = package["state"]
    if isinstance(state, Mapping) and state.get("__quantized"):
        return _Loaded(_restore_v4_quantized(family, used, state, what, fits), family, used)
    return _Loaded(_assign(family, used, _state_dict(state, what), what, fits), family, used)


def _from_saved(saved: Mapping[str, Any], what: str) -> _Loaded:
    """Model of ``{'config': arguments, 'state': state dict}`` and an optional ``'family'``
    (a key of :data:`MODEL_CLASSES`; Demucs v2 without one), as stemserve's benchmarks and
    ``stemserve demo`` save it."""
    family = saved.get("family", "demucs")
    if not (isinstance(family, str) and family in MODEL_CLASSES):
        raise CheckpointError(f"{what}: family={brief(family)} is not one of "
                              f"{', '.join(MODEL_CLASSES)}")
    config = _package_field(saved, "config", what)
    if family != "demucs":
        used = _configuration_v4(family, (), _mapping(config, "config", what), what)
        return _Loaded(_assign(family, used, _state_dict(saved["state"], what), what,
                               f"its own configuration, {_describe(used, family)}"), family,
                       used)
    used = _configuration((), {"sources": SOURCES, **_mapping(config, "config", what)}, what)
    return _Loaded(_assign("demucs", used, _state_dict(saved["state"], what), what,
                           f"its own configuration, {_describe(used)}"), "demucs", used)


def _package_quantizer(training: Any, what: str) -> Callable[[Any, Demucs], Any] | None:
    """demucs 2's ``get_quantizer``: the quantizer that a package's training arguments imply."""
    if training is None:
        return None
    if not isinstance(training, argparse.Namespace):
        raise CheckpointError(f"{what}: 'training_args' is {_kind(training)}, not the "
                              f"argparse.Namespace demucs saves")
    penalty = getattr(training, "diffq", 0)
    bits = getattr(training, "qat", None)
    min_size = getattr(training, "q_min_size", 1)
    if not _is_number(penalty) or penalty < 0:
        raise CheckpointError(f"{what}: training_args.diffq={brief(penalty)} is not a penalty "
                              f">= 0")
    if bits is not None and not (_is_number(bits, integer=True) and bits in _QAT_BITS):
        raise CheckpointError(f"{what}: training_args.qat={brief(bits)} is not a bit width in "
                              f"{_QAT_BITS.start}..{_QAT_BITS.stop - 1}")
    if not _is_number(min_size) or min_size < 0:
        raise CheckpointError(f"{what}: training_args.q_min_size={brief(min_size)} is not a "
                              f"size in MB >= 0")
    if penalty:
        return lambda diffq, m: diffq.DiffQuantizer(m, min_size=min_size, group_size=8)
    if bits:
        return lambda diffq, m: diffq.UniformQuantizer(m, bits=bits, min_size=min_size)
    return None


# --------------------------------------------------------------------------- configuration


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


# --------------------------------------------------------------------------- weights


def _state_dict(state: Any, what: str) -> Mapping[str, torch.Tensor]:
    """``state`` if it is a state dict of dense CPU float tensors by parameter name."""
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{what}: its state is {_kind(state)}, not a state dict "
                              f"(tensors by parameter name)")
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)
                and value.layout == torch.strided and value.device.type == "cpu"
                and value.is_floating_point()):
            raise CheckpointError(f"{what}: its state entry {brief(key)} is {_kind(value)}, not "
                                  f"a float tensor")
    return state


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


def _assign(family: str, used: Mapping[str, Any], state: Mapping[str, torch.Tensor], what: str,
            fits: str, hint: Callable[[], str] | None = None) -> torch.nn.Module:
    """The model of configuration ``used`` holding ``state``'s tensors themselves (then made
    float32: demucs 4 stores half precision).

    Assigned to the meta skeleton rather than copied into an initialised model: nothing is
    allocated before the file's tensors have been matched name by name and shape by shape.
    """
    model = _skeleton(family, used, what)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        advice = f": {hint()}" if hint else ""
        raise CheckpointError(f"{what} does not fit {fits}{advice}\n{_first_lines(exc)}") \
            from exc
    return model.float()


def _release_hint(state: Mapping[str, torch.Tensor], tried: str) -> str:
    """Which release configuration a plain state dict does fit, for its error message."""
    first = state.get("encoder.0.0.weight")
    detected = (f"its first encoder layer has {first.shape[0]} channels"
                if isinstance(first, torch.Tensor) and first.dim() == 3 else
                "it has no Demucs first encoder layer")
    fitting = [name for name in RELEASES if name != tried and _fits(RELEASES[name], state)]
    if fitting:
        return (f"{detected}, and it fits the configuration of {', '.join(fitting)}: try "
                f"--config {fitting[0]} (config={fitting[0]!r} in Python).")
    default = inspect.signature(Demucs).parameters["channels"].default
    by_channels: dict[int, list[str]] = {}
    for name, release in RELEASES.items():
        by_channels.setdefault(release.config.get("channels", default), []).append(name)
    releases = "; ".join(f"{', '.join(names)}: {channels} channels"
                         for channels, names in by_channels.items())
    return (f"{detected}, and no release configuration fits it ({releases}). Save it with "
            f"its configuration instead: torch.save({{'config': {{...Demucs arguments}}, "
            f"'state': state_dict}}, path)")


def _fits(release: Release, state: Mapping[str, torch.Tensor]) -> bool:
    with torch.device("meta"):
        model = Demucs(SOURCES, **release.config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        return False
    return True


def _import_diffq(what: str) -> Any:
    """diffq, imported only for the compressed checkpoints that need it."""
    try:
        import diffq
    except ImportError as exc:
        raise CheckpointError(f"{what} is stored quantized; loading it needs diffq "
                              f"(pip install diffq==0.2.4)") from exc
    return diffq


# What a malformed quantized state makes diffq raise while restoring it.
_RESTORE_ERRORS = (AssertionError, AttributeError, IndexError, KeyError, RuntimeError,
                   TypeError, ValueError)


def _restore_quantized(used: Mapping[str, Any], state: Any,
                       make_quantizer: Callable[[Any, Demucs], Any], what: str,
                       fits: str) -> Demucs:
    """demucs 2's ``set_state`` for ``{'compressed': zlib(torch.save(quantized_state))}``.

    The quantizer is detached afterwards: its hooks go, the dequantized float weights stay.
    """
    diffq = _import_diffq(what)
    raw = _inflate(state, _parameter_count(_skeleton("demucs", used, what)), what)
    quantized = _torch_load(raw, f"the quantized state in {what}")
    model = Demucs(**used)
    quantizer = make_quantizer(diffq, model)
    try:
        quantizer.restore_quantized_state(quantized)
    except _RESTORE_ERRORS as exc:
        raise CheckpointError(f"the quantized state in {what} does not fit {fits}:\n"
                              f"{_first_lines(exc) or type(exc).__name__}") from exc
    quantizer.detach()
    return model


def _restore_v4_quantized(family: str, used: Mapping[str, Any], state: Mapping[str, Any],
                          what: str, fits: str) -> torch.nn.Module:
    """demucs 4's ``set_state`` of a quantized state: ``diffq.restore_quantized_state``,
    which rebuilds the quantizer the state names (``meta``) on the model, restores the
    weights and detaches it, leaving plain float weights.

    diffq restores into a real model, so it is only built for a state that can fill it: every
    weight takes at least a bit (1 to 15 bits, float16 or float32), whatever the packing.
    """
    klass, kwargs = _state_quantizer(state, what)
    diffq = _import_diffq(what)
    parameters = _parameter_count(_skeleton(family, used, what))
    held = _storage_bytes([state.get(part) for part in ("quantized", "float16", "others")])
    if 8 * held < parameters:
        raise CheckpointError(f"{what}: its quantized state holds {held} bytes of tensors, less "
                              f"than a bit for each of the {parameters / 1e6:.1f} M weights of "
                              f"{_describe(used, family)}; refused before building it")
    model = MODEL_CLASSES[family](**used)
    try:
        quantizer = {"diffq.diffq.DiffQuantizer": diffq.DiffQuantizer,
                     "diffq.uniform.UniformQuantizer": diffq.UniformQuantizer}[klass](
            model, **kwargs)
    except _RESTORE_ERRORS as exc:
        raise CheckpointError(f"{what}: its quantizer settings do not fit {fits}: "
                              f"{_first_lines(exc) or type(exc).__name__}") from exc
    try:
        for part, expected in (("float16", quantizer._float16), ("others", quantizer._others)):
            if len(state.get(part, ())) != len(expected):  # diffq would zip them silently
                raise ValueError(f"{len(state.get(part, ()))} {part} tensors where the model "
                                 f"has {len(expected)}")
        quantizer.restore_quantized_state(state)
    except _RESTORE_ERRORS as exc:
        raise CheckpointError(f"the quantized state in {what} does not fit {fits}:\n"
                              f"{_first_lines(exc) or type(exc).__name__}") from exc
    quantizer.detach()
    return model


def _storage_bytes(value: Any) -> int:
    """Bytes of the distinct tensor storages in nested lists and tuples: what a quantized state
    really holds (a pickle can list one storage many times, or a list inside itself)."""
    storages: dict[int, int] = {}
    pending, seen = [value], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return sum(storages.values())


def _state_quantizer(state: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """The quantizer class a demucs 4 quantized state names and its checked arguments."""
    meta = state.get("meta")
    klass = meta.get("klass") if isinstance(meta, Mapping) else None
    if not (isinstance(klass, str) and klass in _QUANTIZER_RULES):
        raise CheckpointError(f"{what}: its state is quantized but names no diffq quantizer "
                              f"(meta.klass is {brief(klass)}; expected "
                              f"{' or '.join(_QUANTIZER_RULES)})")
    kwargs = meta.get("init_kwargs", {})
    if not (isinstance(kwargs, Mapping) and all(isinstance(key, str) for key in kwargs)):
        raise CheckpointError(f"{what}: its quantizer arguments are {_kind(kwargs)}, not a "
                              f"dict by name")
    rules = _QUANTIZER_RULES[klass]
    for name, value in kwargs.items():
        rule = rules.get(name)
        if rule is None:
            raise CheckpointError(f"{what}: its quantizer {klass} has no argument "
                                  f"{brief(name)}")
        if not rule.accepts(value):
            raise CheckpointError(f"{what}: quantizer {name}={brief(value)} is out of bounds: "
                                  f"stemserve loads {rule.accepted} (demucs uses "
                                  f"{rule.releases})")
    return klass, dict(kwargs)


def _inflate(state: Any, parameters: int, what: str) -> bytes:
    """The zlib-compressed quantized state, inflated to at most what the model can need.

    diffq's quantized state takes a quarter to a half of the float32 weights; twice the
    float32 size (plus 1 MiB of torch's framing) is the bound. A 2 MB zlib bomb would
    otherwise inflate to gigabytes before anything could look at it.
    """
    blob = state.get("compressed") if isinstance(state, Mapping) else None
    if not isinstance(blob, bytes):
        raise CheckpointError(f"{what}: no compressed quantized state (expected "
                              f"{{'compressed': zlib bytes}}, found {_kind(state)})")
    limit = 2 * 4 * parameters + (1 << 20)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob, limit + 1)
    except zlib.error as exc:
        raise CheckpointError(f"{what}: its compressed quantized state is not valid zlib data "
                              f"({exc})") from exc
    if len(raw) > limit:
        raise CheckpointError(f"{what}: its compressed quantized state inflates to more than "
                              f"{limit / 2**20:.0f} MiB, more than a model of "
                              f"{parameters / 1e6:.1f} M parameters can need; refused")
    if not inflater.eof:
        raise CheckpointError(f"{what}: its compressed quantized state is truncated")
    return raw


def _warn(message: str) -> None:
    """Warn at the caller's line outside this module, however deep the loader's call chain."""
    frame, level = inspect.currentframe(), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _first_lines(exc: Exception, count: int = 4, limit: int = 1000) -> str:
    """The start of a long torch error (it lists every mismatching tensor)."""
    text = "\n".join(str(exc).strip().splitlines()[:count])
    return text if len(text) <= limit else text[:limit] + " ..."
