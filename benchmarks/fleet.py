"""Issue 7, past one machine: one client over several tritonservers, and a soak with a restart.

Two measurements, each against real tritonservers on loopback ports:

- ``scaling``: throughput (audio seconds separated per second) of one client separating a
  batch of tracks, the CLI's way (:meth:`stemserve.client.Separator.separate_files`, two tracks
  in flight per server), against 1, 2 and 3 servers, for the small test model and for a
  medium one (32 channels) where the network's compute dominates; several servers run once
  with ONNX Runtime on every core each (the template's default) and once with the cores
  split between them. On a 2-core machine all servers share the same two cores: whatever
  they gain comes from filling the gaps one server leaves idle (gRPC, the python backend,
  batching waits, the client's own work), never from more compute. Every figure records
  the share of the CPUs other processes took meanwhile.
- ``soak``: ``clients`` concurrent clients (threads, each with its own FleetBackend) keep
  separating short generated tracks against 2 servers for ``duration`` seconds; one server
  is stopped and started again half way. Every result is compared with the single-server
  output of the same track; a failed or different track counts as failed.

Usage (from the repository root)::

    python -m benchmarks.fleet scaling            # about 8 minutes on 2 cores
    python -m benchmarks.fleet soak               # 5 minutes and the start-up
    python -m benchmarks.fleet all --quick        # a tiny configuration: checks it runs

Results: ``benchmarks/results/fleet-<machine>.json`` (one key per measurement, replaced by
a rerun) and ``fleet-<machine>.md``, its tables. ``tests/test_fleet.py`` runs :func:`soak`
for 20 seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf

from benchmarks.machine import command_line, describe, machine_name, now
from benchmarks.models import export_random
from benchmarks.timing import percentiles
from stemserve.client import Separator, TrackResult
from stemserve.client.backends.fleet import FleetBackend
from stemserve.client.backends.triton import TritonBackend
from stemserve.errors import StemserveError
from stemserve.model_repository.local import local_servers
from stemserve.model_repository.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
WORK_DIR = ROOT / "build" / "benchmarks" / "fleet"
RATE = 44100
MODELS = {"small": dict(channels=4, segment_length=RATE),
          "medium": dict(channels=32, segment_length=2 * RATE)}
"""Random-weight Demucs v2 configurations: the test model, and one with some 60 times its
compute per second of audio (2.5x real time in-process on 2 cores, against 13x)."""
WORKLOADS = {"small": (8, 20.0), "medium": (4, 15.0)}
"""Tracks and seconds per track of one scaling run: some 10 to 30 s of work per run."""
MATCH_TOLERANCE = 1e-5
"""Fleet vs single-server output: batch composition changes ONNX Runtime's sums by ~1e-8."""


# ---------------------------------------------------------------------------------------------
# Models, servers, tracks

def export_model(name: str, root: Path = WORK_DIR) -> Path:
    """An ONNX export of the random-weight model ``name`` (cached: exporting needs torch)."""
    return export_random(MODELS[name], 1234, root / f"export-{name}")


def generated_track(seconds: float, seed: int) -> np.ndarray:
    """[2, n] float32: a chord and noise, different for every seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(80, 900, 3))
    return (0.2 * tones + 0.1 * rng.standard_normal((2, t.size))).astype(np.float32)


def _ticks(servers: Sequence[TritonServer]) -> tuple[int, int, int]:
    """CPU ticks so far: the machine's busy and total, and this benchmark's: this process,
    the servers it has reaped (a restart), and the process groups of its running servers."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    groups = {server.pid for server in servers}
    own = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            values = [int(value) for value in stat.read_text().rsplit(")", 1)[1].split()[1:15]]
        except OSError:
            continue  # gone meanwhile
        if int(stat.parent.name) == os.getpid():
            own += sum(values[10:14])  # utime, stime and those of reaped children
        elif values[1] in groups:
            own += values[10] + values[11]
    return sum(fields) - fields[3] - fields[4], sum(fields), own


