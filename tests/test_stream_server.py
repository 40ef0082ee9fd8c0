"""The ``separate`` model on a real tritonserver: the whole pipeline on the server, the stems
streamed back over gRPC as they become final.

A bare tritonclient script (docs/examples/stream_separate.py, run with no stemserve module
importable) must separate a file into the stems of the client's own pipeline; ``--backend
triton-stream`` must give ``separate_file``'s stems; a cancelled stream must stop the
server's work for it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc as grpcclient

from stemserve.audio import OutputFormat
from stemserve.client import Separator, separate_array
from stemserve.client.backends import open_backend
from stemserve.client.backends.triton_stream import TritonStreamBackend
from stemserve.defaults import TRITON_MODEL
from stemserve.errors import ServerError
from stemserve.pipeline import SeparationOptions
from test_separate_cli import RATE, SOURCES, song, write_song

pytestmark = pytest.mark.server

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "stream_separate.py"
WITHOUT_STEMSERVE = """
import runpy, sys
class NoStemserve:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "stemserve":
            raise ImportError("the example must not need stemserve")
sys.meta_path.insert(0, NoStemserve())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    sys.exit(done.code)
"""


@pytest.fixture(scope="module")
def expected(small_export):
    """The client's own pipeline on the same graph, in-process (equal to demucs 2.0.3's,
    test_pipeline_oracle.py)."""
    return separate_array(song(), RATE, backend=open_backend("onnx", model=small_export))


def test_a_bare_tritonclient_stream_separates_a_file(triton_server, expected, tmp_path):
    track = write_song(tmp_path / "song.wav")
    done = subprocess.run([sys.executable, "-c", WITHOUT_STEMSERVE, str(EXAMPLE), str(track),
                           str(tmp_path / "out"), "--url", triton_server.grpc_url],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in SOURCES:
        data, rate = sf.read(str(tmp_path / "out" / f"{name}.wav"), dtype="float32")
        assert rate == RATE
        assert np.abs(data.T - expected[name]).max() < 1e-5, name


def test_the_streaming_backend_writes_what_the_client_pipeline_writes(triton_server, tmp_path):
    track = write_song(tmp_path / "song.wav")
    options = dict(fmt=OutputFormat("wav", "float32"), clip_mode="none", shifts=2, seed=3)
    with open_backend("triton-stream", connection=triton_server.grpc_url) as streamed, \
            open_backend("triton", connection=triton_server.grpc_url) as client_side:
        assert isinstance(streamed, TritonStreamBackend)
        assert streamed.spec == client_side.spec
        blocks = list(Separator(streamed, **options).stream_file(track))
        written = Separator(client_side, **options).separate_file(track, tmp_path / "out")
    assert len(blocks) > 1
    for name in SOURCES:
        got = np.concatenate([block[name] for block in blocks], axis=-1)
        stored = sf.read(str(written[name]), dtype="float32", always_2d=True)[0].T
        assert got.shape == stored.shape
        # The same graph on the same server; only the server's batches may differ.
        assert np.abs(got - stored).max() < 1e-6, name


def test_a_bad_request_is_an_error_answer_not_a_dead_stream(triton_server):
    with TritonStreamBackend(triton_server.grpc_url) as backend:
        with pytest.raises(ServerError, match="failed"):
            list(backend.stream(lambda: [np.zeros((3, RATE), np.float32)],
                                options=SeparationOptions()))
        # The server goes on: the next track separates.
        blocks = list(backend.stream(lambda: [song()], options=SeparationOptions()))
        assert sum(block.shape[-1] for block in blocks) == song().shape[-1]


def test_cancelling_a_stream_stops_the_servers_work(triton_server):
    """Closed after its first block, a 60 s track (80 segments of the small model) leaves
    the network model idle after a few more segments, not after all of them."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)

    def segments_run() -> int:
        (stats,) = client.get_inference_statistics(TRITON_MODEL, as_json=True)["model_stats"]
        return int(stats.get("inference_count", 0))

    before = segments_run()
    mix = np.tile(song(), 27)[:, :60 * RATE]
    with TritonStreamBackend(triton_server.grpc_url) as backend:
        blocks = backend.stream(lambda: [mix], options=SeparationOptions())
        next(blocks)
        blocks.close()
    time.sleep(3)  # long enough for the rest of the track, had it gone on
    ran = segments_run() - before
    assert ran < 20, f"{ran} segments ran for a stream closed after its first block"
