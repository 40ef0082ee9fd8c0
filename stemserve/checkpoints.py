"""Demucs v2 checkpoints: resolve a release, download it once, verify it, load it safely.

The release files are those of demucs 2.0.3 (``demucs/pretrained.py``): the first 8 hex
digits of a file's sha256 are part of its name, so every file is checked against its name
before use, exactly like ``torch.hub`` does. Files land in torch hub's checkpoint folder,
where demucs itself put them, so an existing cache is reused. A local file is checked
against the CRCs of its zip records instead, which torch does not read.

Checkpoints are pickles. They are read with torch's ``weights_only`` unpickler and a short
allowlist: no pickled code runs, and the Demucs class a training package names unpickles to
an inert marker. Nothing is built until the package's configuration has been checked against
bounds (:data:`_LIMITS`, :data:`_MAX_PARAMETERS`), so a small file cannot make the loader
allocate gigabytes: the network is laid out on torch's ``meta`` device first, and a state
dict's tensors are assigned to it rather than copied into a freshly initialised model.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import inspect
import io
import itertools
import logging
import math
import os
import re
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple, NoReturn

import torch
import tqdm

from stemserve.defaults import CHECKPOINT_URL_ENV
from stemserve.errors import CheckpointError
from stemserve.files import atomic_write, file_sha256
from stemserve.model import SOURCES, Demucs
from stemserve.spec import valid_length

logger = logging.getLogger(__name__)

ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/v3.0/"
URL_ENV = CHECKPOINT_URL_ENV
"""Environment variable that replaces :data:`ROOT_URL`: an http(s) or file:// URL, or a folder
(mirrors, air-gapped hosts, tests)."""

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Release:
    """A pretrained model of the demucs 2.0.3 release.

    ``signature`` is the start of the file's sha256 and part of its name; ``config`` holds the
    :class:`Demucs` arguments besides ``sources``, as ``demucs/pretrained.py`` builds it.
    """

    signature: str
    config: Mapping[str, Any] = field(default_factory=dict)


RELEASES: dict[str, Release] = {
    "demucs": Release("e07c671f"),
    "demucs48_hq": Release("28a1282c", {"channels": 48}),
    "demucs_extra": Release("3646af93"),
    # Stored diffq-compressed; restored with DiffQuantizer(group_size=8, min_size=1).
    "demucs_quantized": Release("07afea75"),
    "demucs_unittest": Release("09ebc15f", {"channels": 4}),
}
# Released alongside, but they are ConvTasNet models, which stemserve does not implement.
UNSUPPORTED: dict[str, str] = {"tasnet": "beb46fac", "tasnet_extra": "df3777b2"}
KNOWN_MODELS: tuple[str, ...] = tuple(RELEASES)

DEFAULT_CONFIG = "demucs"
"""Configuration assumed for a plain state dict file when none is given."""

# The checkpoint formats load_model reads, for the error that refuses any other.
_FORMATS = ("a plain state dict (tensors by parameter name) built with a release's configuration "
           "(--config RELEASE, or config= in Python; default 'demucs'); a demucs 2.x training "
           "package (klass, args, kwargs, state, training_args); a diffq-compressed state "
           "({'compressed': ...}, as in demucs_quantized); or {'config': Demucs arguments, "
           "'state': state dict}, as stemserve's benchmarks save it")


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
_MAX_SOURCES = 8
# Source names become the stems' file names: no separators, no leading dot.
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,31}")
# The releases train on 40 s; the segment also sizes every export and every request.
_MAX_SEGMENT_S = 120
# Channels grow by ``growth`` per layer, so the bounds above still allow 10**13 parameters;
# this caps the model itself at 2.6 times the largest release (2.8 GB of float32 weights).
_MAX_PARAMETERS = 700_000_000
_QAT_BITS = range(0, 17)  # 0: no quantization-aware training, as demucs' --qat default


class _DemucsClass:
    """What a checkpoint's reference to the Demucs class unpickles to: a marker, never a model.

    A training package names the class and never calls it. A pickle that calls it would
    build a network from unchecked arguments while unpickling (a 41-byte file can ask for
    gigabytes), so calling the marker fails; the model is built later from checked kwargs.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise _CalledWhileUnpickling


class _CalledWhileUnpickling(Exception):
    """A pickle called the Demucs class instead of naming it."""


