"""``stemserve separate``: tracks into stems, through Triton or in-process, under one progress
bar."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

from stemserve.cli.flags import add_model, add_precision
from stemserve.connection import ConnectionOptions
from stemserve.defaults import (DEFAULT_MODEL, DEFAULT_URL, STDIN, TRITON_URL_ENV,
                                 triton_url_from_env)
from stemserve.errors import StemserveError, print_error
from stemserve.precision import check_precision


def add_parser(sub: argparse._SubParsersAction) -> None:
    from stemserve.client.backends import BACKEND_KINDS
    from stemserve.client.options import add_options
    from stemserve.client.separator import OutputOptions
    from stemserve.pipeline import SeparationOptions

    parser = sub.add_parser("separate", help="separate tracks into stems through Triton or "
                                             "in-process")
    parser.add_argument("tracks", nargs="+", type=Path,
                        help="audio files libsndfile reads (WAV, FLAC, OGG, MP3, ...), folders "
                             "of them (not their subfolders), @LIST: a file naming one "
                             "track a line, or - (alone): audio on stdin")
    add_model(parser, None, "release name, checkpoint file or export folder (default: what "
                             f"the server serves; {DEFAULT_MODEL} in-process)")
    parser.add_argument("--backend", choices=BACKEND_KINDS, default=None,
                        help="default: triton if a server answers at --url, else onnx; "
                             "triton-stream: the whole pipeline on the server, whose "
                             "'separate' model streams the stems back")
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"),
                        help="output folder; stems go under OUT/<model>/ (default: "
                             "%(default)s); -: one track's --stem to stdout as a WAV stream, "
                             "each block as soon as it is final")
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
    output.add_argument("--stem", default=None,
                        help="with -o -: the stem written to stdout (one of the model's, or "
                             "of --two-stems' pair)")
    triton = parser.add_argument_group("Triton")
    triton.add_argument("--url", default=None,
                        help="Triton gRPC address, or several (HOST:PORT,HOST:PORT or @FILE, "
                             "one or more a line): segments are spread over all that are "
                             f"healthy (default: ${TRITON_URL_ENV}, else {DEFAULT_URL})")
    add_options(triton, ConnectionOptions)
    add_precision(parser, default=None, what="to separate with (default: fp32 in-process, "
                  "whatever Triton serves; with Triton, checks that the server serves it)")
    triton.add_argument("--serve", action="store_true",
                        help="start a local tritonserver with the model for this run "
                             "(on free loopback ports; --url is ignored) and stop it after")
    parser.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    """Separate every track; one failing track does not stop the others (exit code 1)."""
    from stemserve.client.backends import describe_backend, open_backend
    from stemserve.client.backends.fleet import parse_endpoints
    from stemserve.client.options import options_from
    from stemserve.errors import ServerUnreachable

    precision = args.precision and check_precision(args.precision, backend=args.backend)
    _check_pipes(args)
    with contextlib.ExitStack() as stack:
        if args.tracks == [Path(STDIN)]:
            from stemserve.pipes import spooled_stdin

            args.tracks = [stack.enter_context(spooled_stdin(sys.stdin.buffer))]
        if args.serve:
            if args.backend not in (None, "triton", "triton-stream"):
                raise StemserveError("--serve starts a Triton server: drop --backend "
                                     f"{args.backend}")
            args.url = stack.enter_context(_served(args.model, args.config,
                                                   precision or "fp32", args.quiet))
            args.backend = args.backend or "triton"
        url = args.url or triton_url_from_env() or DEFAULT_URL
        options = dict(model=args.model, config=args.config, precision=precision,
                       connection=options_from(args, ConnectionOptions, url=url))
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


def _check_pipes(args: argparse.Namespace) -> None:
    """Refuse what stdin and stdout cannot do, before any model loads."""
    if Path(STDIN) in args.tracks and len(args.tracks) > 1:
        raise StemserveError("- (stdin) must be the only track")
    to_stdout = args.out == Path(STDIN)
    if to_stdout and args.stem is None:
        raise StemserveError("-o - writes one stem to stdout: choose it with --stem (e.g. "
                             "--stem vocals)")
    if args.stem is not None and not to_stdout:
        raise StemserveError("--stem picks the stem written to stdout: add -o -")
    if to_stdout and (args.mp3 or args.flac):
        raise StemserveError("-o - writes a WAV stream: drop --mp3/--flac, or encode the "
                             "stream afterwards (... -o - | ffmpeg -i - out.flac)")


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
    if args.out == Path(STDIN):
        return _separate_to_stdout(args, separator)
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


def _separate_to_stdout(args: argparse.Namespace, separator) -> int:
    """The one track's ``--stem`` to stdout as a WAV stream, block by block as the pipeline
    makes them final. Clipping: ``rescale`` needs the stem's peak over the whole track, so
    a stream is clamped to [-1, 1] instead (``--clip-mode none`` keeps float samples as they
    are)."""
    import os

    import numpy as np

    from stemserve.audio import probe
    from stemserve.client.stems import stem_names
    from stemserve.client.tracks import expand_tracks
    from stemserve.pipes import WavStream

    tracks = expand_tracks(args.tracks)
    if len(tracks) != 1:
        raise StemserveError(f"-o - writes one track's stem; {len(tracks)} tracks given")
    (track,) = tracks
    names = stem_names(separator.spec, separator.output.two_stems)
    if args.stem not in names:
        raise StemserveError(f"--stem {args.stem!r}: the stems are {', '.join(names)}")
    clip = separator.output.clip_mode
    if clip == "rescale":
        clip = "clamp"
        if not args.quiet:
            print("stemserve: to stdout, the stem is clamped to [-1, 1] (--clip-mode rescale "
                  "needs its peak over the whole track)", file=sys.stderr)
    info = probe(track, downmix=args.downmix)
    rate = separator.file_rate(info)
    blocks = separator.stream_file(info, progress=not args.quiet)
    try:
        with contextlib.closing(blocks):
            stream = WavStream(sys.stdout.buffer, rate, separator.spec.audio_channels,
                               separator.output.fmt.encoding)
            for block in blocks:
                samples = block[args.stem]
                stream.write(np.clip(samples, -1.0, 1.0) if clip == "clamp" else samples)
    except BrokenPipeError:
        # The reader left (a player closed): stop at once, and keep Python's exit flush of
        # stdout from failing on the closed pipe too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("stemserve: stdout was closed before the stem was complete", file=sys.stderr)
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
