"""Item 4: transport. Plain gRPC vs system shared memory for the segment tensors.

    python -m benchmarks.transport                      # 1, 10 and 40 s segments
    python -m benchmarks.transport --segments 10 --repeats 40
    python -m benchmarks.transport --quick              # tiny: checks that it runs

For each segment length a small random-weight Demucs (channels=4: little compute, so the
transport shows) is exported for that length and served by its own ``tritonserver`` on
loopback (the CPU repository as shipped: ONNX Runtime in the python backend, dynamic
batching). The same padded segment then goes through the client's
:class:`~stemserve.client.backends.triton.TritonBackend` with the tensors in the gRPC messages
("gRPC") and in system shared memory regions ("shared memory"), and through the in-process
:class:`~stemserve.client.backends.onnx.OnnxBackend` on the same export ("in-process": the
same graph with no transport, the floor).

Two measurements per mode: one request at a time (latency; the three modes take turns
request by request, so a change of load hits all alike), and a window of requests in
flight, a new one sent as each returns, as the separation pipeline does (throughput). Each
row gives the client process's CPU seconds per request (what serialising costs the client),
and the served sequential rows the transport overhead over the in-process median, in ms and
in ms per MB of payload (input + output tensor bytes, MB = 10^6 bytes).
"""
from __future__ import annotations

import argparse
import queue
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .machine import describe, machine_name, now, usable_cpus
from .models import CONFIGS
from .results import add_output_arguments, new_section, save_section
from .server_sweep import export_segments, server_delta, server_stats
from .timing import Stats, loadavg, percentiles

SCRIPT = "transport"
TITLE = "Transport: plain gRPC vs system shared memory (item 4)"
MODEL = "small"
SEED = 0
MB = 1e6
#: Served modes: the ``shared_memory`` argument of TritonBackend.
SERVED = {"gRPC": False, "shared memory": True}
IN_PROCESS = "in-process"
MODES = (*SERVED, IN_PROCESS)
SEQUENTIAL = "sequential"
#: Pause after each sequential request: ONNX Runtime's idle threads spin for about 50 ms
#: after a run (measured on this 2-core VM), on a core the next request would want.
SETTLE_S = 0.1
#: Seconds a window's request may wait for its answer before the measurement is failed.
WAIT_S = 300.0


def _latency_ms(stats: Stats) -> dict:
    return {**{key: value * 1e3 for key, value in percentiles(stats.samples, (50, 95)).items()},
            "min": stats.min * 1e3, "max": stats.max * 1e3, "mean": stats.mean * 1e3}


def _sequential(backends: dict, mix: np.ndarray, *, repeats: int, warmup: int,
                budget_s: float) -> dict[str, dict]:
    """One request at a time, the backends taking turns (the first in turn changes each round).

    Taking turns request by request makes a change of the machine's load hit every backend
    alike. A pause after each request lets ONNX Runtime's idle threads (here and in the
    server) stop spinning, so that no request pays for its predecessor's spin. Stops after
    ``repeats`` rounds, or once ``budget_s`` per backend is spent and 3 rounds are done.
    Returns per backend its wall and process-CPU Stats and its first output.
    """
    firsts = {}
    for name, backend in backends.items():
        for _ in range(warmup):
            firsts[name] = backend.submit(mix).result()
            time.sleep(SETTLE_S)
    walls: dict[str, list[float]] = {name: [] for name in backends}
    cpus: dict[str, list[float]] = {name: [] for name in backends}
    names = list(backends)
    began = time.perf_counter()
    for index in range(repeats):
        if index >= 3 and time.perf_counter() - began >= budget_s * len(names):
            break
        for name in names[index % len(names):] + names[:index % len(names)]:
            cpu, start = time.process_time(), time.perf_counter()
            backends[name].submit(mix).result()
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - cpu)
            time.sleep(SETTLE_S)
    return {name: {"wall": Stats.of(walls[name]), "cpu": Stats.of(cpus[name]),
                   "output": firsts[name]} for name in backends}


