"""ONNX Runtime sessions on the CPU, set up once for both places that run the graph.

The in-process backend (:class:`~stemserve.client.backends.onnx.OnnxBackend`) and the CPU
Triton server's python model (``model_repository/cpu/demucs/1/model.py``) create their
sessions here, so the two paths run the same settings: intra-op threads on every core (or
``threads``), one inter-op thread, sequential execution (the graph is one chain: more
inter-op threads only oversubscribe the cores), and ONNX Runtime's default memory arena.

The arena stays as it is. Measured (benchmarks/cpu_levers.py: full v2 model, 8 s segments,
a track's sequence of batch shapes, 2-core Xeon): an arena growing by what is requested
instead of by powers of two held more (2,079 vs 1,865 MiB), and no arena held 9 % less
(1,691 MiB) but ran 6 % slower, every run paying the page faults of fresh buffers. What
bounds the server's memory is the batch size (``max_batch_size`` in the CPU config).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cpu_session_options(threads: int = 0) -> Any:
    """``SessionOptions`` for a CPU session: ``threads`` intra-op threads (0: one per core
    this process may run on), one inter-op thread, sequential."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def cpu_session(model_file: Path, threads: int = 0) -> Any:
    """An ``InferenceSession`` of ``model_file`` on the CPU with :func:`cpu_session_options`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model_file), cpu_session_options(threads),
                                providers=["CPUExecutionProvider"])
