"""The ``stemserve`` command: a thin layer over the library, one sub-command per job.

``export`` (ONNX, and a TensorRT engine on a GPU host), ``serve`` (a Triton server),
``separate`` (tracks into stems), ``web`` (the upload page) and ``repository`` (fill or
check a Triton model repository). Every failure is printed the same way
(:func:`~stemserve.errors.print_error`), with exit code 1; an interrupt exits with 130.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from stemserve.defaults import (DEFAULT_IN_FLIGHT, DEFAULT_MODEL, DEFAULT_URL, REQUEST_TIMEOUT,
                                TRITON_URL_ENV, repository_root, triton_url_from_env)
from stemserve.errors import ServerError, StemserveError, print_error


INT8_HELP = ("the int8 graph (dynamic quantization of the LSTM and matrix products; "
             "opt-in: the stems differ slightly from demucs', by the SDR the README's "
             "Benchmarks section gives)")
BF16_HELP = ("bf16 arithmetic: OpenVINO runs the fp32 graph on a CPU with AMX or AVX512_BF16 "
             "(the 'openvino' extra; opt-in: the stems differ slightly from demucs', by the "
             "SDR the README's Benchmarks section gives; slower than fp32 for Demucs v2 on "
             "CPUs without AMX)")


def _add_cpu_fast_paths(parser: argparse.ArgumentParser, suffix: str) -> None:
    """``--int8`` or ``--bf16``: the two CPU fast paths, one at a time."""
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--int8", action="store_true", help=INT8_HELP + suffix)
    paths.add_argument("--bf16", action="store_true", help=BF16_HELP + suffix)


def _precision(args: argparse.Namespace) -> str:
    """The export variant ``--int8``/``--bf16`` ask for, else fp32."""
    return "int8" if args.int8 else "bf16" if args.bf16 else "fp32"


def _seconds(text: str) -> float:
    """A number of seconds above 0 for a flag (argparse names the flag when it refuses)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _add_model(parser: argparse.ArgumentParser, default: str | None, help_text: str) -> None:
    """``-n/--model`` and ``--config``: the one way every command names a model."""
    parser.add_argument("-n", "--model", default=default, help=help_text)
    parser.add_argument("--config", default=None, metavar="RELEASE",
                        help="release whose configuration a plain state-dict checkpoint given "
                             "with -n has (e.g. demucs48_hq; default: demucs)")


# ---------------------------------------------------------------------------------------------
# export

def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a Demucs model to ONNX with its sidecar "
                                           "(and build a TensorRT engine on a GPU host)")
    _add_model(parser, DEFAULT_MODEL, "release name or checkpoint path (default: %(default)s)")
    parser.add_argument("--segment", type=_seconds, default=None,
                        help="segment length in seconds (default: the model's training "
                             "segment, what demucs' apply_model splits by)")
    parser.add_argument("--fp16", action="store_true", help="also write an fp16 graph")
    parser.add_argument("--int8", action="store_true",
                        help="also write the int8 graph, the CPU fast path (ONNX Runtime's "
                             "dynamic quantization of the LSTM and matrix products)")
    parser.add_argument("--bf16", action="store_true",
                        help="also write the bf16 sidecar, the CPU fast path on OpenVINO (the "
                             "fp32 graph run with bf16 arithmetic)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output folder (default: <cache>/export/<model>, where every "
                             "command looks for it; the cache is $STEMSERVE_CACHE or "
                             "~/.cache/stemserve)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the PyTorch vs ONNX Runtime parity check")
    tensorrt = parser.add_argument_group(
        "TensorRT", "build model.plan for the gpu-trt repository with trtexec (on the GPU "
                    "host that serves it), from the export (made first if need be)")
    tensorrt.add_argument("--tensorrt", action="store_true", help="build the engine")
    tensorrt.add_argument("--max-batch", type=int, default=8,
                          help="largest batch of the engine (default: %(default)s)")
    tensorrt.add_argument("--opt-batch", type=int, default=None,
                          help="batch the engine is tuned for (default: --max-batch)")
    tensorrt.add_argument("--fp32", action="store_true", help="no fp16 kernels")
    tensorrt.add_argument("--workspace-mib", type=int, default=4096)
    tensorrt.add_argument("--print", action="store_true",
                          help="print the trtexec command, run nothing")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from stemserve.spec import is_export, load_export

    out = args.out
    if out is None or not is_export(out) or not args.tensorrt:
        out = _export_onnx(args)
    if args.tensorrt:
        from stemserve.export.tensorrt import build_engine, trtexec_command

        for folder, _ in load_export(out).members:  # one engine per model of a bag
            command = trtexec_command(folder, max_batch=args.max_batch,
                                      opt_batch=args.opt_batch, fp16=not args.fp32,
                                      workspace_mib=args.workspace_mib)
            print(" ".join(command))
            if not args.print:
                build_engine(command)
    return 0


