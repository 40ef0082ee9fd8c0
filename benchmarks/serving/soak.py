"""A soak: do clients over two tritonservers lose or corrupt a track while one is stopped
(SIGINT, requests in flight) and started again under load? Stems must match a single server's."""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
from stemserve.client import Separator
from stemserve.client.backends.fleet import FleetBackend
from stemserve.client.backends.triton import TritonBackend

from ..scenario import Column, Scenario, option, tritonservers
from . import served

MATCH_TOLERANCE = 1e-5  # against single-server stems: batching moves ONNX Runtime's sums


@dataclasses.dataclass
class SoakResult:
    """What the clients of :func:`soak` saw; ``errors``: the distinct reasons tracks failed."""

    clients: int
    duration_s: float
    completed: int = 0
    failed: int = 0
    retried: int = 0
    latencies_s: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    restart: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """The figures reported: every field but the latencies, which give percentiles."""
        return {**{key: value for key, value in dataclasses.asdict(self).items()
                   if key != "latencies_s"},
                "latency_s": served.latency(self.latencies_s) if self.latencies_s else None}


def soak(urls: Sequence[str], *, clients: int = 8, duration: float = 300.0,
         track_seconds: float = 5.0, distinct_tracks: int = 4,
         restart_server: Callable[[], None] | None = None, restart_at: float = 0.5,
         backoff: float = 0.5) -> SoakResult:
    """``clients`` threads, each with its own FleetBackend over ``urls``, separate tracks back to
    back for ``duration`` seconds; ``restart_server`` is called ``restart_at`` of the way in."""
    mixes = [served.track(round(track_seconds * served.RATE), seed)
             for seed in range(distinct_tracks)]
    with TritonBackend(urls[0]) as single:
        references = [Separator(single).separate_array(mix, served.RATE) for mix in mixes]
    result, lock = SoakResult(clients, duration), threading.Lock()
    start = time.monotonic()

    def client(index: int) -> None:
        with FleetBackend(urls, backoff=backoff) as backend:
            separator, turn = Separator(backend), index
            while time.monotonic() < start + duration:
                track, turn, began = turn % len(mixes), turn + 1, time.monotonic()
                try:
                    stems = separator.separate_array(mixes[track], served.RATE)
                    error = max(float(np.abs(stems[name] - references[track][name]).max())
                                for name in stems)
                    problem = None if error < MATCH_TOLERANCE else \
                        f"track {track} differs by {error:.2e}"
                except Exception as err:  # noqa: BLE001 - whatever it is, the track failed
                    problem = f"{type(err).__name__}: {err}"
                with lock:
                    result.latencies_s.append(time.monotonic() - began)
                    result.completed += problem is None
                    result.failed += problem is not None
                    if problem is not None and problem not in result.errors:
                        result.errors.append(problem)
            with lock:
                result.retried += backend.retried

    with ThreadPoolExecutor(clients) as pool:
        running = pool.map(client, range(clients))  # every client starts now
        if restart_server:
            time.sleep(duration * restart_at)
            result.restart["stopped_at_s"] = round(time.monotonic() - start, 1)
            try:
                restart_server()
                result.restart["ready_at_s"] = round(time.monotonic() - start, 1)
            except Exception as err:  # noqa: BLE001 - reported with the result
                result.restart["error"] = repr(err)
        list(running)  # a client that raised fails the soak
    result.duration_s = time.monotonic() - start
    return result


@dataclasses.dataclass(frozen=True)
class Config:
    clients: int = option(8, "concurrent clients, each with its own FleetBackend", quick=2)
    duration_s: float = option(300.0, "seconds of load", quick=10.0)
    track_s: float = option(5.0, "seconds per generated track", quick=2.0)
    restart_at: float = option(0.5, "share of duration_s at which the second server restarts")


def run(config: Config) -> list[dict]:
    folder, _ = served.export(4, 1.0)
    try:
        with tritonservers(folder, served.WORK / "soak", 2) as servers, \
                served.cpu_share(servers) as share:
            result = soak([server.grpc_url for server in servers], clients=config.clients,
                          duration=config.duration_s, track_seconds=config.track_s,
                          restart_server=servers[1].restart, restart_at=config.restart_at)
    except Exception as err:  # noqa: BLE001 - a server that would not start
        return [{"status": served.failed(err)}]
    ok = not result.failed and "ready_at_s" in result.restart
    return [{**result.summary(), **share, "servers": 2, "track_s": config.track_s,
             "audio_s": result.completed * config.track_s, "status": "ok" if ok else
             f"failed: {result.failed} tracks failed, restart {result.restart}"}]


SCENARIO = Scenario(
    name="serving.soak",
    title="Soak: clients over two tritonservers, one restarted under load",
    config=Config, run=run,
    columns=(Column("clients", "clients"), Column("duration_s", "s", ".0f"),
             Column("completed", "tracks done"), Column("failed", "failed"),
             Column("retried", "segments re-sent"), Column("latency_s.p50", "p50 s", ".2f"),
             Column("latency_s.p95", "p95 s", ".2f"),
             Column("restart.stopped_at_s", "restart stopped at s"),
             Column("restart.ready_at_s", "ready at s"), Column("cpu_busy", "CPU busy", ".2f"),
             Column("cpu_others", "CPU others", ".2f"), Column("status", "status")),
    notes=(
        "The test model (4 channels, 1 s segments). A track fails when it raises or a stem "
        "differs from the single-server stems by 1e-5 or more. CPU busy: the machine's use, a "
        "share of all cores; CPU others: that of processes outside this benchmark and servers.",
    ))
