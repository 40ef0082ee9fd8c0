"""The bf16 CPU fast path: OpenVINO runs the fp32 graph with bf16 arithmetic.

ONNX Runtime has no bf16 CPU kernels, but Intel CPUs with AMX or AVX512_BF16 multiply bf16
several times faster than fp32. OpenVINO reads the exported ONNX graph as it is and, asked
for ``INFERENCE_PRECISION_HINT=bf16``, runs its matrix products and convolutions in bf16
(accumulating in fp32) and keeps the precision-sensitive operators in fp32. Measured on the
released htdemucs configuration, one 7.8 s segment, 2-core Xeon with AMX
(benchmarks/releases.py): 0.87 s against 2.16 s for ONNX Runtime fp32 and 2.27 s for
PyTorch eager. The stems change by what bf16 rounding does (about 3e-3 relative); the
quality meter (benchmarks/quality.py) reports it as an SDR difference (-0.002 dB for a small
trained HT Demucs, -0.005 dB for a v2).

The session mirrors ONNX Runtime's ``run(output_names, feeds)``, so the in-process backend
and the CPU server's python model use either one the same way
(:func:`stemserve.client.backends.ort_session.cpu_session`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stemserve.errors import ModelError

INSTALL_HINT = "pip install 'stemserve[openvino]'"
BF16_TOLERANCE = 0.02
"""Largest difference from OpenVINO's own fp32 result (L2 norm, relative) the self-check
accepts. bf16 rounding gives 2e-3 to 4e-3 (full-size v2 2.7e-3, htdemucs 3.8e-3, random
weights). oneDNN's bf16 convolution on AMX gives about 1 for
some layer shapes (Conv1d with 16 or 24 input channels, kernel 8, stride 4, in OpenVINO
2026.4 and in torch 2.13 alike; the released models' 48 and 64 channels are not among
them): a graph with such a layer is refused, not served wrong."""
SHAPES_KEPT = 2
"""Compiled input shapes kept per session, the least recently used dropped first: the hot
path's and the latest last segment's (each holds its own bf16 copy of the weights)."""


def cpu_has_bf16() -> bool:
    """Whether OpenVINO can run bf16 arithmetic on this CPU (AMX or AVX512_BF16); False
    without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class Bf16Session:
    """``model_file`` compiled by OpenVINO for the CPU with bf16 arithmetic and ``threads``
    threads (0: one per core this process may run on).

    One compiled model per input shape but the batch: OpenVINO 2026.4's CPU plugin computes
    transposed convolutions wrongly in bf16 when the time axis is dynamic (Demucs v2's
    output came back 2,048 samples short, and shorter inputs failed), and right once the
    time axis is fixed. The hot path has one shape (HT Demucs only ever one); a track's
    short last segment compiles its own, and the :data:`SHAPES_KEPT` latest are kept.

    Refuses a CPU without bf16 instructions (OpenVINO would silently fall back to fp32, and
    the stems would be labelled bf16 while being fp32's), and a graph whose bf16 result is
    not within :data:`BF16_TOLERANCE` of fp32's: the first shape compiled is also compiled
    in fp32 once and both run on the same seeded noise. ``check_shape`` (an input shape, the
    batch left out) does that at once, so a refusal comes at load time rather than on the
    first segment; it costs an fp32 compile and a run of each (about 7 s for htdemucs on 2
    cores). Not thread-safe: one caller at a time, as the python backend and the in-process
    worker are.
    """

    def __init__(self, model_file: Path, threads: int = 0,
                 check_shape: tuple[int, ...] | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ModelError(f"the bf16 path runs on OpenVINO: {INSTALL_HINT}") from None
        self._ov = ov
        self._core = ov.Core()
        if not cpu_has_bf16():
            raise ModelError("this CPU has no bf16 arithmetic (AMX or AVX512_BF16): OpenVINO "
                             "would run it in fp32; use the fp32 or int8 graph",
                             where=str(model_file))
        self.threads = threads or len(os.sched_getaffinity(0))
        self.version = ov.get_version()
        self._where = str(model_file)
        try:
            self._model = self._core.read_model(self._where)
        except RuntimeError as err:
            raise ModelError(f"OpenVINO cannot read it: {err}", where=self._where) from None
        self._requests: dict[tuple[int, ...], object] = {}
        self.checked_error: float | None = None
        """The self-check's relative difference from fp32, once it ran."""
        if check_shape is not None:
            self._request(tuple(check_shape))

    def _compile(self, shape: tuple[int, ...], precision: str):
        """The model compiled for inputs of ``shape`` (batch left out) in ``precision``."""
        model = self._model.clone()
        model.reshape(self._ov.PartialShape([-1, *shape]))
        try:
            return self._core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": precision,
                "INFERENCE_NUM_THREADS": self.threads,
                # One request at a time, every thread on it: the server's instance and the
                # in-process worker both run one batch after the other.
                "PERFORMANCE_HINT": "LATENCY",
            })
        except RuntimeError as err:
            raise ModelError(f"OpenVINO cannot compile it for inputs of {list(shape)}: "
                             f"{err}", where=self._where) from None

    def _self_check(self, shape: tuple[int, ...], bf16) -> None:
        """Refuse the graph if its bf16 result on seeded noise of ``shape`` is not within
        :data:`BF16_TOLERANCE` of fp32's."""
        mix = 0.3 * np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
        fp32 = self._compile(shape, "f32")
        expected = fp32.create_infer_request().infer([mix])[fp32.output(0)]
        got = bf16.create_infer_request().infer([mix])[bf16.output(0)]
        error = float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-12))
        if not error <= BF16_TOLERANCE:
            raise ModelError(
                f"OpenVINO's bf16 result on this CPU is {error:.0%} off its fp32 result for "
                f"this graph (bf16 rounding gives about 0.3%): oneDNN's bf16 convolution is "
                "wrong for some layer shapes on AMX CPUs (Conv1d with 16 or 24 input "
                "channels, kernel 8, stride 4); use the fp32 or int8 graph",
                where=self._where)
        self.checked_error = error

    def _request(self, shape: tuple[int, ...]):
        """The inference request of the model compiled for inputs of ``shape`` (batch
        left out), compiled on first use."""
        request = self._requests.pop(shape, None)
        if request is None:
            compiled = self._compile(shape, "bf16")
            if self.checked_error is None:
                self._self_check(shape, compiled)
            request = compiled.create_infer_request()
            if len(self._requests) >= SHAPES_KEPT:
                self._requests.pop(next(iter(self._requests)))
        self._requests[shape] = request  # the latest used last
        return request

    def run(self, output_names: list[str] | None,
            feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs for ``feeds`` (None: every output, as ONNX Runtime; one input;
        copies: the request reuses its buffers)."""
        (value,) = feeds.values()
        request = self._request(tuple(value.shape[1:]))
        try:
            results = request.infer(feeds)
        except RuntimeError as err:
            raise ModelError(f"OpenVINO failed on inputs of shape {list(value.shape)}: {err}",
                             where=self._where) from None
        outputs = {output.get_any_name(): output for output in request.model_outputs}
        return [np.array(results[outputs[name]], copy=True)
                for name in (output_names or list(outputs))]
