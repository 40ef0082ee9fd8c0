"""The serving scenarios' quick runs against real tritonservers (``serving.sweep``,
``serving.fleet``, ``serving.soak``; ``serving.transport`` in test_bench_transport.py), and
the load generator and Triton statistics arithmetic they share, on fakes.

No timing is asserted: which series wins depends on the machine and its load.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from benchmarks.serving import served  # noqa: E402
from conftest import BENCH_MACHINE  # noqa: E402

pytestmark = pytest.mark.bench

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _section(folder: Path, name: str) -> dict:
    section = results.load(folder / f"{BENCH_MACHINE}.json")["sections"][name]
    assert section["command"].startswith(f"python -m benchmarks.run_all {name} --quick")
    assert section["notes"] and section["rows"]
    return section


def _check_latency(latency: dict) -> None:
    assert 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["p99"] \
        <= latency["max"]
    assert latency["min"] <= latency["mean"] <= latency["max"]


@pytest.mark.server
def test_sweep_quick_measures_every_series_and_level(bench_quick_run):
    """Two servers (batching on, off) and in-process, 1 and 2 requests in flight, 3 timed
    requests per client each."""
    section = _section(bench_quick_run, "serving.sweep")
    config = section["config"]
    assert (config["channels"], config["segment_s"], config["concurrency"],
            config["requests"]) == (4, 1.0, [1, 2], 3)
    by_key = {(row["series"], row["concurrency"]): row for row in section["rows"]}
    assert len(by_key) == len(section["rows"])
    assert set(by_key) == {(series, clients) for series in
                           ("batching on", "batching off", "in-process ONNX Runtime")
                           for clients in (1, 2)}
    for (series, clients), row in by_key.items():
        assert row["status"] == "ok", row
        assert row["requests"] == 3 * clients
        for field in ("requests_per_s", "audio_s_per_s", "elapsed_s", "client_cpu_s_per_request"):
            assert _finite_positive(row[field]), (series, clients, field, row[field])
        assert row["requests_per_s"] == pytest.approx(row["requests"] / row["elapsed_s"])
        assert row["audio_s_per_s"] == pytest.approx(row["requests_per_s"] * 1.0)  # 1 s segments
        _check_latency(row["latency_s"])
        if series == "in-process ONNX Runtime":
            assert "server" not in row and "vs_in_process" not in row
            continue
        assert _finite_positive(row["vs_in_process"])
        server = row["server"]  # Triton's counters over the timed phase
        assert server["inferences"] == server["requests"] >= 1 and server["executions"] >= 1
        assert _finite_positive(server["compute_infer_ms"]) and server["queue_ms"] >= 0
        assert row["avg_batch"] == server["avg_batch"]
        if series == "batching off":
            assert row["avg_batch"] == 1
        assert 1 <= row["avg_batch"] <= clients
    markdown = (bench_quick_run / f"{BENCH_MACHINE}.md").read_text()
    name = results.plot_name(BENCH_MACHINE, "serving.sweep", "concurrency")
    assert (bench_quick_run / name).read_bytes()[:8] == PNG_SIGNATURE
    assert f"]({name})" in markdown


@pytest.mark.server
def test_fleet_quick_measures_one_and_two_servers(bench_quick_run):
    section = _section(bench_quick_run, "serving.fleet")
    config = section["config"]
    assert (config["channels"], config["servers"], config["tracks"], config["track_s"]) == \
        ([4], [1, 2], [2], [3.0])
    cores = section["machine"]["usable_cpus"]
    assert sorted((row["client"], row["servers"], row["threads"]) for row in section["rows"]) \
        == sorted([("triton", 1, cores), ("fleet", 1, cores), ("fleet", 2, cores),
                   ("fleet", 2, max(1, cores // 2))])
    for row in section["rows"]:
        assert row["status"] == "ok", row
        assert row["tracks"] == 2 and row["audio_s"] == pytest.approx(6.0, abs=0.01)
        assert row["jobs"] == 2 * row["servers"] and len(row["walls_s"]) == 1
        for field in ("wall_s", "audio_s_per_s", "speedup", "cpu_busy"):
            assert _finite_positive(row[field]), (field, row)
        assert row["audio_s_per_s"] == pytest.approx(row["audio_s"] / row["wall_s"])
        assert 0 <= row["cpu_others"] <= row["cpu_busy"] <= 1.0001
    (triton,) = [row for row in section["rows"] if row["client"] == "triton"]
    assert triton["speedup"] == 1


@pytest.mark.server
def test_soak_quick_loses_no_track_across_the_restart(bench_quick_run):
    section = _section(bench_quick_run, "serving.soak")
    (row,) = section["rows"]
    assert row["status"] == "ok", row
    assert row["clients"] == section["config"]["clients"] == 2
    assert row["failed"] == 0 and row["errors"] == [] and row["completed"] >= 1
    assert row["duration_s"] >= section["config"]["duration_s"]
    assert 0 < row["restart"]["stopped_at_s"] < row["restart"]["ready_at_s"]
    assert row["audio_s"] == pytest.approx(row["completed"] * row["track_s"])
    _check_latency(row["latency_s"])
    assert 0 <= row["cpu_others"] <= row["cpu_busy"] <= 1.0001


# ---------------------------------------------------------------------------------------------
# What the scenarios share, without a server


class FakeBackend:
    """Answers each submitted segment after ``seconds`` on a thread; counts what it saw."""

    def __init__(self, seconds: float = 0.005, fail: bool = False):
        self.seconds, self.fail = seconds, fail
        self.pool = ThreadPoolExecutor(16)
        self.lock = threading.Lock()
        self.submitted = self.in_flight = self.peak = 0

    def submit(self, mix: np.ndarray):
        with self.lock:
            self.submitted += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        return self.pool.submit(self._answer, mix)

    def _answer(self, mix: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        with self.lock:
            self.in_flight -= 1
        if self.fail:
            raise RuntimeError("refused")
        return mix


def test_closed_loop_keeps_the_window_full_and_times_only_the_timed_answers():
    backend = FakeBackend()
    got = served.closed_loop(backend, np.zeros(4), in_flight=3, warmup=4, requests=7,
                             budget_s=60)
    assert backend.submitted == 4 + 7 and backend.peak == 3
    assert got["requests"] == 7 and "server" not in got
    assert got["requests_per_s"] == pytest.approx(7 / got["elapsed_s"])
    assert got["latency_s"]["min"] >= 0.005 and got["client_cpu_s_per_request"] >= 0
    _check_latency(got["latency_s"])


def test_closed_loop_stops_sending_once_its_budget_is_spent():
    backend = FakeBackend(seconds=0.02)
    got = served.closed_loop(backend, np.zeros(4), in_flight=2, warmup=0, requests=None,
                             budget_s=0.1)
    assert 2 <= got["requests"] <= 20 and backend.submitted == got["requests"]


def test_closed_loop_fails_on_a_failed_request():
    with pytest.raises(RuntimeError, match="refused"):
        served.closed_loop(FakeBackend(fail=True), np.zeros(4), in_flight=2, warmup=0,
                           requests=3, budget_s=60)


def _counters(inferences: int, executions: int, **stages: tuple[int, int]) -> dict:
    zero = {f"{key}_{unit}": 0 for key in ("success", *served.STAGES) for unit in ("count", "ns")}
    return {**zero, "inferences": inferences, "executions": executions,
            **{f"{key}_{unit}": value for key, pair in stages.items()
               for unit, value in zip(("count", "ns"), pair)}}


def test_server_delta_gives_ms_per_request_and_the_average_batch():
    before = _counters(10, 10, success=(10, 0), queue=(10, 5_000_000),
                       compute_infer=(10, 900_000_000))
    after = _counters(16, 12, success=(16, 0), queue=(16, 17_000_000),
                      compute_infer=(16, 1_500_000_000))
    delta = served.server_delta(before, after)
    assert delta["requests"] == delta["inferences"] == 6 and delta["executions"] == 2
    assert delta["avg_batch"] == 3
    assert delta["queue_ms"] == pytest.approx(2.0)
    assert delta["compute_infer_ms"] == pytest.approx(100.0)
    assert delta["compute_input_ms"] is None  # no request counted in that stage
    assert served.server_delta(before, before)["avg_batch"] is None


def test_cpu_share_of_a_busy_block_is_a_share_of_the_machine():
    with served.cpu_share([]) as share:
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            pass
    assert 0 < share["cpu_busy"] <= 1 and 0 <= share["cpu_others"] <= share["cpu_busy"]


def test_generated_tracks_are_stereo_float32_and_differ_by_seed():
    first, second = served.track(4410, 0), served.track(4410, 1)
    assert first.shape == (2, 4410) and first.dtype == np.float32
    assert np.array_equal(first, served.track(4410, 0)) and not np.array_equal(first, second)
    assert 0 < np.abs(first).max() < 1
