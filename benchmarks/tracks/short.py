"""A track of two segments (a full one and a 75% tail cannot share a batch): in turn on one
session on every core (``onnx``), or at once on two one-thread sessions (``onnx_pair``)."""
from __future__ import annotations

import dataclasses

from ..scenario import option
from . import reference


@dataclasses.dataclass(frozen=True)
class Config(reference.Config):
    families: tuple[str, ...] = option(("v2",), "model families")
    tracks: tuple[float, ...] = option((60.0,), "track seconds (60: two of v2's segments)")
    paths: tuple[str, ...] = option(
        ("onnx", "onnx_pair", "onnx_int8", "onnx_pair_int8", "onnx_bf16", "onnx_pair_bf16"),
        "paths", quick=("onnx", "onnx_pair", "onnx_int8", "onnx_pair_int8"))
    baseline: str = option("onnx", "the path the others are compared with")
    repeats: int = option(3, "runs of each track", quick=1)


SCENARIO = dataclasses.replace(
    reference.SCENARIO, name="tracks.short", config=Config, plots=(),
    title="A two-segment track: its segments in turn on every core, or at once on one each")