# What a demucs checkpoint may name besides torch's own tensor machinery. The training
# package pickles the demucs class (stemserve's name for it when stemserve made the package)
# and its argparse arguments (paths included); a quantized state names its quantizer class,
# which is never called, so it resolves to a plain string.
_SAFE_GLOBALS: list[Any] = [
    (_DemucsClass, "demucs.model.Demucs"),
    (_DemucsClass, "stemserve.model.Demucs"),
    argparse.Namespace,
    # Pure paths: building one touches nothing; concrete Windows paths cannot exist on POSIX.
    # Python 3.13 moved the classes to pathlib._local.
    *((pure, f"{module}.{prefix}{flavour}Path")
      for module in ("pathlib", "pathlib._local")
      for prefix in ("", "Pure")
      for flavour, pure in (("Posix", PurePosixPath), ("Windows", PureWindowsPath))),
    *((name, name) for name in ("diffq.diffq.DiffQuantizer", "diffq.uniform.UniformQuantizer")),
]
# torch keeps the allowlist in one process-wide set; serialise our additions to it.
_SAFE_GLOBALS_LOCK = threading.Lock()


@dataclass
class CheckpointInfo:
    """Where a model's weights came from.

    ``name`` is the release name or the file's stem, ``sha256`` the full hex digest of the
    file, ``config`` every :class:`Demucs` argument the model was built with.
    """

    name: str
    path: Path
    sha256: str
    config: dict[str, Any]


def checkpoint_url(name: str, *, base_url: str | None = None) -> str:
    """URL of release ``name`` under ``base_url``, else $STEMSERVE_CHECKPOINT_URL, else ROOT.

    A base without a scheme is a folder on this host (a mirror on disk or a shared mount); it
    becomes a ``file://`` URL, which is fetched with the same verification as a download.
    """
    base = base_url or os.environ.get(URL_ENV) or ROOT_URL
    if "://" not in base and not base.startswith("file:"):
        base = Path(base).expanduser().absolute().as_uri()
    return base.rstrip("/") + "/" + _file_name(name)


def checkpoint_cache_dir() -> Path:
    """torch hub's checkpoint folder (honours $TORCH_HOME), shared with demucs and torch.hub."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_checkpoint(name: str, *, cache_dir: str | Path | None = None,
                        base_url: str | None = None, progress: bool = True) -> Path:
    """Path of release ``name``'s verified file, downloaded only when the cache lacks it."""
    return _fetch(name, cache_dir, base_url, progress)[0]


def load_model(name_or_path: str | Path, *, config: str | None = None,
               cache_dir: str | Path | None = None, base_url: str | None = None,
               progress: bool = True) -> tuple[Demucs, CheckpointInfo]:
    """Build a :class:`Demucs` in eval mode from a release name or a local checkpoint file.

    A string naming a release (:data:`KNOWN_MODELS`) downloads or reuses that release; any
    other value is a file in one of the :data:`_FORMATS`: a plain state dict is built with the
    release configuration ``config`` (default :data:`DEFAULT_CONFIG`); the other formats carry
    their own configuration.
    """
    if isinstance(name_or_path, str) and _is_release_name(name_or_path):
        name = name_or_path
        if config not in (None, name):
            raise CheckpointError(f"config={config!r} applies to local files only; "
                                  f"release {name!r} has its own configuration")
        path, sha256 = _fetch(name, cache_dir, base_url, progress)  # sha256 verified
        model, used = _from_loaded(_torch_load(path, str(path)), name, str(path),
                                   config_given=False)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file at {path}")
        name, sha256 = path.stem, _sha256(path)
        _check_zip_crcs(path)
        model, used = _from_loaded(_torch_load(path, str(path)), config or DEFAULT_CONFIG,
                                   str(path), config_given=config is not None)
    return model.eval(), CheckpointInfo(name=name, path=path, sha256=sha256, config=used)


# --------------------------------------------------------------------------- releases, cache


def _is_release_name(text: str) -> bool:
    """Release names win; anything that could be a file is a file; the rest is a bad name."""
    if text in RELEASES or text in UNSUPPORTED:
        return True
    return not (Path(text).exists() or Path(text).suffix or "/" in text or os.sep in text)


