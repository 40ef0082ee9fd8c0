"""The benchmark scripts run on a tiny configuration and write well-formed results.

No timing is asserted anywhere: numbers depend on the machine and its load. What is checked
is that every script runs, and that the JSON, markdown and PNGs it writes follow the schema.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from benchmarks.flops import demucs_flops  # noqa: E402
from benchmarks.run_all import SCRIPTS  # noqa: E402
from benchmarks.timing import Stats, measure, percentiles  # noqa: E402
from conftest import BENCH_MACHINE as MACHINE  # noqa: E402

pytestmark = pytest.mark.bench

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_a_valid_model_forward_section(bench_quick_run):
    data = json.loads((bench_quick_run / f"{MACHINE}.json").read_text())
    results.validate(data)
    assert data["machine_name"] == MACHINE
    machine = data["machine"]
    assert machine["cpu_model"] and machine["usable_cpus"] >= 1
    assert {"python", "torch", "onnxruntime", "numpy", "stemserve"} <= set(machine["versions"])

    section = data["sections"]["model_forward"]
    assert "benchmarks.model_forward" in section["command"] and "--config small" in section["command"]
    assert section["started"] and section["finished"] and section["duration_s"] > 0
    config = section["config"]
    assert config["model"] == "small" and config["segment_s"] == 1
    assert config["padded_samples"] >= config["segment_samples"] == 44100

    quick = dict(zip(SCRIPTS[0].quick[::2], SCRIPTS[0].quick[1::2]))["--backends"].split(",")
    by_key = {(row["backend"], row["batch"]): row for row in section["rows"]}
    assert set(by_key) == {(name, batch) for name in quick for batch in (1, 2)}
    for (name, batch), row in by_key.items():
        assert row["status"] == "ok", row  # ort_slim too: onnxslim is in the dev extra
        wall = row["measurement"]["wall_s"]
        assert wall["n"] == row["repeats"] == 1 and len(wall["samples"]) == 1
        assert wall["min"] <= wall["median"] <= wall["max"]
        for field in ("forward_s", "per_item_s", "rtf", "gflops", "ceiling_fraction"):
            assert _finite_positive(row[field]), (name, batch, field, row[field])
        assert row["per_item_s"] == pytest.approx(row["forward_s"] / batch)
        assert row["ceiling"] == "cpu_fp32"
        if batch == 1:  # every backend computes the same thing as PyTorch eager
            tolerance = 0.05 if name == "ort_fp16" else 1e-3
            assert row["max_abs_diff_vs_eager"] < tolerance, row

    extra = section["extra"]
    assert _finite_positive(extra["gflop_per_item"])
    assert _finite_positive(extra["ceiling_gflops"]["cpu_fp32"])
    assert len(extra["ceilings"]["cpu_fp32"]) == 2 + len(quick)  # start, per backend, end
    backends = {item["backend"]: item for item in extra["backends"]}
    assert set(backends) == set(quick)
    assert backends["ort_saved_extended"]["session_start_s"] > 0
    assert backends["ort_saved_extended"]["graph_nodes"] < backends["ort_saved_extended"]["source_nodes"]


def test_quick_run_writes_markdown_with_the_tables(bench_quick_run):
    text = (bench_quick_run / f"{MACHINE}.md").read_text()
    assert text.startswith(f"# Benchmarks on `{MACHINE}`")
    assert "## Model forward pass (item 1) (`model_forward`)" in text
    assert "Command: `python -m benchmarks.model_forward" in text
    table = [line for line in text.splitlines() if line.startswith("| torch_eager | 1 |")]
    assert len(table) == 1
    header = next(line for line in text.splitlines() if line.startswith("| backend | batch |"))
    assert table[0].count("|") == header.count("|")
    assert "### Backends: preparation, session start, memory" in text


def test_quick_run_writes_plots(bench_quick_run):
    import matplotlib  # noqa: F401  (the dev extra's: a missing one fails, never skips)
    for plot in ("per_item", "cpu_per_item", "gflops"):
        name = results.plot_name(MACHINE, "model_forward", plot)
        png = bench_quick_run / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5000
        assert f"]({name})" in (bench_quick_run / f"{MACHINE}.md").read_text()


def test_a_torch_compile_past_its_budget_is_recorded_as_failed(tmp_path):
    done = _run("benchmarks.model_forward", "--config", "small", "--segment", "0.5",
                "--batches", "1", "--repeats", "1", "--backends", "torch_compile",
                "--compile-budget", "0.5", "--ceiling-size", "256", "--machine", MACHINE,
                "--results-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    section = results.load(tmp_path / f"{MACHINE}.json")["sections"]["model_forward"]
    (row,) = section["rows"]
    assert row["backend"] == "torch_compile" and row["status"].startswith("failed: timed out")
    assert "compile budget" in row["status"]


def test_flop_count_matches_torch_counter_where_it_counts():
    """FlopCounterMode skips the LSTM; everything else must agree exactly."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stemserve.defaults import SOURCES

    from stemserve.model import Demucs

    for config in (dict(channels=4), dict(channels=4, resample=False, glu=False, depth=4,
                                          lstm_layers=1)):
        model = Demucs(SOURCES, **config).eval()
        length = model.valid_length(8000)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(3, 2, length))
        counted = demucs_flops(model, length, batch=3)
        assert counted["total"] - counted["lstm"] == counter.get_total_flops()
        assert counted["total"] == pytest.approx(sum(v for k, v in counted.items() if k != "total"))


