"""The CPU levers benchmark's quick run writes a valid section with every lever measured.

No timing is asserted: which batch size or arena wins depends on the machine and its load.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from conftest import BENCH_MACHINE  # noqa: E402

pytestmark = pytest.mark.bench


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cpu_levers_quick_writes_a_valid_section(bench_quick_run):
    """``run_all --quick`` ran ``benchmarks.cpu_levers --quick`` (the shared fixture)."""
    section = results.load(bench_quick_run / f"{BENCH_MACHINE}.json")["sections"]["cpu_levers"]
    assert "--quick" in section["command"] and section["config"]["batches"] == [1, 2]
    rows = section["rows"]
    assert all(row["status"] == "ok" for row in rows), rows
    assert {(row["precision"], row["batch"]) for row in rows if row["lever"] == "batch"} == \
        {(p, b) for p in ("fp32", "int8") for b in (1, 2)}
    assert {row["arena"] for row in rows if row["lever"] == "arena"} == \
        {"power_of_two", "same_as_requested", "none"}
    assert {(row["precision"], row["mode"]) for row in rows if row["lever"] == "short"} == \
        {(p, m) for p in ("fp32", "int8") for m in ("in_turn", "at_once")}
    for row in rows:
        value = row.get("per_item_s", row.get("warm_batch_s", row.get("track_s")))
        assert _finite_positive(value) and _finite_positive(row["peak_rss_mib"]), row
    notes = " ".join(section["notes"])
    assert "int8 vs fp32 at batch 2" in notes and "Two-segment track, int8" in notes
    markdown = (bench_quick_run / f"{BENCH_MACHINE}.md").read_text()
    assert "CPU levers" in markdown
