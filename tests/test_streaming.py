"""Stems as they are ready: ``Separator.stream_file`` / ``stream_array`` and the pipeline's
generator, in the fast lane.

``separate_file`` writes what ``stream_file`` yields, so the two must agree bit for bit
(float32 WAV, no clipping) on small real networks (the pipeline fixtures' Demucs v2 and
bag of an HT Demucs and a v3 Demucs); the blocks must come out while requests are still
pending, and closing the iterator must cancel the requests in flight.
"""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from stemserve.audio import OutputFormat
from stemserve.client import Separator
from stemserve.client.backends.local import LocalBackend
from stemserve.errors import InputError
from stemserve.pipeline import SeparationOptions, stream_stems
from test_pipeline_core import LENGTH, identity_spec, make_mix
from test_pipeline_fixture import backend_of, load_fixture


@pytest.mark.parametrize("name", ["v2", "v4"])
def test_streamed_stems_equal_the_written_ones_bit_for_bit(name, tmp_path):
    fixture = load_fixture(name)
    track = tmp_path / "mix.wav"
    sf.write(str(track), fixture["mix"].float().numpy().T, fixture["rate"], subtype="FLOAT")
    with contextlib.closing(backend_of(fixture)) as backend:
        # One request at a time: the worker then batches nothing, and a network's float
        # rounding does not depend on which segments happened to share a batch.
        separator = Separator(backend, fmt=OutputFormat("wav", "float32"), clip_mode="none",
                              in_flight=1, **fixture["options"])
        blocks = list(separator.stream_file(track))
        written = separator.separate_file(track, tmp_path / "out")
    assert len(blocks) > 1, "the stems came out in one piece, not as they became final"
    assert all(sorted(block) == sorted(fixture["sources"]) for block in blocks)
    for source in fixture["sources"]:
        streamed = np.concatenate([block[source] for block in blocks], axis=-1)
        stored = sf.read(str(written[source]), dtype="float32", always_2d=True)[0].T
        assert streamed.shape == stored.shape
        assert np.array_equal(streamed, stored), source


def test_stream_array_joined_is_separate_array():
    fixture = load_fixture("v2")
    mix = fixture["mix"].float().numpy()
    with contextlib.closing(backend_of(fixture)) as backend:
        separator = Separator(backend, two_stems="vocals", in_flight=1, **fixture["options"])
        blocks = list(separator.stream_array(mix, fixture["rate"]))
        whole = separator.separate_array(mix, fixture["rate"])
    assert sorted(whole) == ["no_vocals", "vocals"]
    for stem, array in whole.items():
        assert np.array_equal(np.concatenate([block[stem] for block in blocks], axis=-1), array)


class SlowIdentity:
    """The identity network of ``test_pipeline_core`` behind a batching worker, 20 ms a
    segment, counting the segments it ran."""

    def __init__(self):
        self.runs = 0
        self._lock = threading.Lock()
        self.backend = LocalBackend(identity_spec(), self._run, max_batch=1, name="slow")
        self.spec = self.backend.spec

    def _run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        with self._lock:
            self.runs += 1
        return np.stack([batch] * len(self.spec.sources), axis=1)


def test_blocks_come_out_while_the_track_is_still_running():
    network = SlowIdentity()
    mix = make_mix(2)
    seen = []
    with contextlib.closing(network.backend):
        for block in stream_stems(lambda: [mix], network.backend,
                                  SeparationOptions(overlap=0.25, in_flight=2)):
            seen.append((block.shape[-1], network.runs))
    total_runs = network.runs
    assert sum(length for length, _ in seen) == LENGTH
    assert len(seen) > 1 and seen[0][1] < total_runs, seen


def test_closing_the_iterator_cancels_the_requests_in_flight():
    network = SlowIdentity()
    mix = np.tile(make_mix(2), 8)  # 27 s: dozens of segments
    with contextlib.closing(network.backend):
        blocks = stream_stems(lambda: [mix], network.backend, SeparationOptions(in_flight=4))
        next(blocks)
        at_close = network.runs
        blocks.close()
        time.sleep(0.2)  # ten segments' time: a request left queued would have run
        assert network.runs <= at_close + 1  # the one running when it closed, at most


def test_a_bad_array_is_refused_at_the_call_not_at_the_first_block():
    with contextlib.closing(SlowIdentity().backend) as backend:
        with pytest.raises(InputError, match="too short"):
            Separator(backend).stream_array(np.zeros((2, 10), np.float32), 44100)
