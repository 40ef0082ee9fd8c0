"""The pipeline reproduces demucs 2.0.3's separate.py + apply_model(split=True) exactly.

The official package is the oracle: the same random weights run through its apply_model on
the mix normalised as separate.py does, and through stemserve's one pipeline on each backend
(in-process ONNX Runtime, PyTorch, and a real Triton server, with and without shared memory).
"""
from __future__ import annotations

import random
import threading
from concurrent.futures import Future

import numpy as np
import pytest

from stemserve.errors import StemserveError
from stemserve.pipeline import center_trim, transition_window
from stemserve.spec import MAX_SHIFT_SECONDS
from oracle_v2 import demucs2

pytestmark = pytest.mark.oracle
torch = pytest.importorskip("torch")
demucs_utils = demucs2("demucs.utils", module_level=True)
demucs_model = demucs2("demucs.model", module_level=True)
demucs_audio = demucs2("demucs.audio", module_level=True)

from stemserve.client import separate_array  # noqa: E402
from stemserve.client.backends.onnx import OnnxBackend  # noqa: E402
from stemserve.client.backends.pytorch import TorchBackend  # noqa: E402
from stemserve.client.backends.triton import TritonBackend  # noqa: E402
from stemserve.defaults import SOURCES  # noqa: E402
from stemserve.spec import load_export_spec  # noqa: E402
from test_pipeline_core import LENGTH, RATE, make_mix  # noqa: E402
from tolerance import assert_differs, assert_matches  # noqa: E402

ULPS = {"torch": 4, "onnx": 12, "triton": 12, "triton-shm": 12}
"""Bounds in float32 epsilons of the stems' peak (~0.09), ``tests/tolerance.py``. Measured
on a 2-core Xeon (every configuration): torch 1.40 to 1.45 (the oracle's own network in
PyTorch: only the pipeline's arithmetic differs), ONNX Runtime 3.6 to 4.9, Triton and
Triton with shared memory the same as ONNX Runtime (its graph). Pipeline bugs measured the
same way: the normalisation's biased std gives 16.7 to 18.3 on torch and 17.8 to 21.0 on
ONNX (caught by both: the smallest); a flat window 1.5e5, a segment read a sample late
2.7e5 (shifts 0), a shifted segment's 2.6e5 (shifts 2), mirrored shifts 2.5e5 (shifts 2),
rotated stem names 6e6 (``tests/test_mutations.py``)."""
SEED = 20240613


