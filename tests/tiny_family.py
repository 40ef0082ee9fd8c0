"""A model family of a test's own: TinyNet, a two-layer convolutional network with its own
checkpoint format, registered the way a user registers one (test_families.py).

Importing it registers the family; every process that meets a TinyNet model finds this
module through ``$STEMSERVE_FAMILY_MODULES`` (the test sets it to this file's path), a
Triton server's python model included. Nothing outside this module names the family.
"""
from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from stemserve.models.arguments import Rule, integers
from stemserve.models.registry import FamilyRegistration, register
from stemserve.releases import SEGMENTS, is_segment
from stemserve.spec import Family, register_length_rule

NAME = "tinynet"
FORMAT = "tinynet-checkpoint-1"
"""The checkpoint format: ``{"format": FORMAT, "hyper": arguments, "weights": state}``."""


class TinyNet(nn.Module):
    """mix [batch, audio_channels, time] -> stems [batch, len(sources), audio_channels, time]:
    a convolution of ``kernel`` samples into ``hidden`` channels, a GELU, and a 1x1
    convolution per stem; any length in, the same length out."""

    def __init__(self, sources: list[str], audio_channels: int = 2, samplerate: int = 44100,
                 segment: Fraction | float = Fraction(2), hidden: int = 8, kernel: int = 5):
        super().__init__()
        self.sources, self.audio_channels = list(sources), audio_channels
        self.samplerate, self.segment = samplerate, segment
        self.encode = nn.Conv1d(audio_channels, hidden, kernel, padding=kernel // 2)
        self.decode = nn.Conv1d(hidden, len(self.sources) * audio_channels, 1)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        batch, channels, time = mix.shape
        stems = self.decode(nn.functional.gelu(self.encode(mix)))
        return stems.view(batch, len(self.sources), channels, time)


def read(loaded: Any, what: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """The arguments and state of a TinyNet checkpoint; None for any other file."""
    if isinstance(loaded, Mapping) and loaded.get("format") == FORMAT:
        return loaded["hyper"], loaded["weights"]
    return None


def save(model: TinyNet, path) -> None:
    """Write ``model`` in TinyNet's own checkpoint format."""
    hyper = dict(sources=model.sources, audio_channels=model.audio_channels,
                 samplerate=model.samplerate, segment=float(model.segment),
                 hidden=model.encode.out_channels, kernel=model.encode.kernel_size[0])
    torch.save({"format": FORMAT, "hyper": hyper, "weights": model.state_dict()}, path)


LENGTHS = Family("TinyNet", "any", output_as_input=True, shifts_around_split=True)
REGISTRATION = FamilyRegistration(
    name=NAME, model_class=TinyNet, label="TinyNet", pickled=(),
    rules={"audio_channels": integers(1, 2, "2"), "samplerate": integers(8000, 96000, "44100"),
           "segment": Rule(is_segment, SEGMENTS, "2"),
           "hidden": integers(1, 64, "8"), "kernel": integers(1, 15, "5")},
    segment=lambda model: int(Fraction(model.segment) * model.samplerate), read=read)


def register_all() -> None:
    """Register the family (again, after a test removed it)."""
    register_length_rule(NAME, LENGTHS)
    register(REGISTRATION)


register_all()
