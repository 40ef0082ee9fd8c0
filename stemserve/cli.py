"""The ``stemserve`` command: a thin layer over the library, one sub-command per job."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from stemserve.defaults import DEFAULT_MODEL, export_root, repository_root


def _add_config(parser: argparse.ArgumentParser) -> None:
    """``--config``: the one way every command says what a plain state-dict file is."""
    parser.add_argument("--config", default=None, metavar="RELEASE",
                        help="release whose configuration a plain state-dict checkpoint given "
                             "with -n has (e.g. demucs48_hq; default: demucs)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a Demucs v2 model to ONNX with its sidecar")
    parser.add_argument("-n", "--model", default=DEFAULT_MODEL,
                        help="release name or checkpoint path (default: %(default)s)")
    _add_config(parser)
    parser.add_argument("--segment", type=float, default=None,
                        help="segment length in seconds (default: the model's training "
                             "segment, what demucs' apply_model splits by)")
    parser.add_argument("--fp16", action="store_true", help="also write an fp16 graph")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output folder (default: <cache>/export/<model>, where every command "
                             "looks for it; the cache is $STEMSERVE_CACHE or ~/.cache/stemserve)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the PyTorch vs ONNX Runtime parity check")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from stemserve.checkpoints import load_model
    from stemserve.export.to_onnx import export_onnx, onnx_parity

    model, info = load_model(args.model, config=args.config)
    segment = round(args.segment * model.samplerate) if args.segment else None
    out = args.out or export_root() / info.name
    print(f"exporting {info.name} to {out} (tracing the network: about a minute for the "
          "full-size model)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    spec = export_onnx(model, info, out, segment_length=segment, fp16=args.fp16)
    print(f"exported {info.name} to {out / spec.onnx_file} in {time.perf_counter() - start:.1f} s "
          f"(segment {spec.segment_seconds:g} s, padded to {spec.padded_length} samples)")
    if not args.no_check:
        print(f"checking ONNX Runtime against PyTorch on random {spec.padded_length}-sample "
              "segments (--no-check skips it)", file=sys.stderr, flush=True)
        errors = onnx_parity(model, out / spec.onnx_file, spec, progress=True)
        print("ONNX Runtime vs PyTorch max abs error: "
              + ", ".join(f"batch {batch}: {error:.2e}" for batch, error in errors.items()))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="serve an exported model with Triton Inference Server")
    parser.add_argument("-n", "--model", default=DEFAULT_MODEL,
                        help="release name or checkpoint path, exported first when its export "
                             "folder is empty (default: %(default)s)")
    _add_config(parser)
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="export folder (default: <cache>/export/<model>)")
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
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true",
                        help="require the NGC tritonserver image on this host's GPUs (docker)")
    device.add_argument("--cpu", action="store_true",
                        help="use the local CPU server even where a GPU and docker are usable")
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from stemserve.errors import StemserveError
    from stemserve.model_repository.writer import fill_repository
    from stemserve.triton_server import DockerTritonServer, TritonServer, docker_gpu_unavailable

    from stemserve.client.api import export_dir_for

    export_dir = args.export_dir or export_dir_for(args.model, args.config)
    reason = "--cpu was given" if args.cpu else docker_gpu_unavailable()
    if reason and args.gpu:
        raise StemserveError(f"--gpu needs docker and an NVIDIA GPU: {reason}")
    if reason:
        print(f"serving on the CPU: {reason}", file=sys.stderr)
    variant = "cpu" if reason else "gpu"
    repository = args.repository or repository_root() / variant
    fill_repository(export_dir, repository, variant, dynamic_batching=not args.no_batching)

    server_class = TritonServer if reason else DockerTritonServer
    server = server_class(repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host,
                          log_verbose=1 if args.verbose else 0)
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
    raise StemserveError(f"tritonserver exited on its own with code {code}; its log is above")


def _add_separate(sub: argparse._SubParsersAction) -> None:
    from stemserve.audio import CLIP_MODES
    from stemserve.client.api import DEFAULT_TEMPLATE, DEFAULT_URL
    from stemserve.client.fleet import URLS_ENV
    from stemserve.pipeline import DEFAULT_WINDOW, REQUEST_TIMEOUT

    parser = sub.add_parser("separate", help="separate tracks into stems through Triton or "
                                             "in-process")
    parser.add_argument("tracks", nargs="+", type=Path,
                        help="audio files libsndfile reads (WAV, FLAC, OGG, MP3, ...), folders "
                             "of them (not their subfolders), or @LIST: a file naming one "
                             "track a line")
    parser.add_argument("-n", "--model", default=None,
                        help="release name, checkpoint file or export folder (default: what "
                             f"the server serves; {DEFAULT_MODEL} in-process)")
    _add_config(parser)
    parser.add_argument("--backend", choices=("triton", "onnx", "torch"), default=None,
                        help="default: triton if a server answers at --url, else onnx")
    parser.add_argument("--url", default=None,
                        help="Triton gRPC address, or several (HOST:PORT,HOST:PORT or @FILE, "
                             "one or more a line): segments are spread over all that are "
                             f"healthy (default: ${URLS_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="tracks separated at once, sharing the servers (default: 2 per "
                             "Triton server, 1 in-process)")
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"),
                        help="output folder; stems go under OUT/<model>/ (default: %(default)s)")
    parser.add_argument("--filename", default=DEFAULT_TEMPLATE,
                        help="stem path under OUT/<model>/ from {track}, {trackext}, {stem} "
                             "and {ext} (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.25,
                        help="overlap between segments (default: %(default)s)")
    parser.add_argument("--shifts", type=int, default=0,
                        help="average this many random shifts of up to 0.5 s (default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random shifts")
    parser.add_argument("--two-stems", metavar="STEM", default=None,
                        help="write STEM and no_STEM (the sum of the others) only")
    container = parser.add_mutually_exclusive_group()
    container.add_argument("--mp3", action="store_true",
                           help="write MP3 (LAME through libsndfile, gapless: as long as the "
                                "mix)")
    container.add_argument("--flac", action="store_true", help="write FLAC")
    encoding = parser.add_mutually_exclusive_group()
    encoding.add_argument("--int24", action="store_true", help="24-bit samples")
    encoding.add_argument("--float32", action="store_true", help="32-bit float WAV")
    parser.add_argument("--mp3-bitrate", type=int, default=320,
                        help="MP3 bit rate in kb/s (default: %(default)s)")
    parser.add_argument("--clip-mode", choices=CLIP_MODES, default="rescale",
                        help="rescale: stem / max(1.01 * peak, 1) as demucs does; clamp: clip "
                             "to [-1, 1]; none: as is (default: %(default)s)")
    parser.add_argument("--downmix", action="store_true",
                        help="accept more than two channels, averaged to mono first")
    parser.add_argument("--samplerate-out", choices=("original", "model"), default="original",
                        help="write at the input's rate, so stems line up with the mix, or at "
                             "the model's as demucs does (default: %(default)s)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help="segment requests in flight, per track and per Triton server "
                             "(default: %(default)s)")
    parser.add_argument("--shared-memory", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="pass tensors to Triton through system shared memory (default: "
                             "when --url is this host and the server can map it)")
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT,
                        help="seconds one Triton request may take (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries of a request after a transient gRPC error, on another "
                             "server when there are several (default: %(default)s)")
    parser.add_argument("--serve", action="store_true",
                        help="start a local tritonserver with the model for this run "
                             "(on free loopback ports; --url is ignored) and stop it after")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar, list of stems or summary")
    parser.set_defaults(func=_run_separate)


@contextlib.contextmanager
def _local_server(model: str | None, config: str | None, quiet: bool) -> Iterator[str]:
    """A CPU tritonserver for ``model`` on free loopback ports; yields its gRPC URL.

    The repository is a fresh folder next to the export (hard links, no copy), so a
    `stemserve serve` running from ``build/model_repository`` is never disturbed.
    """
    import tempfile

    from stemserve.client.api import export_dir_for
    from stemserve.model_repository.writer import fill_repository
    from stemserve.triton_server import TritonServer, free_ports

    export_dir = export_dir_for(model or DEFAULT_MODEL, config)
    repository_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve-", dir=repository_root()) as folder:
        fill_repository(export_dir, Path(folder), "cpu")
        http_port, grpc_port, metrics_port = free_ports(3)
        server = TritonServer(Path(folder), http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port, log_file=Path(folder) / "server.log")
        start = time.perf_counter()
        with server:
            if not quiet:
                print(f"tritonserver ready at {server.grpc_url} in "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
            yield server.grpc_url


def _run_separate(args: argparse.Namespace) -> int:
    """Separate every track; one failing track does not stop the others (exit code 1)."""
    import os

    from stemserve.audio import OutputFormat
    from stemserve.client.api import DEFAULT_URL, open_backend
    from stemserve.client.fleet import URLS_ENV, parse_endpoints
    from stemserve.client.triton import ServerUnreachable
    from stemserve.errors import StemserveError

    fmt = OutputFormat("mp3" if args.mp3 else "flac" if args.flac else "wav",
                       "int24" if args.int24 else "float32" if args.float32 else "int16",
                       args.mp3_bitrate)
    with contextlib.ExitStack() as stack:
        if args.serve:
            if args.backend not in (None, "triton"):
                raise StemserveError("--serve starts a Triton server: drop --backend "
                                     f"{args.backend}")
            args.url = stack.enter_context(_local_server(args.model, args.config, args.quiet))
            args.backend = "triton"
        url = args.url or os.environ.get(URLS_ENV) or DEFAULT_URL
        options = dict(model=args.model, config=args.config, url=url, window=args.window,
                       shared_memory=args.shared_memory, timeout=args.timeout,
                       retries=args.retries)
        servers = len(parse_endpoints(url)) if args.backend in (None, "triton") else 0
        try:
            backend = open_backend(args.backend or "triton", **options)
        except ServerUnreachable as err:
            if args.backend:
                raise
            print(f"stemserve: {err}\nstemserve: separating in-process with ONNX Runtime "
                  "(--backend onnx) instead", file=sys.stderr)
            backend = open_backend("onnx", **options)
            servers = 0
        stack.callback(backend.close)
        if args.jobs is None:
            args.jobs = 2 * servers or 1
        return _separate_tracks(args, backend, fmt)


def _separate_tracks(args: argparse.Namespace, backend, fmt) -> int:
    """Separate every track with ``backend``, ``args.jobs`` at once, under one progress bar;
    a failing track does not stop the others."""
    import tqdm

    from stemserve.client.api import expand_tracks, separate_files
    from stemserve.client.fleet import FleetBackend

    tracks = expand_tracks(args.tracks)
    start = time.perf_counter()
    failed, seconds, total = 0, 0.0, 0
    for result in separate_files(
            tracks, args.out / backend.spec.checkpoint, backend=backend, jobs=args.jobs,
            progress=not args.quiet, template=args.filename, fmt=fmt,
            clip_mode=args.clip_mode, two_stems=args.two_stems,
            samplerate_out=args.samplerate_out, downmix=args.downmix, overlap=args.overlap,
            shifts=args.shifts, seed=args.seed, window=args.window):
        total += 1
        # tqdm.write keeps the bar below the lines printed while it runs.
        if result.error is not None:
            tqdm.tqdm.write(f"stemserve: error: {result.error}", file=sys.stderr)
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


def _add_web(sub: argparse._SubParsersAction) -> None:
    from stemserve.web.settings import TOKEN_ENV, Settings

    defaults = Settings()
    parser = sub.add_parser("web", help="serve the upload page and HTTP API (demucs image's "
                                        "port 8000)")
    parser.add_argument("--host", default=defaults.host,
                        help="address to listen on (default: %(default)s; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=defaults.port,
                        help="port to listen on (default: %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help="Triton gRPC address to separate on (default: "
                            "$STEMSERVE_TRITON_URL; if unset, in-process)")
    where.add_argument("--backend", choices=("onnx",), default=None,
                       help="separate in-process with ONNX Runtime, even if "
                            "$STEMSERVE_TRITON_URL is set")
    parser.add_argument("-n", "--model", default=None,
                        help="default model: release name, checkpoint file or export folder "
                             f"(default: what Triton serves; {DEFAULT_MODEL} in-process)")
    _add_config(parser)
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_mb,
                        help="largest upload in MB (default: %(default)g)")
    parser.add_argument("--max-duration", type=float, default=defaults.max_duration,
                        help="longest track in seconds (default: %(default)g)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="tracks separated at once (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size,
                        help="tracks that may wait; more are refused (default: %(default)s)")
    parser.add_argument("--job-ttl", type=float, default=defaults.job_ttl,
                        help="seconds a finished job's files are kept (default: %(default)g)")
    parser.add_argument("--jobs-dir", type=Path, default=defaults.jobs_dir,
                        help="folder for uploads and stems, used by one server at a time "
                             "(default: %(default)s)")
    parser.add_argument("--max-disk-mb", type=float, default=defaults.max_disk_mb,
                        help="disk budget of the jobs folder in MB (default: %(default)g)")
    parser.add_argument("--token", default=None,
                        help=f"require this token for the API (default: ${TOKEN_ENV}, which "
                             "keeps it out of the process list; unset: no token)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="another site whose pages may post here, e.g. "
                             "https://music.example.com (repeatable)")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                        help="seconds a request's headers may take (default: %(default)g)")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help="longest pause in an upload, in seconds (default: %(default)g)")
    parser.set_defaults(func=_run_web)


def _run_web(args: argparse.Namespace) -> int:
    import os

    from stemserve.web import Settings, serve
    from stemserve.web.settings import TOKEN_ENV

    url = args.url or (None if args.backend else os.environ.get("STEMSERVE_TRITON_URL"))
    serve(Settings(host=args.host, port=args.port, triton_url=url or None, model=args.model,
                   config=args.config, max_upload_mb=args.max_upload_mb,
                   max_duration=args.max_duration, workers=args.workers,
                   queue_size=args.queue_size, job_ttl=args.job_ttl, jobs_dir=args.jobs_dir,
                   max_disk_mb=args.max_disk_mb,
                   token=args.token or os.environ.get(TOKEN_ENV) or None,
                   allow_origins=tuple(args.allow_origin),
                   header_timeout=args.header_timeout, body_timeout=args.body_timeout))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemserve",
        description="Separate music into drums, bass, other and vocals with Demucs v2 on Triton.")
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
    _add_serve(sub)
    _add_separate(sub)
    _add_web(sub)
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
    from stemserve.errors import StemserveError

    try:
        with _stopped_by_signals():
            return args.func(args)
    except StemserveError as err:
        print(f"stemserve: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stemserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