class CpuShare:
    """CPU use over a ``with`` block as a share of all cores: the whole machine's, and that
    of processes outside this benchmark (other people's work skews a figure; it is recorded
    next to it)."""

    def __init__(self, servers: Sequence[TritonServer]):
        self._servers = servers
        self.busy = self.others = 0.0

    def __enter__(self) -> "CpuShare":
        self._start = _ticks(self._servers)
        return self

    def __exit__(self, *exc) -> None:
        busy, total, own = (end - start for end, start in zip(_ticks(self._servers),
                                                                self._start, strict=True))
        self.busy = busy / max(total, 1)
        self.others = max(0.0, busy - own) / max(total, 1)


def wait_until_quiet(servers: Sequence[TritonServer], limit: float = 900.0) -> float:
    """Wait (up to ``limit`` s) until processes outside this benchmark use under 5 % of the
    machine; returns the share last seen."""
    deadline = time.monotonic() + limit
    while True:
        with CpuShare(servers) as cpu:
            time.sleep(3)
        if cpu.others < 0.05 or time.monotonic() > deadline:
            return cpu.others
        print(f"waiting: other processes use {100 * cpu.others:.0f} % of the CPUs", flush=True)
        time.sleep(10)


# ---------------------------------------------------------------------------------------------
# Scaling

