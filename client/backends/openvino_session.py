"""The bf16 CPU fast path: OpenVINO runs the fp32 graph with bf16 arithmetic.

ONNX Runtime has no bf16 CPU kernels, but Intel CPUs with AMX or AVX512_BF16 multiply bf16
several times faster than fp32. OpenVINO reads the exported ONNX graph as it is and, asked
for ``INFERENCE_PRECISION_HINT=bf16``, runs its matrix products and convolutions in bf16
(accumulating in fp32) and keeps the precision-sensitive operators in fp32. Measured on the
released htdemucs configuration, one 7.8 s segment, 2-core Xeon with AMX
(benchmarks/releases.py): 0.98 s against 2.25 s for ONNX Runtime fp32 and 2.45 s for
PyTorch eager. The stems change by what bf16 rounding does (about 3e-3 relative); the
quality meter (benchmarks/quality.py) reports it as an SDR difference.

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
SHAPES_KEPT = 4
"""Compiled input shapes kept per session: the hot path's, and a few last segments'."""


class Bf16Session:
    """``model_file`` compiled by OpenVINO for the CPU with bf16 arithmetic and ``threads``
    threads (0: one per core this process may run on).

    One compiled model per input shape but the batch: OpenVINO 2026.4's CPU plugin computes
    transposed convolutions wrongly in bf16 when the time axis is dynamic (Demucs v2's
    output came back 2,048 samples short, and shorter inputs failed), and right once the
    time axis is fixed. The hot path has one shape (HT Demucs only ever one); a track's
    short last segment compiles its own, and the :data:`SHAPES_KEPT` latest are kept.

    Refuses a CPU without bf16 instructions (OpenVINO would silently fall back to fp32, and
    the stems would be labelled bf16 while being fp32's). Not thread-safe: one caller at a
    time, as the python backend and the in-process worker are.
    """

    def __init__(self, model_file: Path, threads: int = 0):
        try:
            import openvino as ov
        except ImportError:
            raise ModelError(f"the bf16 path runs on OpenVINO: {INSTALL_HINT}") from None
        self._ov = ov
        self._core = ov.Core()
        if "BF16" not in self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
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

    def _request(self, shape: tuple[int, ...]):
        """The inference request of the model compiled for inputs of ``shape`` (batch
        left out), compiled on first use."""
        request = self._requests.pop(shape, None)
        if request is None:
            model = self._model.clone()
            model.reshape(self._ov.PartialShape([-1, *shape]))
            try:
                compiled = self._core.compile_model(model, "CPU", {
                    "INFERENCE_PRECISION_HINT": "bf16",
                    "INFERENCE_NUM_THREADS": self.threads,
                    # One request at a time, every thread on it: the server's instance and
                    # the in-process worker both run one batch after the other.
                    "PERFORMANCE_HINT": "LATENCY",
                })
            except RuntimeError as err:
                raise ModelError(f"OpenVINO cannot compile it for inputs of {list(shape)}: "
                                 f"{err}", where=self._where) from None
            request = compiled.create_infer_request()
            if len(self._requests) >= SHAPES_KEPT:
                self._requests.pop(next(iter(self._requests)))
        self._requests[shape] = request  # the latest used last
        return request

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs for ``feeds`` (one input; copies: the request reuses its
        buffers)."""
        (value,) = feeds.values()
        request = self._request(tuple(value.shape[1:]))
        try:
            results = request.infer(feeds)
        except RuntimeError as err:
            raise ModelError(f"OpenVINO failed on inputs of shape {list(value.shape)}: {err}",
                             where=self._where) from None
        outputs = {output.get_any_name(): output for output in request.model_outputs}
        return [np.array(results[outputs[name]], copy=True) for name in output_names]
