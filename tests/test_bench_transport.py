"""The transport scenario's quick run against a real tritonserver writes a valid section.

The test runs the quick run itself (``conftest.BENCH_RUN_ON_THEIR_OWN``), so that it can run
alone. No timing is asserted: which transport wins depends on the machine and its load.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from conftest import BENCH_MACHINE  # noqa: E402

pytestmark = [pytest.mark.bench, pytest.mark.server]

MODES = {"gRPC", "shared memory", "in-process"}


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_transport_quick_writes_a_valid_section(tmp_path):
    """1 s segments, one server, every mode sequential and with a window of 8."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "serving.transport",
                           "--quick", "--machine", BENCH_MACHINE, "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = results.load(tmp_path / f"{BENCH_MACHINE}.json")  # validates the whole file
    section = data["sections"]["serving.transport"]
    assert section["command"].startswith("python -m benchmarks.run_all serving.transport --quick")
    config = section["config"]
    assert config["segments_s"] == [1.0] and config["channels"] == 4
    window = f"window {config['window']}"

    by_key = {(row["series"], row["measurement"]): row for row in section["rows"]}
    assert len(by_key) == len(section["rows"])
    assert set(by_key) == {(mode, measurement) for mode in MODES
                           for measurement in ("sequential", window)}
    for (mode, measurement), row in by_key.items():
        assert row["status"] == "ok", row
        assert row["segment_s"] == 1.0
        assert row["payload_mb"] == pytest.approx(row["input_mb"] + row["output_mb"])
        # Stereo float32 in, four stereo stems out of about the same length.
        assert row["input_mb"] >= 2 * 44100 * 4 / 1e6
        assert 3 * row["input_mb"] < row["output_mb"] < 4 * row["input_mb"]
        for field in ("requests", "requests_per_s", "mb_per_s", "client_cpu_s_per_request",
                      "latency_s.p50", "latency_s.p95"):
            assert _finite_positive(results.get(row, field)), (mode, measurement, field, row)
        latency = row["latency_s"]
        assert latency["min"] <= latency["p50"] <= latency["p95"] <= latency["max"]
        assert row["mb_per_s"] == pytest.approx(row["requests_per_s"] * row["payload_mb"])
        if measurement == "sequential":
            assert row["requests"] == 3  # --quick: 3 requests
            assert row["spread"] >= 0
            assert row["max_abs_diff_vs_in_process"] < 1e-5  # the transport loses nothing
            if mode == "in-process":
                assert "overhead_ms" not in row
            else:  # served minus in-process medians: may be negative on a noisy machine
                assert math.isfinite(row["overhead_ms"])
                assert row["overhead_ms_per_mb"] == pytest.approx(
                    row["overhead_ms"] / row["payload_mb"])
            # the paired difference of gRPC and shared memory, on the shared memory row
            assert ("saves_ms_vs_grpc" in row) == (mode == "shared memory")
        else:
            assert 1 <= row["requests"] <= config["window_requests"]
            assert row["requests_per_s"] == pytest.approx(row["requests"] / row["elapsed_s"])
            if mode == "in-process":
                assert "server" not in row
            else:  # Triton's counters over the timed window
                assert row["server"]["requests"] >= 1 and _finite_positive(row["avg_batch"])
                assert _finite_positive(row["server_io_ms"])
            assert ("vs_grpc" in row) == (mode == "shared memory")
    assert math.isfinite(by_key["shared memory", "sequential"]["saves_ms_vs_grpc"])
    assert _finite_positive(by_key["shared memory", window]["vs_grpc"])

    markdown = (tmp_path / f"{BENCH_MACHINE}.md").read_text()
    assert "(`serving.transport`)" in markdown
    assert any("python backend" in note for note in section["notes"])
