"""Issue 14's levers on the CPU: batch size, precision, ONNX Runtime's arena, short tracks.

    python -m benchmarks.cpu_levers                 # official-size v2, 8 s segments (~10 min)
    python -m benchmarks.cpu_levers --quick         # small model: checks that it runs

One in-process ONNX Runtime session per measurement, each in a fresh process (its peak
memory is its own), on the same random weights, one after another:

- ``batch``: seconds per segment at each batch size, fp32 and int8 (``stemserve export
  --int8``; ``--precisions`` may add bf16, OpenVINO), with the sessions the server and the
  in-process backend use
  (:mod:`stemserve.runtime.ort_session`); this picks the CPU repository's
  ``max_batch_size``.
- ``arena``: the same sequence of runs as a track gives the server (full batches, a lone
  full segment, a shorter tail, full batches again) with ONNX Runtime's default arena
  (grows by powers of two; what stemserve uses), an arena growing by what is requested, and
  no arena; peak memory and the warm batch's time.
- ``short``: a 2-segment track (one full segment and a 75 % tail, which cannot share a
  batch: demucs runs the tail at its own length): one session on every core running them in
  turn, against one single-threaded session per segment running both at once (what two
  Triton model instances would do).

Every layer's cost is linear in time, so 8 s segments stand for the 40 s ones the server
sends (per audio second) at a fifth of the time; the end-to-end script measures the real
thing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .machine import describe, machine_name, now, usable_cpus
from .memory import peak_rss_mib
from .models import CONFIGS, export_random
from .plots import save_and_plot
from .results import add_output_arguments, new_section
from .timing import loadavg, measure

SCRIPT = "cpu_levers"
TITLE = "CPU levers: batch size, int8, ONNX Runtime's arena, short tracks (issue 14)"
SEED = 0
RATE = 44100
ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = Path(__file__).resolve().parent / ".cache" / SCRIPT
ARENAS = {"power_of_two": "ONNX Runtime's default arena, growing by powers of two (stemserve)",
          "same_as_requested": "an arena growing by what is requested",
          "none": "no arena"}
TAIL = 0.75
"""The tail segment of a track of two segments at 25 % overlap, as a share of a segment."""


# ---------------------------------------------------------------------------------------------
# Child side

def _session(export: Path, precision: str, arena: str = "power_of_two", threads: int = 0):
    """A session as stemserve makes them, or with another arena (the ``arena`` lever)."""
    import onnxruntime as ort

    from stemserve.runtime.ort_session import cpu_session, cpu_session_options
    from stemserve.spec import load_export_spec

    spec = load_export_spec(export, precision)
    model_file = export / spec.onnx_file
    if arena == "power_of_two":  # bf16: OpenVINO (the arena lever is ONNX Runtime's)
        return cpu_session(model_file, threads, precision,
                           (spec.audio_channels, spec.padded_length))
    options = cpu_session_options(threads)
    if arena == "none":
        options.enable_cpu_mem_arena = False
    else:  # a process-wide arena that grows by what is requested (kSameAsRequested)
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                   ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def _mix(batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((batch, 2, length)).astype(np.float32)


def _tail_length(spec) -> int:
    return spec.valid_length(int(TAIL * spec.segment_length))


def _batch_job(job: dict, export: Path, spec) -> dict:
    session = _session(export, job["precision"])
    mix = _mix(job["batch"], spec.padded_length)
    run = lambda: session.run(None, {spec.input_name: mix})  # noqa: E731
    got = measure(run, repeats=job["repeats"], warmup=1)
    return {"per_item_s": got.wall.median / job["batch"],
            "cpu_per_item_s": got.cpu.median / job["batch"], "measurement": got.to_dict()}


def _arena_job(job: dict, export: Path, spec) -> dict:
    session = _session(export, "fp32", job["arena"])
    full, tail = spec.padded_length, _tail_length(spec)
    steps = [(2, full), (1, full), (1, tail), (2, full)]
    times = []
    for batch, length in steps:
        start = time.perf_counter()
        session.run(None, {spec.input_name: _mix(batch, length)})
        times.append(time.perf_counter() - start)
    return {"steps": [f"batch {b} x {n}" for b, n in steps], "step_s": times,
            "warm_batch_s": times[-1]}


def _short_job(job: dict, export: Path, spec) -> dict:
    lengths = [spec.padded_length, _tail_length(spec)]
    if job["mode"] == "in_turn":
        session = _session(export, job["precision"])
        runs = [lambda n=n: session.run(None, {spec.input_name: _mix(1, n)}) for n in lengths]
        track = lambda: [run() for run in runs]  # noqa: E731
    else:
        sessions = [_session(export, job["precision"], threads=1) for _ in lengths]

        def track() -> None:
            errors: list[BaseException] = []

            def run(session, length: int) -> None:
                try:
                    session.run(None, {spec.input_name: _mix(1, length)})
                except BaseException as err:  # noqa: BLE001 - re-raised below: a failed
                    errors.append(err)        # run must not be timed as a fast one
            workers = [threading.Thread(target=run, args=(s, n))
                       for s, n in zip(sessions, lengths)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            if errors:
                raise errors[0]
    got = measure(track, repeats=job["repeats"], warmup=1)
    return {"track_s": got.wall.median, "measurement": got.to_dict()}


def child(job: dict) -> None:
    """Run one measurement and print its result as the last line of stdout."""
    from stemserve.spec import load_export_spec

    export = Path(job["export"])
    spec = load_export_spec(export)
    result = {"batch": _batch_job, "arena": _arena_job, "short": _short_job}[job["kind"]](
        job, export, spec)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent side

def _run_child(job: dict, log) -> dict:
    load = loadavg()
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{SCRIPT}", "--child",
                           json.dumps(job)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        log(f"  failed ({done.returncode}); its stderr is above")
        return {"status": f"failed: exit {done.returncode}"}
    return {"status": "ok", "loadavg_before": load, **json.loads(lines[-1][len("RESULT "):])}


def _notes(rows: list[dict], segment_s: float, reduce_range: bool) -> list[str]:
    ok = [row for row in rows if row["status"] == "ok"]
    notes = [
        f"Segments of {segment_s:g} s at the network's valid length, random weights (seed "
        f"{SEED}), {usable_cpus()} intra-op threads unless a row says otherwise; each row in a "
        "fresh process (peak RSS is the process's VmHWM, the model's weights included). "
        f"int8: ONNX Runtime's dynamic quantization, reduce_range={reduce_range}.",
    ]
    batch = {(row["precision"], row["batch"]): row["per_item_s"] for row in ok
             if row["lever"] == "batch"}
    for precision in ("fp32", "int8", "bf16"):
        mine = {b: s for (p, b), s in batch.items() if p == precision}
        if mine:
            best = min(mine, key=mine.get)
            notes.append(f"{precision}: per segment " + ", ".join(
                f"batch {b} {s:.2f} s" for b, s in sorted(mine.items()))
                + f"; fastest per item at batch {best}.")
    for b in sorted({b for _, b in batch}):
        for fast in ("int8", "bf16"):
            if ("fp32", b) in batch and (fast, b) in batch:
                notes.append(f"{fast} vs fp32 at batch {b}: "
                             f"{batch['fp32', b] / batch[fast, b]:.2f}x.")
    arena = {row["arena"]: row for row in ok if row["lever"] == "arena"}
    if "power_of_two" in arena:
        base = arena["power_of_two"]
        for name, row in arena.items():
            if name != "power_of_two":
                notes.append(f"{ARENAS[name]}: peak {row['peak_rss_mib']:.0f} MiB vs "
                             f"{base['peak_rss_mib']:.0f} MiB, warm batch "
                             f"{row['warm_batch_s']:.2f} s vs {base['warm_batch_s']:.2f} s.")
    short = {(row["precision"], row["mode"]): row["track_s"] for row in ok
             if row["lever"] == "short"}
    for precision in ("fp32", "int8", "bf16"):
        if (precision, "in_turn") in short and (precision, "at_once") in short:
            notes.append(f"Two-segment track, {precision}: both at once on one thread each "
                         f"{short[precision, 'at_once']:.2f} s vs in turn on every core "
                         f"{short[precision, 'in_turn']:.2f} s "
                         f"({short[precision, 'in_turn'] / short[precision, 'at_once']:.2f}x).")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT}",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--segment", type=float, default=8.0, help="segment seconds (8)")
    parser.add_argument("--batches", default="1,2,4,5,8", help="batch sizes (1,2,4,5,8)")
    parser.add_argument("--precisions", default="fp32,int8",
                        help="fp32, int8 and/or bf16 (OpenVINO; the arena lever is fp32's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="tiny check: small model, 1 s segments, batches 1 and 2")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.config, args.segment, args.batches, args.repeats = "small", 1.0, "1,2", 1
    batches = [int(item) for item in args.batches.split(",") if item]
    precisions = [item for item in args.precisions.split(",") if item]

    def log(message: str) -> None:
        print(f"[{SCRIPT}] {message}", flush=True)

    from stemserve.client.models import export_dir_for
    from stemserve.cpu import cpu_has_vnni

    machine = describe()
    config = {"model": args.config, "model_args": CONFIGS[args.config],
              "segment_s": args.segment, "batches": batches, "precisions": precisions,
              "repeats": args.repeats, "usable_cpus": usable_cpus(), "quick": args.quick}
    section = new_section(SCRIPT, TITLE, config=config, machine=machine)
    began = time.perf_counter()
    export = export_random(args.config, SEED, WORK_DIR / f"export-{args.config}-{args.segment:g}s",
                           segment_length=int(args.segment * RATE))
    for precision in sorted(set(precisions) - {"fp32"}):
        log(f"the {precision} variant of the export (made once)")
        export_dir_for(export, precision=precision)
    common = {"export": str(export), "repeats": args.repeats}
    jobs = [{"lever": "batch", "kind": "batch", "precision": p, "batch": b}
            for p in precisions for b in batches]
    jobs += [{"lever": "arena", "kind": "arena", "arena": name} for name in ARENAS]
    jobs += [{"lever": "short", "kind": "short", "precision": p, "mode": mode}
             for p in precisions for mode in ("in_turn", "at_once")]
    rows = []
    for job in jobs:
        label = ", ".join(f"{k} {v}" for k, v in job.items() if k not in ("lever", "kind"))
        log(f"{job['lever']}: {label}")
        row = {**job, "series": f"{job['lever']}: {label}",
               **_run_child({**common, **job}, log)}
        rows.append(row)
        if row["status"] == "ok":
            shown = row.get("per_item_s", row.get("warm_batch_s", row.get("track_s")))
            log(f"  {shown:.2f} s, peak {row['peak_rss_mib']:.0f} MiB")
    section["rows"] = rows
    section["columns"] = [
        {"key": "lever", "title": "lever"},
        {"key": "precision", "title": "precision"},
        {"key": "batch", "title": "batch"},
        {"key": "arena", "title": "arena"},
        {"key": "mode", "title": "short track"},
        {"key": "per_item_s", "title": "s per segment", "format": ".2f"},
        {"key": "cpu_per_item_s", "title": "CPU s per segment", "format": ".2f"},
        {"key": "warm_batch_s", "title": "warm batch of 2 s", "format": ".2f"},
        {"key": "track_s", "title": "2-segment track s", "format": ".2f"},
        {"key": "peak_rss_mib", "title": "peak MiB", "format": ".0f"},
        {"key": "status", "title": "status"},
    ]
    section["notes"] = _notes(rows, args.segment, not cpu_has_vnni())
    if args.quick:
        section["notes"].append("--quick: a tiny model; a check that the script runs.")
    section["duration_s"] = time.perf_counter() - began
    section["finished"] = now()
    save_and_plot(section, results_dir=args.results_dir,
                  machine=args.machine or machine_name(machine), plots=(), log=log)
    return 0 if any(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