def _export_onnx(args: argparse.Namespace) -> Path:
    """Export ``args.model`` (every model of a bag) to ONNX, unless ``--tensorrt`` finds it
    exported; its folder."""
    from stemserve.client.models import export_model, local_export

    if args.tensorrt and args.out is None and args.segment is None \
            and (local := local_export(args.model, args.config)) is not None:
        if args.int8 or args.bf16:
            raise StemserveError(f"--{'int8' if args.int8 else 'bf16'} is a CPU fast path; "
                                 "TensorRT builds its own engine from the fp32 graph")
        return local
    from stemserve.export.to_onnx import onnx_parity
    from stemserve.spec import load_export

    def announce(index: int, count: int, info) -> None:
        if count > 1:
            print(f"  model {index + 1} of {count}: {info.name}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    out, bag = export_model(args.model, args.config, segment=args.segment, out=args.out,
                            fp16=args.fp16, on_member=announce)
    if args.int8:
        from stemserve.export.quantize import quantize_export

        print("quantizing to int8", file=sys.stderr, flush=True)
        quantize_export(out)
    if args.bf16:
        from stemserve.export.bf16 import bf16_export

        bf16_export(out)
    layout = load_export(out)
    print(f"exported {bag.name} to {out} in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{spec.checkpoint} ({spec.family}, sha256 {spec.checkpoint_sha256[:8]}, "
                      f"segment {spec.segment_seconds:g} s, requests of {spec.padded_length} "
                      "samples)" for _, spec in layout.members))
    if not args.no_check:
        print("checking ONNX Runtime against PyTorch on random full segments (--no-check "
              "skips it)", file=sys.stderr, flush=True)
        for (folder, spec), model in zip(layout.members, bag.models):
            errors = onnx_parity(model, folder / spec.onnx_file, spec,
                                 progress=True)
            print(f"ONNX Runtime vs PyTorch max abs error, {spec.checkpoint}: "
                  + ", ".join(f"batch {batch}: {error:.2e}" for batch, error in errors.items()))
    return out


# ---------------------------------------------------------------------------------------------
# demo

