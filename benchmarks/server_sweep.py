"""Item 2: the served model. A concurrency sweep against a real tritonserver, batching on/off.

    python -m benchmarks.server_sweep                           # medium model, 2 s segments
    python -m benchmarks.server_sweep --config default --segment 8 --duration 30
    python -m benchmarks.server_sweep --quick                   # tiny: checks that it runs

One random-weight Demucs is exported to ONNX and served twice on loopback, each time by a
fresh ``tritonserver`` (the CPU repository: ONNX Runtime inside the python backend, every
core): once with dynamic batching (the shipped config) and once without. For each number of
concurrent clients (threads, each with its own ``tritonclient.grpc`` client, each sending one
padded segment of ``spec.padded_length`` samples at a time, back to back) the row gives,
after an untimed warm-up, the requests per second, the seconds of audio separated per second,
the client-side p50/p95/p99 latency, and Triton's own per-request queue and compute times
and average batch size from ``get_inference_statistics`` deltas over the timed phase.

The same segments then run in this process on ONNX Runtime (same options as the served
model: intra-op threads = usable CPUs, one inter-op thread) at batch 1 and at the batch the
server typically formed, so served throughput is given as a fraction of in-process
throughput.

With ``--perf-analyzer`` (the default, except with ``--quick``) Triton's own load generator
then measures the batching-on server, still up and warm, at the same concurrency levels, with
the same segment, for ``--duration`` per level (benchmarks/perf_analyzer.py): an independent
cross-check of these threads' numbers, in its own table. ``--quick`` leaves it out because
its first use downloads perf_analyzer and Debian's newer glibc.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import perf_analyzer
from .machine import describe, machine_name, now, usable_cpus
from .models import CONFIGS, export_random
from .plots import save_and_plot
from .results import add_output_arguments, new_section
from .timing import loadavg, measure, percentiles

SCRIPT = "server_sweep"
TITLE = "Served model: concurrency sweep, batching on/off (item 2)"
SEED = 0

SERIES = {"batching on": True, "batching off": False}
LOAD_COLUMNS = [
    {"key": "requests_per_s", "title": "req/s", "format": ".2f"},
    {"key": "audio_s_per_s", "title": "audio s/s", "format": ".2f"},
    {"key": "latency_s.p50", "title": "p50 s", "format": ".3f"},
    {"key": "latency_s.p95", "title": "p95 s", "format": ".3f"},
    {"key": "latency_s.p99", "title": "p99 s", "format": ".3f"},
    {"key": "server.queue_ms", "title": "queue ms/req", "format": ".1f"},
    {"key": "server.compute_infer_ms", "title": "compute ms/req", "format": ".1f"},
    {"key": "avg_batch", "title": "avg batch", "format": ".2f"},
]
"""What a load level measured, as both load generators' tables show it."""


def export_segments(config: str, segment_s: float, out: Path):
    """The random-weight model ``config`` exported with ``segment_s`` segments; its spec."""
    from stemserve.spec import ModelSpec

    export_random(config, SEED, out, segment_length=int(round(segment_s * 44100)))
    return ModelSpec.load(out / "model.json")


def server_stats(client, model: str) -> dict:
    """Cumulative counters of ``model`` (Triton reports its counts as strings)."""
    (stats,) = client.get_inference_statistics(model, as_json=True)["model_stats"]
    infer = stats.get("inference_stats", {})
    out = {"inference_count": int(stats.get("inference_count", 0) or 0),
           "execution_count": int(stats.get("execution_count", 0) or 0)}
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        item = infer.get(key, {})
        out[key] = (int(item.get("count", 0) or 0), int(item.get("ns", 0) or 0))
    return out


def server_delta(before: dict, after: dict) -> dict:
    def per_request_ms(key: str) -> float | None:
        count = after[key][0] - before[key][0]
        return (after[key][1] - before[key][1]) / count / 1e6 if count else None

    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    return {"requests": after["success"][0] - before["success"][0],
            "executions": executions, "inferences": inferences,
            "avg_batch": inferences / executions if executions else None,
            "queue_ms": per_request_ms("queue"),
            "compute_input_ms": per_request_ms("compute_input"),
            "compute_infer_ms": per_request_ms("compute_infer"),
            "compute_output_ms": per_request_ms("compute_output")}