def _window(backend, mix: np.ndarray, *, window: int, requests: int, budget_s: float) -> dict:
    """``window`` requests in flight, the next sent as each returns, as the pipeline does.

    The first ``window`` answers are untimed (the batch shapes warm up), the window staying
    full across them; then ``requests`` answers are timed, fewer once ``budget_s`` is spent
    (never fewer than the ``window`` already in flight).
    """
    done: queue.Queue = queue.Queue()

    def send() -> None:
        start = time.perf_counter()
        backend.submit(mix).add_done_callback(
            lambda future: done.put((future, time.perf_counter() - start)))

    def receive() -> float:
        future, latency = done.get(timeout=WAIT_S)
        future.result()  # a failed request fails the measurement
        return latency

    for _ in range(window):
        send()
    for _ in range(window):
        receive()
        send()
    cpu, began = time.process_time(), time.perf_counter()
    sent, latencies = window, []
    while len(latencies) < sent:
        latencies.append(receive())
        if sent < requests and time.perf_counter() - began < budget_s:
            send()
            sent += 1
    elapsed = time.perf_counter() - began
    return {"requests": sent, "elapsed_s": elapsed,
            "client_cpu_s_per_request": (time.process_time() - cpu) / sent,
            "latency_ms": _latency_ms(Stats.of(latencies))}


def _server_counters(url: str, model: str) -> dict:
    """Triton's cumulative statistics once the last response has been counted."""
    import tritonclient.grpc as grpcclient

    time.sleep(0.1)  # Triton counts a request just after its response
    client = grpcclient.InferenceServerClient(url)
    try:
        return server_stats(client, model)
    finally:
        client.close()


def _measure_segment(segment_s: float, work: Path, args, log) -> tuple[list[dict], dict]:
    """Export, serve and measure every mode at one segment length."""
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.client.backends.triton import TritonBackend
    from stemserve.model_repository.local import local_server

    export = work / f"export-{segment_s:g}"
    began = time.perf_counter()
    spec = export_segments(MODEL, segment_s, export)
    info = {"segment_s": segment_s, "segment_samples": spec.segment_length,
            "padded_samples": spec.padded_length, "export_s": time.perf_counter() - began}
    mix = (0.1 * np.random.default_rng(SEED).standard_normal(
        (spec.audio_channels, spec.padded_length))).astype(np.float32)
    base = {"segment_s": segment_s, "input_mb": mix.nbytes / MB}
    rows: list[dict] = []

    def add(mode: str, measurement: str, **fields) -> dict:
        row = {**base, "series": mode, "measurement": measurement,
               "in_flight": 1 if measurement == SEQUENTIAL else args.window, **fields}
        rows.append(row)
        return row

    began = time.perf_counter()
    with local_server(export, root=work, logs=work, start_timeout=180) as server:
        info["server_start_s"] = time.perf_counter() - began
        window = f"window {args.window}"
        backends: dict = {}
        refused: dict[str, str] = {}
        try:
            for mode, shared in SERVED.items():
                try:
                    backends[mode] = TritonBackend(server.grpc_url, timeout=WAIT_S,
                                                   shared_memory=shared, shm_slots=args.window)
                except Exception as err:  # noqa: BLE001 - e.g. shared memory refused: a row says so
                    refused[mode] = f"failed: {type(err).__name__}: {err}"
            backends[IN_PROCESS] = OnnxBackend(export, max_batch=1, threads=usable_cpus())
            log(f"{segment_s:g} s: {', '.join(backends)} in turn, {args.repeats} sequential "
                "requests")
            sequential = _sequential(backends, mix, repeats=args.repeats, warmup=args.warmup,
                                     budget_s=args.budget)
            backends.pop(IN_PROCESS).close()
            reference = sequential[IN_PROCESS]["output"]
            base["output_mb"] = reference.nbytes / MB
            base["payload_mb"] = base["input_mb"] + base["output_mb"]
            floor = sequential[IN_PROCESS]["wall"].median
            for mode, got in sequential.items():
                wall = got["wall"]
                row = add(mode, SEQUENTIAL, status="ok", requests=wall.n,
                          elapsed_s=sum(wall.samples), latency_ms=_latency_ms(wall),
                          samples_ms=[value * 1e3 for value in wall.samples], spread=wall.spread,
                          client_cpu_s_per_request=sum(got["cpu"].samples) / wall.n,
                          max_abs_diff_vs_in_process=float(np.abs(got["output"] - reference).max()))
                if mode != IN_PROCESS:
                    row["overhead_ms"] = (wall.median - floor) * 1e3
                    row["overhead_ms_per_mb"] = row["overhead_ms"] / base["payload_mb"]
            for mode, status in refused.items():
                for measurement in (SEQUENTIAL, window):
                    add(mode, measurement, status=status)

            for mode, backend in backends.items():
                log(f"{segment_s:g} s: {mode}, {window}")
                try:
                    before = _server_counters(server.grpc_url, spec.model_name)
                    got = _window(backend, mix, window=args.window, requests=args.window_requests,
                                  budget_s=args.budget)
                    delta = server_delta(before, _server_counters(server.grpc_url,
                                                                   spec.model_name))
                    add(mode, window, status="ok", **got, server=delta, avg_batch=delta["avg_batch"])
                except Exception as err:  # noqa: BLE001
                    add(mode, window, status=f"failed: {type(err).__name__}: {err}")
        finally:
            for backend in backends.values():
                backend.close()

    # The in-process floor at the server's batch limit, as the served window can batch.
    log(f"{segment_s:g} s: {IN_PROCESS}, {window}")
    local = OnnxBackend(export, max_batch=args.window, threads=usable_cpus())
    try:
        add(IN_PROCESS, window, status="ok", max_batch=args.window,
            **_window(local, mix, window=args.window, requests=args.window_requests,
                      budget_s=args.budget))
    finally:
        local.close()
    audio_s = spec.segment_length / spec.sample_rate
    for row in rows:
        if row["status"] == "ok":
            row["segments_per_s"] = row["requests"] / row["elapsed_s"]
            row["mb_per_s"] = row["segments_per_s"] * base["payload_mb"]
            row["audio_s_per_s"] = row["segments_per_s"] * audio_s
    return rows, info