def _release(name: str, what: str = "model") -> Release:
    if name in UNSUPPORTED:
        raise CheckpointError(f"{name!r} is a ConvTasNet model, which stemserve does not "
                              f"support; supported models: {', '.join(KNOWN_MODELS)}")
    try:
        return RELEASES[name]
    except KeyError:
        raise CheckpointError(f"unknown {what} {name!r}; known models: "
                              f"{', '.join(KNOWN_MODELS)}") from None


def _file_name(name: str) -> str:
    return f"{name}-{_release(name).signature}.th"


def _fetch(name: str, cache_dir: str | Path | None, base_url: str | None,
           progress: bool) -> tuple[Path, str]:
    """Verified cached file of release ``name`` and its sha256; downloads it if needed.

    A cached file that does not match its name is moved aside, never deleted: it may be a
    truncated download, or a user's own model saved under a release's name.
    """
    signature = _release(name).signature
    folder = Path(cache_dir) if cache_dir is not None else checkpoint_cache_dir()
    path = folder / _file_name(name)
    aside = None
    if path.is_file():
        sha256 = _sha256(path)
        if sha256.startswith(signature):
            return path, sha256
        aside = _move_aside(path, sha256)
    url = checkpoint_url(name, base_url=base_url)
    try:
        return path, _download(url, path, signature, progress)
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
            f"(an http(s):// or file:// URL, or a folder)")


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
        except _CalledWhileUnpickling:
            raise CheckpointError(f"{what} calls the Demucs class while unpickling, which no "
                                  f"checkpoint does (it only names it); refused before building "
                                  f"anything") from None
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


# --------------------------------------------------------------------------- formats


def _from_loaded(loaded: Any, config: str, what: str, *,
                 config_given: bool) -> tuple[Demucs, dict[str, Any]]:
    """Model of whichever of the :data:`_FORMATS` ``loaded`` is; anything else is refused."""
    if isinstance(loaded, Mapping) and ("klass" in loaded or {"config", "state"} <= loaded.keys()):
        if config_given:
            warnings.warn(f"{what} carries its own configuration; ignoring config={config!r}",
                          stacklevel=3)
        return _from_package(loaded, what) if "klass" in loaded else _from_saved(loaded, what)
    if isinstance(loaded, Mapping) and loaded and (
            "compressed" in loaded or all(isinstance(v, torch.Tensor) for v in loaded.values())):
        return _from_state(loaded, config, what)
    if isinstance(loaded, Mapping):
        keys = list(loaded)
        holds = (f"a dict with keys {', '.join(map(repr, keys[:6]))}"
                 f"{' ...' if len(keys) > 6 else ''}" if keys else "an empty dict")
    else:
        holds = f"a {type(loaded).__name__}"
    raise CheckpointError(f"{what} holds {holds}, which is no checkpoint format stemserve "
                          f"loads. It loads {_FORMATS}.")


def _from_state(state: Mapping[str, Any], config: str,
                what: str) -> tuple[Demucs, dict[str, Any]]:
    """Model of release configuration ``config`` holding a plain or compressed state dict."""
    release = _release(config, what="configuration")
    used = _configuration((), {"sources": SOURCES, **release.config}, what)
    fits = f"the {config!r} configuration, {_describe(used)}"
    if "compressed" in state:
        # demucs_quantized, as demucs/pretrained.py restores it.
        return _restore_quantized(
            used, state, lambda diffq, m: diffq.DiffQuantizer(m, group_size=8, min_size=1),
            what, fits), used
    return _assign(used, _state_dict(state, what), what, fits,
                   hint=lambda: _release_hint(state, config)), used


def _from_package(package: Mapping[str, Any], what: str) -> tuple[Demucs, dict[str, Any]]:
    """Model of a demucs 2.x training package, restored like demucs' ``load_model``."""
    klass = package["klass"]
    if klass is not _DemucsClass:
        raise CheckpointError(f"{what} is a training package of {klass!r}, not of "
                              f"demucs.model.Demucs")
    missing = [key for key in ("kwargs", "state") if key not in package]
    if missing:
        raise CheckpointError(f"{what} is a training package without "
                              f"{' or '.join(map(repr, missing))}")
    used = _configuration(package.get("args", ()), package["kwargs"], what)
    fits = f"its own configuration, {_describe(used)}"
    make_quantizer = _package_quantizer(package.get("training_args"), what)
    state = package["state"]
    if make_quantizer is None:
        if isinstance(state, Mapping) and "compressed" in state:
            raise CheckpointError(f"{what}: its state is compressed, but its training_args "
                                  f"name no quantizer (diffq or qat) to restore it with")
        return _assign(used, _state_dict(state, what), what, fits), used
    return _restore_quantized(used, state, make_quantizer, what, fits), used


