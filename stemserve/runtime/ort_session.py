"""ONNX Runtime sessions on the CPU, set up once for both places that run the graph.

The in-process backend (:class:`~stemserve.client.backends.onnx.OnnxBackend`) and the CPU
Triton server's python model (``model_repository/cpu/demucs/1/model.py``) create their
sessions here, so the two paths run the same settings: intra-op threads on every core (or
``threads``), one inter-op thread, sequential execution (the graph is one chain: more
inter-op threads only oversubscribe the cores), and ONNX Runtime's default memory arena
without its memory patterns.

The arena stays as it is: without one every run pays the page faults of fresh buffers, and
what bounds the server's memory is the batch size (``max_batch_size`` in the CPU config);
docs/decisions/0006-onnx-runtime-arena.md has the measurement. The memory patterns (one
block planned per input shape) are off: they hold more memory for every family and are no
faster (docs/decisions/0009-no-memory-patterns.md).

The bf16 variant of an export runs the same fp32 graph on OpenVINO instead
(:mod:`.openvino_session`): :func:`cpu_session` picks the runtime by the sidecar's precision.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stemserve.errors import ModelError
from stemserve.precision import row


def cpu_session_options(threads: int = 0) -> Any:
    """``SessionOptions`` for a CPU session: ``threads`` intra-op threads (0: one per core
    this process may run on), one inter-op thread, sequential, no memory patterns."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = False
    return options


def cpu_session(model_file: Path, threads: int = 0, precision: str = "fp32",
                check_shape: tuple[int, ...] | None = None) -> Any:
    """A CPU session of ``model_file`` for an export's ``precision`` variant, on the runtime
    its row names (:data:`~stemserve.precision.PRECISIONS`): ONNX Runtime's
    ``InferenceSession`` with :func:`cpu_session_options`, or OpenVINO's
    :class:`~.openvino_session.Bf16Session` (same ``run``), self-checked against fp32 at
    ``check_shape`` (the hot path's input shape, batch left out) before it returns."""
    runtime = row(precision).runtime
    if runtime == "OpenVINO":
        from stemserve.runtime.openvino_session import Bf16Session

        return Bf16Session(model_file, threads, check_shape)
    if runtime != "ONNX Runtime":
        raise ModelError(f"no CPU session for the {precision} graph's runtime, {runtime}")
    import onnxruntime as ort

    return ort.InferenceSession(str(model_file), cpu_session_options(threads),
                                providers=["CPUExecutionProvider"])