def _comparison(rows: list[dict], segment_s: float, window: str) -> dict:
    """Shared memory against gRPC at one segment length (None where a row failed)."""
    def value(mode: str, measurement: str, key: str) -> float | None:
        return next((row[key] for row in rows if row["segment_s"] == segment_s
                     and row["series"] == mode and row["measurement"] == measurement
                     and row["status"] == "ok"), None)

    def cpu_ms(mode: str) -> float | None:
        seconds = value(mode, SEQUENTIAL, "client_cpu_s_per_request")
        return None if seconds is None else seconds * 1e3

    def server_io_ms(mode: str) -> float | None:
        server = value(mode, window, "server") or {}
        parts = (server.get("compute_input_ms"), server.get("compute_output_ms"))
        return None if None in parts else sum(parts)

    grpc = value("gRPC", SEQUENTIAL, "samples_ms")
    shm = value("shared memory", SEQUENTIAL, "samples_ms")
    grpc_rate = value("gRPC", window, "segments_per_s")
    shm_rate = value("shared memory", window, "segments_per_s")
    return {"segment_s": segment_s,
            "payload_mb": value(IN_PROCESS, SEQUENTIAL, "payload_mb"),
            "in_process_ms": (value(IN_PROCESS, SEQUENTIAL, "latency_ms") or {}).get("p50"),
            "grpc_overhead_ms": value("gRPC", SEQUENTIAL, "overhead_ms"),
            "shm_overhead_ms": value("shared memory", SEQUENTIAL, "overhead_ms"),
            "shm_saves_ms": statistics.median(g - s for g, s in zip(grpc, shm))
            if grpc and shm else None,
            "grpc_cpu_ms": cpu_ms("gRPC"), "shm_cpu_ms": cpu_ms("shared memory"),
            "grpc_server_io_ms": server_io_ms("gRPC"),
            "shm_server_io_ms": server_io_ms("shared memory"),
            "window_shm_vs_grpc": shm_rate / grpc_rate if shm_rate and grpc_rate else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--segments", default="1,10,40",
                        help="comma-separated segment seconds, one export and server each "
                             "(1,10,40)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed sequential requests per mode (20)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed sequential requests per mode (1)")
    parser.add_argument("--window", type=int, default=8,
                        help="requests in flight in the throughput measurement (8)")
    parser.add_argument("--window-requests", type=int, default=24,
                        help="timed requests per mode in the throughput measurement (24)")
    parser.add_argument("--budget", type=float, default=6.0,
                        help="seconds per mode after which a measurement sends no more "
                             "requests, once it has 3 sequential rounds or a window (6)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny check: 1 s segments, 3 requests, one window")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.segments, args.repeats, args.warmup, args.window_requests = "1", 3, 1, 8
    segments = [float(item) for item in str(args.segments).split(",") if item]

    def log(message: str) -> None:
        print(f"[{SCRIPT}] {message}", flush=True)

    machine = describe()
    config = {"model": MODEL, "model_args": CONFIGS[MODEL], "segments_s": segments,
              "sequential_repeats": args.repeats, "warmup": args.warmup,
              "window": args.window, "window_requests": args.window_requests,
              "budget_s": args.budget, "usable_cpus": usable_cpus(), "quick": args.quick}
    section = new_section(SCRIPT, TITLE, config=config, machine=machine)
    began = time.perf_counter()
    rows: list[dict] = []
    segment_info: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="stemserve-transport-") as tmp:
        for segment_s in segments:
            load_before = loadavg()
            try:
                got, info = _measure_segment(segment_s, Path(tmp), args, log)
            except Exception as err:  # noqa: BLE001 - export, server or a request failed
                log(f"{segment_s:g} s: {err}")
                got = [{"segment_s": segment_s, "series": mode, "measurement": measurement,
                        "status": f"failed: {type(err).__name__}: {err}"}
                       for mode in MODES for measurement in (SEQUENTIAL, f"window {args.window}")]
                info = {"segment_s": segment_s, "error": str(err)}
            info.update(loadavg_before=load_before, loadavg_after=loadavg())
            for row in got:
                if row["status"] == "ok":
                    log(f"  {row['series']:>13} {row['measurement']:>10}: "
                        f"p50 {row['latency_ms']['p50']:.1f} ms, "
                        f"{row['segments_per_s']:.2f} segments/s, client CPU "
                        f"{1e3 * row['client_cpu_s_per_request']:.1f} ms/request")
            rows += got
            segment_info.append(info)

    window = f"window {args.window}"
    comparisons = [_comparison(rows, segment_s, window) for segment_s in segments]
    served_ok = [row for row in rows if row["status"] == "ok" and row["series"] in SERVED]
    section["rows"] = rows
    section["columns"] = [
        {"key": "segment_s", "title": "segment s"},
        {"key": "series", "title": "mode"},
        {"key": "measurement", "title": "measurement"},
        {"key": "requests", "title": "n"},
        {"key": "payload_mb", "title": "payload MB", "format": ".1f"},
        {"key": "latency_ms.p50", "title": "median ms", "format": ".1f"},
        {"key": "latency_ms.p95", "title": "p95 ms", "format": ".1f"},
        {"key": "spread", "title": "spread", "format": ".2f"},
        {"key": "overhead_ms", "title": "overhead ms", "format": ".1f"},
        {"key": "overhead_ms_per_mb", "title": "overhead ms/MB", "format": ".2f"},
        {"key": "client_cpu_s_per_request", "title": "client CPU s/req", "format": ".4f"},
        {"key": "segments_per_s", "title": "segments/s", "format": ".2f"},
        {"key": "mb_per_s", "title": "MB/s", "format": ".0f"},
        {"key": "avg_batch", "title": "avg batch", "format": ".2f"},
        {"key": "status", "title": "status"},
    ]
    section["tables"] = [{
        "title": "Shared memory against gRPC, per segment length",
        "columns": [{"key": "segment_s", "title": "segment s"},
                    {"key": "payload_mb", "title": "payload MB", "format": ".1f"},
                    {"key": "in_process_ms", "title": "in-process ms", "format": ".1f"},
                    {"key": "grpc_overhead_ms", "title": "gRPC overhead ms", "format": ".1f"},
                    {"key": "shm_overhead_ms", "title": "shm overhead ms", "format": ".1f"},
                    {"key": "shm_saves_ms", "title": "shm saves ms/request (paired)",
                     "format": ".1f"},
                    {"key": "grpc_cpu_ms", "title": "gRPC client CPU ms", "format": ".1f"},
                    {"key": "shm_cpu_ms", "title": "shm client CPU ms", "format": ".1f"},
                    {"key": "grpc_server_io_ms", "title": "gRPC server in+out ms",
                     "format": ".1f"},
                    {"key": "shm_server_io_ms", "title": "shm server in+out ms",
                     "format": ".1f"},
                    {"key": "window_shm_vs_grpc", "title": f"{window}: shm / gRPC segments/s",
                     "format": ".2f"}],
        "rows": comparisons}]
    section["extra"] = {"segments": segment_info, "comparisons": comparisons}
    section["notes"] = [
        "Everything shares this machine's CPUs on loopback: the client, tritonserver, its "
        "python-backend stub process and ONNX Runtime's threads. Serialising, copying and "
        "sending the tensors takes cores from the model, so the overhead is the wall time "
        "that costs here, not what it would cost with the client on another host.",
        "Overhead = served median - in-process median (OnnxBackend, max_batch 1, same graph "
        "and intra-op thread count as the server). It is everything between the client and "
        "ONNX Runtime: the tensor transfer, the dynamic batcher's queue delay (a lone "
        "request may wait up to max_queue_delay, 2 ms), and the python backend, which copies "
        "each tensor between tritonserver and its stub process in both modes. Shared memory "
        "only removes the protobuf serialisation and the socket transfer; a C++ backend "
        "would gain more.",
        "Overhead is a difference of two noisy medians: where the segment's compute dwarfs "
        "the transport (long segments, a busy machine) it can come out negative, and only "
        "a difference beyond the spread means anything. 'shm saves (paired)' is the median "
        "over rounds of gRPC minus shared memory latency in the same round, steadier than a "
        "difference of medians; client CPU s/req is the steadiest figure of all.",
        "Sequential: the three modes take turns request by request (so a load change hits "
        f"all alike), with a {SETTLE_S:g} s pause after each: ONNX Runtime's idle threads "
        "spin for about 50 ms after a run (measured here), in this process and in the "
        "server, on a core the next request wants. Back to back, a served request's reply "
        "would meet the server's spinning threads on these 2 cores.",
        "Client CPU s/req is this process's CPU time (all threads) / requests: gRPC's "
        "serialisation and copies, or the shared-memory copies in and out of the region "
        "(the client copies the output out so the caller owns it). For in-process it is the "
        "model's own compute.",
        f"The window measurement keeps {args.window} requests in flight; the server's dynamic "
        "batcher batches them (avg batch, from Triton's statistics over the whole "
        "measurement), so the in-process row there uses "
        f"OnnxBackend(max_batch={args.window}) to batch alike. The first {args.window} "
        "answers are untimed, the window staying full across them; latency there is per "
        "request from send to answer, queueing behind the window included.",
        "Server in+out ms (shared memory vs gRPC table) is Triton's compute_input + "
        f"compute_output per request over the {args.window}-window measurement: moving the "
        "tensors into the python backend and its answer back out, which the transport "
        "changes.",
        "Payload = input + output tensor bytes per request (float32; MB = 10^6 bytes); "
        "max_abs_diff_vs_in_process in each sequential row checks every mode returns the "
        "same stems.",
        f"Load average at start {machine.get('loadavg')}; the machine is shared, so compare "
        "rows of one run, and only differences beyond the spread.",
    ]
    for item in comparisons:
        if item["shm_saves_ms"] is not None:
            section["notes"].append(
                f"{item['segment_s']:g} s segments ({item['payload_mb']:.1f} MB a request): "
                f"shared memory saves {item['shm_saves_ms']:.1f} ms a request "
                f"(overhead over in-process: gRPC {item['grpc_overhead_ms']:.1f} ms, "
                f"shared memory {item['shm_overhead_ms']:.1f} ms).")
    if args.quick:
        section["notes"].append("--quick: 1 s segments and a few requests; a check that "
                                "the script runs, not a measurement.")
    section["notes"].append("No plot: the existing plot kinds do not fit rows keyed by "
                            "segment length and mode.")
    section["duration_s"] = time.perf_counter() - began
    section["finished"] = now()
    path = save_section(section, results_dir=args.results_dir,
                        machine=args.machine or machine_name(machine))
    log(f"wrote {path}")
    return 0 if served_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
