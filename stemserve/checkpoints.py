"""Demucs v2 checkpoints: resolve a release, download it once, verify it, load it safely.

The release files are those of demucs 2.0.3 (``demucs/pretrained.py``): the first 8 hex
digits of a file's sha256 are part of its name, so every file is checked against its name
before use, exactly like ``torch.hub`` does. Files land in torch hub's checkpoint folder,
where demucs itself put them, so an existing cache is reused.

Checkpoints are pickles. They are read with torch's ``weights_only`` unpickler and a short
allowlist, which maps the demucs class a training package names onto stemserve's own
:class:`~stemserve.model.Demucs`: demucs need not be installed and no pickled code runs.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import inspect
import io
import logging
import os
import re
import secrets
import threading
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
import tqdm

from stemserve.errors import StemserveError
from stemserve.model import SOURCES, Demucs

logger = logging.getLogger(__name__)

ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/v3.0/"
URL_ENV = "STEMSERVE_CHECKPOINT_URL"
"""Environment variable that replaces :data:`ROOT_URL` (mirrors, air-gapped hosts, tests)."""

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

# What a demucs checkpoint may name besides torch's own tensor machinery. The training
# package pickles the demucs class and its argparse arguments (paths included); a quantized
# state names its quantizer class, which is never called, so it resolves to a plain string.
_SAFE_GLOBALS: list[Any] = [
    (Demucs, "demucs.model.Demucs"),
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


class CheckpointError(StemserveError):
    """A checkpoint could not be resolved, downloaded, verified or loaded."""


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
    """URL of release ``name`` under ``base_url``, else $STEMSERVE_CHECKPOINT_URL, else ROOT."""
    base = base_url or os.environ.get(URL_ENV) or ROOT_URL
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
    other value is a file: either a plain state dict, built with the release configuration
    ``config`` (default :data:`DEFAULT_CONFIG`), or a demucs 2.x training package, which
    carries its own configuration.
    """
    if isinstance(name_or_path, str) and _is_release_name(name_or_path):
        name = name_or_path
        if config not in (None, name):
            raise CheckpointError(f"config={config!r} applies to local files only; "
                                  f"release {name!r} has its own configuration")
        path, sha256 = _fetch(name, cache_dir, base_url, progress)
        model, used = _from_state(_torch_load(path, str(path)), name, str(path))
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file at {path}")
        name, sha256 = path.stem, _sha256(path)
        loaded = _torch_load(path, str(path))
        if _is_package(loaded):
            if config is not None:
                warnings.warn(f"{path} is a training package with its own configuration; "
                              f"ignoring config={config!r}", stacklevel=2)
            model, used = _from_package(loaded, str(path))
        else:
            model, used = _from_state(loaded, config or DEFAULT_CONFIG, str(path))
    return model.eval(), CheckpointInfo(name=name, path=path, sha256=sha256, config=used)


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
    """Verified cached file of release ``name`` and its sha256; downloads it if needed."""
    signature = _release(name).signature
    folder = Path(cache_dir) if cache_dir is not None else checkpoint_cache_dir()
    path = folder / _file_name(name)
    if path.is_file():
        sha256 = _sha256(path)
        if sha256.startswith(signature):
            return path, sha256
        logger.warning("removing %s: its sha256 %s does not match its name", path, sha256[:8])
        path.unlink(missing_ok=True)
    url = checkpoint_url(name, base_url=base_url)
    folder.mkdir(parents=True, exist_ok=True)
    return path, _download(url, path, signature, progress)


def _download(url: str, path: Path, signature: str, progress: bool) -> str:
    """Stream ``url`` next to ``path``, verify it, then move it into place atomically.

    The partial file never carries the final name, so an interrupted or corrupt download
    can never be mistaken for a cached checkpoint.
    """
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        digest, received, expected = hashlib.sha256(), 0, None
        # "xb" rather than mkstemp: the cached file gets the usual umask permissions.
        with open(partial, "xb") as out:
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
            except (OSError, http.client.HTTPException) as exc:
                raise CheckpointError(
                    f"could not download {url} ({exc}) and {path.parent} holds no valid "
                    f"{path.name}; connect to the network or copy that file there") from exc
        if expected is not None and received != expected:
            raise CheckpointError(f"download of {url} was cut short ({received} of "
                                  f"{expected} bytes); nothing was kept, try again")
        sha256 = digest.hexdigest()
        if not sha256.startswith(signature):
            raise CheckpointError(f"checksum mismatch for {url}: sha256 starts with "
                                  f"{sha256[:8]}, the file name says {signature}; "
                                  f"the download was discarded")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return sha256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
        except Exception as exc:
            refused = re.search(r"GLOBAL (\S+)", str(exc))  # torch's refusal of a global
            if refused:
                raise CheckpointError(_refusal(what, [refused.group(1)])) from exc
            raise CheckpointError(f"{what} is not a Demucs checkpoint that can be loaded "
                                  f"safely: {_load_failure(exc)}") from exc


def _refusal(what: str, names: list[str]) -> str:
    return (f"{what} refers to {', '.join(names)}, which a Demucs checkpoint never needs; "
            f"refused without running it")


