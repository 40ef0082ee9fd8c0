"""Backends: what runs the network on a padded segment, behind one small interface.

:class:`~stemserve.pipeline.Backend` is the interface; the implementations are a Triton
server (:mod:`.triton`), several of them (:mod:`.fleet`), ONNX Runtime in-process
(:mod:`.onnx`) and PyTorch (:mod:`.pytorch`), the last two sharing a batching worker
(:mod:`.local`). :func:`open_backend` builds one from a kind and a model name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from stemserve.client.models import export_dir_for, load_checkpoint, local_export
from stemserve.defaults import DEFAULT_IN_FLIGHT, DEFAULT_MODEL, DEFAULT_URL, REQUEST_TIMEOUT
from stemserve.errors import ModelError
from stemserve.pipeline import Backend
from stemserve.spec import load_export_spec

BackendKind = Literal["triton", "onnx", "torch"]
BACKEND_KINDS: tuple[str, ...] = ("triton", "onnx", "torch")


def open_backend(kind: BackendKind = "triton", *, model: str | Path | None = None,
                 config: str | None = None, url: str = DEFAULT_URL,
                 server_window: int = DEFAULT_IN_FLIGHT, shared_memory: bool | None = None,
                 timeout: float = REQUEST_TIMEOUT, retries: int = 3) -> Backend:
    """A backend of ``kind``; close it when done (it is a context manager).

    ``model`` is a release name, a checkpoint file or an export folder; ``config`` names the
    release whose configuration a plain state-dict file has (as ``--config`` does). For
    Triton it is only checked against what the server serves; the in-process backends
    default to :data:`~stemserve.defaults.DEFAULT_MODEL`.

    Triton: ``url`` may name several servers (``host:port,host:port`` or ``@file``, see
    :func:`~stemserve.client.backends.fleet.parse_endpoints`): the backend is then a
    :class:`~stemserve.client.backends.fleet.FleetBackend` spreading segments over all of
    them. ``server_window`` requests go to each server at once (and as many shared-memory
    regions are made per server); ``shared_memory`` None means when the server is on this
    host; ``timeout`` and ``retries`` apply to each request.
    """
    if kind == "triton":
        from stemserve.client.backends.fleet import FleetBackend, parse_endpoints
        from stemserve.client.backends.triton import TritonBackend

        local = local_export(model)
        spec = None if local is None else load_export_spec(local)
        urls = parse_endpoints(url)
        backend: Backend
        if len(urls) == 1:
            backend = TritonBackend(urls[0], timeout=timeout, retries=retries,
                                    shared_memory=shared_memory, shm_slots=server_window,
                                    spec=spec)
        else:
            backend = FleetBackend(urls, timeout=timeout, retries=retries,
                                   shared_memory=shared_memory, server_window=server_window,
                                   spec=spec)
        if model is not None and local is None and Path(model).stem != backend.spec.checkpoint:
            backend.close()
            raise ModelError(f"Triton at {url} serves '{backend.spec.checkpoint}', not "
                             f"'{Path(model).stem}': serve that model, or leave -n/--model out")
        return backend
    if kind == "onnx":
        from stemserve.client.backends.onnx import OnnxBackend

        return OnnxBackend(export_dir_for(model or DEFAULT_MODEL, config))
    if kind == "torch":
        from stemserve.client.backends.pytorch import TorchBackend

        return TorchBackend(*load_checkpoint(model or DEFAULT_MODEL, config))
    raise ModelError(f"unknown backend {kind!r}: use {', '.join(BACKEND_KINDS)}")
