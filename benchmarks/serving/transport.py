"""What moving the tensors costs: gRPC, system shared memory, none (in-process), per segment,
for a model small enough that it shows: one request at a time, then a window in flight."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import numpy as np
from stemserve.client.backends.onnx import OnnxBackend
from stemserve.client.backends.triton import TritonBackend

from ..machine import usable_cpus
from ..scenario import Column, Scenario, option, tritonservers
from ..timing import Stats
from . import served

IN_PROCESS = "in-process"
SERVED = {"gRPC": False, "shared memory": True}  # TritonBackend's shared_memory
SETTLE_S = 0.1  # pause after each sequential request: idle ONNX Runtime threads spin a while
MB = 1e6


@dataclasses.dataclass(frozen=True)
class Config:
    segments_s: tuple[float, ...] = option((1.0, 10.0, 40.0), "segment seconds, one export "
                                           "and server each", quick=(1.0,))
    channels: int = option(4, "width of the random-weight Demucs v2")
    repeats: int = option(20, "timed sequential requests per mode", quick=3)
    warmup: int = option(1, "untimed sequential requests per mode")
    window: int = option(8, "requests in flight in the throughput measurement")
    window_requests: int = option(24, "timed requests per mode in the window", quick=8)
    budget_s: float = option(6.0, "seconds per mode after which no more requests are sent, "
                                  "once 3 sequential rounds or one window are done")


def _sequential(backends: dict, mix: np.ndarray, config: Config) -> tuple[list[dict], np.ndarray]:
    """One request at a time, the modes taking turns request by request (the first in turn
    changing each round), so that a change of the machine's load hits them all alike."""
    names, outputs = list(backends), {}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # wall, CPU
    began = time.perf_counter()
    for index in range(-config.warmup, config.repeats):  # negative: untimed rounds
        if index >= 3 and time.perf_counter() - began >= config.budget_s * len(names):
            break
        for name in names[index % len(names):] + names[:index % len(names)]:
            cpu, start = time.process_time(), time.perf_counter()
            outputs[name] = backends[name].submit(mix).result()
            if index >= 0:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu))
            time.sleep(SETTLE_S)
    walls = {name: [wall for wall, _ in pairs] for name, pairs in times.items()}
    rows = [{"series": name, "measurement": "sequential", "requests": len(walls[name]),
             "requests_per_s": len(walls[name]) / sum(walls[name]),
             "latency_s": served.latency(walls[name]), "spread": Stats.of(walls[name]).spread,
             "client_cpu_s_per_request": statistics.fmean(cpu for _, cpu in times[name]),
             "max_abs_diff_vs_in_process":
                 float(np.abs(outputs[name] - outputs[IN_PROCESS]).max())} for name in names]
    for row in rows[:-1]:  # the served modes; in-process is last
        row["overhead_ms"] = 1e3 * (row["latency_s"]["p50"] - rows[-1]["latency_s"]["p50"])
    rows[names.index("shared memory")]["saves_ms_vs_grpc"] = 1e3 * statistics.median(
        grpc - shm for grpc, shm in zip(walls["gRPC"], walls["shared memory"]))
    return rows, outputs[IN_PROCESS]


def _segment(segment_s: float, config: Config) -> list[dict]:
    folder, spec = served.export(config.channels, segment_s)
    mix = served.track(spec.padded_length, 0)
    loop = dict(in_flight=config.window, warmup=config.window,
                requests=config.window_requests, budget_s=config.budget_s)
    with contextlib.ExitStack() as stack:
        (triton,) = stack.enter_context(tritonservers(folder, served.WORK / "transport"))
        server = (triton.grpc_url, spec.model_name)
        backends = {mode: stack.enter_context(TritonBackend(
            *server, timeout=served.WAIT_S, shared_memory=shared, shm_slots=config.window))
            for mode, shared in SERVED.items()}
        with OnnxBackend(folder, max_batch=1, threads=usable_cpus()) as local:
            rows, output = _sequential({**backends, IN_PROCESS: local}, mix, config)
        rows += [{"series": mode, **served.closed_loop(backend, mix, **loop, server=server)}
                 for mode, backend in backends.items()]
    with OnnxBackend(folder, max_batch=config.window, threads=usable_cpus()) as local:
        rows.append({"series": IN_PROCESS, **served.closed_loop(local, mix, **loop)})
    grpc, shm, _ = rows[-3:]
    shm["vs_grpc"] = shm["requests_per_s"] / grpc["requests_per_s"]
    payload = (mix.nbytes + output.nbytes) / MB
    for row in rows:
        row.setdefault("measurement", f"window {config.window}")
        row.update(segment_s=segment_s, status="ok", input_mb=mix.nbytes / MB,
                   output_mb=output.nbytes / MB, payload_mb=payload,
                   mb_per_s=row["requests_per_s"] * payload)
        if "overhead_ms" in row:
            row["overhead_ms_per_mb"] = row["overhead_ms"] / payload
        if "server" in row:
            row["server_io_ms"] = sum(row["server"][f"compute_{stage}_ms"]
                                      for stage in ("input", "output"))
    return rows


def run(config: Config) -> list[dict]:
    rows = []
    for segment_s in config.segments_s:
        try:
            rows += _segment(segment_s, config)
        except Exception as err:  # noqa: BLE001 - export, server or a request failed
            rows.append({"segment_s": segment_s, "status": served.failed(err)})
    return rows


SCENARIO = Scenario(
    name="serving.transport",
    title="Transport: plain gRPC against system shared memory against in-process",
    config=Config, run=run,
    columns=(Column("segment_s", "segment s"), Column("series", "mode"),
             Column("measurement", "measurement"), Column("requests", "n"),
             Column("payload_mb", "payload MB", ".1f"), Column("latency_s.p50", "median s", ".4f"),
             Column("latency_s.p95", "p95 s", ".4f"), Column("overhead_ms", "overhead ms", ".1f"),
             Column("saves_ms_vs_grpc", "saves ms/req vs gRPC (paired)", ".1f"),
             Column("client_cpu_s_per_request", "client CPU s/req", ".4f"),
             Column("server_io_ms", "server in+out ms/req", ".1f"),
             Column("requests_per_s", "segments/s", ".2f"), Column("mb_per_s", "MB/s", ".0f"),
             Column("vs_grpc", "vs gRPC", ".2f"), Column("avg_batch", "avg batch", ".2f"),
             Column("status", "status")),
    notes=(
        "Client, server, its python-backend stub and ONNX Runtime share these CPUs, on loopback.",
        "Overhead = served median - in-process median (OnnxBackend, max_batch 1, the server's "
        "graph and threads): transfer, queue delay and the python backend's copies to and from "
        "its stub (shared memory removes only protobuf and the socket). It can be negative; "
        "'saves ms/req vs gRPC', the median of the paired differences, is steadier.",
        "Sequential: the modes take turns request by request, each followed by a 0.1 s pause "
        "(ONNX Runtime's idle threads spin a while). Window: the first `window` answers "
        "untimed; in-process batches up to `window` like the dynamic batcher (avg batch: "
        "Triton's). Server in+out: Triton's compute_input + compute_output per request.",
    ))
