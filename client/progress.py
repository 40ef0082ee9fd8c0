"""Progress in audio seconds: a tqdm bar on a terminal, or a callback for a program.

Answers come a segment at a time, and a segment is up to 40 s of audio: a short track is
one request, and a long one waits seconds between answers. So between answers the progress
moves with time, at the pace the answers so far have set (:data:`PRIOR_PACE` before the
first), up to :data:`ESTIMATE_CAP` of what is left; it never moves back, and the answers
themselves keep it honest. Smaller requests would move it too, but they change the stems
(demucs splits by whole segments) and cost context and batching.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Union

import tqdm

ProgressCallback = Callable[[str, float, float], None]
"""Receives ``(stage, done, total)`` in audio seconds: stage ``"separating"`` as the
separation advances (each answer, and with time between answers), then ``"encoding"`` while
the stems are written."""
Progress = Union[bool, ProgressCallback]
"""True: a tqdm bar in audio seconds (shown on a terminal only); a callable: see
:data:`ProgressCallback`."""

TICK_SECONDS = 0.5
"""How often progress moves between answers."""
PRIOR_PACE = 1.0
"""Seconds per audio second assumed before the first answer: real time, slower than any
measured path (a 2-core CPU runs the full models at 0.2 to 0.5), so the estimate lags and
the first answer catches it up rather than holds it back."""
ESTIMATE_CAP = 0.9
"""The share of what is not yet answered that an estimate may show."""


def progress_bar(seconds: float, label: str) -> tqdm.tqdm:
    """A tqdm bar in audio seconds, shown on a terminal only (one track, or a whole job)."""
    return tqdm.tqdm(total=seconds, desc=label, unit="s", disable=None,
                     bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]")


class TrackProgress:
    """Turns the pipeline's answered samples and the writer's encoded fraction into what
    ``progress`` asks for: a bar (the encoding stage as its postfix) or a callback, moved
    with time between answers by a ticker thread."""

    def __init__(self, progress: Progress, seconds: float, sample_rate: int, label: str):
        self._callback = progress if callable(progress) else None
        self._bar = progress_bar(seconds, label) if progress is True else None
        self.seconds = seconds
        self._rate = sample_rate
        self._answered = 0.0
        self._shown = 0.0
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None
        if self._bar is not None or self._callback is not None:
            self._ticker = threading.Thread(target=self._tick, name="stemserve-progress",
                                            daemon=True)
            self._ticker.start()

    def separated(self, samples: float) -> None:
        # Counted at the model's rate, against the input's length: never past the end.
        with self._lock:
            self._answered = min(self._answered + samples / self._rate, self.seconds)
            self._last = time.monotonic()
            self._show(self._answered)

    def estimate(self, now: float | None = None) -> float:
        """Audio seconds probably done by ``now``: the answers, and the time since the last
        at their pace."""
        now = time.monotonic() if now is None else now
        answered = self._answered
        pace = (self._last - self._start) / answered if answered else PRIOR_PACE
        ahead = (now - self._last) / max(pace, 1e-6)
        return answered + min(ahead, ESTIMATE_CAP * (self.seconds - answered))

    def encoded(self, fraction: float) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.set_postfix_str(f"encoding {fraction:.0%}")
        elif self._callback is not None:
            self._callback("encoding", fraction * self.seconds, self.seconds)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            with self._lock:
                if not self._stop.is_set():
                    self._show(self.estimate())

    def _show(self, done: float) -> None:
        """Move to ``done``, never back (an estimate may run ahead of the next answer)."""
        done = min(max(done, self._shown), self.seconds)
        step, self._shown = done - self._shown, done
        if self._bar is not None:
            if step:
                self._bar.update(step)
        elif self._callback is not None:
            self._callback("separating", done, self.seconds)