def scaling(models: Sequence[str], counts: Sequence[int], repeats: int,
            workload: tuple[int, float] | None = None) -> list[dict]:
    """Throughput of one client over 1..N servers, per model; one row per configuration.

    Each count runs with servers that use every core (the default) and, for several
    servers, with the cores split between them (``cores // servers`` threads, at least 1).
    ``workload``: (tracks, seconds per track), else the model's :data:`WORKLOADS`.
    """
    cores = len(os.sched_getaffinity(0))
    rows = []
    for name in models:
        tracks, seconds = workload or WORKLOADS[name]
        export = export_model(name)
        with tempfile.TemporaryDirectory(dir=_work_dir()) as folder:
            work = Path(folder)
            paths = []
            for index in range(tracks):
                paths.append(work / f"track-{index}.wav")
                sf.write(str(paths[-1]), generated_track(seconds, index).T, RATE,
                         subtype="FLOAT")
            baseline = 1.0
            for count in counts:
                for threads in dict.fromkeys([0] if count == 1 else [0, max(1, cores // count)]):
                    with local_servers(export, count, root=work, logs=work,
                                       intra_op_threads=threads) as servers:
                        for kind in ["triton", "fleet"] if count == 1 else ["fleet"]:
                            row = _throughput(kind, servers, paths, work / "out", repeats)
                            if kind == "triton":
                                baseline = row["throughput"]
                            row.update(model=name, channels=MODELS[name]["channels"],
                                       threads=threads or cores,
                                       speedup=row["throughput"] / baseline)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    return rows


def _throughput(kind: str, servers: list[TritonServer], paths: list[Path], out: Path,
                repeats: int) -> dict:
    """Separate every track ``repeats`` times (after one warm-up track), the CLI's way: two
    tracks per server at once. The median run's throughput, in audio seconds per second."""
    urls = [server.grpc_url for server in servers]
    open_backend = (lambda: TritonBackend(urls[0])) if kind == "triton" else \
        (lambda: FleetBackend(urls))
    jobs = 2 * len(urls)
    audio = sum(sf.info(str(path)).duration for path in paths)
    walls, busy, others = [], [], []
    with open_backend() as backend:
        separator = Separator(backend)
        _check_all(separator.separate_files(paths[:1], out))
        for _ in range(repeats):
            wait_until_quiet(servers)
            start = time.perf_counter()
            with CpuShare(servers) as cpu:
                _check_all(separator.separate_files(paths, out, jobs=jobs))
            walls.append(time.perf_counter() - start)
            busy.append(cpu.busy)
            others.append(cpu.others)
    wall = statistics.median(walls)
    return dict(client=kind, servers=len(urls), jobs=jobs, tracks=len(paths),
                audio_s=round(audio, 1), wall_s=wall, walls_s=walls,
                throughput=audio / wall, cpu_busy=statistics.median(busy),
                cpu_others=max(others))


def _check_all(results: Iterator[TrackResult]) -> None:
    for result in results:
        if result.error is not None:
            raise result.error


# ---------------------------------------------------------------------------------------------
# Soak

@dataclasses.dataclass
class SoakResult:
    """What the clients of :func:`soak` saw."""

    clients: int
    duration_s: float
    completed: int = 0
    failed: int = 0
    retried: int = 0
    latencies_s: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    """Distinct reasons tracks failed."""
    restart: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """The reported figures: counts, latency percentiles, the restart's timing."""
        latency = percentiles(self.latencies_s, (50, 95)) if self.latencies_s else {}
        return dict(clients=self.clients, duration_s=round(self.duration_s, 1),
                    completed=self.completed, failed=self.failed, retried=self.retried,
                    latency_p50_s=latency.get("p50"), latency_p95_s=latency.get("p95"),
                    restart=self.restart, errors=self.errors[:10])


def soak(urls: Sequence[str], *, clients: int = 8, duration: float = 300.0,
         track_seconds: float = 5.0, distinct_tracks: int = 4,
         restart_server: Callable[[], None] | None = None, restart_at: float = 0.5,
         backoff: float = 0.5) -> SoakResult:
    """``clients`` threads, each with its own :class:`FleetBackend` over ``urls``, separate
    generated tracks back to back for ``duration`` seconds; ``restart_server`` is called
    ``restart_at`` of the way in. A track counts as failed when it raises or when its stems
    differ from the single-server stems of the same track."""
    mixes = [generated_track(track_seconds, seed) for seed in range(distinct_tracks)]
    with TritonBackend(urls[0]) as single:
        references = [Separator(single).separate_array(mix, RATE) for mix in mixes]
    result = SoakResult(clients, duration)
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + duration

    def client(index: int) -> None:
        with FleetBackend(urls, backoff=backoff) as backend:
            separator = Separator(backend)
            turn = index
            while time.monotonic() < deadline:
                track = turn % len(mixes)
                turn += 1
                began = time.monotonic()
                try:
                    stems = separator.separate_array(mixes[track], RATE)
                    error = max(float(np.abs(stems[name] - references[track][name]).max())
                                for name in stems)
                    problem = (None if error < MATCH_TOLERANCE
                               else f"track {track} differs by {error:.2e}")
                except Exception as err:  # whatever it is, the track failed
                    problem = str(err) if isinstance(err, StemserveError) else repr(err)
                with lock:
                    result.latencies_s.append(time.monotonic() - began)
                    result.completed += problem is None
                    result.failed += problem is not None
                    if problem is not None and problem not in result.errors:
                        result.errors.append(problem)
            with lock:
                result.retried += backend.retried

    def restarter() -> None:
        time.sleep(duration * restart_at)
        result.restart["stopped_at_s"] = round(time.monotonic() - start, 1)
        try:
            restart_server()
        except Exception as err:  # reported with the result, not lost in a thread
            result.restart["error"] = repr(err)
        else:
            result.restart["ready_at_s"] = round(time.monotonic() - start, 1)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    if restart_server is not None:
        threads.append(threading.Thread(target=restarter))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.duration_s = time.monotonic() - start
    return result


def run_soak(clients: int, duration: float, track_seconds: float) -> dict:
    """:func:`soak` against 2 fresh servers of the small model, the second one restarted."""
    export = export_model("small")
    with tempfile.TemporaryDirectory(dir=_work_dir()) as folder:
        work = Path(folder)
        with local_servers(export, 2, root=work, logs=work) as servers:
            wait_until_quiet(servers)
            with CpuShare(servers) as cpu:
                result = soak([server.grpc_url for server in servers], clients=clients,
                              duration=duration, track_seconds=track_seconds,
                              restart_server=servers[1].restart)
    summary = result.summary()
    summary.update(servers=2, model="small", track_seconds=track_seconds,
                   audio_s=round(result.completed * track_seconds, 1), cpu_busy=cpu.busy,
                   cpu_others=cpu.others)
    print(json.dumps(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# Results

def _work_dir() -> Path:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    return WORK_DIR


def save(results_dir: Path, machine: str, key: str, value: object, config: dict) -> Path:
    """Replace ``key`` in ``fleet-<machine>.json`` and rewrite the markdown next to it."""
    path = results_dir / f"fleet-{machine}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["machine"] = describe()
    data[key] = dict(date=now(), command=command_line(), config=config, results=value)
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(data))
    return path


def markdown(data: dict) -> str:
    """The results as tables (generated: edit the script, not the file)."""
    machine = data["machine"]
    lines = ["# One client over several tritonservers", "",
             f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, "
             f"{machine['memory_gib']} GiB. Generated by `benchmarks/fleet.py`.", ""]
    if "scaling" in data:
        section = data["scaling"]
        lines += [f"## Scaling ({section['date']})", "", f"`{section['command']}`", "",
                  "| model | client | servers | threads / server | tracks x s | wall s "
                  "| audio s / s | speedup | CPU busy (others) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in section["results"]:
            lines.append(f"| {row['model']} ({row['channels']} ch) | {row['client']} "
                         f"| {row['servers']} | {row['threads']} | {row['tracks']} x "
                         f"{row['audio_s'] / row['tracks']:.0f} | {row['wall_s']:.1f} "
                         f"| {row['throughput']:.1f} | {row['speedup']:.2f}x "
                         f"| {100 * row['cpu_busy']:.0f} % ({100 * row['cpu_others']:.0f} %) |")
        lines += ["", "Speedup: against the plain one-server client (`triton`) of the same "
                  "model; median of the runs. Threads: ONNX Runtime intra-op threads of each "
                  "server. CPU busy: the whole machine, of all cores; in brackets, the share "
                  "other processes took (the runs wait for it to be under 5 % first). All "
                  "servers share this machine's cores: more servers can only fill the gaps "
                  "one leaves idle (gRPC, python backend, batching waits), never add compute.",
                  ""]
    if "soak" in data:
        section = data["soak"]
        row = section["results"]
        lines += [f"## Soak ({section['date']})", "", f"`{section['command']}`", "",
                  "| clients | servers | minutes | tracks done | failed | segments re-sent "
                  "| p50 s | p95 s | restart (stopped, ready at s) | CPU busy (others) |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {row['clients']} | {row['servers']} | {row['duration_s'] / 60:.1f} "
                  f"| {row['completed']} | {row['failed']} | {row['retried']} "
                  f"| {row['latency_p50_s']:.2f} | {row['latency_p95_s']:.2f} "
                  f"| {row['restart'].get('stopped_at_s')}, {row['restart'].get('ready_at_s')} "
                  f"| {100 * row['cpu_busy']:.0f} % ({100 * row['cpu_others']:.0f} %) |",
                  "", f"Tracks of {row['track_seconds']:g} s of the {row['model']} model; "
                  "each result compared with the single-server stems of the same track.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("scaling", "soak", "all"))
    parser.add_argument("--quick", action="store_true", help="tiny configuration")
    parser.add_argument("--machine", default=None, help="results name (default: this CPU)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    machine = args.machine or machine_name()
    if args.what in ("scaling", "all"):
        config = (dict(models=["small"], counts=[1, 2], repeats=1, workload=(2, 3.0))
                  if args.quick else dict(models=list(MODELS), counts=[1, 2, 3], repeats=3))
        save(args.results_dir, machine, "scaling", scaling(**config), config)
    if args.what in ("soak", "all"):
        config = (dict(clients=2, duration=10.0, track_seconds=2.0) if args.quick else
                  dict(clients=8, duration=300.0, track_seconds=5.0))
        print(save(args.results_dir, machine, "soak", run_soak(**config), config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