def _sweep_level(url: str, spec, mix: np.ndarray, clients: int, *, warmup: int,
                 requests: int | None, duration: float) -> dict:
    """``clients`` threads sending back to back; fixed ``requests`` each, else ``duration``."""
    import tritonclient.grpc as grpcclient

    model = spec.model_name
    barrier = threading.Barrier(clients + 1)
    start_at: list[float] = []
    latencies: list[list[float]] = [[] for _ in range(clients)]
    ends = [0.0] * clients
    errors: list[str] = []

    def worker(index: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            def once() -> float:
                inp = grpcclient.InferInput(spec.input_name, list(mix.shape), "FP32")
                inp.set_data_from_numpy(mix)
                out = grpcclient.InferRequestedOutput(spec.output_name)
                began = time.perf_counter()
                result = client.infer(model, [inp], outputs=[out])
                result.as_numpy(spec.output_name)
                return time.perf_counter() - began

            for _ in range(warmup):
                once()
        except Exception as err:  # noqa: BLE001 - reported in the row
            errors.append(f"{type(err).__name__}: {err}")
            barrier.abort()
            client.close()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        deadline = start_at[0] + duration
        try:
            while True:
                if requests is not None:
                    if len(latencies[index]) >= requests:
                        break
                elif time.perf_counter() >= deadline:
                    break
                latencies[index].append(once())
                ends[index] = time.perf_counter()
        except Exception as err:  # noqa: BLE001
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(index,), daemon=True)
               for index in range(clients)]
    stats_client = grpcclient.InferenceServerClient(url)
    for thread in threads:
        thread.start()
    load_before = loadavg()
    # Warm-up done by every client: snapshot the counters, then release them together.
    while barrier.n_waiting < clients and not barrier.broken and not errors:
        time.sleep(0.005)
    time.sleep(0.1)  # Triton counts a request just after its response: let warm-up settle
    before = server_stats(stats_client, model)
    cpu0 = time.process_time()
    start_at.append(time.perf_counter())
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    after = server_stats(stats_client, model)
    client_cpu = time.process_time() - cpu0
    stats_client.close()
    samples = [value for per_client in latencies for value in per_client]
    if errors or not samples:
        return {"status": f"failed: {errors[0] if errors else 'no request completed'}"}
    elapsed = max(ends) - start_at[0]
    audio_s = spec.segment_length / spec.sample_rate
    return {"status": "ok", "requests": len(samples), "elapsed_s": elapsed,
            "requests_per_s": len(samples) / elapsed,
            "audio_s_per_s": len(samples) * audio_s / elapsed,
            "latency_s": {**percentiles(samples), "mean": statistics.fmean(samples),
                          "min": min(samples), "max": max(samples)},
            "server": server_delta(before, after),
            "client_cpu_s_per_s": client_cpu / elapsed,
            "loadavg_before": load_before, "loadavg_after": loadavg()}


def _serve_and_sweep(export_dir: Path, work: Path, batching: bool, spec, mix: np.ndarray,
                     args, log, while_up: Callable[[str, list[dict]], None] | None = None
                     ) -> tuple[list[dict], dict]:
    """Start a server, sweep it, then call ``while_up(grpc_url, rows)`` before stopping it."""
    from stemserve.model_repository.local import local_server

    series = "batching on" if batching else "batching off"
    rows = []
    began = time.perf_counter()
    with local_server(export_dir, root=work, logs=work, start_timeout=180,
                      dynamic_batching=batching) as server:
        info = {"series": series, "start_s": time.perf_counter() - began}
        for clients in args.concurrency:
            log(f"{series}: {clients} client(s)")
            row = {"series": series, "batching": batching, "concurrency": clients}
            try:
                row.update(_sweep_level(server.grpc_url, spec, mix, clients,
                                        warmup=args.warmup, requests=args.requests,
                                        duration=args.duration))
            except Exception as err:  # noqa: BLE001
                row["status"] = f"failed: {type(err).__name__}: {err}"
            if row.get("status") == "ok":
                row["avg_batch"] = row["server"]["avg_batch"]
                log(f"  {row['requests_per_s']:.2f} req/s, p95 {row['latency_s']['p95']:.3f} s, "
                    f"avg batch {row['avg_batch']}")
            else:
                log(f"  {row['status']}")
            rows.append(row)
        if while_up:
            while_up(server.grpc_url, rows)
    return rows, info


