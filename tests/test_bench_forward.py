"""The forward scenarios (benchmarks/forward/): their quick runs measure every backend, family
and arena, and write the fields the tables, plots and docs read; their pure helpers.

No timing is asserted: which backend or batch wins depends on the machine and its load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import models, results  # noqa: E402
from benchmarks.forward import arena, backends  # noqa: E402
from benchmarks.scenario import config_from  # noqa: E402
from conftest import BENCH_MACHINE  # noqa: E402

pytestmark = pytest.mark.bench

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _quick(config: type) -> dict:
    """A config's ``--quick`` values as the results file records them."""
    chosen = config_from(argparse.Namespace(), config, quick=True)
    return json.loads(json.dumps(dataclasses.asdict(chosen)))


def _section(folder: Path, name: str) -> dict:
    data = results.load(folder / f"{BENCH_MACHINE}.json")
    results.validate(data)
    return data["sections"][name]


def _expected_skip(family: str, kind: str) -> str | None:
    """The start of the status a quick row may have instead of ok: no fp16 graph of HT
    Demucs, no bf16 arithmetic on this CPU."""
    from stemserve.runtime.openvino_session import cpu_has_bf16

    if family == "htdemucs" and kind == "ort_fp16":
        return "skipped: no fp16 graph"
    if kind == "openvino_bf16" and not cpu_has_bf16():
        return "skipped: this CPU has no bf16 arithmetic"
    return None


def test_backends_quick_run_measures_every_backend_of_both_families(bench_quick_run):
    section = _section(bench_quick_run, "forward.backends")
    assert "forward.backends" in section["command"] and "--quick" in section["command"]
    assert section["config"] == _quick(backends.Config)
    config = section["config"]
    assert config["families"] == ["v2", "htdemucs"] and config["size"] == "small"
    by_key = {(row["family"], row["kind"], row["batch"]): row for row in section["rows"]}
    assert set(by_key) == {(family, kind, batch) for family in config["families"]
                           for kind in config["backends"] for batch in (1, 2)}
    for (family, kind, batch), row in by_key.items():
        if (skip := _expected_skip(family, kind)) and row["status"].startswith(skip):
            continue
        assert row["status"] == "ok", row
        assert row["backend"] == f"{family} {kind}" and row["repeats"] == 1
        for field in ("forward_s", "per_item_s", "rtf", "cpu_per_item_s", "cpu_rtf",
                      "peak_rss_mib", "parameters_m", "vs_eager", "cost_vs_first_family",
                      "probe_gflops", "first_call_s"):
            assert _finite_positive(row[field]), (family, kind, batch, field, row.get(field))
        wall = row["measurement"]["wall_s"]
        assert wall["n"] == 1 and wall["min"] <= wall["median"] <= wall["max"]
        assert row["segment_s"] == 1  # v2 at --segment 1; the tiny HT Demucs' own segment
        assert row["per_item_s"] == pytest.approx(row["forward_s"] / batch)
        assert row["rtf"] == pytest.approx(row["per_item_s"] / row["segment_s"])
        if family == "v2":  # counted FLOPs and the CPU ceiling
            assert row["cost_vs_first_family"] == 1
            for field in ("gflops", "ceiling_gflops", "ceiling_fraction"):
                assert _finite_positive(row[field]), (kind, batch, field)
        else:
            assert "gflops" not in row
        start = "load_s" if kind.startswith("torch") else "session_start_s"
        assert _finite_positive(row[start]), row  # the model's build or the session's start
        if batch == 1:  # every backend computes what PyTorch eager does, to its precision
            tolerance = 1e-3 if kind in ("torch_eager", "ort", "ort_no_opt",
                                         "ort_saved_extended") else 0.1
            assert row["max_abs_diff_vs_eager"] < tolerance, row
    saved = by_key["v2", "ort_saved_extended", 1]
    assert saved["graph_nodes"] < saved["source_nodes"] and _finite_positive(saved["prepare_s"])
    assert by_key["v2", "torch_eager", 1]["max_abs_diff_vs_eager"] == 0


