"""The web service's side of the client library: which models it offers, and running a job.

Backends are opened once and shared by every job and worker: a Triton backend is one gRPC
channel that takes concurrent requests, and an in-process one batches whatever its callers
queue. Jobs name a model by a name from :meth:`Separator.models`, never by a path, so an
upload form cannot make the server load an arbitrary file.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

from stemserve.audio import OutputFormat
from stemserve.defaults import DEFAULT_MODEL, export_root
from stemserve.client.api import open_backend, separate_file
from stemserve.client.onnx_backend import load_export_spec
from stemserve.errors import StemserveError
from stemserve.pipeline import Backend
from stemserve.web.jobs import STEMS, Job, ProgressCallback

logger = logging.getLogger(__name__)

SOURCES = ("drums", "bass", "other", "vocals")
"""What every Demucs v2 release separates (the page offers two-stems mode for each)."""
FORMATS: dict[str, OutputFormat] = {
    "wav": OutputFormat("wav", "int16"),
    "wav24": OutputFormat("wav", "int24"),
    "wav32f": OutputFormat("wav", "float32"),
    "flac": OutputFormat("flac", "int16"),
    "flac24": OutputFormat("flac", "int24"),
    "mp3": OutputFormat("mp3", "int16", 320),
}
DEFAULT_FORMAT = "wav"
"""The command line's default: 16-bit WAV."""
STEM_TEMPLATE = "{stem}.{ext}"


class Separator:
    """Opens and shares backends; runs one job through :func:`separate_file`.

    With ``triton_url`` every job goes to that server, which serves one model (``model``
    may name its export folder when the server's config carries no sidecar). Without it,
    jobs run in-process with ONNX Runtime on ``model`` (default: the command line's) or on
    any other exported or cached model. ``config`` is the release whose configuration a
    plain state-dict ``model`` has.

    The default model's backend opens here, so a server that does not answer or a model
    that cannot be downloaded, exported or loaded raises its :class:`StemserveError` now,
    before the service takes uploads.
    """

    def __init__(self, triton_url: str | None = None, model: str | None = None,
                 config: str | None = None):
        self.triton_url = triton_url
        self._default = model or DEFAULT_MODEL
        self._config = config
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        self._served: str | None = None
        if triton_url:
            backend = open_backend("triton", url=triton_url, model=model, config=config)
            self._served = backend.spec.checkpoint
            self._backends[self._served] = backend
            logger.info("separating on the Triton server at %s (model %s)", triton_url,
                        self._served)
        else:
            logger.info("opening %s to separate in-process (exported first if need be)",
                        self._default)
            self.backend(_model_name(self._default))

    @property
    def backend_kind(self) -> str:
        return "triton" if self.triton_url else "onnx"

    def models(self) -> dict[str, str]:
        """{name: what open_backend takes}, the default first.

        Triton: the served model. In-process: the default model, every export under
        the export root, and every release whose checkpoint is cached (exported on first
        use, which needs PyTorch).
        """
        if self._served is not None:
            return {self._served: self._served}
        models = {_model_name(self._default): self._default}
        for sidecar in sorted(export_root().glob("*/model.json")):
            models.setdefault(sidecar.parent.name, str(sidecar.parent))
        for release in _cached_releases():
            models.setdefault(release, release)
        return models

    def backend(self, name: str) -> Backend:
        """The shared backend of model ``name``, opened (and exported) on first use."""
        backend = self._backends.get(name)
        if backend is not None:
            return backend
        with self._lock:
            if name not in self._backends:
                models = self.models()
                if name not in models:
                    raise StemserveError(f"model {name!r} is not available here; choose one "
                                         f"of {', '.join(models)}")
                config = self._config if models[name] == self._default else None
                self._backends[name] = open_backend("onnx", model=models[name], config=config)
            return self._backends[name]

    def separate(self, job: Job, on_progress: ProgressCallback) -> dict[str, Path]:
        """The :data:`~stemserve.web.jobs.Runner` of the web service."""
        options = job.options
        return separate_file(job.upload_path, job.folder / STEMS,
                             backend=self.backend(options["model"]), template=STEM_TEMPLATE,
                             fmt=FORMATS[options["format"]], two_stems=options["two_stems"],
                             shifts=options["shifts"], progress=on_progress)

    def close(self) -> None:
        with self._lock:
            backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            backend.close()


def _model_name(model: str) -> str:
    """How the page names ``model``: an export folder by its checkpoint, else by its stem."""
    if (Path(model) / "model.json").is_file():
        return load_export_spec(Path(model)).checkpoint
    return Path(model).stem


def _cached_releases() -> list[str]:
    """Release names whose checkpoint is in torch hub's cache; none without PyTorch."""
    if importlib.util.find_spec("torch") is None:
        return []
    from stemserve.checkpoints import KNOWN_MODELS, checkpoint_cache_dir, checkpoint_url

    folder = checkpoint_cache_dir()
    return [name for name in KNOWN_MODELS
            if (folder / checkpoint_url(name).rsplit("/", 1)[-1]).is_file()]
