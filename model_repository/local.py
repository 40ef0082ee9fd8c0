"""One context manager for "real tritonservers serving this export, here, now".

The command line (``separate --serve``), the test suite and the benchmarks all need the
same steps: fill a model repository from an export, pick free loopback ports, run the
servers until they are done. :func:`local_servers` does them (:func:`local_server` for the
usual one), so the server they test and measure is the one users get.
"""
from __future__ import annotations

import contextlib
import tempfile
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator

from stemserve.defaults import repository_root
from stemserve.model_repository.ports import start_on_free_ports
from stemserve.model_repository.server import TritonServer
from stemserve.model_repository.writer import fill_repository


@contextlib.contextmanager
def local_servers(export_dir: Path, count: int = 1, *, variant: str = "cpu",
                  root: Path | None = None, logs: Path | None = None,
                  start_timeout: float = 120, extra_args: tuple[str, ...] = (),
                  **fill: Any) -> Iterator[list[TritonServer]]:
    """``count`` started :class:`TritonServer` of ``export_dir``, each on free loopback
    ports, stopped on exit.

    They share one repository: a fresh folder under ``root`` (default: stemserve's
    repository root), filled with hard links (no copy of the model) and removed at the end,
    so a `stemserve serve` running from a repository of its own is never disturbed.
    ``fill`` goes to :func:`~.writer.fill_repository` (``dynamic_batching``,
    ``max_batch_size``, ``intra_op_threads``, ...). Server ``i`` logs to
    ``server-i.log`` in ``logs`` (default: that folder). A server whose port was taken
    between the pick and its bind starts again on fresh ports
    (:func:`~.ports.start_on_free_ports`).
    """
    root = Path(root) if root is not None else repository_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve-", dir=root) as folder:
        repository = Path(folder) / "repository"
        fill_repository(export_dir, repository, variant, **fill)

        def start(index: int) -> TritonServer:
            def on(ports: list[int]) -> TritonServer:
                http_port, grpc_port, metrics_port = ports
                server = TritonServer(repository, http_port=http_port, grpc_port=grpc_port,
                                      metrics_port=metrics_port, extra_args=extra_args,
                                      log_file=Path(logs or folder) / f"server-{index}.log")
                server.start(start_timeout)  # stops it again if the start fails
                return server
            return start_on_free_ports(on)

        servers: list[TritonServer] = []
        try:
            with ThreadPoolExecutor(count) as pool:
                starts = [pool.submit(start, index) for index in range(count)]
                wait(starts)
            servers = [started.result() for started in starts if not started.exception()]
            for started in starts:
                if started.exception() is not None:
                    raise started.exception()
            yield servers
        finally:
            with ThreadPoolExecutor(count) as pool:
                list(pool.map(lambda server: server.stop(), servers))


@contextlib.contextmanager
def local_server(export_dir: Path, **options: Any) -> Iterator[TritonServer]:
    """One server of :func:`local_servers`."""
    with local_servers(export_dir, 1, **options) as (server,):
        yield server
