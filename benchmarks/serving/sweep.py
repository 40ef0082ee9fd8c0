"""Throughput and latency of a tritonserver (the CPU repository as shipped) as requests in
flight grow, batching on and off, against in-process: one closed loop, a fresh server each."""
from __future__ import annotations

import contextlib
import dataclasses

from stemserve.client.backends.onnx import OnnxBackend
from stemserve.client.backends.triton import TritonBackend

from ..machine import usable_cpus
from ..scenario import Column, Scenario, option, tritonservers
from . import served

SERIES = {"on": "batching on", "off": "batching off", "in-process": "in-process ONNX Runtime"}


@dataclasses.dataclass(frozen=True)
class Config:
    channels: int = option(16, "width of the random-weight Demucs v2 (4: the test model, "
                               "64: the official v2's)", quick=4)
    segment_s: float = option(2.0, "segment seconds", quick=1.0)
    concurrency: tuple[int, ...] = option((1, 2, 4, 8, 16), "requests in flight (clients), "
                                          "one level each", quick=(1, 2))
    series: tuple[str, ...] = option(tuple(SERIES), "what is measured: servers with dynamic "
                                     "batching on, off, and in-process ONNX Runtime")
    duration_s: float = option(10.0, "timed seconds per level")
    requests: int | None = option(None, "timed requests per client, not duration_s", quick=3)
    warmup: int = option(2, "untimed requests per client", quick=1)


def _series(name: str, config: Config) -> list[dict]:
    rows = [{"series": SERIES[name], "concurrency": level} for level in config.concurrency]
    try:
        folder, spec = served.export(config.channels, config.segment_s)
        with (contextlib.nullcontext([None]) if name == "in-process" else tritonservers(
                folder, served.WORK / "sweep", dynamic_batching=name == "on")) as (triton,):
            server = triton and (triton.grpc_url, spec.model_name)
            for row in rows:
                level = row["concurrency"]
                with (OnnxBackend(folder, max_batch=level, threads=usable_cpus()) if not server
                      else TritonBackend(*server, timeout=served.WAIT_S, shared_memory=False)
                      ) as backend:
                    row.update(served.closed_loop(
                        backend, served.track(spec.padded_length, 0), in_flight=level,
                        warmup=config.warmup * level, budget_s=config.duration_s,
                        requests=config.requests and config.requests * level, server=server))
                row.update(status="ok", audio_s_per_s=row["requests_per_s"] * spec.segment_seconds)
    except Exception as err:  # noqa: BLE001 - a server that would not start, a failed request
        for row in rows:
            row.setdefault("status", served.failed(err))
    return rows


def run(config: Config) -> list[dict]:
    rows = [row for name in config.series for row in _series(name, config)]
    local = {row["concurrency"]: row["requests_per_s"] for row in rows
             if row["status"] == "ok" and "server" not in row}
    for row in rows:
        if "server" in row and row["concurrency"] in local:  # a served level measured
            row["vs_in_process"] = row["requests_per_s"] / local[row["concurrency"]]
    return rows


SCENARIO = Scenario(
    name="serving.sweep",
    title="Served model: requests in flight, batching on and off, against in-process",
    config=Config, run=run, plots=("concurrency",),
    columns=(Column("series", "series"), Column("concurrency", "clients"),
             Column("requests", "requests"), Column("requests_per_s", "req/s", ".2f"),
             Column("audio_s_per_s", "audio s/s", ".2f"), Column("latency_s.p50", "p50 s", ".3f"),
             Column("latency_s.p95", "p95 s", ".3f"), Column("latency_s.p99", "p99 s", ".3f"),
             Column("server.queue_ms", "queue ms/req", ".1f"),
             Column("server.compute_infer_ms", "compute ms/req", ".1f"),
             Column("avg_batch", "avg batch", ".2f"),
             Column("vs_in_process", "vs in-process", ".2f"), Column("status", "status")),
    notes=(
        "Load: `clients` requests of one padded segment kept in flight, a new one sent as each "
        "returns, through a TritonBackend over plain gRPC (in-process: an OnnxBackend batching "
        "up to `clients`); the window drains after the warm-up. Client and server share the CPUs.",
        "Latency: as the client sees it. Queue and compute ms/req: Triton's statistics over the "
        "timed phase (compute_infer: a batch counts once for each request in it). vs in-process: "
        "served req/s over in-process req/s at the same level.",
    ))
