"""Progress in audio seconds: a tqdm bar on a terminal, or a callback for a program."""
from __future__ import annotations

from typing import Callable, Union

import tqdm

ProgressCallback = Callable[[str, float, float], None]
"""Receives ``(stage, done, total)`` in audio seconds: stage ``"separating"`` each time the
backend answers a request, then ``"encoding"`` while the stems are written."""
Progress = Union[bool, ProgressCallback]
"""True: a tqdm bar in audio seconds (shown on a terminal only); a callable: see
:data:`ProgressCallback`."""


def progress_bar(seconds: float, label: str) -> tqdm.tqdm:
    """A tqdm bar in audio seconds, shown on a terminal only (one track, or a whole job)."""
    return tqdm.tqdm(total=seconds, desc=label, unit="s", disable=None,
                     bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]")


class TrackProgress:
    """Turns the pipeline's answered samples and the writer's encoded fraction into what
    ``progress`` asks for: a bar (the encoding stage as its postfix) or a callback."""

    def __init__(self, progress: Progress, seconds: float, sample_rate: int, label: str):
        self._callback = progress if callable(progress) else None
        self._bar = progress_bar(seconds, label) if progress is True else None
        self.seconds = seconds
        self._rate = sample_rate
        self._done = 0.0

    def separated(self, samples: float) -> None:
        # Counted at the model's rate, against the input's length: never past the end.
        done = min(self._done + samples / self._rate, self.seconds)
        step, self._done = done - self._done, done
        if self._bar is not None:
            self._bar.update(step)
        elif self._callback is not None:
            self._callback("separating", self._done, self.seconds)

    def encoded(self, fraction: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"encoding {fraction:.0%}")
        elif self._callback is not None:
            self._callback("encoding", fraction * self.seconds, self.seconds)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