def test_backends_quick_run_writes_its_table_and_plots(bench_quick_run):
    import matplotlib  # noqa: F401  (the dev extra's: a missing one fails, never skips)

    text = (bench_quick_run / f"{BENCH_MACHINE}.md").read_text()
    assert "(`forward.backends`)" in text and "(`forward.arena`)" in text
    (line,) = [line for line in text.splitlines() if line.startswith("| v2 torch_eager | 1 |")]
    header = next(line for line in text.splitlines() if line.startswith("| backend | batch |"))
    assert line.count("|") == header.count("|")
    for plot in ("per_item", "cpu_per_item", "gflops"):
        name = results.plot_name(BENCH_MACHINE, "forward.backends", plot)
        assert (bench_quick_run / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in text


def test_arena_quick_run_measures_every_arena(bench_quick_run):
    section = _section(bench_quick_run, "forward.arena")
    assert "--quick" in section["command"] and section["config"] == _quick(arena.Config)
    rows = {row["arena"]: row for row in section["rows"]}
    assert set(rows) == set(arena.ARENAS)
    for row in rows.values():
        assert row["status"] == "ok", row
        assert set(row["step_s"]) == {name for name, _, _ in arena.STEPS}
        assert all(_finite_positive(seconds) for seconds in row["step_s"].values()), row
        assert _finite_positive(row["peak_rss_mib"]) and row["segment_s"] == 1


def test_torch_compile_past_its_budget_fails_and_onnxslim_runs(tmp_path):
    """The compile budget ends the backend's process and says so; the quick run leaves
    onnxslim out (slow on HT Demucs), so it runs here, on the small v2."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "forward.backends", "--quick",
         "--families", "v2", "--backends", "ort_slim,torch_compile", "--batches", "1",
         "--compile-budget", "0.5", "--machine", BENCH_MACHINE, "--results-dir",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]  # a failed row fails the run
    rows = {row["kind"]: row for row in _section(tmp_path, "forward.backends")["rows"]}
    assert rows["torch_compile"]["status"].startswith("failed: ")
    assert "torch.compile ran past its budget of 0.5 s" in rows["torch_compile"]["status"]
    slim = rows["ort_slim"]
    assert slim["status"] == "ok" and slim["graph_nodes"] < slim["source_nodes"], slim
    assert _finite_positive(slim["per_item_s"]) and "max_abs_diff_vs_eager" not in slim


def test_a_roformer_runs_fused_portable_and_on_openvino_fp32(tmp_path):
    """The fused attention's comparison (docs/decisions/0010): the export's graph, the one
    ``--portable`` writes (more nodes: the attention spelled out), OpenVINO in fp32, on the
    small BS-RoFormer."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "forward.backends", "--quick",
         "--families", "bs_roformer", "--backends", "torch_eager,ort,ort_portable,openvino_fp32",
         "--batches", "1", "--machine", BENCH_MACHINE, "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["kind"]: row for row in _section(tmp_path, "forward.backends")["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    portable = rows["ort_portable"]
    assert portable["graph_nodes"] > portable["source_nodes"] and portable["prepare_s"] > 0
    for kind in ("ort", "ort_portable"):
        assert rows[kind]["max_abs_diff_vs_eager"] < 1e-3, rows[kind]
    assert rows["openvino_fp32"]["max_abs_diff_vs_eager"] < 0.1
    assert _finite_positive(rows["openvino_fp32"]["session_start_s"])


def _config(**values) -> backends.Config:
    return dataclasses.replace(backends.Config(), **values)


def test_backends_expand_groups_put_eager_first_and_take_their_own_batches():
    chosen = backends.backends_of(_config(backends=("ort", "cpu", "torch_eager"),
                                          batches=(1, 2), batches_for=("ort=1/2/4/8",)))
    assert list(chosen)[:2] == ["torch_eager", "ort"]
    assert set(chosen) == {name for name, backend in backends.BACKENDS.items()
                           if not backend.gpu}
    assert chosen["ort"] == (1, 2, 4, 8) and chosen["ort_int8"] == (1, 2)
    for wrong in (_config(backends=("ort", "nope")),
                  _config(backends=("ort",), batches_for=("nope=1",))):
        with pytest.raises(SystemExit, match="unknown backends"):
            backends.backends_of(wrong)


def test_a_backend_this_machine_cannot_run_is_skipped_and_left_out_of_its_group():
    import torch

    cuda = torch.cuda.is_available()
    assert backends._skip("torch_cuda", "v2") == (None if cuda else "no CUDA device")
    assert ("torch_cuda" in backends.backends_of(_config(backends=("gpu",)))) == cuda
    assert backends._skip("ort_fp16", "htdemucs").startswith("no fp16 graph")
    assert backends._skip("ort", "htdemucs") is None


def test_derived_fields_follow_from_the_measurement():
    measurement = {"wall_s": {"median": 2.0, "min": 1.5, "max": 3.0, "n": 3},
                   "cpu_s": {"median": 3.0}, "cpu_util": 1.5, "warmup_s": [4.0],
                   "loadavg_before": [0.5, 0.4, 0.3]}
    row = {"kind": "ort", "batch": 2, "measurement": measurement}
    backends._derive(row, {"segment_s": 8.0, "gflop": 10.0}, 40.0)
    assert row["per_item_s"] == 1.0 and row["rtf"] == 1 / 8 and row["cpu_rtf"] == 1.5 / 8
    assert row["spread"] == 0.75 and row["repeats"] == 3 and row["first_call_s"] == 4.0
    assert row["gflops"] == 10.0 and row["ceiling_fraction"] == 0.25
    gpu = {"kind": "torch_cuda", "batch": 1, "measurement": measurement}
    backends._derive(gpu, {"segment_s": 8.0, "gflop": None}, 40.0)
    assert gpu["ceiling_gflops"] is None and "gflops" not in gpu


def test_describe_gives_each_family_from_a_weightless_copy():
    from benchmarks.flops import demucs_flops

    v2 = backends.describe("v2", "small", 1.0)
    assert v2["segment_length"] == 44100 < v2["padded_length"] and v2["channels"] == 2
    model = models.build("v2", "small")
    assert v2["gflop"] == pytest.approx(demucs_flops(model, v2["padded_length"])["total"] / 1e9)
    assert v2["parameters_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    ht = backends.describe("htdemucs", "small", 8.0)  # a fixed-length network: its own segment
    assert ht["segment_length"] == ht["padded_length"] == 44100 and ht["gflop"] is None
    with pytest.raises(SystemExit, match="no htdemucs of size 'medium'"):
        models.build("htdemucs", "medium")
