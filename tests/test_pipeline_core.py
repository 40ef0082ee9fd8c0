"""The pipeline's geometry and memory, without any network: numpy only, the fast lane.

An identity "network" returns its input as every source, so the pipeline must give back the
mix, for any overlap and shifts: segments, padding, trimming and the overlap-add all cancel
out only when each is right. It cannot see what an identity cancels: the normalisation's
statistics, the shape of the transition window, the direction of the shifts, which stem is
which. A small real network against the official demucs does, in this lane too:
``test_pipeline_fixture.py``; on the full configurations, ``test_pipeline_oracle.py`` and
``test_pipeline_v4.py``.
"""
from __future__ import annotations

import tracemalloc
from concurrent.futures import Future

import numpy as np
import pytest

from stemserve.errors import StemserveError
from stemserve.pipeline import SeparationOptions, mix_stats, stream_stems
from stemserve.spec import ModelSpec
from tolerance import assert_matches

RATE = 44100
LENGTH = int(3.37 * RATE) + 7
"""3.37 s plus 7 samples: a multiple of neither the segment, the stride nor the network's
length granularity, so the last segment is short and odd-sized."""


def make_mix(channels: int) -> np.ndarray:
    """Noise plus tones with a DC offset: mean and std both matter."""
    rng = np.random.default_rng(channels)
    t = np.arange(LENGTH) / RATE
    tones = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
    mix = 0.2 * rng.standard_normal((channels, LENGTH)) + tones + 0.05
    return mix.astype(np.float32)


def identity_spec() -> ModelSpec:
    return ModelSpec(model_name="identity", checkpoint="identity", checkpoint_sha256="0",
                     sample_rate=RATE, audio_channels=2, sources=("a", "b"),
                     segment_length=RATE, padded_length=RATE + 1000, output_length=RATE + 1000,
                     valid_length_params=dict(resample=True, depth=3, kernel_size=8, stride=4,
                                              context=3))


class IdentityBackend:
    """Returns its input as every source: the pipeline must then give back the mix."""

    def __init__(self):
        self.spec = identity_spec()

    def submit(self, mix: np.ndarray) -> Future:
        future: Future = Future()
        future.set_result(np.stack([mix] * len(self.spec.sources)))
        return future

    def close(self) -> None:
        pass


@pytest.mark.parametrize("shifts", [0, 3])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.9])
def test_identity_network_gives_back_the_mix(overlap, shifts):
    mix = make_mix(2)
    blocks = list(stream_stems(lambda: [mix[:, i:i + 5000] for i in range(0, LENGTH, 5000)],
                               IdentityBackend(),
                               SeparationOptions(overlap=overlap, shifts=shifts, seed=1)))
    out = np.concatenate(blocks, axis=-1)
    assert out.shape == (2, 2, LENGTH)
    # Measured: at most 3.2 float32 epsilons of the mix's peak (overlap 0.9, shifts 3).
    assert_matches(out, np.broadcast_to(mix, out.shape), 8, "identity")


def test_memory_does_not_grow_with_the_track():
    """Ten minutes go through in blocks; peak allocation stays at a few segments."""
    seconds = 600
    block = 1 << 16

    def source():
        rng = np.random.default_rng(0)
        for start in range(0, seconds * RATE, block):
            yield rng.standard_normal((2, min(block, seconds * RATE - start)),
                                      dtype=np.float32)

    received = [0, 0]
    tracemalloc.start()
    try:
        for stems in stream_stems(source, IdentityBackend(), SeparationOptions(in_flight=8)):
            received[0] += stems.shape[-1]
            received[1] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received[0] == seconds * RATE
    assert received[1] > seconds // 10  # streamed out as it went, not at the end
    track_bytes = seconds * RATE * 2 * 4
    assert peak < 30e6 < track_bytes / 5, peak


def test_mix_stats_over_blocks_equal_the_whole_track():
    mix = make_mix(2) * 3 + 1
    stats = mix_stats(mix[:, i:i + 777] for i in range(0, LENGTH, 777))
    ref = mix.astype(np.float64).mean(axis=0)
    assert stats.length == LENGTH
    assert stats.mean == pytest.approx(ref.mean(), rel=1e-12)
    assert stats.std == pytest.approx(ref.std(ddof=1), rel=1e-12)  # unbiased, as torch


@pytest.mark.parametrize("kwargs,message", [
    (dict(overlap=1.0), "overlap"), (dict(shifts=-1), "shifts"),
    (dict(transition_power=0.5), "transition_power"), (dict(in_flight=0), "in_flight")])
def test_bad_parameters_are_clear_errors(kwargs, message):
    with pytest.raises(StemserveError, match=message):
        SeparationOptions(**kwargs)


def test_silence_and_nan():
    silence = np.zeros((2, RATE), np.float32)
    blocks = list(stream_stems(lambda: [silence], IdentityBackend()))
    assert np.all(np.concatenate(blocks, axis=-1) == 0)
    broken = make_mix(2)
    broken[0, 100] = np.nan
    with pytest.raises(StemserveError, match="NaN"):
        next(stream_stems(lambda: [broken], IdentityBackend()))
