"""The tracks scenarios (benchmarks/tracks/) on their quick configuration, and their helpers.

The quick run is the session's ``bench_quick_run``; no timing is asserted (it depends on the
machine and its load), only that every path ran (or was skipped for the one reason this
machine gives), that its figures are there and sane, and that the stems of the exact paths
are the reference's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from benchmarks.tracks import SCENARIOS  # noqa: E402
from benchmarks.tracks.reference import compare, max_difference  # noqa: E402
from benchmarks.tracks.runs import FAMILIES, PATHS, precision, run_path, unavailable  # noqa: E402
from conftest import BENCH_MACHINE as MACHINE  # noqa: E402

pytestmark = [pytest.mark.bench, pytest.mark.server]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXACT = ("triton", "onnx", "onnx_pair", "torch_cuda")
"""Paths running the fp32 graph (or module): the reference's stems to a rounding step."""


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _quick_config(name: str) -> dict:
    """The config a scenario's quick run records: its defaults with the --quick values."""
    from benchmarks.run_all import load_scenario

    fields = dataclasses.fields(load_scenario(name).config)
    return json.loads(json.dumps({field.name: field.metadata.get("quick", field.default)
                                  for field in fields}))


@pytest.fixture(scope="module")
def sections(bench_quick_run: Path) -> dict:
    return results.load(bench_quick_run / f"{MACHINE}.json")["sections"]


def _check_rows(section: dict) -> dict[tuple, dict]:
    """Every (family, track, window, path) of the config has one row, measured where this
    machine can run it and skipped, saying why, where it cannot; the measured rows' figures
    (those the table and the stages plot read) finite and positive."""
    config = section["config"]
    if os.environ.get("CI"):  # CI installs both references: a missing one fails
        assert all(unavailable("reference", family) is None for family in FAMILIES)
    rows = {(row["family"], row["track_s"], row["window"], row["path"]): row
            for row in section["rows"]}
    assert list(rows) == [(family, seconds, window, path) for family in config["families"]
                          for seconds in config["tracks"] for window in config["windows"]
                          for path in config["paths"]]
    for (family, seconds, _, path), row in rows.items():
        if unavailable(path, family):
            assert row["status"] == unavailable(path, family), row
            continue
        assert row["status"] == "ok", row
        assert row["repeats"] == config["repeats"] and row["series"] == f"{family}: {path}"
        for field in ("wall_s", "rtf", "load_s", "total_s", "client_peak_mib", "client_cpu_s",
                      "client_peak_vs_shortest"):
            assert _finite_positive(row[field]), (path, field, row[field])
        assert row["rtf"] == pytest.approx(row["wall_s"] / seconds)
        assert row["total_s"] == pytest.approx(row["wall_s"] + row["load_s"])
        assert list(row["stages_s"])[:1] == ["load"] and {"separate", "write"} <= set(
            row["stages_s"])
        assert all(math.isfinite(value) and value >= 0 for value in row["stages_s"].values())
        if path.startswith("triton"):
            assert row["shared_memory"] is True
            assert _finite_positive(row["server_peak_mib"]) and _finite_positive(
                row["server_start_s"])
        if path == "reference":
            package, version = FAMILIES[family]["package"]  # demucs, or audio-separator
            assert row["reference"].startswith(f"{package} {version}"), row
            assert row["torch_threads"] >= 1
    return rows


def _check_baseline(rows: dict[tuple, dict], baseline: str) -> None:
    """The ratios to the baseline and the stems' differences from its stems."""
    for (family, seconds, window, path), row in rows.items():
        base = rows[family, seconds, window, baseline]
        if row["status"] != "ok" or base["status"] != "ok":
            assert "speedup_vs_baseline" not in row
            continue
        assert row["speedup_vs_baseline"] == pytest.approx(base["wall_s"] / row["wall_s"])
        assert _finite_positive(row["speedup_vs_baseline_with_load"])
        if path == baseline:
            assert row["speedup_vs_baseline"] == 1 and row["max_diff_lsb_vs_baseline"] == 0
        elif path in EXACT and (baseline in EXACT or baseline == "reference"):
            assert row["max_diff_lsb_vs_baseline"] <= 2, row  # same weights, same stems
        else:  # int8, bf16 or autocast: near the baseline's, not equal
            assert row["max_diff_lsb_vs_baseline"] < 2**15, row


@pytest.mark.oracle
def test_quick_run_writes_the_reference_section(sections, bench_quick_run):
    """Demucs v2 and a BS-RoFormer on a tiny model and a 3 s track: Triton, in-process fp32
    and int8, PyTorch on CUDA (skipped without one) and each family's reference (demucs 2.0.3;
    audio-separator's network in MSST's demix)."""
    section = sections["tracks.reference"]
    assert section["command"].startswith("python -m benchmarks.run_all tracks.reference")
    assert "--quick" in section["command"] and section["duration_s"] > 0
    assert section["config"] == _quick_config("tracks.reference")
    assert section["config"]["families"] == ["v2", "bs_roformer"]
    rows = _check_rows(section)
    _check_baseline(rows, "reference")
    assert {row["family"] for row in rows.values()
            if row["path"] == "reference" and row["status"] == "ok"} == {"v2", "bs_roformer"}
    markdown = (bench_quick_run / f"{MACHINE}.md").read_text()
    assert "(`tracks.reference`)" in markdown
    plot = results.plot_name(MACHINE, "tracks.reference", "stages")
    assert (bench_quick_run / plot).read_bytes()[:8] == PNG_SIGNATURE and f"]({plot})" in markdown


