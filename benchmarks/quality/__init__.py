"""Separation quality: what the fast paths (bf16, fp16, int8) cost in SDR, measured on
models trained on synthetic stems (``meter``)."""

SCENARIOS: tuple[str, ...] = ("quality.meter",)
