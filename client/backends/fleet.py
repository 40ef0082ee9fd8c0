"""Many Triton servers behind one backend: spread the segments, survive a server going away.

:class:`FleetBackend` keeps one :class:`~stemserve.client.backends.triton.TritonBackend` per server
(gRPC, shared memory and the spec check are its business) and adds what several servers
need:

- dispatch: every segment goes to the healthy server with the fewest requests outstanding,
  each server with its own bounded in-flight window, so a slow server gets less work instead
  of its round-robin share;
- failover: its servers' backends fail fast (no retries of their own); a request that fails
  transiently (server down, restarting, too slow) takes its server out, and it and every
  other request that server drops are re-sent to the others (counted in :attr:`retried`);
- recovery: a server taken out is probed in the background with backoff and taken back once
  it is ready and serves the same model;
- a clear end: only when no server has been healthy for the retries budget do the waiting
  segments fail, with an error naming every URL, so the track fails whole (its stems are
  written atomically) rather than with holes.

Endpoints come as ``host:port,host:port``, as ``@file`` (one or more per line, ``#``
comments), or, in the command line and the web service, from ``$STEMSERVE_TRITON_URL``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stemserve.client.backends.triton import TritonBackend, unreachable_message
from stemserve.defaults import BACKOFF, DEFAULT_IN_FLIGHT, REQUEST_TIMEOUT, RETRIES, TRITON_MODEL
from stemserve.errors import ServerUnreachable, StemserveError, TransientError
from stemserve.files import read_list
from stemserve.spec import ModelSpec

logger = logging.getLogger(__name__)

PROBE_INTERVAL_MAX = 2.0
"""Longest pause between probes of a server that is out: a restarted one is back soon after."""
CLOSE_DRAIN = 10.0
"""Seconds :meth:`FleetBackend.close` waits for answers still on their way (a track that
failed may leave some): a backend's shared memory must outlive the answers written to it."""
_ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")


# ---------------------------------------------------------------------------------------------
# Endpoints

def parse_endpoints(text: str) -> list[str]:
    """``host:port`` gRPC endpoints from ``a:8001,b:8001`` and/or ``@file`` items.

    Order is kept and duplicates are dropped (a server listed twice would get twice its share
    of the in-flight windows). Anything that is not ``host:port`` is a clear error.
    """
    items: list[str] = []
    for item in re.split(r"[,\s]+", text.strip()):
        if item.startswith("@"):
            items += [entry for line in read_list(Path(item[1:]))
                      for entry in re.split(r"[,\s]+", line.split("#", 1)[0]) if entry]
        elif item:
            items.append(item)
    for item in items:
        match = _ENDPOINT.fullmatch(item)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise StemserveError(f"Triton endpoint {item!r} (in {text!r}) is not host:port")
    if not items:
        raise StemserveError(f"no Triton endpoint in {text!r}: give host:port[,host:port...] "
                             "or @FILE")
    return list(dict.fromkeys(items))


def check_agreement(specs: dict[str, ModelSpec]) -> ModelSpec:
    """The one spec every endpoint serves; otherwise a clear error saying who serves what.

    Servers of different models (or exports with other segment lengths) would give a track
    whose stems depend on which server ran which segment.
    """
    groups: list[tuple[ModelSpec, list[str]]] = []
    for url, spec in specs.items():
        for known, urls in groups:
            if known == spec:
                urls.append(url)
                break
        else:
            groups.append((spec, [url]))
    if len(groups) > 1:
        raise StemserveError(
            "the Triton servers do not serve the same model: " + "; ".join(
                f"{', '.join(urls)} serve{'s' if len(urls) == 1 else ''} {spec.checkpoint} "
                f"({spec.checkpoint_sha256[:12]}, {spec.segment_length}-sample segments, "
                f"{spec.precision})" for spec, urls in groups)
            + ": list only servers of one export")
    return groups[0][0]


# ---------------------------------------------------------------------------------------------
# The fleet