def test_quick_run_writes_the_client_memory_section(sections):
    """The Triton path on tracks of 5 and 15 s: the client's peak, relative to the shortest."""
    section = sections["tracks.client_memory"]
    assert section["config"] == _quick_config("tracks.client_memory")
    rows = _check_rows(section)
    assert [row["track_s"] for row in rows.values()] == [5, 15]
    assert all(row["status"] == "ok" for row in rows.values())
    first, second = rows.values()
    assert first["client_peak_vs_shortest"] == 1
    assert second["client_peak_vs_shortest"] == pytest.approx(
        second["client_peak_mib"] / first["client_peak_mib"])


def test_quick_run_writes_the_short_track_section(sections):
    """A two-segment track in-process, in turn (onnx) and at once (onnx_pair), fp32 and int8."""
    section = sections["tracks.short"]
    assert section["config"] == _quick_config("tracks.short")
    assert section["config"]["baseline"] == "onnx"
    rows = _check_rows(section)
    assert {row["path"] for row in rows.values()} >= {"onnx", "onnx_pair"}
    assert all(row["status"] == "ok" for row in rows.values())
    _check_baseline(rows, "onnx")


def test_the_group_lists_its_scenarios():
    from benchmarks.run_all import load_scenario

    assert SCENARIOS == ("tracks.reference", "tracks.client_memory", "tracks.short")
    assert [load_scenario(name).name for name in SCENARIOS] == list(SCENARIOS)


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_scenario_documents_its_flags(name):
    """--help renders every field's help (argparse refuses a stray %)."""
    import argparse

    from benchmarks.run_all import load_scenario
    from benchmarks.scenario import add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser, load_scenario(name).config)
    assert all(f"--{flag}" in parser.format_help() for flag in ("paths", "tracks", "baseline"))


@pytest.mark.parametrize("path, graph", [
    ("triton", "fp32"), ("onnx_int8", "int8"), ("onnx_pair_bf16", "bf16"),
    ("torch_cuda_fp16", "fp16"), ("reference", "fp32")])
def test_a_path_names_its_graph(path, graph):
    assert path in PATHS and precision(path) == graph


def test_an_unknown_path_is_refused():
    with pytest.raises(ValueError, match="unknown path 'onnx_fp64'"):
        run_path("onnx_fp64", "v2", "small", 1.0, 1)


def _stems(folder: Path, **values: np.ndarray) -> Path:
    import soundfile as sf

    folder.mkdir(parents=True)
    for name, pcm in values.items():
        sf.write(str(folder / f"{name}.wav"), pcm, 44100, subtype="PCM_16")
    return folder


def test_max_difference_is_in_16_bit_steps(tmp_path):
    pcm = np.arange(-500, 500, dtype=np.int16).reshape(-1, 2)
    base = _stems(tmp_path / "base", drums=pcm, bass=pcm)
    assert max_difference(_stems(tmp_path / "same", drums=pcm, bass=pcm), base) == 0
    off = pcm.copy()
    off[7, 1] += 3
    assert max_difference(_stems(tmp_path / "off", drums=pcm, bass=off), base) == 3
    assert max_difference(_stems(tmp_path / "short", drums=pcm, bass=pcm[:-1]), base) == 2**16


def test_compare_rates_each_row_against_the_baseline_of_its_family_and_track():
    def row(family, path, seconds, wall, peak):
        return {"family": family, "path": path, "track_s": seconds, "window": 4,
                "status": "ok", "wall_s": wall, "total_s": wall + 1, "client_peak_mib": peak}

    rows = [row("v2", "reference", 60, 30, 400), row("v2", "triton", 60, 10, 100),
            row("v2", "triton", 600, 90, 300), row("htdemucs", "triton", 60, 20, 200),
            {"family": "v2", "path": "onnx", "track_s": 60, "window": 4, "status": "skipped: x"}]
    seen = []
    compare(rows, "reference", difference=lambda ours, base: seen.append((ours, base)) or 5)
    reference, short, long, other, skipped = rows
    assert short["speedup_vs_baseline"] == 3 and short["speedup_vs_baseline_with_load"] == 31 / 11
    assert short["max_diff_lsb_vs_baseline"] == 5 and reference["speedup_vs_baseline"] == 1
    assert [(ours.parent.parent.name, base.parent.parent.name) for ours, base in seen] == [
        ("v2-reference-60s-4", "v2-reference-60s-4"), ("v2-triton-60s-4", "v2-reference-60s-4")]
    assert "speedup_vs_baseline" not in long and "speedup_vs_baseline" not in other
    assert long["client_peak_vs_shortest"] == 3 and short["client_peak_vs_shortest"] == 1
    assert other["client_peak_vs_shortest"] == 1 and "client_peak_vs_shortest" not in skipped
