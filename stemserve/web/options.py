"""What a job may ask for: a model by name, two-stems mode, shifts and an output format.

The choices are few and named, so that a form can offer them and nothing else: formats by
name (``wav24``, ``mp3``, ...), models from the list the service offers, never a path.
"""
from __future__ import annotations

import dataclasses

from stemserve.audio import OutputFormat
from stemserve.defaults import STEM_NAMES
from stemserve.errors import InputError

FORMATS: dict[str, OutputFormat] = {
    "wav": OutputFormat("wav", "int16"),
    "wav24": OutputFormat("wav", "int24"),
    "wav32f": OutputFormat("wav", "float32"),
    "flac": OutputFormat("flac", "int16"),
    "flac24": OutputFormat("flac", "int24"),
    "mp3": OutputFormat("mp3", "int16", 320),
}
DEFAULT_FORMAT = "wav"
"""The command line's default: 16-bit WAV."""
MAX_SHIFTS = 10
"""Each shift runs the whole track once more: more than demucs' paper used is no help."""


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """One job's choices, with the command line's defaults; ``model`` None is the service's
    default model. The HTTP form checks the same bounds first, to name the field at fault."""

    model: str | None = None
    two_stems: str | None = None
    shifts: int = 0
    format: str = DEFAULT_FORMAT

    def __post_init__(self) -> None:
        if self.two_stems is not None and self.two_stems not in STEM_NAMES:
            raise InputError(f"two_stems must be one of {', '.join(STEM_NAMES)}, "
                             f"not {self.two_stems!r}")
        if not 0 <= self.shifts <= MAX_SHIFTS:
            raise InputError(f"shifts must be from 0 to {MAX_SHIFTS}, not {self.shifts}")
        if self.format not in FORMATS:
            raise InputError(f"format must be one of {', '.join(FORMATS)}, "
                             f"not {self.format!r}")
