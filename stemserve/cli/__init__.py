"""The ``stemserve`` command: a thin layer over the library, one module per sub-command.

``export`` (ONNX, and a TensorRT engine on a GPU host), ``demo`` (a random-weight model to
try everything offline), ``serve`` (a Triton server), ``separate`` (tracks into stems),
``web`` (the upload page) and ``repository`` (fill or check a Triton model repository).
Each module adds its parser (``add_parser``) and runs it (``run``); the heavy libraries
are imported only by the command that needs them. Every failure is printed the same way
(:func:`~stemserve.errors.print_error`), with exit code 1; an interrupt exits with 130.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Iterator

from stemserve import __version__
from stemserve.cli import demo, export, repository, separate, serve, web
from stemserve.errors import StemserveError, print_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemserve",
        description="Separate music into stems (drums, bass, other, vocals; guitar and piano "
                    "with 6-source models) with any Demucs generation, in-process or on "
                    "Triton Inference Server.")
    parser.add_argument("--version", action="version", version=f"stemserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # -v after the sub-command too; SUPPRESS keeps a -v given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *args, **kwargs: add_parser(*args, parents=[common], **kwargs)
    for command in (export, demo, serve, separate, web, repository):
        command.add_parser(sub)
    return parser


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
