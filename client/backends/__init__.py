"""Backends: what runs the network on a padded segment, behind one small interface.

:class:`~stemserve.pipeline.Backend` is the interface; the implementations are a Triton
server (:mod:`.triton`), several of them (:mod:`.fleet`), ONNX Runtime in-process
(:mod:`.onnx`) and PyTorch (:mod:`.pytorch`), the last two sharing a batching worker
(:mod:`.local`). :func:`open_backend` builds one from a kind and a model name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from stemserve.client.backends.bag import BagBackend
from stemserve.client.models import export_dir_for, load_models, local_export
from stemserve.defaults import (DEFAULT_IN_FLIGHT, DEFAULT_MODEL, DEFAULT_URL, REQUEST_TIMEOUT,
                                TRITON_MODEL)
from stemserve.errors import ModelError
from stemserve.pipeline import Backend
from stemserve.spec import PRECISION_FLAGS, BagSpec, has_precision, load_export

BackendKind = Literal["triton", "onnx", "torch"]
BACKEND_KINDS: tuple[str, ...] = ("triton", "onnx", "torch")


def open_backend(kind: BackendKind = "triton", *, model: str | Path | None = None,
                 config: str | None = None, precision: str | None = None,
                 url: str = DEFAULT_URL, server_window: int = DEFAULT_IN_FLIGHT,
                 shared_memory: bool | None = None, timeout: float = REQUEST_TIMEOUT,
                 retries: int = 3) -> Backend:
    """A backend of ``kind``; close it when done (it is a context manager).

    ``model`` is a release name, a checkpoint file, a bag YAML or an export folder;
    ``config`` names the release whose configuration a plain state-dict file has (as
    ``--config`` does). For Triton it is only checked against what the server serves; the
    in-process backends default to :data:`~stemserve.defaults.DEFAULT_MODEL`. A bag of
    models (``htdemucs_ft``, ``mdx``, ...) is a :class:`~.bag.BagBackend` over one backend
    per member: on Triton, one served model per member, found on the server.

    ``precision``: ``int8`` runs the dynamically quantized graph (quantized once if need
    be; a CPU fast path), ``bf16`` the fp32 graph on OpenVINO with bf16 arithmetic (the
    other), ``fp16`` the half-precision graph; for Triton, what the server must serve (None:
    whatever it serves); for PyTorch, ``fp16``/``bf16`` autocast.

    Triton: ``url`` may name several servers (``host:port,host:port`` or ``@file``, see
    :func:`~stemserve.client.backends.fleet.parse_endpoints`): each member is then a
    :class:`~stemserve.client.backends.fleet.FleetBackend` spreading segments over all of
    them. ``server_window`` requests go to each server at once (and as many shared-memory
    regions are made per server and member); ``shared_memory`` None means when the server
    is on this host; ``timeout`` and ``retries`` apply to each request.
    """
    if kind == "triton":
        backend = _triton_backend(model, url, precision or "fp32", server_window=server_window,
                                  shared_memory=shared_memory, timeout=timeout,
                                  retries=retries)
        problem = None
        if model is not None and local_export(model) is None \
                and Path(model).stem != backend.spec.checkpoint:
            problem = (f"Triton at {url} serves '{backend.spec.checkpoint}', not "
                       f"'{Path(model).stem}': serve that model, or leave -n/--model out")
        elif precision is not None and backend.spec.precision != precision:
            flag = PRECISION_FLAGS.get(precision)
            problem = (f"Triton at {url} serves the {backend.spec.precision} graph of "
                       f"'{backend.spec.checkpoint}', not {precision}: start it with "
                       f"`stemserve serve{' ' + flag if flag else ''}`")
        if problem:
            backend.close()
            raise ModelError(problem)
        return backend
    if kind == "onnx":
        from stemserve.client.backends.onnx import OnnxBackend

        precision = precision or "fp32"
        layout = load_export(export_dir_for(model or DEFAULT_MODEL, config, precision),
                             precision)
        return _bag_or_single(layout.bag, [
            lambda folder=folder: OnnxBackend(folder, precision=precision)
            for folder, _ in layout.members])
    if kind == "torch":
        from stemserve.client.backends.pytorch import TorchBackend

        if precision == "int8":
            raise ModelError("the int8 graph runs on ONNX Runtime: --int8 takes --backend "
                             "onnx or triton, not torch")

        bag = load_models(model or DEFAULT_MODEL, config)
        return _bag_or_single(
            BagSpec(bag.name, tuple(info.name for info in bag.infos),
                    tuple(tuple(row) for row in bag.weights), bag.segment),
            [lambda net=net, info=info: TorchBackend(net, info, segment=bag.segment,
                                                     precision=precision or "fp32")
             for net, info in zip(bag.models, bag.infos)])
    raise ModelError(f"unknown backend {kind!r}: use {', '.join(BACKEND_KINDS)}")


def _triton_backend(model: str | Path | None, url: str, precision: str, **options) -> Backend:
    """The Triton (or fleet) backend of what the servers at ``url`` serve, checked against
    the local export ``model`` names (its ``precision`` graph), if any."""
    from stemserve.client.backends.fleet import FleetBackend, parse_endpoints
    from stemserve.client.backends.triton import ServerUnreachable, TritonBackend, served_bag

    local = local_export(model)
    layout = None
    if local is not None and has_precision(local, precision):
        layout = load_export(local, precision)
    elif local is not None:
        layout = load_export(local)
    urls = parse_endpoints(url)
    if layout is not None:
        bag = layout.bag if len(layout.members) > 1 else None
    else:
        bag, unreachable = None, None
        for server in urls:  # the first that answers says what the fleet serves
            try:
                bag = served_bag(server)
                break
            except ServerUnreachable as err:
                unreachable = err
        else:
            raise unreachable
    specs = dict((spec.model_name, spec) for _, spec in layout.members) if layout else {}
    server_window = options.pop("server_window")

    def member(name: str):
        def connect():
            if len(urls) == 1:
                return TritonBackend(urls[0], name, shm_slots=server_window,
                                     spec=specs.get(name), **options)
            return FleetBackend(urls, name, server_window=server_window,
                                spec=specs.get(name), **options)
        return connect

    if bag is None:
        return member(TRITON_MODEL)()
    return _bag_or_single(bag, [member(name) for name in bag.members])


def _bag_or_single(bag: BagSpec, connect: list[Callable[[], Backend]]) -> Backend:
    """One backend per member (closing those opened if one fails), as a
    :class:`~.bag.BagBackend` when there are several or the weights are not all one."""
    members: list[Backend] = []
    try:
        for opener in connect:
            members.append(opener())
        if len(members) == 1 and all(w == 1 for row in bag.weights for w in row):
            return members[0]
        return BagBackend(members, bag.weights, bag.name)
    except BaseException:
        for opened in members:
            opened.close()
        raise
