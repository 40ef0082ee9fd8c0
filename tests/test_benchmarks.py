"""The benchmarks' framework: scenarios' flags, the isolated runner, the one results writer,
the plots, and that ``run_all --quick`` runs every scenario.

No timing is asserted anywhere: numbers depend on the machine and its load. The scenarios'
own rows are checked in tests/test_bench_<group>.py.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import results, run_all  # noqa: E402
from benchmarks.flops import demucs_flops  # noqa: E402
from benchmarks.isolated import IsolatedFailed, run_isolated  # noqa: E402
from benchmarks.plots import PLOTS  # noqa: E402
from benchmarks.scenario import Column, Scenario, add_flags, config_from, option  # noqa: E402
from benchmarks.timing import Stats, measure, percentiles  # noqa: E402
from conftest import BENCH_MACHINE as MACHINE, BENCH_RUN_ON_THEIR_OWN  # noqa: E402

pytestmark = pytest.mark.bench

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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


def _section(scenario: str, rows: list[dict], columns=None) -> dict:
    section = results.new_section(scenario, scenario.title(), config={"x": 1},
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


def test_the_plots_draw_from_the_documented_fields(tmp_path):
    """A scenario only fills rows; its plots work from the fields documented in plots.py."""
    import matplotlib  # noqa: F401  (the dev extra's: a missing one fails, never skips)
    from benchmarks.plots import plot_results

    server = _section("server_throughput", [
        {"series": series, "concurrency": clients, "status": "ok",
         "audio_s_per_s": 3.0 * clients ** 0.5, "requests_per_s": 0.1 * clients,
         "latency_s": {"p50": 1.0 * clients, "p95": 1.5 * clients, "p99": 2.0 * clients}}
        for series in ("batching on", "batching off") for clients in (1, 2, 4, 8, 16)])
    server["rows"].append({"reference_line": "in-process ORT", "audio_s_per_s": 9.0})
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




# ---------------------------------------------------------------------------------------------
# Scenarios: flags from a config, run_all, the isolated runner

@dataclasses.dataclass(frozen=True)
class ToyConfig:
    batches: tuple[int, ...] = option((1, 2, 4), "batch sizes", quick=(1,))
    seconds: float = option(8.0, "segment length", quick=0.5)
    family: str | None = option(None, "a family, or none for all")
    compile: bool = option(False, "also torch.compile")


def toy_run(config: ToyConfig) -> list[dict]:
    return [{"batch": batch, "status": "ok" if batch < 99 else "failed: too big",
             "per_item_s": config.seconds / batch, "backend": "toy"} for batch in config.batches]


TOY = Scenario(name="forward.toy_for_tests", title="A toy scenario", config=ToyConfig,
               run=toy_run, columns=(Column("batch", "batch"), Column("per_item_s", "s/item", ".2f")),
               notes=("random numbers",), plots=("per_item",))


@pytest.fixture
def toy_scenario(monkeypatch):
    module = types.ModuleType("benchmarks.forward.toy_for_tests")
    module.SCENARIO = TOY
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return TOY


def test_flags_come_from_the_config_with_quick_values_and_overrides():
    import argparse

    parser = argparse.ArgumentParser()
    add_flags(parser, ToyConfig)
    assert config_from(parser.parse_args([]), ToyConfig, quick=False) == ToyConfig()
    assert config_from(parser.parse_args([]), ToyConfig, quick=True) == \
        ToyConfig(batches=(1,), seconds=0.5)
    given = parser.parse_args(["--batches", "2,8", "--family", "none", "--compile"])
    assert config_from(given, ToyConfig, quick=True) == \
        ToyConfig(batches=(2, 8), seconds=0.5, family=None, compile=True)
    assert config_from(parser.parse_args(["--family", "htdemucs", "--no-compile"]), ToyConfig,
                       quick=False) == ToyConfig(family="htdemucs")
    text = parser.format_help()
    assert "batch sizes (default: 1,2,4; --quick: 1)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--batches", "two"])


def test_a_field_without_a_flag_form_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        table: dict = option(None, "no flag can say this")

    import argparse

    with pytest.raises(TypeError, match="no flag form"):
        add_flags(argparse.ArgumentParser(), Odd)


def test_one_scenario_runs_saves_and_plots(tmp_path, toy_scenario, monkeypatch):
    import matplotlib  # noqa: F401  (the dev extra's: a missing one fails, never skips)

    monkeypatch.setattr(sys, "argv", ["run_all.py"])
    assert run_all.main([TOY.name, "--quick", "--batches", "1,2", "--machine", "m",
                         "--results-dir", str(tmp_path)]) == 0
    section = results.load(tmp_path / "m.json")["sections"][TOY.name]
    assert section["config"] == {"batches": [1, 2], "seconds": 0.5, "family": None,
                                 "compile": False}
    assert [row["batch"] for row in section["rows"]] == [1, 2]
    assert section["notes"] == ["random numbers"] and section["duration_s"] >= 0
    assert section["columns"][1] == {"key": "per_item_s", "title": "s/item", "format": ".2f"}
    markdown = (tmp_path / "m.md").read_text()
    assert "## A toy scenario (`forward.toy_for_tests`)" in markdown and "| 2 | 0.25 |" in markdown
    png = tmp_path / results.plot_name("m", TOY.name, "per_item")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    # A failed row is saved with the others, and the run exits 1.
    assert run_all.main([TOY.name, "--batches", "1,99", "--machine", "m",
                         "--results-dir", str(tmp_path)]) == 1
    rows = results.load(tmp_path / "m.json")["sections"][TOY.name]["rows"]
    assert [row["status"] for row in rows] == ["ok", "failed: too big"]
    # A labelled run keeps its own section beside the scenario's.
    assert run_all.main([TOY.name, "--label", "two", "--batches", "2", "--machine", "m",
                         "--results-dir", str(tmp_path)]) == 0
    sections = results.load(tmp_path / "m.json")["sections"]
    assert sorted(sections) == [TOY.name, f"{TOY.name}-two"]
    assert [row["batch"] for row in sections[f"{TOY.name}-two"]["rows"]] == [2]
    with pytest.raises(SystemExit):
        run_all.main([TOY.name, "--label", "../x", "--results-dir", str(tmp_path)])


def test_an_unknown_scenario_is_named_with_the_known_ones():
    done = _run("benchmarks.run_all", "forward.nope", "--quick", timeout=120)
    assert done.returncode != 0
    assert "unknown scenario 'forward.nope'" in done.stderr
    assert all(name in done.stderr for name in run_all.scenario_names())


def test_every_scenario_has_a_documented_config():
    names = run_all.scenario_names()
    assert names and len(set(names)) == len(names)
    assert {name.split(".")[0] for name in names} == set(run_all.GROUPS)
    for name in names:
        scenario = run_all.load_scenario(name)
        assert scenario.name == name and scenario.columns
        for field in dataclasses.fields(scenario.config):
            assert field.metadata.get("help"), f"{name}: {field.name} has no help"
        run_all.scenario_parser(name)  # every field has a flag form
        assert set(scenario.plots) <= set(PLOTS)


def isolated_double(job: dict) -> dict:
    if job.get("fail"):
        raise RuntimeError("asked to fail")
    if job.get("sleep"):
        __import__("time").sleep(job["sleep"])
    return {"double": job["x"] * 2}


def test_run_isolated_returns_the_result_and_reports_failures():
    function = "test_benchmarks:isolated_double"
    env_path = str(ROOT / "tests")
    got = run_isolated(function, {"x": 21}, timeout=60, pythonpath=Path(env_path))
    assert got["double"] == 42 and got["cpu_s"] >= 0 and got["peak_rss_mib"] > 0
    with pytest.raises(IsolatedFailed, match="RuntimeError: asked to fail"):
        run_isolated(function, {"x": 1, "fail": True}, timeout=60, pythonpath=Path(env_path))
    with pytest.raises(IsolatedFailed, match="timed out after 3 s"):
        run_isolated(function, {"x": 1, "sleep": 30}, timeout=3, pythonpath=Path(env_path))


def test_the_quick_run_measured_every_scenario(bench_quick_run):
    data = results.load(bench_quick_run / f"{MACHINE}.json")
    expected = [name for name in run_all.scenario_names() if name not in BENCH_RUN_ON_THEIR_OWN]
    assert sorted(data["sections"]) == sorted(expected)
    markdown = (bench_quick_run / f"{MACHINE}.md").read_text()
    for name, section in data["sections"].items():
        assert section["command"].startswith(f"python -m benchmarks.run_all {name} --quick")
        assert section["rows"] and f"(`{name}`)" in markdown
        assert not [row for row in section["rows"] if str(row.get("status", "ok")).startswith("failed")]
        for plot in run_all.load_scenario(name).plots:
            png = bench_quick_run / results.plot_name(MACHINE, name, plot)
            assert png.read_bytes()[:8] == PNG_SIGNATURE, png.name


GROWTH = {"issue 22: the RoFormer families (models.py, their MSST reference in tracks/runs.py, "
          "the meter's BS-RoFormer, forward.arena per family and memory patterns)": 75,
          "issue 22: forward.backends' portable graph, OpenVINO fp32, bf16 on the portable "
          "graph (the fused attention's record, docs/decisions/0010)": 40,
          "issue 22: GroupMemory reads the server's PSS every 5 s, no longer taxing it": 7}
"""Lines added to benchmarks/ since issue 21 halved it, each by what it measures: growth is a
decision named here, not drift."""


def test_benchmarks_stay_at_half_their_former_size():
    """Issue 21: benchmarks/ was 6,734 lines of Python, organised by issue; halved then."""
    lines = sum(len(path.read_text().splitlines())
                for path in (ROOT / "benchmarks").rglob("*.py") if ".cache" not in path.parts)
    assert lines <= 6734 // 2 + sum(GROWTH.values()), f"benchmarks/ has {lines} lines of Python"