@pytest.fixture(scope="module")
def oracle_model(small_model):
    """The official demucs 2.0.3 Demucs carrying exactly small_model's weights."""
    model, info = small_model
    reference = demucs_model.Demucs(sources=list(SOURCES), **info.config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def run_oracle(reference, mix: np.ndarray, overlap: float, shifts: int,
               seed: int) -> np.ndarray:
    """demucs/separate.py's steps, from the channel conversion to the de-normalisation."""
    wav = demucs_audio.convert_audio_channels(torch.from_numpy(mix), reference.audio_channels)
    ref = wav.mean(0)
    wav = (wav - ref.mean()) / ref.std()
    random.seed(seed)
    with torch.no_grad():
        sources = demucs_utils.apply_model(reference, wav, shifts=shifts, split=True,
                                           overlap=overlap)
    return (sources * ref.std() + ref.mean()).numpy()


@pytest.fixture(scope="module")
def oracle(oracle_model):
    """Oracle outputs, computed once per configuration."""
    cache: dict[tuple, np.ndarray] = {}

    def get(channels: int, overlap: float, shifts: int, seed: int = SEED) -> np.ndarray:
        key = (channels, overlap, shifts, seed)
        if key not in cache:
            cache[key] = run_oracle(oracle_model, make_mix(channels), overlap, shifts, seed)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def backends(small_model, request):
    """Backends by name, opened on first use and closed with the module (the export only
    for those that need it: the torch tests alone run without it)."""
    opened: dict[str, object] = {}

    def get(name: str):
        if name not in opened:
            if name == "onnx":
                opened[name] = OnnxBackend(request.getfixturevalue("small_export"))
            elif name == "torch":
                opened[name] = TorchBackend(*small_model)
            else:
                server = request.getfixturevalue("triton_server")
                spec = load_export_spec(request.getfixturevalue("small_export"))
                opened[name] = TritonBackend(server.grpc_url, spec=spec,
                                             shared_memory=name == "triton-shm")
        return opened[name]
    yield get
    for backend in opened.values():
        backend.close()


def as_array(stems: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([stems[name] for name in SOURCES])


CONFIGS = [(channels, overlap, shifts) for channels in (1, 2) for overlap in (0.25, 0.5)
           for shifts in (0, 2)]


@pytest.mark.parametrize("channels,overlap,shifts", CONFIGS,
                         ids=[f"{'mono' if c == 1 else 'stereo'}-overlap{o}-shifts{s}"
                              for c, o, s in CONFIGS])
@pytest.mark.parametrize("backend_name", ["onnx", "torch", "triton"])
def test_matches_demucs_reference(backend_name, channels, overlap, shifts, oracle, backends):
    mix = make_mix(channels)
    expected = oracle(channels, overlap, shifts)
    got = as_array(separate_array(mix[0] if channels == 1 else mix, RATE,
                                  backend=backends(backend_name), overlap=overlap,
                                  shifts=shifts, seed=SEED))
    assert got.shape == expected.shape == (4, 2, LENGTH)
    assert_matches(got, expected, ULPS[backend_name], backend_name)


@pytest.mark.parametrize("shifts", [0, 2])
def test_triton_shared_memory_matches_reference(shifts, oracle, backends):
    assert backends("triton-shm").shared_memory and not backends("triton").shared_memory
    got = as_array(separate_array(make_mix(2), RATE, backend=backends("triton-shm"),
                                  shifts=shifts, seed=SEED))
    assert_matches(got, oracle(2, 0.25, shifts), ULPS["triton-shm"], "triton-shm")


def test_shared_memory_by_default_on_this_host_only(triton_server, small_export, monkeypatch):
    from tritonclient.utils import InferenceServerException

    from stemserve.client.backends import triton

    spec = load_export_spec(small_export)
    assert triton.is_loopback(triton_server.grpc_url) and not triton.is_loopback("8.8.8.8:1")
    with TritonBackend(triton_server.grpc_url, spec=spec) as backend:
        assert backend.shared_memory

    def refuse(*args):
        raise InferenceServerException("Unable to open shared memory region")
    monkeypatch.setattr(triton, "_SharedMemoryPool", refuse)
    with TritonBackend(triton_server.grpc_url, spec=spec) as backend:
        assert not backend.shared_memory  # plain gRPC instead
    with pytest.raises(StemserveError, match="cannot use this host's shared memory"):
        TritonBackend(triton_server.grpc_url, spec=spec, shared_memory=True)


def test_another_seed_draws_other_shifts(oracle, backends):
    """The seeded comparison can fail: other offsets give clearly other stems."""
    got = as_array(separate_array(make_mix(2), RATE, backend=backends("onnx"), shifts=2,
                                  seed=SEED + 1))
    assert_differs(got, oracle(2, 0.25, 2), 1000 * ULPS["onnx"])


class ShuffledBackend:
    """Completes each request after a random delay: results arrive in any order."""

    def __init__(self, inner, seed: int = 0):
        self.inner = inner
        self.spec = inner.spec
        self._rng = random.Random(seed)
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def submit(self, mix: np.ndarray) -> Future:
        outer: Future = Future()
        delay = self._rng.uniform(0, 0.05)
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

        def later(inner: Future) -> None:
            def finish() -> None:
                with self._lock:
                    self._in_flight -= 1
                outer.set_result(inner.result())
            threading.Timer(delay, finish).start()
        self.inner.submit(mix).add_done_callback(later)
        return outer

    def close(self) -> None:
        pass


def test_results_in_any_order_and_window_bounds_requests(oracle, backends):
    backend = ShuffledBackend(backends("onnx"))
    got = as_array(separate_array(make_mix(2), RATE, backend=backend, overlap=0.5,
                                  shifts=2, seed=SEED, in_flight=3))
    assert_matches(got, oracle(2, 0.5, 2), ULPS["onnx"], "onnx, shuffled")
    assert backend.max_in_flight == 3


def test_window_and_trim_are_demucs():
    for segment in (44100, 7, 8):
        weight = torch.cat([torch.arange(1, segment // 2 + 1),
                            torch.arange(segment - segment // 2, 0, -1)]).float()
        expected = (weight / weight.max()) ** 1.5
        assert np.allclose(transition_window(segment, 1.5), expected.numpy(), atol=1e-7)
    data = np.arange(20.0)
    for length in (20, 13, 12):
        assert np.array_equal(center_trim(data, length),
                              demucs_utils.center_trim(torch.from_numpy(data), length).numpy())
    assert MAX_SHIFT_SECONDS == 0.5
