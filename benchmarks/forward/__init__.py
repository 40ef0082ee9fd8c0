"""The network alone: one segment's forward pass, and what it holds.

- ``forward.backends``: each family's network per runtime, precision and batch size: time,
  CPU time, GFLOP/s against the matmul ceiling, peak memory, cost against the first family.
- ``forward.arena``: ONNX Runtime's CPU memory arena over the batch shapes of a track.
"""

SCENARIOS: tuple[str, ...] = ("forward.backends", "forward.arena")