def _load_failure(exc: Exception) -> str:
    """The reason inside torch's weights_only error, without its advice to unpickle unsafely."""
    paragraphs = [text.strip() for text in str(exc).split("\n\n")
                  if text.strip() and not text.strip().startswith("Check the documentation")]
    return f"{type(exc).__name__}: {paragraphs[-1]}" if paragraphs else type(exc).__name__


def _is_package(obj: Any) -> bool:
    return isinstance(obj, Mapping) and {"klass", "kwargs", "state"} <= obj.keys()


def _build(args: tuple, kwargs: dict[str, Any], what: str) -> tuple[Demucs, dict[str, Any]]:
    """A fresh :class:`Demucs` and every argument it was built with."""
    try:
        bound = inspect.signature(Demucs).bind(*args, **kwargs)
    except TypeError as exc:
        raise CheckpointError(f"{what}: bad Demucs arguments ({exc})") from exc
    bound.apply_defaults()
    used = dict(bound.arguments)
    used["sources"] = list(used["sources"])
    return Demucs(**used), used


def _from_state(state: Any, config: str, what: str) -> tuple[Demucs, dict[str, Any]]:
    """Model of release configuration ``config`` holding a plain or compressed state dict."""
    release = _release(config, what="configuration")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} holds a {type(state).__name__}, not a state dict")
    model, used = _build((), {"sources": SOURCES, **release.config}, what)
    fits = f"the {config!r} configuration, {_describe(used)} (choose another with config=)"
    if "compressed" in state:
        # demucs_quantized, as demucs/pretrained.py restores it.
        diffq = _import_diffq(what)
        _restore_quantized(model, state,
                           lambda m: diffq.DiffQuantizer(m, group_size=8, min_size=1), what, fits)
    else:
        _load_state_dict(model, state, what, fits)
    return model, used


def _from_package(package: Mapping[str, Any], what: str) -> tuple[Demucs, dict[str, Any]]:
    """Model of a demucs 2.x training package, restored like demucs' ``load_model``."""
    if package["klass"] is not Demucs:
        raise CheckpointError(f"{what} holds a {package['klass']!r}, not a demucs.model.Demucs")
    kwargs = dict(package["kwargs"])
    parameters = inspect.signature(Demucs).parameters
    for key in [key for key in kwargs if key not in parameters]:
        warnings.warn(f"{what}: dropping unknown Demucs parameter {key!r}", stacklevel=3)
        del kwargs[key]
    model, used = _build(tuple(package.get("args", ())), kwargs, what)
    fits = f"its own configuration, {_describe(used)}"
    training = package.get("training_args")
    min_size = getattr(training, "q_min_size", 1)
    if getattr(training, "diffq", 0):
        diffq = _import_diffq(what)
        _restore_quantized(model, package["state"],
                           lambda m: diffq.DiffQuantizer(m, min_size=min_size, group_size=8),
                           what, fits)
    elif getattr(training, "qat", None):
        diffq = _import_diffq(what)
        _restore_quantized(model, package["state"],
                           lambda m: diffq.UniformQuantizer(m, bits=training.qat,
                                                            min_size=min_size),
                           what, fits)
    else:
        _load_state_dict(model, package["state"], what, fits)
    return model, used


def _describe(config: Mapping[str, Any]) -> str:
    defaults = inspect.signature(Demucs).parameters
    changed = [f"{key}={value!r}" for key, value in config.items()
               if key != "sources" and value != defaults[key].default]
    return f"Demucs({', '.join(changed)})"


def _load_state_dict(model: Demucs, state: Any, what: str, fits: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{what} does not fit {fits}:\n{_first_lines(exc)}") from exc


def _import_diffq(what: str) -> Any:
    """diffq, imported only for the compressed checkpoints that need it."""
    try:
        import diffq
    except ImportError as exc:
        raise CheckpointError(f"{what} is stored quantized; loading it needs diffq "
                              f"(pip install diffq==0.2.4)") from exc
    return diffq


def _restore_quantized(model: Demucs, state: Any, make_quantizer: Callable[[Demucs], Any],
                       what: str, fits: str) -> None:
    """demucs' ``set_state`` for ``{'compressed': zlib(torch.save(quantized_state))}``.

    The quantizer is detached afterwards: its hooks go, the dequantized float weights stay.
    """
    try:
        raw = zlib.decompress(state["compressed"])
    except (KeyError, TypeError, zlib.error) as exc:
        raise CheckpointError(f"{what}: no valid compressed quantized state ({exc})") from exc
    quantized = _torch_load(raw, f"the quantized state in {what}")
    quantizer = make_quantizer(model)
    try:
        quantizer.restore_quantized_state(quantized)
    except (AssertionError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the quantized state in {what} does not fit {fits}:\n"
                              f"{_first_lines(exc) or type(exc).__name__}") from exc
    quantizer.detach()


def _first_lines(exc: Exception, count: int = 4, limit: int = 1000) -> str:
    """The start of a long torch error (it lists every mismatching tensor)."""
    text = "\n".join(str(exc).strip().splitlines()[:count])
    return text if len(text) <= limit else text[:limit] + " ..."
