"""The transport benchmark's quick run against a real tritonserver writes a valid section.

No timing is asserted: which transport wins depends on the machine and its load.
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

pytestmark = pytest.mark.bench

MACHINE = "test-box"
MODES = {"gRPC", "shared memory", "in-process"}


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_transport_quick_writes_a_valid_section(tmp_path):
    """1 s segments, one server, every mode sequential and with a window of 8."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.transport", "--quick",
                           "--machine", MACHINE, "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = results.load(tmp_path / f"{MACHINE}.json")  # validates the whole file
    section = data["sections"]["transport"]
    assert "benchmarks.transport" in section["command"] and "--quick" in section["command"]
    config = section["config"]
    assert config["segments_s"] == [1.0] and config["model_args"] == {"channels": 4}
    window = f"window {config['window']}"

    by_key = {(row["series"], row["measurement"]): row for row in section["rows"]}
    assert set(by_key) == {(mode, measurement) for mode in MODES
                           for measurement in ("sequential", window)}
    for (mode, measurement), row in by_key.items():
        assert row["status"] == "ok", row
        assert row["segment_s"] == 1.0
        assert row["payload_mb"] == pytest.approx(row["input_mb"] + row["output_mb"])
        # Stereo float32 in, four stereo stems out of about the same length.
        assert row["input_mb"] >= 2 * 44100 * 4 / 1e6
        assert 3 * row["input_mb"] < row["output_mb"] < 4 * row["input_mb"]
        for field in ("requests", "elapsed_s", "segments_per_s", "mb_per_s", "audio_s_per_s",
                      "client_cpu_s_per_request", "latency_ms.p50", "latency_ms.p95"):
            assert _finite_positive(results.get(row, field)), (mode, measurement, field, row)
        latency = row["latency_ms"]
        assert latency["min"] <= latency["p50"] <= latency["p95"] <= latency["max"]
        assert row["segments_per_s"] == pytest.approx(row["requests"] / row["elapsed_s"])
        if measurement == "sequential":
            assert row["in_flight"] == 1 and row["requests"] == 3  # --quick: 3 requests
            assert row["spread"] >= 0
            assert row["max_abs_diff_vs_in_process"] < 1e-5  # the transport loses nothing
            if mode == "in-process":
                assert "overhead_ms" not in row
            else:  # served minus in-process medians: may be negative on a noisy machine
                assert math.isfinite(row["overhead_ms"])
                assert row["overhead_ms_per_mb"] == pytest.approx(
                    row["overhead_ms"] / row["payload_mb"])
        else:
            assert row["in_flight"] == config["window"] and row["requests"] >= 1
            if mode != "in-process":  # Triton's counters over the timed window
                assert row["server"]["requests"] >= 1 and _finite_positive(row["avg_batch"])

    (comparison,) = section["extra"]["comparisons"]
    for field in ("payload_mb", "in_process_ms", "grpc_cpu_ms", "shm_cpu_ms",
                  "grpc_server_io_ms", "shm_server_io_ms", "window_shm_vs_grpc"):
        assert _finite_positive(comparison[field]), (field, comparison)
    assert math.isfinite(comparison["shm_saves_ms"])
    (segment,) = section["extra"]["segments"]
    assert segment["padded_samples"] >= segment["segment_samples"] == 44100
    assert _finite_positive(segment["server_start_s"])

    markdown = (tmp_path / f"{MACHINE}.md").read_text()
    assert "(`transport`)" in markdown and "### Shared memory against gRPC" in markdown
    assert any("python backend" in note for note in section["notes"])