def _cross_check(argv: list[str], url: str, own: list[dict], spec, mix: np.ndarray,
                 args) -> list[dict]:
    """perf_analyzer at the sweep's levels for --duration each, the same warm-up per client."""
    rates = {row["concurrency"]: row.get("requests_per_s") for row in own}
    computes = {row["concurrency"]: row.get("server", {}).get("compute_infer_ms") for row in own}
    rows = perf_analyzer.run(argv, url, spec.model_name, {spec.input_name: mix[0]},
                             args.concurrency, duration_s=args.duration,
                             warmup={clients: args.warmup * clients
                                     for clients in args.concurrency})
    audio_s = spec.segment_length / spec.sample_rate
    for row in rows:
        row["series"] = "perf_analyzer, batching on"
        if row["status"] == "ok":
            row["requests_per_s"] = row["inferences_per_s"]
            row["audio_s_per_s"] = row["inferences_per_s"] * audio_s
            if rates.get(row["concurrency"]):
                row["sweep_requests_per_s"] = rates[row["concurrency"]]
                row["sweep_compute_infer_ms"] = computes[row["concurrency"]]
                row["vs_sweep"] = row["requests_per_s"] / row["sweep_requests_per_s"]
    return rows


def _in_process(export_dir: Path, spec, mix: np.ndarray, batches: list[int], args) -> list[dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(export_dir / spec.onnx_file), options,
                                   providers=["CPUExecutionProvider"])
    audio_s = spec.segment_length / spec.sample_rate
    rows = []
    for batch in batches:
        data = np.ascontiguousarray(np.repeat(mix, batch, axis=0))
        measured = measure(lambda: session.run([spec.output_name], {spec.input_name: data}),
                           repeats=args.inproc_repeats, warmup=1, budget_s=args.inproc_budget)
        wall = measured.wall.median
        rows.append({"series": "in-process ONNX Runtime", "batch": batch, "status": "ok",
                     "forward_s": wall, "requests_per_s": batch / wall,
                     "audio_s_per_s": batch * audio_s / wall, "cpu_util": measured.cpu_util,
                     "repeats": measured.wall.n, "measurement": measured.to_dict()})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_sweep",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="medium",
                        help="random-weight model size: small (channels=4), medium "
                             "(channels=16), default (the official v2, channels=64)")
    parser.add_argument("--segment", type=float, default=2.0, help="segment seconds (2)")
    parser.add_argument("--concurrency", default="1,2,4,8,16",
                        help="comma-separated client counts (1,2,4,8,16)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="timed seconds per level (10), unless --requests is given")
    parser.add_argument("--requests", type=int, default=None,
                        help="a fixed number of timed requests per client instead of --duration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests per client (2)")
    parser.add_argument("--inproc-repeats", type=int, default=10)
    parser.add_argument("--inproc-budget", type=float, default=20.0,
                        help="seconds cap of each in-process measurement (20)")
    parser.add_argument("--series", default="on,off", help="which servers: on,off")
    parser.add_argument("--quick", action="store_true",
                        help="tiny check: small model, 1 s segments, 1,2 clients, 3 requests")
    parser.add_argument("--perf-analyzer", action=argparse.BooleanOptionalAction, default=None,
                        help="cross-check the batching-on server with Triton's perf_analyzer "
                             "at the same levels (default: on, off with --quick)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.segment, args.concurrency = "small", 1.0, "1,2"
        args.requests, args.warmup, args.inproc_repeats = args.requests or 3, 1, 2
    if args.perf_analyzer is None:
        args.perf_analyzer = not args.quick
    args.concurrency = [int(item) for item in str(args.concurrency).split(",") if item]
    wanted = [item.strip() for item in args.series.split(",")]

    def log(message: str) -> None:
        print(f"[{SCRIPT}] {message}", flush=True)

    machine = describe()
    config = {"model": args.config, "model_args": CONFIGS[args.config],
              "segment_s": args.segment, "concurrency": args.concurrency,
              "duration_s_per_level": None if args.requests else args.duration,
              "requests_per_client": args.requests, "warmup_per_client": args.warmup,
              "transport": "gRPC on loopback (tritonclient.grpc, one client per thread)",
              "usable_cpus": usable_cpus(), "quick": args.quick,
              "perf_analyzer": args.perf_analyzer}
    section = new_section(SCRIPT, TITLE, config=config, machine=machine)
    began = time.perf_counter()
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="stemserve-sweep-") as tmp:
        work = Path(tmp)
        log(f"exporting {args.config} model, {args.segment:g} s segments")
        spec = export_segments(args.config, args.segment, work / "export")
        config.update(segment_samples=spec.segment_length, padded_samples=spec.padded_length)
        mix = (0.1 * rng.standard_normal((1, spec.audio_channels, spec.padded_length))
               ).astype(np.float32)
        cross: dict = {"argv": None, "rows": [], "note": None}
        if not args.perf_analyzer:
            cross["note"] = ("perf_analyzer cross-check not run (--quick or --no-perf-analyzer); "
                             "--perf-analyzer runs Triton's perf_analyzer at the same levels.")
        elif "on" not in wanted:
            cross["note"] = ("perf_analyzer cross-check not run: it measures the batching-on "
                             "server, which --series left out.")
        else:
            log(f"provisioning perf_analyzer {perf_analyzer.VERSION}")
            try:
                cross["argv"] = perf_analyzer.provision()
            except perf_analyzer.PerfAnalyzerUnavailable as err:
                cross["note"] = f"perf_analyzer did not run: {err}."
                log(cross["note"])

        def cross_check(url: str, own: list[dict]) -> None:
            log(f"perf_analyzer at {args.concurrency} client(s)")
            try:
                cross["rows"] = _cross_check(cross["argv"], url, own, spec, mix, args)
            except Exception as err:  # noqa: BLE001 - the sweep's own rows stand
                cross["note"] = f"perf_analyzer failed: {type(err).__name__}: {err}."
                log(cross["note"])
            for row in cross["rows"]:
                log(f"  {row['concurrency']} client(s): " + (
                    f"{row['requests_per_s']:.2f} req/s" if row["status"] == "ok"
                    else row["status"]))

        rows, servers = [], []
        for series, batching in SERIES.items():
            if series.split()[-1] not in wanted:
                continue
            try:
                got, info = _serve_and_sweep(work / "export", work, batching, spec, mix, args, log,
                                             cross_check if batching and cross["argv"] else None)
            except Exception as err:  # noqa: BLE001 - a server that will not start
                got = [{"series": series, "batching": batching, "concurrency": clients,
                        "status": f"failed: {type(err).__name__}: {err}"}
                       for clients in args.concurrency]
                info = {"series": series, "error": str(err)}
                log(f"{series}: {err}")
            rows += got
            servers.append(info)

        on_rows = [row for row in rows if row["series"] == "batching on" and row["status"] == "ok"
                   and row.get("avg_batch")]
        typical = round(on_rows[-1]["avg_batch"]) if on_rows else 1
        typical = max(1, min(8, typical))
        batches = sorted({1, typical, *([2] if args.quick else [])})
        log(f"in-process ONNX Runtime at batch {batches}")
        inproc = _in_process(work / "export", spec, mix, batches, args)

    best_inproc = max(row["audio_s_per_s"] for row in inproc)
    inproc_b1 = next(row["audio_s_per_s"] for row in inproc if row["batch"] == 1)
    for row in rows:
        if row.get("status") == "ok":
            row["vs_in_process"] = row["audio_s_per_s"] / best_inproc
    ok = [row for row in rows if row.get("status") == "ok"]
    best = max(ok, key=lambda row: row["audio_s_per_s"]) if ok else None

    def at(series: str, clients: int) -> dict | None:
        return next((row for row in ok if row["series"] == series
                     and row["concurrency"] == clients), None)

    compare_at = 8 if 8 in args.concurrency else max(args.concurrency)
    on, off = at("batching on", compare_at), at("batching off", compare_at)
    section["rows"] = rows
    section["columns"] = [
        {"key": "series", "title": "series"},
        {"key": "concurrency", "title": "clients"},
        {"key": "requests", "title": "requests"},
        *LOAD_COLUMNS,
        {"key": "vs_in_process", "title": "vs in-process", "format": ".2f"},
        {"key": "status", "title": "status"},
    ]
    section["tables"] = [{
        "title": "In-process ONNX Runtime on the same segments",
        "columns": [{"key": "batch", "title": "batch"},
                    {"key": "forward_s", "title": "s/forward", "format": ".4f"},
                    {"key": "requests_per_s", "title": "segments/s", "format": ".2f"},
                    {"key": "audio_s_per_s", "title": "audio s/s", "format": ".2f"},
                    {"key": "cpu_util", "title": "cpu util", "format": ".2f"},
                    {"key": "repeats", "title": "repeats"}],
        "rows": inproc}]
    if cross["rows"]:
        section["tables"].append({
            "title": f"perf_analyzer {perf_analyzer.VERSION} on the batching-on server "
                     "(cross-check)",
            "columns": [{"key": "concurrency", "title": "clients"},
                        {"key": "requests", "title": "requests"},
                        *LOAD_COLUMNS,
                        {"key": "window_infer_per_s", "title": "req/s per window"},
                        {"key": "vs_sweep", "title": "vs script req/s", "format": ".2f"},
                        {"key": "status", "title": "status"}],
            "rows": cross["rows"]})
    section["extra"] = {
        "servers": servers,
        "in_process": inproc,
        "perf_analyzer": {"argv": cross["argv"], "rows": cross["rows"], "note": cross["note"]},
        "reference_lines": [{"label": f"in-process ONNX Runtime, batch {row['batch']}",
                             "audio_s_per_s": row["audio_s_per_s"],
                             "requests_per_s": row["requests_per_s"]} for row in inproc],
        "best_served": ({"series": best["series"], "concurrency": best["concurrency"],
                         "audio_s_per_s": best["audio_s_per_s"]} if best else None),
        "served_vs_in_process": (best["audio_s_per_s"] / best_inproc) if best else None,
        "served_vs_in_process_batch1": (best["audio_s_per_s"] / inproc_b1) if best else None,
        "batching_on_vs_off": {"concurrency": compare_at,
                               "on_requests_per_s": on and on["requests_per_s"],
                               "off_requests_per_s": off and off["requests_per_s"],
                               "ratio": (on["requests_per_s"] / off["requests_per_s"])
                               if on and off else None},
    }
    notes = [
        "Clients and server share this machine's CPUs: the client threads' own CPU use "
        "(client_cpu_s_per_s in the JSON, serialising the segments over gRPC) is taken from "
        "the model's cores.",
        "Latency is per request as the client sees it (send, queue, compute, receive); queue "
        "and compute ms/req are Triton's own statistics (get_inference_statistics deltas over "
        "the timed phase; compute = compute_infer, per request, so a batch's time counts once "
        "for each request in it).",
        f"Load average at start {machine.get('loadavg')}; per-level load is in each row.",
    ]
    if best:
        notes.append(f"Best served throughput {best['audio_s_per_s']:.2f} audio s/s "
                     f"({best['series']}, {best['concurrency']} clients) = "
                     f"{best['audio_s_per_s'] / best_inproc:.2f}x the best in-process "
                     f"ONNX Runtime rate ({best_inproc:.2f} audio s/s), "
                     f"{best['audio_s_per_s'] / inproc_b1:.2f}x in-process batch 1.")
    if on and off:
        notes.append(f"At {compare_at} clients batching on gives {on['requests_per_s']:.2f} "
                     f"req/s (avg batch {on['avg_batch']:.2f}) vs off "
                     f"{off['requests_per_s']:.2f} req/s: ratio "
                     f"{on['requests_per_s'] / off['requests_per_s']:.2f}.")
    compared = [row for row in cross["rows"] if row.get("vs_sweep")]
    if compared:
        loader = (", its manylinux_2_38 binary run through Debian trixie's glibc loader"
                  if len(cross["argv"]) > 1 else "")
        notes.append(
            f"Cross-check: perf_analyzer {perf_analyzer.VERSION} (Triton's C++ load generator, "
            f"sync gRPC, one thread per concurrent request, the same segment{loader}) on the "
            "batching-on server right after this script's sweep, for --duration per level "
            "as 3 time windows (its stability rule relaxed to 1000 %, so like the sweep it "
            "is one fixed-length measurement; the per-window rates show the spread). "
            "perf_analyzer vs this script: " + "; ".join(
                f"{row['concurrency']} client(s) {row['requests_per_s']:.2f} vs "
                f"{row['sweep_requests_per_s']:.2f} req/s ({row['vs_sweep']:.2f}x), Triton "
                f"compute {row['server']['compute_infer_ms']:.0f} vs "
                f"{format(row['sweep_compute_infer_ms'] or float('nan'), '.0f')} ms/req"
                for row in compared)
            + " (where Triton's compute time differs as much as the rate, the machine's "
            "load changed between the two runs; the load generators did not differ).")
    elif cross["rows"]:
        notes.append("perf_analyzer ran but gave no level to compare: "
                     + "; ".join(f"{row['concurrency']}: {row['status']}"
                                 for row in cross["rows"]) + ".")
    if cross["note"]:
        notes.append(cross["note"])
    if args.quick:
        notes.append("--quick: tiny model and a few requests; a check that the script runs, "
                     "not a measurement.")
    section["notes"] = notes
    section["duration_s"] = time.perf_counter() - began
    section["finished"] = now()
    save_and_plot(section, results_dir=args.results_dir,
                  machine=args.machine or machine_name(machine), plots=("concurrency",), log=log)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
