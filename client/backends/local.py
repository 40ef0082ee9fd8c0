"""A batching worker for in-process backends: what a Triton server's batcher does, in a thread.

The ONNX Runtime and PyTorch backends share it: whatever is queued when the worker comes
round is batched (up to ``max_batch``), which is where a CPU gains most per segment.
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Callable

import numpy as np

from stemserve.errors import StemserveError
from stemserve.spec import ModelSpec


class LocalBackend:
    """:class:`~stemserve.pipeline.Backend` that runs ``run_batch`` in one worker thread on
    batches of queued segments of equal shape."""

    def __init__(self, spec: ModelSpec, run_batch: Callable[[np.ndarray], np.ndarray],
                 max_batch: int = 2, name: str = "stemserve-local"):
        self.spec = spec
        self._run_batch = run_batch
        self._max_batch = max(1, max_batch)
        self._queue: collections.deque[tuple[np.ndarray, Future]] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, mix: np.ndarray) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise StemserveError("the backend is closed")
            self._queue.append((mix, future))
            self._ready.notify()
        return future

    def _next_batch(self) -> list[tuple[np.ndarray, Future]] | None:
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            rest: collections.deque[tuple[np.ndarray, Future]] = collections.deque()
            for item in self._queue:
                if len(batch) < self._max_batch and item[0].shape == batch[0][0].shape:
                    batch.append(item)
                else:
                    rest.append(item)
            self._queue = rest
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [(mix, future) for mix, future in batch
                     if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                outputs = self._run_batch(np.stack([mix for mix, _ in batch]))
            except Exception as err:  # handed to the waiting pipeline, which re-raises
                for _, future in batch:
                    future.set_exception(err)
            else:
                for (_, future), output in zip(batch, outputs):
                    future.set_result(output)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            leftover = list(self._queue)
            self._queue.clear()
            self._ready.notify_all()
        for _, future in leftover:
            future.cancel()
        self._thread.join()

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
