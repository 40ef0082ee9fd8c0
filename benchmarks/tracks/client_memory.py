"""The client's peak memory over tracks up to an hour, per window, on the Triton path: the
client streams, so it should not grow with the track; a bigger model only slows the server."""
from __future__ import annotations

import dataclasses

from stemserve.defaults import DEFAULT_IN_FLIGHT

from ..scenario import option
from . import reference


@dataclasses.dataclass(frozen=True)
class Config(reference.Config):
    families: tuple[str, ...] = option(("v2",), "model families")
    size: str = option("small", "model size")
    tracks: tuple[float, ...] = option((60.0, 600.0, 3600.0), "track seconds", quick=(5.0, 15.0))
    paths: tuple[str, ...] = option(("triton",), "paths")
    windows: tuple[int, ...] = option((DEFAULT_IN_FLIGHT, 2), "segment requests in flight",
                                      quick=(DEFAULT_IN_FLIGHT,))
    repeats: int = option(1, "runs of each track")


SCENARIO = dataclasses.replace(
    reference.SCENARIO, name="tracks.client_memory", config=Config, plots=(),
    title="Whole tracks: the client's peak memory vs track length (Triton path)")