def _from_saved(saved: Mapping[str, Any], what: str) -> tuple[Demucs, dict[str, Any]]:
    """Model of ``{'config': Demucs arguments, 'state': state dict}``, as benchmarks save it."""
    used = _configuration((), {"sources": SOURCES, **_mapping(saved["config"], "config", what)},
                          what)
    return _assign(used, _state_dict(saved["state"], what), what,
                   f"its own configuration, {_describe(used)}"), used


def _package_quantizer(training: Any, what: str) -> Callable[[Any, Demucs], Any] | None:
    """demucs' ``get_quantizer``: the quantizer that a package's training arguments imply."""
    if training is None:
        return None
    if not isinstance(training, argparse.Namespace):
        raise CheckpointError(f"{what}: 'training_args' is {_kind(training)}, not the "
                              f"argparse.Namespace demucs saves")
    penalty = getattr(training, "diffq", 0)
    bits = getattr(training, "qat", None)
    min_size = getattr(training, "q_min_size", 1)
    if not _is_number(penalty) or penalty < 0:
        raise CheckpointError(f"{what}: training_args.diffq={penalty!r} is not a penalty >= 0")
    if bits is not None and not (_is_number(bits, integer=True) and bits in _QAT_BITS):
        raise CheckpointError(f"{what}: training_args.qat={bits!r} is not a bit width in "
                              f"{_QAT_BITS.start}..{_QAT_BITS.stop - 1}")
    if not _is_number(min_size) or min_size < 0:
        raise CheckpointError(f"{what}: training_args.q_min_size={min_size!r} is not a size "
                              f"in MB >= 0")
    if penalty:
        return lambda diffq, m: diffq.DiffQuantizer(m, min_size=min_size, group_size=8)
    if bits:
        return lambda diffq, m: diffq.UniformQuantizer(m, bits=bits, min_size=min_size)
    return None


# --------------------------------------------------------------------------- configuration


def _configuration(args: Any, kwargs: Any, what: str) -> dict[str, Any]:
    """Every :class:`Demucs` argument of ``args`` and ``kwargs``, checked against the bounds."""
    if not isinstance(args, (tuple, list)):
        raise CheckpointError(f"{what}: 'args' is {_kind(args)}, not a tuple of Demucs "
                              f"arguments")
    kwargs = dict(_mapping(kwargs, "kwargs", what))
    parameters = inspect.signature(Demucs).parameters
    for key in [key for key in kwargs if key not in parameters]:
        warnings.warn(f"{what}: dropping unknown Demucs parameter {key!r}", stacklevel=5)
        del kwargs[key]
    try:
        bound = inspect.signature(Demucs).bind(*args, **kwargs)
    except TypeError as exc:
        raise CheckpointError(f"{what}: bad Demucs arguments ({exc})") from exc
    bound.apply_defaults()
    used = dict(bound.arguments)
    used["sources"] = _sources(used["sources"], what)
    for name, limit in _LIMITS.items():
        value = used[name]
        if not (_is_number(value, integer=limit.integer) and limit.low <= value <= limit.high):
            raise CheckpointError(f"{what}: {name}={value!r} is out of bounds: stemserve loads "
                                  f"{'integers' if limit.integer else 'numbers'} from "
                                  f"{limit.low} to {limit.high} (the releases use "
                                  f"{limit.releases})")
    for name in _FLAGS:
        if not isinstance(used[name], bool):
            raise CheckpointError(f"{what}: {name}={used[name]!r} is not True or False")
    _check_segment(used, what)
    return used


def _mapping(value: Any, field_name: str, what: str) -> Mapping[str, Any]:
    if not (isinstance(value, Mapping) and all(isinstance(key, str) for key in value)):
        raise CheckpointError(f"{what}: {field_name!r} is {_kind(value)}, not a dict of Demucs "
                              f"arguments by name")
    return value


