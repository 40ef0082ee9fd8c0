"""Triton python-backend model: Demucs on ONNX Runtime (or, for the bf16 variant, OpenVINO),
for CPU-only servers.

With dynamic batching Triton hands ``execute`` a list of requests and leaves batching to
the model: requests whose segments have the same shape are stacked into one ONNX Runtime
run, and the output is split back per request. A bad request gets its own error response;
the others in the same call are still served.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from stemserve.runtime.openvino_session import Bf16Session
from stemserve.runtime.ort_session import cpu_session
from stemserve.spec import SIDECAR_FILE, ModelSpec


class _TritonLog(logging.Handler):
    """stemserve's log lines (the bf16 check, its compiles) into Triton's log, which
    `stemserve serve` shows a user."""

    def emit(self, record: logging.LogRecord) -> None:
        log = (pb_utils.Logger.log_error if record.levelno >= logging.ERROR else
               pb_utils.Logger.log_warn if record.levelno >= logging.WARNING else
               pb_utils.Logger.log_info)
        log(f"demucs: {self.format(record)}")


_logger = logging.getLogger("stemserve")
_logger.handlers[:] = [_TritonLog()]
_logger.setLevel(logging.INFO)
_logger.propagate = False


class TritonPythonModel:
    """One session per model instance, created from the version folder: ONNX Runtime, or
    OpenVINO for a bf16 sidecar (``ort_session.cpu_session`` picks)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.spec = ModelSpec.load(version_dir / SIDECAR_FILE)
        # The shape contract: a track's last segment may be one sample long; a shifted full
        # segment is the longest request, and anything longer only costs memory.
        self.min_length = self.spec.min_request_length
        self.max_length = self.spec.max_request_length

        threads = int(config.get("parameters", {}).get("intra_op_threads", {})
                      .get("string_value", "0"))
        # The in-process backend's session: intra-op threads on every core (or "threads"),
        # sequential, ONNX Runtime's default arena (ort_session's docstring).
        # bf16: OpenVINO, checked against fp32 at the hot path's shape before READY.
        graph = version_dir / self.spec.onnx_file
        pb_utils.Logger.log_info(f"demucs: loading {self.spec.checkpoint} "
                                 f"({graph.stat().st_size / 1e6:.0f} MB graph, "
                                 f"{self.spec.precision}); a warm-up request follows")
        self.session = cpu_session(graph, threads,
                                   self.spec.precision,
                                   (self.spec.audio_channels, self.spec.padded_length))
        pb_utils.Logger.log_info(f"demucs: {self.spec.checkpoint} ({self.spec.precision}) on "
                                 f"{_runtime(self.session)}")

    def _problem(self, mix: np.ndarray) -> str | None:
        """Why ``mix`` cannot be run, or None.

        Triton already checks dtype and dims against config.pbtxt; this also covers a
        config edited by hand and a segment shorter than the network accepts.
        """
        channels = self.spec.audio_channels
        if mix.dtype != np.float32 or mix.ndim != 3 or mix.shape[1] != channels:
            return (f"'{self.spec.input_name}' must be float32 [batch, {channels}, time], "
                    f"got {mix.dtype} {list(mix.shape)}")
        if not self.min_length <= mix.shape[2] <= self.max_length:
            return (f"'{self.spec.input_name}' has {mix.shape[2]} samples; the model takes "
                    f"{self.min_length} to {self.max_length} (send spec.valid_length(n))")
        return None

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            mix = pb_utils.get_input_tensor_by_name(request, self.spec.input_name).as_numpy()
            problem = self._problem(mix)
            if problem:
                responses[index] = _error(problem, pb_utils.TritonError.INVALID_ARG)
            else:
                groups.setdefault(mix.shape[1:], []).append((index, mix))

        for members in groups.values():
            batch = np.concatenate([mix for _, mix in members])
            try:
                stems = self.session.run([self.spec.output_name],
                                         {self.spec.input_name: batch})[0]
            except Exception as err:  # ONNX Runtime raises several unrelated types
                for index, _ in members:
                    responses[index] = _error(
                        f"{_runtime(self.session)} failed on a batch of shape "
                        f"{list(batch.shape)}: {err}",
                        pb_utils.TritonError.INTERNAL)
                continue
            offset = 0
            for index, mix in members:
                part = stems[offset:offset + len(mix)]
                offset += len(mix)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(self.spec.output_name, part)])
        return responses

    def finalize(self) -> None:
        self.session = None


def _runtime(session) -> str:
    """The runtime behind ``session``, its version and threads, for the log and errors."""
    if isinstance(session, Bf16Session):
        return (f"OpenVINO {session.version} (bf16, {session.checked_error:.1e} off fp32 "
                f"on noise), {session.threads} threads")
    import onnxruntime as ort

    threads = session.get_session_options().intra_op_num_threads
    return f"ONNX Runtime {ort.__version__}, {threads} intra-op threads"


def _error(message: str, code: int) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