@dataclasses.dataclass(frozen=True)
class EndpointStatus:
    """One server as the fleet sees it."""

    url: str
    healthy: bool
    in_flight: int
    answered: int
    taken_out: int
    """How many times it failed and was taken out."""
    last_error: str | None


@dataclasses.dataclass(eq=False)
class _Endpoint:
    """One server: its backend while it is in, and what the dispatcher knows of it."""

    url: str
    backend: TritonBackend | None = None
    healthy: bool = False
    in_flight: int = 0
    answered: int = 0
    taken_out: int = 0
    last_used: int = 0
    last_error: str | None = None


@dataclasses.dataclass(eq=False)
class _Request:
    """A segment and the future the pipeline waits on, across however many sends it takes."""

    mix: np.ndarray
    future: Future
    sends: int = 0


class FleetBackend:
    """:class:`~stemserve.pipeline.Backend` over several Triton servers of one model.

    Args:
        urls: gRPC ``host:port`` of each server (see :func:`parse_endpoints`).
        model: the model's name in the repositories.
        server_window: requests in flight per server (and its shared-memory regions).
        timeout: seconds one request may take; a server that takes longer is taken out.
        retries: a segment is sent at most once per server plus ``retries`` times (each
            server going down fails what it holds once); with ``backoff``, also how long to
            wait for a server when none is healthy: ``backoff * (2**retries - 1)`` seconds,
            what one TritonBackend's retries take.
        backoff: first pause between probes of a server that is out (doubling up to
            :data:`PROBE_INTERVAL_MAX`).
        shared_memory: as for :class:`~stemserve.client.backends.triton.TritonBackend`, per server.
        spec: the local export's sidecar, checked against what each server serves.

    Servers that do not answer at start are probed like failed ones; if none answers, it
    raises :class:`~stemserve.client.backends.triton.ServerUnreachable` naming them all.
    """

    def __init__(self, urls: Sequence[str], model: str = TRITON_MODEL, *,
                 server_window: int = DEFAULT_IN_FLIGHT, timeout: float = REQUEST_TIMEOUT,
                 retries: int = RETRIES, backoff: float = BACKOFF,
                 shared_memory: bool | None = None, spec: ModelSpec | None = None):
        if not urls:
            raise StemserveError("a fleet needs at least one Triton endpoint")
        if server_window < 1:
            raise StemserveError(f"server_window must be >= 1, got {server_window}")
        self.urls = list(urls)
        self.where = f"{len(self.urls)} Triton servers ({', '.join(self.urls)})"
        self.server_window = server_window
        self.backoff = backoff
        self.grace = backoff * (2 ** retries - 1)
        self._max_sends = len(self.urls) + retries
        self.retried = 0
        """Segments re-sent to another server after a transient failure."""
        self._connect = functools.partial(TritonBackend, model=model, timeout=timeout,
                                          retries=0, shared_memory=shared_memory,
                                          shm_slots=server_window)
        self._endpoints = [_Endpoint(url) for url in self.urls]
        self._queue: collections.deque[_Request] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._down_since: float | None = None
        self._sent = 0
        self.spec = self._open_all(spec)
        for endpoint in self._endpoints:
            if not endpoint.healthy:
                self._start_probe(endpoint)
        self._dispatcher = threading.Thread(target=self._dispatch, name="stemserve-fleet",
                                            daemon=True)
        self._dispatcher.start()

    def _open_all(self, local: ModelSpec | None) -> ModelSpec:
        """Connect to every server at once; the ones that answer must agree on the model."""
        with ThreadPoolExecutor(len(self.urls)) as pool:
            attempts = list(pool.map(
                lambda url: _capture(functools.partial(self._connect, url, spec=local)),
                self.urls))
        opened = {url: outcome for url, outcome in zip(self.urls, attempts, strict=True)
                  if isinstance(outcome, TritonBackend)}
        try:
            failure = next((outcome for outcome in attempts
                            if isinstance(outcome, BaseException)
                            and not isinstance(outcome, ServerUnreachable)), None)
            if failure is not None:
                raise failure
            if not opened:
                raise ServerUnreachable(unreachable_message(
                    f"any of {', '.join(self.urls)}", "none is ready"))
            spec = check_agreement({url: backend.spec for url, backend in opened.items()})
        except BaseException:
            for backend in opened.values():
                backend.close()
            raise
        for endpoint, outcome in zip(self._endpoints, attempts, strict=True):
            if isinstance(outcome, TritonBackend):
                endpoint.backend, endpoint.healthy = outcome, True
            else:
                endpoint.last_error = f"{endpoint.url} did not answer at start-up"
                logger.warning("%s does not answer yet: probing it in the background (%s)",
                               endpoint.url, outcome)
        return spec

    # -- the pipeline's side ------------------------------------------------------------------

    def submit(self, mix: np.ndarray) -> Future:
        request = _Request(mix, Future())
        with self._wakeup:
            if self._closed:
                raise StemserveError("the Triton fleet backend is closed")
            self._queue.append(request)
            self._wakeup.notify_all()
        return request.future

    def status(self) -> list[EndpointStatus]:
        """Each server's health and load, in the order the URLs were given."""
        with self._wakeup:
            return [EndpointStatus(e.url, e.healthy, e.in_flight, e.answered, e.taken_out,
                                   e.last_error) for e in self._endpoints]

    # -- dispatch -----------------------------------------------------------------------------

    def _pick(self) -> _Endpoint | None:
        """The healthy server with the fewest requests outstanding and room in its window;
        ties go to the one least recently used."""
        ready = [e for e in self._endpoints if e.healthy and e.in_flight < self.server_window]
        return min(ready, key=lambda e: (e.in_flight, e.last_used), default=None)

    def _next(self) -> tuple[_Endpoint | None, list[_Request]] | None:
        """Wait for work: (server, [request]) to send, (None, requests) to fail because no
        server came back in time, or None once closed. Call with the lock held."""
        while not self._closed:
            endpoint = self._pick() if self._queue else None
            if endpoint is not None:
                request = self._queue.popleft()
                if request.sends == 0 and not request.future.set_running_or_notify_cancel():
                    continue  # the pipeline gave up on it while it waited
                self._sent += 1
                endpoint.in_flight += 1
                endpoint.last_used = self._sent
                return endpoint, [request]
            wait = None
            if self._queue and self._down_since is not None:
                wait = self._down_since + self.grace - time.monotonic()
                if wait <= 0:
                    doomed = list(self._queue)
                    self._queue.clear()
                    return None, doomed
            self._wakeup.wait(wait)
        return None

    def _dispatch(self) -> None:
        """The dispatcher thread: gRPC callbacks only queue, so nothing blocks in them."""
        while True:
            with self._wakeup:
                work = self._next()
                error = self._all_down_error() if work and work[0] is None else None
            if work is None:
                return
            endpoint, requests = work
            if endpoint is None:
                for request in requests:
                    _fail(request, error)
                continue
            request = requests[0]
            request.sends += 1
            try:
                inner = endpoint.backend.submit(request.mix)
            except Exception as err:  # handed to the waiting pipeline like any failure
                inner = Future()
                inner.set_exception(err)
            inner.add_done_callback(functools.partial(self._done, endpoint, request))

    def _all_down_error(self) -> StemserveError:
        reasons = "; ".join(e.last_error for e in self._endpoints if e.last_error)
        return StemserveError(f"every Triton server is down ({', '.join(self.urls)}) and none "
                              f"came back within {self.grace:.1f} s; last errors: {reasons}")

    def _done(self, endpoint: _Endpoint, request: _Request, inner: Future) -> None:
        """Completion of one send (a gRPC callback): deliver, or take the server out and
        queue the segment again in front, where the pipeline is waiting for it."""
        error = inner.exception()
        with self._wakeup:
            endpoint.in_flight -= 1
            if error is None:
                endpoint.answered += 1
            resend = isinstance(error, TransientError) and not self._closed
            if resend:
                self._take_out(endpoint, str(error))
                resend = request.sends < self._max_sends
            if resend:
                self._queue.appendleft(request)
                self.retried += 1
            self._wakeup.notify_all()
        if resend:
            return
        if error is None:
            request.future.set_result(inner.result())
        elif isinstance(error, TransientError):
            request.future.set_exception(TransientError(
                f"{error} (the segment was sent {request.sends} times: giving up)"))
        else:
            request.future.set_exception(error)

    # -- health -------------------------------------------------------------------------------

    def _take_out(self, endpoint: _Endpoint, reason: str) -> None:
        """Stop sending to ``endpoint`` and start probing it. Call with the lock held."""
        endpoint.last_error = reason
        if not endpoint.healthy:
            return
        endpoint.healthy = False
        endpoint.taken_out += 1
        if not any(e.healthy for e in self._endpoints):
            self._down_since = time.monotonic()
        logger.warning("taking %s out (%s); its segments go to the other servers",
                       endpoint.url, reason)
        self._start_probe(endpoint)

    def _start_probe(self, endpoint: _Endpoint) -> None:
        threading.Thread(target=self._probe, args=(endpoint,), daemon=True,
                         name=f"stemserve-probe-{endpoint.url}").start()

    def _probe(self, endpoint: _Endpoint) -> None:
        """Retire the server's backend once its last request is back, then reconnect with
        backoff until it is ready and serves the fleet's model."""
        with self._wakeup:
            self._wakeup.wait_for(lambda: endpoint.in_flight == 0)
            # Closed only when nothing is in flight: a late answer may still read its region.
            old, endpoint.backend = endpoint.backend, None
        if old is not None:
            old.close()
        delay, said = self.backoff, ""
        while True:
            with self._wakeup:
                if self._wakeup.wait_for(lambda: self._closed, timeout=delay):
                    return
            try:
                backend = self._connect(endpoint.url, spec=self.spec)
                if backend.spec != self.spec:
                    backend.close()
                    check_agreement({"the fleet": self.spec, endpoint.url: backend.spec})
            except StemserveError as err:
                # Down is expected here; answering but not as one of this fleet is worth a word.
                if not isinstance(err, ServerUnreachable) and str(err) != said:
                    logger.warning("%s stays out: %s", endpoint.url, err)
                    said = str(err)
                delay = min(2 * delay, max(PROBE_INTERVAL_MAX, self.backoff))
                continue
            with self._wakeup:
                taken_back = not self._closed
                if taken_back:
                    endpoint.backend, endpoint.healthy = backend, True
                    self._down_since = None
                    self._wakeup.notify_all()
            if taken_back:
                logger.info("%s is ready again: taken back", endpoint.url)
            else:  # the fleet was closed meanwhile
                backend.close()
            return

    # -- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Fail what is queued, stop dispatching and probing, close every server's backend."""
        with self._wakeup:
            if self._closed:
                return
            self._closed = True
            doomed = list(self._queue)
            self._queue.clear()
            self._wakeup.notify_all()
            self._wakeup.wait_for(lambda: not any(e.in_flight for e in self._endpoints),
                                  timeout=CLOSE_DRAIN)
            backends = [e.backend for e in self._endpoints if e.backend is not None]
            for endpoint in self._endpoints:
                endpoint.backend, endpoint.healthy = None, False
            self._wakeup.notify_all()
        self._dispatcher.join()
        error = StemserveError("the Triton fleet backend was closed")
        for request in doomed:
            _fail(request, error)
        for backend in backends:
            backend.close()

    def __enter__(self) -> "FleetBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _capture(function: Callable[[], TritonBackend]) -> TritonBackend | BaseException:
    """``function()``, or the exception it raised (sorted out after a parallel map)."""
    try:
        return function()
    except BaseException as err:  # re-raised by the caller unless it is ServerUnreachable
        return err


def _fail(request: _Request, error: BaseException) -> None:
    """Fail a request that never reached a server, unless the pipeline cancelled it."""
    if request.sends or request.future.set_running_or_notify_cancel():
        request.future.set_exception(error)
