"""The quality meter (benchmarks/quality/): its synthetic stems, its SDR, its cache, its quick run.

No SDR value is asserted for the quick run: three training steps teach a model nothing. What
is checked is that every path separates and is scored, and that the deltas are there.
"""
from __future__ import annotations

import dataclasses
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
from benchmarks.quality.meter import (MIXTURE, MODELS, NO_MODEL, PATHS, REFERENCE,  # noqa: E402
                                      SCENARIO, sdr_db)
from benchmarks.quality.synthetic import (SAMPLE_RATE, TEST_SEED_OFFSET, remix, song,  # noqa: E402
                                          trained_model)
from benchmarks.scenario import CACHE  # noqa: E402
from conftest import BENCH_MACHINE  # noqa: E402
from stemserve.defaults import SOURCES  # noqa: E402
from stemserve.runtime.openvino_session import cpu_has_bf16  # noqa: E402

pytestmark = pytest.mark.bench


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_songs_are_seeded_stereo_stems_with_every_source_sounding():
    stems = song(3, 2.0)
    assert stems.shape == (len(SOURCES), 2, 2 * SAMPLE_RATE) and stems.dtype == np.float32
    assert np.array_equal(stems, song(3, 2.0))
    assert not np.allclose(stems, song(3 + TEST_SEED_OFFSET, 2.0))
    assert (np.sqrt(np.mean(stems ** 2, axis=(1, 2))) > 1e-3).all()


def test_remixes_sum_to_their_mix_normalised_as_the_pipeline_does():
    pool = np.stack([song(seed, 2.0) for seed in range(2)])
    mix, stems = remix(pool, SAMPLE_RATE, 3, np.random.default_rng(0))
    assert mix.shape == (3, 2, SAMPLE_RATE) and stems.shape == (3, len(SOURCES), 2, SAMPLE_RATE)
    assert np.allclose(stems.sum(axis=1), mix, atol=1e-5)
    assert np.allclose(mix.mean(axis=1).std(axis=-1, ddof=1), 1, atol=1e-4)


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


def test_a_trained_model_is_cached_and_reused(tmp_path):
    """A second call loads the first one's checkpoint: the same weights, marked reused; a
    different training budget is another checkpoint."""
    training = dict(seed=0, train_minutes=1.0, max_steps=1, batch=1, lr=1e-3, pool_songs=1,
                    pool_seconds=2.0)
    model, info, record = trained_model("demucs", MODELS["demucs"][1], training, tmp_path)
    again, info_again, record_again = trained_model("demucs", MODELS["demucs"][1], training,
                                                    tmp_path)
    assert (record["steps"], record["reused"], record_again["reused"]) == (1, False, True)
    assert info.sha256 == info_again.sha256 and Path(record["checkpoint"]).parent == tmp_path
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b
               in zip(model.state_dict().values(), again.state_dict().values()))
    *_, other = trained_model("demucs", MODELS["demucs"][1], dict(training, max_steps=2), tmp_path)
    assert other["checkpoint"] != record["checkpoint"] and other["steps"] == 2


def test_quality_quick_scores_every_path_of_every_model(bench_quick_run):
    """``run_all --quick`` ran ``quality.meter --quick`` (the shared fixture)."""
    data = results.load(bench_quick_run / f"{BENCH_MACHINE}.json")  # validates the whole file
    section = data["sections"]["quality.meter"]
    assert "quality.meter" in section["command"] and "--quick" in section["command"]
    quick = {field.name: field.metadata.get("quick", field.default)
             for field in dataclasses.fields(SCENARIO.config)}
    assert section["config"] == {key: list(value) if isinstance(value, tuple) else value
                                 for key, value in quick.items()}
    models = set(section["config"]["models"])
    assert models == {"demucs", "htdemucs", "bs_roformer"}

    rows = {(row["model"], row["path"]): row for row in section["rows"]}
    assert len(rows) == len(section["rows"])
    assert set(rows) == {(NO_MODEL, MIXTURE)} | {(model, path) for model in models
                                                for path in PATHS}
    for (model, path), row in rows.items():
        if path == "onnx fp16" and model != "demucs":  # no fp16 graph of these
            assert row["status"].startswith("skipped: no fp16 graph"), row
            continue
        if path == "openvino bf16" and not cpu_has_bf16():
            assert row["status"].startswith("skipped: "), row
            continue
        assert row["status"] == "ok", row
        assert set(row["sdr_db"]) == set(SOURCES)
        assert all(_finite(value) for value in row["sdr_db"].values()), row
        assert row["sdr_mean_db"] == pytest.approx(np.mean(list(row["sdr_db"].values())))
        assert np.array(row["sdr_per_mix_db"]).shape == (1, len(SOURCES))
        if path == MIXTURE:
            continue
        assert _finite(row["delta_mean_db"]) and row["delta_worst_source"] in SOURCES
        assert row["delta_mean_db"] == pytest.approx(
            row["sdr_mean_db"] - rows[model, REFERENCE]["sdr_mean_db"])
        assert _finite(row["stems_rel_diff"]) and row["stems_rel_diff"] >= 0
        assert _finite(row["separate_s"]) and row["separate_s"] > 0
        assert row["parameters"] > 0 and row["export_s"] > 0
        assert row["training"]["steps"] == 3 and _finite(row["training"]["final_loss"])
        assert Path(row["training"]["checkpoint"]).parent == CACHE / "quality"
        assert (row["layer_scale"] is None) == (model != "htdemucs")
    for model in models:
        assert rows[model, REFERENCE]["delta_mean_db"] == 0
        assert rows[model, REFERENCE]["stems_rel_diff"] == 0
        # The same network in PyTorch and ONNX Runtime: the same stems, the same SDR.
        assert abs(rows[model, "torch fp32"]["delta_mean_db"]) < 0.01
        assert rows[model, "torch fp32"]["stems_rel_diff"] < 1e-3

    keys = {column["key"] for column in section["columns"]}
    assert {"sdr_mean_db", "delta_mean_db", "delta_worst_db", "stems_rel_diff"} <= keys
    markdown = (bench_quick_run / f"{BENCH_MACHINE}.md").read_text()
    assert "(`quality.meter`)" in markdown
