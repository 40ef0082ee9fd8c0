"""benchmarks.perf_analyzer: its report parsers on a real run, and its refusals, offline.

Nothing here downloads: provisioning is only exercised on the paths that fail before the
network (no cache with downloads off, no apt-get) or that reuse a cache.
"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import perf_analyzer  # noqa: E402

pytestmark = pytest.mark.bench

# Captured from perf_analyzer 2.60.0 (through trixie's loader) against the batching-on
# tritonserver 2.51 serving the sweep's "medium" model on 2 s segments, with run()'s options:
#   -i grpc --shape mix:2,94890 --input-data DIR --concurrency-range 2:2:1
#   --warmup-request-count 4 --measurement-mode time_windows --measurement-interval 1111
#   --stability-percentage 1000 --max-trials 3 -v --verbose-csv -f REPORT
REAL_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
2,6.58335,135,1746,134351,157,150399,3929,4,356836,412057,460955,507456,290723,139,290554
"""  # noqa: E501 - verbatim
# The same run's console report (stdout), measurement part.
REAL_CONSOLE = """\
Request concurrency: 2
Request concurrency: 2
  Pass [1] throughput: 4.49923 infer/sec. Avg latency: 396192 usec (std 86495 usec). 
  Pass [2] throughput: 4.34724 infer/sec. Avg latency: 397442 usec (std 6653 usec). 
  Pass [3] throughput: 10.8107 infer/sec. Avg latency: 205849 usec (std 114817 usec). 
  Client: 
    Request count: 27
    Throughput: 6.58335 infer/sec
    Avg client overhead: 1.79%
    Avg latency: 290723 usec (standard deviation 133779 usec)
    p50 latency: 356836 usec
    p90 latency: 412057 usec
    p95 latency: 460955 usec
    p99 latency: 507456 usec
    Avg gRPC time: 290693 usec (marshal 135 usec + response wait 290554 usec + unmarshal 4 usec)
  Server: 
    Inference count: 27
    Execution count: 26
    Successful request count: 27
    Avg request latency: 288844 usec (overhead 8 usec + queue 134351 usec + compute input 157 usec + compute infer 150399 usec + compute output 3929 usec)
Inferences/Second vs. Client Average Batch Latency
Concurrency: 2, throughput: 6.58335 infer/sec, latency 290723 usec
"""  # noqa: E501, W291 - verbatim


def test_parse_csv_of_a_real_run():
    (row,) = perf_analyzer.parse_csv(REAL_CSV)
    assert row["concurrency"] == 2
    assert row["inferences_per_s"] == pytest.approx(6.58335)
    assert row["latency_s"] == pytest.approx({"p50": 0.356836, "p90": 0.412057, "p95": 0.460955,
                                              "p99": 0.507456, "mean": 0.290723})
    assert row["server"] == pytest.approx({"queue_ms": 134.351, "compute_input_ms": 0.157,
                                           "compute_infer_ms": 150.399,
                                           "compute_output_ms": 3.929})
    assert row["client"] == pytest.approx({"send_ms": 0.135, "recv_ms": 0.004,
                                           "network_ms": 1.746})


def test_parse_csv_stops_at_a_blank_line_and_refuses_other_reports():
    rows = perf_analyzer.parse_csv(REAL_CSV + "\nServer Metrics,whatever\n1,2\n")
    assert [row["concurrency"] for row in rows] == [2]
    with pytest.raises(ValueError, match="not a perf_analyzer concurrency report"):
        perf_analyzer.parse_csv("Request Rate,Inferences/Second\n1,2\n")


def test_console_of_a_real_run():
    found = perf_analyzer.parse_console(REAL_CONSOLE)
    assert found == {"requests": 27, "inferences": 27, "executions": 26,
                     "window_infer_per_s": [4.49923, 4.34724, 10.8107],
                     "avg_batch": pytest.approx(27 / 26)}
    # the merged rate is the requests over the three windows together
    assert found["requests"] / perf_analyzer.parse_csv(REAL_CSV)[0]["inferences_per_s"] \
        == pytest.approx(3 * 1.111 * perf_analyzer.WINDOW_STRETCH, rel=0.05)
    assert perf_analyzer.parse_console("error: failed to get model metadata") == {}


def test_no_cache_and_no_downloads_is_a_clear_error(tmp_path):
    with pytest.raises(perf_analyzer.PerfAnalyzerUnavailable,
                       match=r"2\.60\.0 is not provisioned in .*downloading is off"):
        perf_analyzer.provision(tmp_path / "cache", download=False)
    assert not (tmp_path / "cache").exists()


def test_without_apt_get_the_error_says_what_is_missing(tmp_path, monkeypatch):
    """The binary needs glibc 2.38; without apt-get there is no newer one to fetch."""
    if sys.platform != "linux" or perf_analyzer.platform.machine() != "x86_64":
        pytest.skip("the platform check refuses first here")
    wheel_dir = tmp_path / "wheel"

    def fake_wheel(version: str, work: Path) -> Path:  # a wheel whose binary cannot run
        wheel_dir.mkdir()
        wheel = wheel_dir / f"perf_analyzer-{version}-py3-none-{perf_analyzer.WHEEL_PLATFORM}.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("perf_analyzer/bin/perf_analyzer", "#!/bin/sh\nexit 1\n")
        return wheel

    monkeypatch.setattr(perf_analyzer, "_download_wheel", fake_wheel)
    monkeypatch.setattr(perf_analyzer.shutil, "which", lambda tool: None)
    with pytest.raises(perf_analyzer.PerfAnalyzerUnavailable,
                       match="needs glibc 2.38.*apt-get, dpkg-deb is not installed"):
        perf_analyzer.provision(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-made is left behind


def test_a_provisioned_cache_is_reused_without_downloading(tmp_path, monkeypatch):
    root = tmp_path / "cache" / perf_analyzer.VERSION
    root.mkdir(parents=True)
    (root / perf_analyzer.MANIFEST).write_text(json.dumps(
        {"binary": "perf_analyzer/bin/perf_analyzer",
         "loader": "debian/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
         "library_path": ["debian/usr/lib/x86_64-linux-gnu"]}))
    monkeypatch.setattr(perf_analyzer.subprocess, "run", pytest.fail)
    argv = perf_analyzer.provision(tmp_path / "cache")
    assert argv[0] == str(root / "debian/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert argv[1] == "--library-path"
    assert argv[2].split(":")[0] == str(root / "debian/usr/lib/x86_64-linux-gnu")
    assert argv[3] == str(root / "perf_analyzer/bin/perf_analyzer")