DEMO_MODELS = ("htdemucs", "htdemucs_6s", "hdemucs_mmi", "demucs_mdx", "demucs")
"""What ``stemserve demo`` builds (stemserve.models.demo.CONFIGS), listed without torch."""


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="write a random-weight model of any family, to try "
                                         "everything with no download")
    parser.add_argument("name", nargs="?", choices=DEMO_MODELS, default="htdemucs",
                        help="the release configuration to build (default: %(default)s)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="checkpoint file to write (default: demo-<name>.th here)")
    parser.add_argument("--small", action="store_true",
                        help="a few channels: exports and separates in seconds")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights")
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    try:
        from stemserve.models.demo import save_demo
    except ImportError as err:
        raise StemserveError(f"building a model needs PyTorch ({err}): pip install "
                             "'stemserve[export]'") from None
    path = save_demo(args.name, args.out or Path(f"demo-{args.name}.th"), small=args.small,
                     seed=args.seed)
    print(f"wrote {path}: {'a small ' if args.small else ''}{args.name} with random weights "
          f"(its stems are noise, not music). Try: stemserve separate -n {path} song.wav")
    return 0


# ---------------------------------------------------------------------------------------------
# serve

def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="serve an exported model with Triton Inference Server")
    _add_model(parser, DEFAULT_MODEL, "release name, checkpoint path or export folder, "
                                      "exported first when need be (default: %(default)s)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="model repository to fill (default: <cache>/model_repository/cpu, "
                             "or /gpu when serving on a GPU)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0: all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--no-batching", action="store_true",
                        help="run every request alone (no dynamic batching)")
    _add_cpu_fast_paths(parser, " (made once if need be; a CPU server)")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true",
                        help="require the NGC tritonserver image on this host's GPUs (docker)")
    device.add_argument("--cpu", action="store_true",
                        help="use the local CPU server even where a GPU and docker are usable")
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from stemserve.client.models import export_dir_for
    from stemserve.model_repository.server import (DockerTritonServer, TritonServer,
                                                   docker_gpu_unavailable)
    from stemserve.model_repository.writer import fill_repository
    from stemserve.spec import load_export

    precision = _precision(args)
    if precision != "fp32" and args.gpu:
        raise StemserveError(f"--{precision} is a CPU fast path: drop --gpu")
    export_dir = export_dir_for(args.model, args.config, precision)
    reason = ("--cpu was given" if args.cpu else f"--{precision} was given"
              if precision != "fp32" else docker_gpu_unavailable())
    if reason and args.gpu:
        raise ServerError(f"--gpu needs docker and an NVIDIA GPU: {reason}")
    if reason:
        print(f"serving on the CPU: {reason}", file=sys.stderr)
    variant = "cpu" if reason else "gpu"
    repository = args.repository or repository_root() / variant
    fill_repository(export_dir, repository, variant, precision=precision,
                    dynamic_batching=not args.no_batching)
    layout = load_export(export_dir)
    spec = layout.spec
    print(f"serving {layout.bag.name} ("
          + (f"{spec.rules.title}, sha256 {spec.checkpoint_sha256[:8]}"
             if len(layout.members) == 1 else f"a bag of {len(layout.members)} models")
          + f", {precision}) from {export_dir}", file=sys.stderr, flush=True)

    server_class = TritonServer if reason else DockerTritonServer
    server = server_class(repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host,
                          log_verbose=1 if args.verbose else 0, log_all=args.verbose)
    print(f"starting tritonserver on {args.host} ({variant}, repository {repository}; its "
          "warnings and errors follow, all of its log with -v)", file=sys.stderr, flush=True)
    try:
        # A first GPU start may pull the image and build TensorRT engines: minutes.
        server.start(timeout=300 if reason else 1800)
        print(f"Triton is ready ({variant}, repository {repository}):\n"
              f"  gRPC    {server.grpc_url}\n  HTTP    {server.http_url}\n"
              f"  metrics {server.metrics_url}\nCtrl-C stops it.", flush=True)
        code = server.wait()
    except KeyboardInterrupt:
        print("stopping tritonserver", file=sys.stderr)
        return 0
    finally:
        server.stop()
    raise ServerError(f"tritonserver exited on its own with code {code}; its log is above")


# ---------------------------------------------------------------------------------------------
# separate

