"""The quality meter (benchmarks/quality.py): its synthetic stems, its SDR, and its quick run.

No SDR value is asserted for the quick run: three training steps teach a model nothing. What
is checked is that every path separates and is scored, and that the deltas are there.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("fast_bss_eval", reason="the dev extra (fast_bss_eval) is not installed")

from benchmarks import results  # noqa: E402
from benchmarks.quality import (MIXTURE, NO_MODEL, PATHS, REFERENCE, SOURCES,  # noqa: E402
                                TEST_SEED_OFFSET, WORK_DIR, sdr_db, song)
from conftest import BENCH_MACHINE  # noqa: E402
from stemserve.runtime.openvino_session import cpu_has_bf16  # noqa: E402


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_songs_are_seeded_stereo_stems_with_every_source_sounding():
    stems = song(3, 2.0)
    assert stems.shape == (len(SOURCES), 2, 88200) and stems.dtype == np.float32
    assert np.array_equal(stems, song(3, 2.0))
    assert not np.allclose(stems, song(3 + TEST_SEED_OFFSET, 2.0))
    assert (np.sqrt(np.mean(stems ** 2, axis=(1, 2))) > 1e-3).all()


def test_sdr_is_bss_evals_per_source():
    """White noise added at a known level gives about that SDR (the 512-tap distortion
    filter absorbs a little of the noise), and each source is scored against its own
    reference only."""
    rng = np.random.default_rng(0)
    references = rng.standard_normal((2, 2, 44100)).astype(np.float32)
    noise = rng.standard_normal(references.shape).astype(np.float32)
    levels = np.array([0.1, 0.5], dtype=np.float32)[:, None, None]
    got = sdr_db(references, references + levels * noise)
    assert got == pytest.approx(-20 * np.log10([0.1, 0.5]), abs=0.2)
    assert sdr_db(references, references[::-1]).max() < -15  # another source: only what
    # 512 taps can fit of it, ~-19 dB


@pytest.mark.bench
def test_quality_quick_writes_a_section_for_every_path(bench_quick_run):
    """``run_all --quick`` ran ``benchmarks.quality --quick`` (the shared fixture)."""
    data = results.load(bench_quick_run / f"{BENCH_MACHINE}.json")  # validates the whole file
    section = data["sections"]["quality"]
    assert "benchmarks.quality" in section["command"] and "--quick" in section["command"]
    assert section["config"]["quick"] is True and section["config"]["max_steps"] == 3
    models = set(section["config"]["models"])
    assert models == {"demucs v2", "htdemucs"}

    rows = {(row["model"], row["path"]): row for row in section["rows"]}
    assert set(rows) == {(NO_MODEL, MIXTURE)} | {(model, path) for model in models
                                                for path in PATHS}
    for (model, path), row in rows.items():
        if (model, path) == ("htdemucs", "onnx fp16") and row["status"] != "ok":
            # HT Demucs' fp16 graph does not trace on the CPU; the row says why.
            assert row["status"].startswith("failed: export_onnx(fp16=True)"), row
            continue
        if path == "openvino bf16" and not cpu_has_bf16():  # refused, saying why
            assert "no bf16 arithmetic" in row["status"], row
            continue
        assert row["status"] == "ok", row
        assert set(row["sdr_db"]) == set(SOURCES)
        assert all(_finite(value) for value in row["sdr_db"].values()), row
        assert _finite(row["sdr_mean_db"])
        assert np.array(row["sdr_per_mix_db"]).shape == (1, len(SOURCES))
        if path != MIXTURE:
            assert _finite(row["delta_mean_db"]) and row["delta_worst_source"] in SOURCES
            assert row["delta_mean_db"] == pytest.approx(
                row["sdr_mean_db"] - rows[model, REFERENCE]["sdr_mean_db"])
    for model in models:
        assert rows[model, REFERENCE]["delta_mean_db"] == 0
        # The same network in PyTorch and ONNX Runtime: the same stems, the same SDR.
        assert abs(rows[model, "torch fp32"]["delta_mean_db"]) < 0.01

    assert {"delta_mean_db", "delta_worst_db"} <= {column["key"] for column in section["columns"]}
    (training,) = section["tables"]
    assert {row["model"] for row in training["rows"]} == models
    for row in training["rows"]:
        assert row["steps"] == 3 and row["parameters"] > 0 and _finite(row["final_loss"])
        assert Path(row["checkpoint"]).parent == WORK_DIR  # run_all's default cache
    assert set(section["extra"]["target"]) == models
    assert any(note.startswith("Target (issue 14") for note in section["notes"])
    markdown = (bench_quick_run / f"{BENCH_MACHINE}.md").read_text()
    assert "(`quality`)" in markdown and "### The trained models" in markdown
