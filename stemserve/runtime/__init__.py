"""The CPU runtimes that run an exported graph: ONNX Runtime and OpenVINO sessions.

Two places run the graph on the CPU: the in-process backend
(:class:`~stemserve.client.backends.onnx.OnnxBackend`) and the CPU Triton server's python
model (``model_repository/cpu/demucs/1/model.py``). Both take their sessions from here, so
they run the same settings, and neither imports the other: the server's model needs nothing
of the client. :func:`.ort_session.cpu_session` picks the runtime by the export's precision
(:mod:`.ort_session` for ONNX Runtime, :mod:`.openvino_session` for the bf16 fast path).
Like the client, this package needs no torch; ``onnxruntime`` and ``openvino`` (optional
extras) are imported only when a session is made.
"""