def test_flop_count_of_the_official_model_on_8_seconds():
    import torch

    from stemserve.defaults import SOURCES

    from stemserve.model import Demucs

    with torch.device("meta"):
        model = Demucs(SOURCES)
    flops = demucs_flops(model, model.valid_length(8 * 44100))
    assert flops["total"] / 1e9 == pytest.approx(192, rel=0.01)  # the performance note's count
    assert 0.25 < flops["lstm"] / flops["total"] < 0.35


def test_stats_and_measure():
    stats = Stats.of([3.0, 1.0, 2.0, 4.0])
    assert (stats.n, stats.median, stats.min, stats.max) == (4, 2.5, 1.0, 4.0)
    assert (stats.q1, stats.q3, stats.iqr) == (1.75, 3.25, 1.5)
    assert percentiles(list(range(101))) == {"p50": 50, "p95": 95, "p99": 99}
    calls = []
    measured = measure(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and measured.wall.n == 3 and len(measured.warmup_s) == 2
    slow = measure(lambda: __import__("time").sleep(0.02), repeats=50, budget_s=0.05,
                   min_repeats=2)
    assert slow.stopped_early and 2 <= slow.wall.n < 50


def _section(script: str, rows: list[dict], columns=None) -> dict:
    section = results.new_section(script, script.title(), config={"x": 1},
                                  machine={"cpu_model": "Test CPU", "usable_cpus": 2,
                                           "gpus": [], "versions": {}})
    section["rows"] = rows
    section["columns"] = columns or [{"key": key, "title": key} for key in rows[0]]
    return section


def test_sections_merge_and_malformed_ones_are_refused(tmp_path):
    results.save_section(_section("first", [{"a": 1}]), results_dir=tmp_path, machine="m")
    results.save_section(_section("second", [{"b": float("nan")}]), results_dir=tmp_path,
                         machine="m")
    results.save_section(_section("first", [{"a": 2}]), results_dir=tmp_path, machine="m")
    data = results.load(tmp_path / "m.json")
    assert sorted(data["sections"]) == ["first", "second"]
    assert data["sections"]["first"]["rows"] == [{"a": 2}]
    assert data["sections"]["second"]["rows"] == [{"b": None}]  # JSON has no NaN
    bad = _section("third", [{"a": 1}])
    del bad["command"]
    with pytest.raises(results.ResultsError):
        results.save_section(bad, results_dir=tmp_path, machine="m")
    assert "third" not in results.load(tmp_path / "m.json")["sections"]


def test_the_plots_for_later_scripts_draw_from_the_documented_fields(tmp_path):
    """Items 2-4 only fill rows; their plots already work from the schema in plots.py."""
    import matplotlib  # noqa: F401  (the dev extra's: a missing one fails, never skips)
    from benchmarks.plots import plot_results

    server = _section("server_throughput", [
        {"series": series, "concurrency": clients, "status": "ok",
         "audio_s_per_s": 3.0 * clients ** 0.5, "requests_per_s": 0.1 * clients,
         "latency_s": {"p50": 1.0 * clients, "p95": 1.5 * clients, "p99": 2.0 * clients}}
        for series in ("batching on", "batching off") for clients in (1, 2, 4, 8, 16)])
    server["extra"]["reference_lines"] = [{"label": "in-process ORT", "audio_s_per_s": 9.0}]
    stages = _section("end_to_end", [
        {"series": series, "track_s": track, "status": "ok",
         "stages_s": {"decode": 0.5, "infer": 20.0 * track / 60, "encode": 0.7}}
        for series in ("triton", "onnx", "torch") for track in (60, 600)],
        columns=[{"key": "series", "title": "path"}, {"key": "stages_s.infer", "title": "infer"}])
    for section in (server, stages):
        results.save_section(section, results_dir=tmp_path, machine="m")
    written = plot_results(tmp_path / "m.json")
    assert sorted(path.name for path in written) == ["m-end_to_end-stages.png",
                                                      "m-server_throughput-concurrency.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    markdown = (tmp_path / "m.md").read_text()
    assert "](m-server_throughput-concurrency.png)" in markdown
    assert "| triton | 20 |" in markdown  # dotted column keys reach into nested fields


def test_server_sweep_quick_writes_a_valid_section(bench_quick_run):
    """A real tritonserver, batching on and off, 1 and 2 clients, a few requests each (the
    quick run's ``server_sweep --quick``: the same command as a run of its own)."""
    data = results.load(bench_quick_run / f"{MACHINE}.json")
    section = data["sections"]["server_sweep"]
    assert "benchmarks.server_sweep" in section["command"] and "--quick" in section["command"]
    assert section["config"]["model"] == "small" and section["config"]["concurrency"] == [1, 2]
    by_key = {(row["series"], row["concurrency"]): row for row in section["rows"]}
    assert set(by_key) == {(series, clients) for series in ("batching on", "batching off")
                           for clients in (1, 2)}
    for (series, clients), row in by_key.items():
        assert row["status"] == "ok", row
        assert row["requests"] == 3 * clients  # --quick: 3 timed requests per client
        for field in ("requests_per_s", "audio_s_per_s", "avg_batch", "vs_in_process"):
            assert _finite_positive(row[field]), (series, clients, field, row[field])
        latency = row["latency_s"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        server = row["server"]
        # Triton's counters may trail the responses by a request or so: no exact match.
        assert server["inferences"] == server["requests"] >= 1
        assert server["executions"] >= 1 and _finite_positive(server["compute_infer_ms"])
        assert server["queue_ms"] is not None and server["queue_ms"] >= 0
        if series == "batching off":
            assert row["avg_batch"] == 1
    inproc = section["extra"]["in_process"]
    assert {row["batch"] for row in inproc} >= {1}
    assert all(_finite_positive(row["audio_s_per_s"]) for row in inproc)
    assert _finite_positive(section["extra"]["served_vs_in_process"])
    assert any("perf_analyzer" in note for note in section["notes"])
    markdown = (bench_quick_run / f"{MACHINE}.md").read_text()
    assert "(`server_sweep`)" in markdown and "### In-process ONNX Runtime" in markdown
    name = results.plot_name(MACHINE, "server_sweep", "concurrency")
    assert (bench_quick_run / name).read_bytes()[:8] == PNG_SIGNATURE
    assert f"]({name})" in markdown


def test_quick_run_writes_an_end_to_end_section(bench_quick_run):
    """Every path on one tiny track, the same stems (the int8 ones close), and the
    client-memory table."""
    section = results.load(bench_quick_run / f"{MACHINE}.json")["sections"]["end_to_end"]
    assert "--quick" in section["command"] and section["config"]["model"] == "small"
    rows = {row["path"]: row for row in section["rows"]}
    assert set(rows) == {"triton", "onnx", "triton_int8", "onnx_int8", "torch"}
    if os.environ.get("CI"):
        from oracle_v2 import demucs2

        demucs2("demucs")  # CI compares with demucs 2.0.3: a missing one fails
    reference = importlib.util.find_spec("demucs") is not None
    for path, row in rows.items():
        if path == "torch" and not reference:
            assert row["status"].startswith("skipped: demucs 2.0.3"), row
            continue
        assert row["status"] == "ok", row
        assert row["track_s"] == 5 and row["repeats"] == 1
        for field in ("wall_s", "rtf", "client_peak_mib", "load_s", "total_s"):
            assert _finite_positive(row[field]), (path, field, row[field])
        assert row["rtf"] == pytest.approx(row["wall_s"] / 5)
        assert set(row["stages_s"]) >= {"load", "separate", "write"}
        if reference:
            assert _finite_positive(row["speedup_vs_torch"])
            if path in ("triton", "onnx"):  # same weights, same stems, to a step or two
                assert row["max_diff_lsb_vs_torch"] <= 2, row
            elif path != "torch":  # int8: near, not equal
                assert 0 < row["max_diff_lsb_vs_torch"] < 2**15, row
    assert rows["triton"]["shared_memory"] is True
    assert _finite_positive(rows["triton"]["server_peak_mib"])
    memory = section["tables"][0]["rows"]
    assert [row["track_s"] for row in memory] == [5, 15]
    assert all(row["status"] == "ok" and _finite_positive(row["client_peak_mib"])
               for row in memory)
    assert memory[0]["client_peak_vs_shortest"] == 1
    markdown = (bench_quick_run / f"{MACHINE}.md").read_text()
    assert "(`end_to_end`)" in markdown and "### Client peak memory vs track length" in markdown


def _bf16_refused(row: dict) -> bool:
    """A bf16 row on a CPU without bf16 arithmetic: failed, saying so (not measurable)."""
    from stemserve.runtime.openvino_session import cpu_has_bf16

    if cpu_has_bf16():
        return False
    assert "no bf16 arithmetic" in row["status"], row
    return True


@pytest.mark.oracle
def test_quick_run_writes_the_releases_sections(bench_quick_run):
    """Issue 13 on a tiny HT Demucs: forward per batch (eager, ORT), the cost table against
    the v2 model, and every end-to-end path on one track with demucs 4.0.1's stems."""
    from oracle_v4 import oracle_available, require_oracle

    if os.environ.get("CI"):
        require_oracle()  # CI compares with demucs 4.0.1: a missing oracle fails
    reference = oracle_available()
    data = results.load(bench_quick_run / f"{MACHINE}.json")

    forward = data["sections"]["releases_forward"]
    assert "benchmarks.releases" in forward["command"] and "--quick" in forward["command"]
    config = forward["config"]
    assert config["quick"] is True and config["segment_samples"] == 44100
    assert config["segment_s"] == 1
    by_key = {(row["backend"], row["batch"]): row for row in forward["rows"]}
    assert set(by_key) == {("torch_eager", 1), ("torch_eager", 2), ("ort", 1), ("ort", 2),
                           ("ort", 4), ("openvino_bf16", 1), ("openvino_bf16", 2)}
    for (backend, batch), row in by_key.items():
        if backend == "openvino_bf16" and _bf16_refused(row):
            continue
        assert row["status"] == "ok", row
        assert row["repeats"] == 1 and row["model"] == "htdemucs"
        for field in ("forward_s", "per_item_s", "cpu_per_item_s", "rtf", "peak_rss_mib",
                      "speedup_vs_eager_b1"):
            assert _finite_positive(row[field]), (backend, batch, field, row[field])
        assert row["per_item_s"] == pytest.approx(row["forward_s"] / batch)
        assert row["rtf"] == pytest.approx(row["per_item_s"] / config["segment_s"])
    assert by_key["torch_eager", 1]["max_abs_diff_vs_eager"] == 0
    assert by_key["ort", 1]["max_abs_diff_vs_eager"] < 1e-3  # the export computes the same
    (cost,) = forward["tables"]
    assert [row["model"] for row in cost["rows"]] == ["htdemucs", "demucs_quantized"]
    for row in cost["rows"]:
        assert row["status"] == "ok" and row["batch"] == 2, row
        for field in ("s_per_audio_s", "cpu_s_per_audio_s", "vs_htdemucs", "parameters_m"):
            assert _finite_positive(row[field]), (row["model"], field, row[field])
    assert cost["rows"][0]["vs_htdemucs"] == 1 and cost["rows"][1]["segment_s"] == 8

    section = data["sections"]["releases_end_to_end"]
    assert "--quick" in section["command"] and section["config"]["shifts"] == 1
    rows = {row["path"]: row for row in section["rows"]}
    assert set(rows) == {"triton", "onnx", "triton_int8", "triton_bf16", "demucs4"}
    for path, row in rows.items():
        if path == "demucs4" and not reference:
            assert row["status"].startswith("skipped: the demucs 4.0.1 reference"), row
            continue
        if path == "triton_bf16" and _bf16_refused(row):
            continue
        assert row["status"] == "ok", row
        assert row["track_s"] == 3 and row["repeats"] == 1
        for field in ("wall_s", "rtf", "client_peak_mib", "load_s", "total_s"):
            assert _finite_positive(row[field]), (path, field, row[field])
        assert row["rtf"] == pytest.approx(row["wall_s"] / 3)
        assert set(row["stages_s"]) >= {"load", "separate", "write"}
        if reference:
            assert _finite_positive(row["speedup_vs_demucs4"])
            if path in ("triton", "onnx"):  # same weights and shift draws: the same stems
                assert row["max_diff_lsb_vs_demucs4"] <= 2, row
            elif path in ("triton_int8", "triton_bf16"):  # near, not equal
                assert row["max_diff_lsb_vs_demucs4"] < 2**15, row
    assert rows["triton"]["shared_memory"] is True
    assert _finite_positive(rows["triton"]["server_peak_mib"])
    target = section["extra"]["target"]
    assert target["target_x"] == 2 and set(target["speedups"]) == {"3"}
    assert (target["speedups"]["3"] is not None) == reference
    assert any("Target (issue 13" in note for note in section["notes"])
    markdown = (bench_quick_run / f"{MACHINE}.md").read_text()
    assert "(`releases_forward`)" in markdown and "(`releases_end_to_end`)" in markdown
    assert "### Cost per audio second: htdemucs vs demucs_quantized" in markdown
    for name, plot in (("releases_forward", "per_item"), ("releases_end_to_end", "stages")):
        png = bench_quick_run / results.plot_name(MACHINE, name, plot)
        assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_redrawing_the_results_folder_passes_over_other_result_formats(tmp_path, monkeypatch,
                                                                       capsys):
    """``python -m benchmarks.plots`` with no files: the fleet results share the folder."""
    import matplotlib  # noqa: F401  (the dev extra's: a missing one fails, never skips)
    from benchmarks import plots

    stages = _section("end_to_end", [{"series": "onnx", "track_s": 60, "status": "ok",
                                      "stages_s": {"separate": 30.0, "write": 1.0}}])
    results.save_section(stages, results_dir=tmp_path, machine="m")
    (tmp_path / "fleet-m.json").write_text(json.dumps({"scaling": {}}))
    monkeypatch.setattr(plots, "DEFAULT_RESULTS_DIR", tmp_path)
    assert [path.name for path in plots.main([])] == ["m-end_to_end-stages.png"]
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(results.ResultsError):  # a file named explicitly must be a results file
        plots.main([str(tmp_path / "fleet-m.json")])