def _add_separate(sub: argparse._SubParsersAction) -> None:
    from stemserve.client.backends import BACKEND_KINDS
    from stemserve.client.options import add_options
    from stemserve.client.separator import OutputOptions
    from stemserve.pipeline import SeparationOptions

    parser = sub.add_parser("separate", help="separate tracks into stems through Triton or "
                                             "in-process")
    parser.add_argument("tracks", nargs="+", type=Path,
                        help="audio files libsndfile reads (WAV, FLAC, OGG, MP3, ...), folders "
                             "of them (not their subfolders), or @LIST: a file naming one "
                             "track a line")
    _add_model(parser, None, "release name, checkpoint file or export folder (default: what "
                             f"the server serves; {DEFAULT_MODEL} in-process)")
    parser.add_argument("--backend", choices=BACKEND_KINDS, default=None,
                        help="default: triton if a server answers at --url, else onnx")
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"),
                        help="output folder; stems go under OUT/<model>/ (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="tracks separated at once, sharing the servers (default: 2 per "
                             "Triton server, 1 in-process)")
    parser.add_argument("--downmix", action="store_true",
                        help="accept more than two channels, averaged to mono first")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar, list of stems or summary")
    add_options(parser.add_argument_group("separation"), SeparationOptions)
    output = parser.add_argument_group("output")
    add_options(output, OutputOptions)
    container = output.add_mutually_exclusive_group()
    container.add_argument("--mp3", action="store_true",
                           help="write MP3 (LAME through libsndfile, gapless: as long as the "
                                "mix)")
    container.add_argument("--flac", action="store_true", help="write FLAC")
    encoding = output.add_mutually_exclusive_group()
    encoding.add_argument("--int24", action="store_true", help="24-bit samples")
    encoding.add_argument("--float32", action="store_true", help="32-bit float WAV")
    output.add_argument("--mp3-bitrate", type=int, default=320,
                        help="MP3 bit rate in kb/s (default: %(default)s)")
    triton = parser.add_argument_group("Triton")
    triton.add_argument("--url", default=None,
                        help="Triton gRPC address, or several (HOST:PORT,HOST:PORT or @FILE, "
                             "one or more a line): segments are spread over all that are "
                             f"healthy (default: ${TRITON_URL_ENV}, else {DEFAULT_URL})")
    triton.add_argument("--server-window", type=int, default=DEFAULT_IN_FLIGHT,
                        help="requests in flight per Triton server, and its shared-memory "
                             "regions (default: %(default)s)")
    triton.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="pass tensors to Triton through system shared memory (default: "
                             "when --url is this host and the server can map it)")
    triton.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT,
                        help="seconds one Triton request may take (default: %(default)s)")
    triton.add_argument("--retries", type=int, default=3,
                        help="retries of a request after a transient gRPC error, on another "
                             "server when there are several (default: %(default)s)")
    _add_cpu_fast_paths(parser, "; with Triton, checks that the server serves it")
    triton.add_argument("--serve", action="store_true",
                        help="start a local tritonserver with the model for this run "
                             "(on free loopback ports; --url is ignored) and stop it after")
    parser.set_defaults(func=_run_separate)


