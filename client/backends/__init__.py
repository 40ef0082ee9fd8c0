"""Backends: what runs the network on a padded segment, behind one small interface.

:class:`~stemserve.pipeline.Backend` is the interface; the implementations are a Triton
server (:mod:`.triton`), several of them (:mod:`.fleet`), a server that runs the whole
pipeline and streams the stems back (:mod:`.triton_stream`), ONNX Runtime in-process
(:mod:`.onnx`) and PyTorch (:mod:`.pytorch`), the last two sharing a batching worker
(:mod:`.local`). :func:`open_backend` builds one from a kind and a model name.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Literal

from stemserve.client.backends.bag import BagBackend
from stemserve.client.models import export_dir_for, load_models, local_export, served_mismatch
from stemserve.connection import ConnectionOptions
from stemserve.defaults import DEFAULT_MODEL, TRITON_MODEL
from stemserve.errors import ModelError
from stemserve.pipeline import Backend, bag_of
from stemserve.precision import asked_as, check_precision, row
from stemserve.spec import BagSpec, has_precision, load_export
from stemserve.untrusted import safe_name

logger = logging.getLogger(__name__)

BackendKind = Literal["triton", "triton-stream", "onnx", "torch"]
BACKEND_KINDS: tuple[str, ...] = ("triton", "triton-stream", "onnx", "torch")


def open_backend(kind: BackendKind = "triton", *, model: str | Path | None = None,
                 config: str | None = None, precision: str | None = None,
                 autocast: str | None = None,
                 connection: ConnectionOptions | str | None = None) -> Backend:
    """A backend of ``kind``; close it when done (it is a context manager).

    ``model`` is a release name, a checkpoint file, a bag YAML or an export folder;
    ``config`` names the release whose configuration a plain state-dict file has (as
    ``--config`` does). For Triton it is only checked against what the server serves; the
    in-process backends default to :data:`~stemserve.defaults.DEFAULT_MODEL`. A bag of
    models (``htdemucs_ft``, ``mdx``, ...) is a :class:`~.bag.BagBackend` over one backend
    per member: on Triton, one served model per member, found on the server.

    ``precision`` names a graph of the export (:mod:`stemserve.precision`): ``int8`` runs
    the dynamically quantized graph (quantized once if need be; a CPU fast path), ``bf16``
    the fp32 graph on OpenVINO with bf16 arithmetic (the other), ``fp16`` the
    half-precision graph; for Triton, what the server must serve (None: whatever it
    serves). PyTorch runs the module, not a graph: fp32 only, and ``autocast`` (``fp16`` or
    ``bf16``) runs it under ``torch.autocast`` instead.

    Triton: ``connection`` (:class:`~stemserve.connection.ConnectionOptions`, or just its
    URL; None: the defaults) says where and how. Its URL may name several servers
    (``host:port,host:port`` or ``@file``, see
    :func:`~stemserve.client.backends.fleet.parse_endpoints`): each member is then a
    :class:`~stemserve.client.backends.fleet.FleetBackend` spreading segments over all of
    them. ``server_window`` requests go to each server at once (and as many shared-memory
    regions are made per server and member); ``shared_memory`` None means when the server
    is on this host; ``timeout``, ``retries`` and ``backoff`` apply to each request.
    """
    if precision is not None:
        precision = check_precision(precision, backend=kind, error=ModelError).value
    if autocast is not None and kind != "torch":
        raise ModelError(f"autocast is PyTorch's: it takes the torch backend, not {kind}")
    if kind in ("triton", "triton-stream"):
        if not isinstance(connection, ConnectionOptions):
            connection = ConnectionOptions(**({} if connection is None else {"url": connection}))
        url = connection.url
        local = local_export(model, config)
        backend = (_triton_backend(local, precision or "fp32", connection) if kind == "triton"
                   else _stream_backend(connection))
        served = backend.spec
        problem = None if model is None else served_mismatch(local or model, config, served)
        if problem is None and precision is not None and served.precision != precision:
            problem = (f"serves the {served.precision} graph of '{served.checkpoint}', not "
                       f"{precision}: start it with `stemserve serve"
                       f"{'' if precision == 'fp32' else ' ' + asked_as(precision)}`")
        if problem:
            backend.close()
            raise ModelError(f"Triton at {url} {problem}")
        if precision is None and not row(served.precision).exact:
            logger.warning("Triton at %s serves the %s graph of '%s', not the exact fp32 one: "
                           "its stems differ slightly from demucs' (%s asks for it; leave it "
                           "out of `stemserve serve` for the exact path)", url,
                           served.precision, served.checkpoint,
                           asked_as(served.precision))
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

        bag = load_models(model or DEFAULT_MODEL, config)
        return _bag_or_single(
            BagSpec(safe_name(bag.name), tuple(safe_name(info.name) for info in bag.infos),
                    tuple(tuple(row) for row in bag.weights), bag.segment),
            [lambda net=net, info=info: TorchBackend(net, info, segment=bag.segment,
                                                     autocast=autocast)
             for net, info in zip(bag.models, bag.infos)])
    raise ModelError(f"unknown backend {kind!r}: use {', '.join(BACKEND_KINDS)}")


def describe_backend(backend: Backend, verbose: bool = False) -> str:
    """Which model, checkpoint, precision and server produce the stems: one line, and with
    ``verbose`` one more per model (its whole sha256, segment and stems)."""
    spec = backend.spec
    members = list({id(member): member for member in bag_of(backend)[0]}.values())
    what = (f"{spec.rules.title}, sha256 {spec.checkpoint_sha256[:8]}" if len(members) == 1
            else f"a bag of {len(bag_of(backend)[0])} {spec.rules.title} models")
    line = f"{spec.checkpoint} ({what}, {spec.precision}) on {backend.where}"
    if verbose:
        for member in members:
            detail = member.spec
            line += (f"\n  {detail.checkpoint}: sha256 {detail.checkpoint_sha256}, segment "
                     f"{detail.segment_seconds:g} s, {detail.sample_rate} Hz, stems "
                     f"{', '.join(detail.sources)}")
    return line


def output_folder_name(spec) -> str:
    """The folder under ``-o`` a model's stems go to, as demucs names it (the model), and
    the precision too when it is not the exact fp32, so stems of two precisions never mix."""
    return spec.checkpoint if row(spec.precision).exact else f"{spec.checkpoint}-{spec.precision}"


def _triton_backend(local: Path | None, precision: str,
                    connection: ConnectionOptions) -> Backend:
    """The Triton (or fleet) backend of what the servers at the ``connection``'s URL serve,
    checked against the ``local`` export of the model asked for (its ``precision`` graph),
    if any."""
    from stemserve.client.backends.fleet import FleetBackend, parse_endpoints
    from stemserve.client.backends.triton import ServerUnreachable, TritonBackend, served_bag

    layout = None
    if local is not None and has_precision(local, precision):
        layout = load_export(local, precision)
    elif local is not None:
        layout = load_export(local)
    urls = parse_endpoints(connection.url)
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
    options = dict(shared_memory=connection.shared_memory, timeout=connection.timeout,
                   retries=connection.retries, backoff=connection.backoff)

    def member(name: str):
        def connect():
            if len(urls) == 1:
                return TritonBackend(urls[0], name, shm_slots=connection.server_window,
                                     spec=specs.get(name), **options)
            return FleetBackend(urls, name, server_window=connection.server_window,
                                spec=specs.get(name), **options)
        return connect

    if bag is None:
        return member(TRITON_MODEL)()
    return _bag_or_single(bag, [member(name) for name in bag.members])


def _stream_backend(connection: ConnectionOptions) -> Backend:
    """The pipeline on the one server at the ``connection``'s URL (a fleet shares segments,
    which only the client's pipeline cuts)."""
    from stemserve.client.backends.fleet import parse_endpoints
    from stemserve.client.backends.triton_stream import TritonStreamBackend

    urls = parse_endpoints(connection.url)
    if len(urls) != 1:
        raise ModelError(f"--backend triton-stream runs the track on one server, not "
                         f"{len(urls)}: use --backend triton for a fleet")
    return TritonStreamBackend(urls[0], timeout=connection.timeout)


def _bag_or_single(bag: BagSpec, connect: list[Callable[[], Backend]]) -> Backend:
    """One backend per member (closing those opened if one fails), as a
    :class:`~.bag.BagBackend` when there are several or the weights are not all one.

    A model a bag lists twice (``repro_mdx_a_hybrid_only``) is opened once and listed twice:
    the pipeline still runs it once per listing, as demucs does (with shifts, each draws
    its own)."""
    opened: dict[str, Backend] = {}
    try:
        for name, opener in zip(bag.members, connect, strict=True):
            if name not in opened:
                opened[name] = opener()
        members = [opened[name] for name in bag.members]
        if len(members) == 1 and all(w == 1 for row in bag.weights for w in row):
            return members[0]
        return BagBackend(members, bag.weights, bag.name)
    except BaseException:
        for backend in opened.values():
            backend.close()
        raise
