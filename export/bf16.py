"""The bf16 CPU fast path's export: a sidecar, no second graph.

OpenVINO runs the fp32 graph itself with bf16 arithmetic
(:mod:`stemserve.runtime.openvino_session`), so an export's bf16 variant is only
``model.bf16.json`` (``precision: bf16``) naming the fp32 ``model.onnx``, one per model of a
bag: the repository writer, the server and the in-process backend pick their variant by
sidecar, and the precision a server reports is the one it runs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from stemserve.spec import ModelSpec, load_export, sidecar_name


def bf16_export(export_dir: Path) -> list[ModelSpec]:
    """Write the bf16 sidecar beside every model's fp32 one (a bag's members too)."""
    specs = []
    for folder, spec in load_export(export_dir).members:
        bf16 = dataclasses.replace(spec, precision="bf16")
        bf16.save(folder / sidecar_name("bf16"))
        specs.append(bf16)
    return specs