@contextlib.contextmanager
def _served(model: str | None, config: str | None, precision: str,
            quiet: bool) -> Iterator[str]:
    """A CPU tritonserver for ``model`` on free loopback ports for this run; its gRPC URL."""
    from stemserve.client.models import export_dir_for
    from stemserve.model_repository.local import local_server

    export_dir = export_dir_for(model or DEFAULT_MODEL, config, precision)
    start = time.perf_counter()
    with local_server(export_dir, precision=precision) as server:
        if not quiet:
            print(f"tritonserver ready at {server.grpc_url} in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        yield server.grpc_url


def _run_separate(args: argparse.Namespace) -> int:
    """Separate every track; one failing track does not stop the others (exit code 1)."""
    from stemserve.client.backends import describe_backend, open_backend
    from stemserve.client.backends.fleet import parse_endpoints
    from stemserve.errors import ServerUnreachable

    precision = _precision(args)
    if precision == "bf16" and args.backend == "torch":
        raise StemserveError("--bf16 runs the graph on OpenVINO: it takes --backend onnx or "
                             "triton, not torch")
    with contextlib.ExitStack() as stack:
        if args.serve:
            if args.backend not in (None, "triton"):
                raise StemserveError("--serve starts a Triton server: drop --backend "
                                     f"{args.backend}")
            args.url = stack.enter_context(_served(args.model, args.config, precision,
                                                   args.quiet))
            args.backend = "triton"
        url = args.url or triton_url_from_env() or DEFAULT_URL
        options = dict(model=args.model, config=args.config,
                       precision=None if precision == "fp32" else precision, url=url,
                       server_window=args.server_window, shared_memory=args.shared_memory,
                       timeout=args.timeout, retries=args.retries)
        servers = len(parse_endpoints(url)) if args.backend in (None, "triton") else 0
        try:
            backend = open_backend(args.backend or "triton", **options)
        except ServerUnreachable as err:
            if args.backend:
                raise
            logging.getLogger(__name__).warning(
                "%s\nseparating in-process with ONNX Runtime (--backend onnx) instead", err)
            backend = open_backend("onnx", **options)
            servers = 0
        stack.callback(backend.close)
        if not args.quiet:
            print(f"stemserve: separating with {describe_backend(backend, args.verbose)}",
                  file=sys.stderr, flush=True)
        return _separate_tracks(args, backend, jobs=args.jobs or 2 * servers or 1)


def _separate_tracks(args: argparse.Namespace, backend, jobs: int) -> int:
    """Separate every track with ``backend``, ``jobs`` at once, under one progress bar; a
    failing track does not stop the others."""
    import tqdm

    from stemserve.audio import OutputFormat
    from stemserve.client.backends import output_folder_name
    from stemserve.client.backends.fleet import FleetBackend
    from stemserve.client.options import options_from
    from stemserve.client.separator import OutputOptions, Separator
    from stemserve.client.tracks import expand_tracks
    from stemserve.pipeline import SeparationOptions

    fmt = OutputFormat("mp3" if args.mp3 else "flac" if args.flac else "wav",
                       "int24" if args.int24 else "float32" if args.float32 else "int16",
                       args.mp3_bitrate)
    separator = Separator(backend, options_from(args, SeparationOptions),
                          options_from(args, OutputOptions, fmt=fmt), downmix=args.downmix)
    start = time.perf_counter()
    failed, seconds, total = 0, 0.0, 0
    for result in separator.separate_files(expand_tracks(args.tracks),
                                           args.out / output_folder_name(backend.spec), jobs=jobs,
                                           progress=not args.quiet):
        total += 1
        # tqdm.write keeps the bar below the lines printed while it runs.
        if result.error is not None:
            print_error(result.error, _TqdmStream(sys.stderr))
            failed += 1
        else:
            seconds += result.seconds
            if not args.quiet:
                tqdm.tqdm.write(f"{result.track}: " + ", ".join(map(str, result.stems.values())),
                                file=sys.stdout)
    if not args.quiet:
        elapsed = time.perf_counter() - start
        resent = (f", {backend.retried} segments re-sent to another server"
                  if isinstance(backend, FleetBackend) else "")
        print(f"stemserve: {total - failed} of {total} tracks separated, "
              f"{seconds:.1f} s of audio in {elapsed:.1f} s "
              f"({seconds / max(elapsed, 1e-9):.1f}x real time){resent}", file=sys.stderr)
    if failed:
        print(f"stemserve: {failed} of {total} tracks failed", file=sys.stderr)
        return 1
    return 0


class _TqdmStream:
    """A stream whose lines go through ``tqdm.write`` (above a progress bar, not into it)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> None:
        import tqdm

        if text.strip():
            tqdm.tqdm.write(text.rstrip("\n"), file=self._stream)

    def flush(self) -> None:
        self._stream.flush()


# ---------------------------------------------------------------------------------------------
# repository

def _add_repository(sub: argparse._SubParsersAction) -> None:
    from stemserve.model_repository.writer import VARIANTS
    from stemserve.spec import PRECISION_SIDECARS as PRECISIONS

    parser = sub.add_parser("repository", help="fill or check a Triton model repository")
    actions = parser.add_subparsers(dest="action", required=True)
    fill = actions.add_parser("fill", help="fill a repository from an export folder")
    fill.add_argument("export_dir", type=Path, help="folder with model.json and its graph")
    fill.add_argument("repo_dir", type=Path, help="Triton model repository to fill")
    fill.add_argument("--variant", choices=VARIANTS, default="cpu")
    fill.add_argument("--precision", choices=PRECISIONS, default="fp32",
                      help="which variant of the export: fp32, fp16 (gpu), int8 or bf16 "
                           "(cpu)")
    fill.add_argument("--no-tensorrt", action="store_true",
                      help="gpu variant: ONNX Runtime's CUDA provider without TensorRT")
    fill.add_argument("--version", type=int, default=1, help="version folder to fill")
    fill.add_argument("--max-batch-size", type=int, default=None)
    fill.add_argument("--no-batching", action="store_true", help="no dynamic batching")
    check = actions.add_parser("check", help="refuse a repository whose config, model file "
                                             "and sidecar do not belong together")
    check.add_argument("repo_dir", type=Path)
    parser.set_defaults(func=_run_repository)


def _run_repository(args: argparse.Namespace) -> int:
    from stemserve.model_repository.writer import check_repository, fill_repository

    if args.action == "fill":
        fill_repository(args.export_dir, args.repo_dir, args.variant,
                        precision=args.precision, tensorrt=not args.no_tensorrt,
                        version=args.version,
                        max_batch_size=args.max_batch_size,
                        dynamic_batching=not args.no_batching)
        print(f"filled {args.repo_dir} ({args.variant})")
    layout = check_repository(args.repo_dir)
    for _, spec in layout.members:
        print(f"{args.repo_dir}: {spec.model_name} serves {spec.checkpoint} "
              f"({spec.checkpoint_sha256[:12]}, {spec.family}): consistent")
    if len(layout.members) > 1:
        print(f"{args.repo_dir}: the bag {layout.bag.name} of {len(layout.members)} models")
    return 0


# ---------------------------------------------------------------------------------------------
# web

def _add_web(sub: argparse._SubParsersAction) -> None:
    """Flags from :class:`~stemserve.web.settings.Settings`; the settings without a help text
    of their own (where separation runs, the model, other sites) are written here."""
    from stemserve.client.options import add_options
    from stemserve.web.settings import Settings

    parser = sub.add_parser("web", help="serve the upload page and HTTP API (port 8080; "
                                        "--port 8000 for the demucs image's)")
    add_options(parser, Settings)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help="Triton gRPC address(es) to separate on (default: "
                            f"${TRITON_URL_ENV}; if unset, in-process)")
    where.add_argument("--backend", choices=("onnx",), default=None,
                       help="separate in-process with ONNX Runtime, even if "
                            f"${TRITON_URL_ENV} is set")
    _add_model(parser, None, "default model: release name, checkpoint file or export folder "
                             f"(default: what Triton serves; {DEFAULT_MODEL} in-process)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="another site whose pages may post here, e.g. "
                             "https://music.example.com (repeatable)")
    parser.set_defaults(func=_run_web)


def _run_web(args: argparse.Namespace) -> int:
    import os

    from stemserve.client.options import options_from
    from stemserve.defaults import WEB_TOKEN_ENV
    from stemserve.web.server import serve
    from stemserve.web.settings import Settings

    url = args.url or (None if args.backend else triton_url_from_env())
    serve(options_from(args, Settings, triton_url=url or None, model=args.model,
                       config=args.config, allow_origins=tuple(args.allow_origin),
                       token=args.token or os.environ.get(WEB_TOKEN_ENV) or None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemserve",
        description="Separate music into stems (drums, bass, other, vocals; guitar and piano "
                    "with 6-source models) with any Demucs generation, in-process or on "
                    "Triton Inference Server.")
    parser.add_argument("--version", action="version", version=f"stemserve {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # -v after the sub-command too; SUPPRESS keeps a -v given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *args, **kwargs: add_parser(*args, parents=[common], **kwargs)
    _add_export(sub)
    _add_demo(sub)
    _add_serve(sub)
    _add_separate(sub)
    _add_web(sub)
    _add_repository(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stemserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


class _TqdmHandler(logging.Handler):
    """Log lines through ``tqdm.write``, so they never cut a progress bar in two."""

    def emit(self, record: logging.LogRecord) -> None:
        import tqdm

        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def _configure_logging(verbose: bool) -> None:
    """stemserve's own messages as ``stemserve: ...`` (INFO and up; all with -v); other
    libraries' warnings only, unless -v."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("stemserve: %(message)s"))
    ours = logging.getLogger("stemserve")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM (docker stop, systemd, kill), SIGHUP (terminal closed) and SIGINT stop every
    command as Ctrl-C does, so temporary files, shared-memory regions and child servers are
    cleaned up. SIGINT is set explicitly: a shell starts background jobs with it ignored.
    The handlers before are put back after (main() may run inside another program)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; its own program decides there
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {signum: signal.signal(signum, _interrupt) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        with _stopped_by_signals():
            return args.func(args)
    except StemserveError as err:
        print_error(err)
        return 1
    except KeyboardInterrupt:
        print("stemserve: interrupted", file=sys.stderr)
        return 130
