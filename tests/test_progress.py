"""Progress moves with time while a long request runs: a track of one segment no longer
shows 0 until it is done, and what it shows never goes back."""
from __future__ import annotations

import time

import numpy as np
import pytest

import stemserve.client.progress as progress_module
from stemserve.client import separate_array
from stemserve.client.backends.local import LocalBackend
from stemserve.client.progress import ESTIMATE_CAP, TrackProgress
from stemserve.spec import load_export_spec


class SlowBackend(LocalBackend):
    """The small model's shapes, answered with silence after ``seconds`` per request."""

    def __init__(self, spec, seconds: float):
        def run(batch: np.ndarray) -> np.ndarray:
            time.sleep(seconds)
            length = spec.request_output_length(batch.shape[-1])
            return np.zeros((batch.shape[0], len(spec.sources), spec.audio_channels, length),
                            np.float32)

        super().__init__(spec, run, max_batch=1, name="slow")
        self.where = "a test's slow backend"


@pytest.fixture
def quick_ticks(monkeypatch):
    monkeypatch.setattr(progress_module, "TICK_SECONDS", 0.05)


def test_a_one_segment_track_moves_before_its_answer(small_export, quick_ticks):
    spec = load_export_spec(small_export)
    seconds = 0.8 * spec.segment_seconds  # shorter than one segment: one request
    mix = np.random.default_rng(0).standard_normal((2, int(seconds * spec.sample_rate)))
    seen: list[tuple[str, float, float]] = []
    with SlowBackend(spec, seconds=1.0) as backend:
        separate_array(mix.astype(np.float32), spec.sample_rate, backend=backend,
                       progress=lambda *report: seen.append(report))
    done = [value for stage, value, _ in seen if stage == "separating"]
    assert done == sorted(done), "progress went back"
    assert done[-1] == pytest.approx(seconds)
    moving = [value for value in done if 0 < value <= ESTIMATE_CAP * seconds + 1e-9]
    assert len(set(moving)) >= 5, done  # it moved, in steps, before the first answer


def test_the_estimate_follows_the_pace_of_the_answers():
    progress = TrackProgress(False, seconds=100.0, sample_rate=10, label="t")
    start = progress._start
    assert progress.estimate(start + 2) == pytest.approx(2 / progress_module.PRIOR_PACE)
    progress._last = start + 10
    progress._answered = 20.0  # 20 audio seconds in 10 s: 2 per second
    assert progress.estimate(start + 13) == pytest.approx(26.0)
    assert progress.estimate(start + 10_000) == pytest.approx(20 + ESTIMATE_CAP * 80)
    progress.close()
