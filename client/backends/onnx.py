"""In-process ONNX Runtime: the CPU fallback when no Triton server is wanted.

Same graph, same pipeline as the served path; only the transport differs. Segments queued
while ONNX Runtime is busy are run as one batch, which costs less per segment than one at a
time for the recurrent families (docs/decisions/0008-segment-pipelining.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stemserve.client.backends.local import LocalBackend
from stemserve.errors import ModelError
from stemserve.runtime.ort_session import cpu_session
from stemserve.spec import load_export_spec

DEFAULT_MAX_BATCH = 2


class OnnxBackend(LocalBackend):
    """:class:`~stemserve.pipeline.Backend` running an export folder's graph in-process.

    ``export_dir`` holds ``model.json`` and the graph it names (what ``stemserve export``
    writes); ``precision`` ``int8`` (or ``fp16``) takes that variant's sidecar and graph
    instead, and ``bf16`` runs the fp32 graph on OpenVINO
    (:mod:`stemserve.runtime.openvino_session`, self-checked against fp32 here, before the
    first segment). ``threads`` sets the runtime's intra-op threads (0: one per core).
    Without ``providers``, the session is the CPU server's
    (:mod:`stemserve.runtime.ort_session`).
    """

    def __init__(self, export_dir: Path, *, precision: str = "fp32",
                 max_batch: int = DEFAULT_MAX_BATCH, threads: int = 0,
                 providers: list[str] | None = None):
        export_dir = Path(export_dir)
        spec = load_export_spec(export_dir, precision)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("the onnx backend needs ONNX Runtime: "
                             "pip install 'stemserve[onnx]'") from None
        model_file = export_dir / spec.onnx_file
        try:
            if providers is None:
                session = cpu_session(model_file, threads, spec.precision,
                                      (spec.audio_channels, spec.padded_length))
            else:
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(str(model_file), options, providers=providers)
        except ModelError:
            raise
        except Exception as err:  # ORT raises its own untyped errors for bad files
            raise ModelError(f"cannot load it: {err}", where=str(model_file)) from None
        self.session = session

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run([spec.output_name], {spec.input_name: batch})[0]

        super().__init__(spec, run, max_batch=max_batch, name="stemserve-onnx")
        self.where = ("in-process OpenVINO (bf16 arithmetic)" if spec.precision == "bf16"
                      else "in-process ONNX Runtime")