def _sources(sources: Any, what: str) -> list[str]:
    if not (isinstance(sources, (list, tuple)) and 1 <= len(sources) <= _MAX_SOURCES
            and all(isinstance(name, str) and _SOURCE_NAME.fullmatch(name) for name in sources)
            and len(set(sources)) == len(sources)):
        raise CheckpointError(f"{what}: sources={sources!r} is not a list of 1 to "
                              f"{_MAX_SOURCES} distinct names (letters, digits, _ and -; the "
                              f"releases use {list(SOURCES)})")
    return list(sources)


def _check_segment(used: Mapping[str, Any], what: str) -> None:
    """Bound the training segment and the input the network needs for it (its valid length),
    which every export and every request is sized by: stride**depth can make it hours."""
    segment, rate = used["segment_length"], used["samplerate"]
    if not (_is_number(segment, integer=True) and 0 < segment <= _MAX_SEGMENT_S * rate):
        raise CheckpointError(f"{what}: segment_length={segment!r} is out of bounds: stemserve "
                              f"loads 1 sample to {_MAX_SEGMENT_S} s (the releases use 40 s)")
    padded = valid_length(segment, **{key: used[key] for key in
                                      ("resample", "depth", "kernel_size", "stride", "context")})
    if padded > 2 * _MAX_SEGMENT_S * rate:
        raise CheckpointError(f"{what}: its network needs {padded / rate:.0f} s of input for "
                              f"its {segment / rate:g} s segment (stride {used['stride']}, "
                              f"depth {used['depth']}); stemserve loads at most "
                              f"{2 * _MAX_SEGMENT_S} s")


def _is_number(value: Any, *, integer: bool = False) -> bool:
    """A finite int (or float, unless ``integer``); bools and tensors are not numbers here."""
    return (isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _describe(config: Mapping[str, Any]) -> str:
    defaults = inspect.signature(Demucs).parameters
    changed = [f"{key}={value!r}" for key, value in config.items()
               if key != "sources" and value != defaults[key].default]
    return f"Demucs({', '.join(changed)})" if changed else "Demucs with its default arguments"


def _skeleton(used: Mapping[str, Any], what: str) -> Demucs:
    """The network laid out on torch's meta device: its exact size, without allocating it."""
    with torch.device("meta"):
        skeleton = Demucs(**used)
    count = _parameter_count(skeleton)
    if count > _MAX_PARAMETERS:
        raise CheckpointError(f"{what}: {_describe(used)} has {count / 1e6:.0f} M parameters; "
                              f"stemserve loads at most {_MAX_PARAMETERS / 1e6:.0f} M (the "
                              f"largest release has 266 M)")
    return skeleton


def _parameter_count(model: Demucs) -> int:
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
            raise CheckpointError(f"{what}: its state entry {key!r} is {_kind(value)}, not a "
                                  f"float tensor")
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


def _assign(used: Mapping[str, Any], state: Mapping[str, torch.Tensor], what: str, fits: str,
            hint: Callable[[], str] | None = None) -> Demucs:
    """The model of configuration ``used`` holding ``state``'s tensors themselves.

    Assigned to the meta skeleton rather than copied into an initialised model: nothing is
    allocated before the file's tensors have been matched name by name and shape by shape.
    """
    model = _skeleton(used, what)
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


def _restore_quantized(used: Mapping[str, Any], state: Any,
                       make_quantizer: Callable[[Any, Demucs], Any], what: str,
                       fits: str) -> Demucs:
    """demucs' ``set_state`` for ``{'compressed': zlib(torch.save(quantized_state))}``.

    The quantizer is detached afterwards: its hooks go, the dequantized float weights stay.
    """
    diffq = _import_diffq(what)
    raw = _inflate(state, _parameter_count(_skeleton(used, what)), what)
    quantized = _torch_load(raw, f"the quantized state in {what}")
    model = Demucs(**used)
    quantizer = make_quantizer(diffq, model)
    try:
        quantizer.restore_quantized_state(quantized)
    except (AssertionError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the quantized state in {what} does not fit {fits}:\n"
                              f"{_first_lines(exc) or type(exc).__name__}") from exc
    quantizer.detach()
    return model


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


def _first_lines(exc: Exception, count: int = 4, limit: int = 1000) -> str:
    """The start of a long torch error (it lists every mismatching tensor)."""
    text = "\n".join(str(exc).strip().splitlines()[:count])
    return text if len(text) <= limit else text[:limit] + " ..."
