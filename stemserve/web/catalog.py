"""The models the web service offers, each opened once and shared by every job.

Backends are shared by every job and worker: a Triton backend is one gRPC channel that takes
concurrent requests, and an in-process one batches whatever its callers queue. Jobs name a
model by a name from :meth:`ModelCatalog.models`, never by a path, so an upload form cannot
make the server load an arbitrary file.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Literal

from stemserve.client import open_backend
from stemserve.client.models import keyed_exports, local_export
from stemserve.connection import ConnectionOptions
from stemserve.defaults import DEFAULT_MODEL
from stemserve.errors import ModelError, StemserveError
from stemserve.pipeline import Backend
from stemserve.releases import KNOWN_MODELS
from stemserve.spec import ModelSpec, is_export, load_export

logger = logging.getLogger(__name__)


class ModelCatalog:
    """Opens and shares backends by model name.

    With ``triton_url`` every job goes to that server, which serves one model (``model``
    may name its export folder when the server's config carries no sidecar). Without it,
    jobs run in-process with ONNX Runtime on ``model`` (default: the command line's) or on
    any other exported or cached model. ``config`` is the release whose configuration a
    plain state-dict ``model`` has; ``precision`` ``int8`` runs the int8 graphs, ``bf16``
    the fp32 ones on OpenVINO in bf16 (see
    :func:`~stemserve.client.backends.open_backend`); ``connection`` how requests go to
    Triton (its URL is ``triton_url``).

    Nothing opens until :meth:`open`, so that the caller decides what must succeed first.
    """

    def __init__(self, triton_url: str | None = None, model: str | None = None,
                 config: str | None = None, precision: str | None = None,
                 connection: ConnectionOptions | None = None):
        self.triton_url = triton_url
        self._connection = connection or ConnectionOptions()
        self._default = model or DEFAULT_MODEL
        self._given = model
        self._config = config
        self._precision = precision
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._served: str | None = None
        self._damaged: set[Path] = set()

    def open(self) -> None:
        """Open the default model's backend: a server that does not answer, or a model that
        cannot be downloaded, exported or loaded, raises its error now, not on every job."""
        if self.triton_url:
            backend = open_backend("triton", model=self._given, config=self._config,
                                   precision=self._precision, connection=dataclasses.replace(
                                       self._connection, url=self.triton_url))
            self._served = backend.spec.checkpoint
            self._backends[self._served] = backend
            logger.info("separating on the Triton server at %s (model %s)", self.triton_url,
                        self._served)
        else:
            logger.info("opening %s to separate in-process (exported first if need be)",
                        self._default)
            self.backend(_model_name(self._default))

    @property
    def kind(self) -> Literal["triton", "onnx"]:
        return "triton" if self.triton_url else "onnx"

    def models(self) -> dict[str, str]:
        """{name: what open_backend takes}, the default first.

        Triton: the served model. In-process: the default model, every export under the
        export root (a release by its name, a local model by its own unless a release or
        another entry has it, then by its folder's), and every release whose checkpoint is
        cached (exported on first use, which needs PyTorch).
        """
        return {name: target for name, (target, _) in self._entries().items()}

    def describe(self, name: str) -> str:
        """What model ``name`` is, for a user choosing: release or local file (and where),
        its family and checkpoint's sha256 where known."""
        entry = self._entries().get(name)
        if entry is None:
            raise ModelError(f"model {name!r} is not available here")
        return entry[1]

    def _entries(self) -> dict[str, tuple[str, str]]:
        """{name: (target, description)}, the default first."""
        if self._served is not None:
            backend = self._backends[self._served]
            return {self._served: (self._served, f"served by {backend.where}: "
                                                 f"{_spec_text(backend.spec)}")}
        entries: dict[str, tuple[str, str]] = {}
        default = _model_name(self._default)
        opened = self._backends.get(default)
        entries[default] = (self._default, _spec_text(opened.spec) if opened is not None
                            else f"{self._default}, not opened yet")
        for folder, source in keyed_exports():
            try:
                spec = load_export(folder).spec
            except StemserveError as err:  # a damaged export is not offered, and said once
                if folder not in self._damaged:
                    self._damaged.add(folder)
                    logger.warning("not offering %s: %s", folder, err)
                continue
            text = f"{source.describe()}, {_spec_text(spec)}"
            if source.kind == "release":
                entries.setdefault(source.name, (source.name, text))
            elif source.name in KNOWN_MODELS or source.name in entries:
                entries.setdefault(folder.name, (str(folder), text))
            else:
                entries[source.name] = (str(folder), text)
        for release in _cached_releases():
            entries.setdefault(release, (release, f"release {release}, downloaded, exported "
                                                  "on its first job"))
        return entries

    def backend(self, name: str) -> Backend:
        """The shared backend of model ``name``, opened (and exported) on first use."""
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        with self._lock:
            if name not in self._backends:
                models = self.models()
                if name not in models:
                    raise ModelError(f"model {name!r} is not available here; choose one "
                                     f"of {', '.join(models)}")
                config = self._config if models[name] == self._default else None
                self._backends[name] = open_backend("onnx", model=models[name], config=config,
                                                    precision=self._precision)
            return self._backends[name]

    def sources(self, name: str) -> tuple[str, ...] | None:
        """The stems model ``name`` separates, when known without loading it: from its open
        backend or its export's sidecar; None for a release not exported yet."""
        backend = self._backends.get(name)
        if backend is not None:
            return tuple(backend.spec.sources)
        target = self.models().get(name)
        folder = None if target is None else local_export(target)
        return None if folder is None else tuple(load_export(folder).spec.sources)

    def close(self) -> None:
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            backend.close()


def _model_name(model: str) -> str:
    """How the page names ``model``: an export folder by its model (or bag), else by its
    stem."""
    if is_export(Path(model)):
        return load_export(Path(model)).bag.name
    return Path(model).stem


def _spec_text(spec: ModelSpec) -> str:
    """A served or exported model in a few words: family, checkpoint sha256, precision."""
    return (f"{spec.rules.title}, sha256 {spec.checkpoint_sha256[:8]}, {spec.precision}, "
            f"{len(spec.sources)} stems")


def _cached_releases() -> list[str]:
    """Release names whose checkpoint is in torch hub's cache; none without PyTorch."""
    if importlib.util.find_spec("torch") is None:
        return []
    from stemserve.checkpoints import KNOWN_MODELS, checkpoint_cache_dir, checkpoint_files

    folder = checkpoint_cache_dir()
    return [name for name in KNOWN_MODELS
            if all((folder / file).is_file() for file in checkpoint_files(name))]
