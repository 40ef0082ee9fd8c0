"""serving.perf_analyzer: its CSV parser on a real report, its refusals offline, and its quick
run against a real tritonserver.

Provisioning is exercised offline on the paths that fail before the network (no cache with
downloads off, no apt-get) or that reuse a cache; the quick run provisions perf_analyzer into
``benchmarks/.cache/perf_analyzer`` the first time (the pip and Debian package registries),
and a machine that cannot is a failure here, not a skip.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from benchmarks.serving import perf_analyzer  # noqa: E402
from conftest import BENCH_MACHINE  # noqa: E402

pytestmark = pytest.mark.bench

# Captured from perf_analyzer 2.60.0 (through trixie's loader) against the batching-on
# tritonserver 2.51 serving the sweep's 16-channel model on 2 s segments (--verbose-csv adds
# the last three columns, which the parser ignores).
REAL_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
2,6.58335,135,1746,134351,157,150399,3929,4,356836,412057,460955,507456,290723,139,290554
"""  # noqa: E501 - verbatim


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _fake_binary(path: Path) -> None:
    """What the pip install leaves, as a binary that cannot run here (as on glibc < 2.38)."""
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)


def test_parse_csv_of_a_real_run():
    (row,) = perf_analyzer.parse_csv(REAL_CSV)
    assert row == {"concurrency": 2, "requests_per_s": pytest.approx(6.58335),
                   "latency_s": pytest.approx({"p50": 0.356836, "p90": 0.412057,
                                               "p95": 0.460955, "p99": 0.507456}),
                   "server": pytest.approx({"queue_ms": 134.351, "compute_input_ms": 0.157,
                                            "compute_infer_ms": 150.399,
                                            "compute_output_ms": 3.929})}


def test_parse_csv_refuses_another_report():
    with pytest.raises(KeyError, match="Concurrency"):
        perf_analyzer.parse_csv("Request Rate,Inferences/Second\n1,2\n")


def test_no_cache_and_no_downloads_is_a_clear_error(tmp_path):
    with pytest.raises(perf_analyzer.Unavailable,
                       match=r"2\.60\.0 is not provisioned in .* downloads are off"):
        perf_analyzer.provision(tmp_path / "cache", download=False)
    assert not (tmp_path / "cache").exists()


def test_run_without_perf_analyzer_skips_every_level(tmp_path, monkeypatch):
    """Rows are skipped, not failed, and no model is exported nor server started."""
    monkeypatch.setattr(perf_analyzer, "PROVISIONED", tmp_path / "cache")
    monkeypatch.setattr(perf_analyzer.served, "export", pytest.fail)
    config = perf_analyzer.Config(concurrency=(1, 4), download=False)
    rows = perf_analyzer.run(config)
    assert [(row["series"], row["concurrency"]) for row in rows] == [("perf_analyzer", 1),
                                                                    ("perf_analyzer", 4)]
    assert all(row["status"].startswith("skipped: perf_analyzer unavailable: 2.60.0 is not "
                                        "provisioned") for row in rows)


def test_without_apt_get_nothing_half_made_is_left(tmp_path, monkeypatch):
    """The wheel's binary does not run and there is no apt-get to fetch a newer glibc."""
    real_check = perf_analyzer._check

    def check(command: list, what: str, **kwargs) -> str:
        if what != "pip install":
            return real_check(command, what, **kwargs)
        target = Path(next(arg for arg in command if arg.startswith("--target="))[9:])
        _fake_binary(target / perf_analyzer.BINARY)
        return ""

    monkeypatch.setattr(perf_analyzer, "_check", check)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get, no dpkg-deb
    monkeypatch.setattr(perf_analyzer, "PROVISIONED", tmp_path / "cache")
    monkeypatch.setattr(perf_analyzer.served, "export", pytest.fail)
    with pytest.raises(FileNotFoundError, match="apt-get"):
        perf_analyzer.provision(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the staging folder is gone
    (row,) = perf_analyzer.run(perf_analyzer.Config(concurrency=(1,)))
    assert row["status"].startswith("skipped: perf_analyzer unavailable: ") \
        and "apt-get" in row["status"]


@pytest.mark.parametrize("debian", [True, False])
def test_a_provisioned_cache_is_reused_without_downloading(tmp_path, monkeypatch, debian):
    root = tmp_path / "cache" / perf_analyzer.VERSION
    libs = root / perf_analyzer.LIBS[0]
    if debian:  # the binary needed trixie's loader
        libs.mkdir(parents=True)
        (libs / "ld-linux-x86-64.so.2").touch()
    _fake_binary(root / perf_analyzer.BINARY)
    (root / perf_analyzer.MANIFEST).write_text(json.dumps({"ready": True}))
    monkeypatch.setattr(perf_analyzer.subprocess, "run", pytest.fail)
    argv = perf_analyzer.provision(tmp_path / "cache", download=False)
    binary = str(root / perf_analyzer.BINARY)
    if debian:
        assert argv[:2] == [str(libs / "ld-linux-x86-64.so.2"), "--library-path"]
        assert argv[2].split(":") == [str(libs), "/usr/lib/x86_64-linux-gnu",
                                      "/lib/x86_64-linux-gnu"]
        assert argv[3:] == [binary]
    else:
        assert argv == [binary]


@pytest.mark.server
def test_quick_run(tmp_path):
    """Two levels against a fresh batching-on server: every row ok, what the concurrency
    plot and the table read present and positive, the config recorded."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "serving.perf_analyzer",
                           "--quick", "--machine", BENCH_MACHINE,
                           "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    section = results.load(tmp_path / f"{BENCH_MACHINE}.json")["sections"][
        "serving.perf_analyzer"]
    assert section["command"].startswith("python -m benchmarks.run_all serving.perf_analyzer "
                                         "--quick")
    assert section["config"] == {"channels": 4, "segment_s": 1.0, "concurrency": [1, 2],
                                 "duration_s": 2.0, "warmup": 1, "download": True}
    rows = section["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2]
    for row in rows:
        assert row["status"] == "ok" and row["series"] == "perf_analyzer", row
        for field in ("requests_per_s", "audio_s_per_s", "latency_s.p50", "latency_s.p95",
                      "latency_s.p99", "server.compute_infer_ms"):
            assert _finite_positive(results.get(row, field)), (field, row)
        assert row["latency_s"]["p50"] <= row["latency_s"]["p95"] <= row["latency_s"]["p99"]
        assert row["server"]["queue_ms"] >= 0
        assert row["audio_s_per_s"] == pytest.approx(row["requests_per_s"] * 1.0)  # 1 s segments
    assert (tmp_path / f"{BENCH_MACHINE}-serving.perf_analyzer-concurrency.png").is_file()
