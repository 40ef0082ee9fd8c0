"""The Triton backend: segments go to a tritonserver over gRPC, many in flight at once.

Requests are sent with ``async_infer`` and completed through callbacks, so the server's
dynamic batcher sees as many equal-shaped segments as the pipeline's window allows.
Transient gRPC failures (server restarting, unreachable, overloaded, too slow) are retried
with exponential backoff a bounded number of times; then the segment fails with a clear
error (a :class:`TransientError`, which a fleet of servers re-sends to another one).

When the server is on this host (a loopback URL), tensors travel through Triton's system
shared memory instead of protobuf, from a pool of regions sized for the largest request,
which saves most of gRPC's overhead over in-process ONNX Runtime
(docs/decisions/0007-shared-memory-on-loopback.md). A server that cannot map the regions (say, in a container with its own /dev/shm) gets plain gRPC.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils import shared_memory as shm

from stemserve.defaults import BACKOFF, DEFAULT_IN_FLIGHT, REQUEST_TIMEOUT, RETRIES, TRITON_MODEL
from stemserve.errors import (ServerError, ServerUnreachable, StemserveError,
                              TransientError)
from stemserve.files import pid_alive
from stemserve.spec import BAG_PARAMETER, SPEC_PARAMETER, BagSpec, ModelSpec

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds the first contact may take: an unreachable host should fail fast."""
CONTROL_TIMEOUT = 10.0
"""Deadline of every call that is not an inference (metadata, config, shared memory): a
frozen server must never hold the client."""
CLOSE_TIMEOUT = 3.0
"""Deadline of the clean-up calls at close: exit must not wait on a dead server."""
REGION_DRAIN = 10.0
"""Seconds close() waits for the server to finish requests still holding shared memory."""
HEALTH_INTERVAL = 2.0
HEALTH_TIMEOUT = 5.0
HEALTH_FAILURES = 2
"""While requests are in flight, the server's liveness is asked every HEALTH_INTERVAL
seconds; after HEALTH_FAILURES probes in a row get no answer within HEALTH_TIMEOUT, the
server is taken for frozen and its requests are failed as transient (retried, or re-sent
to another server of a fleet) instead of waiting out the request timeout."""
RECONNECT_BACKOFF_MS = 1000
"""Longest pause between gRPC's reconnection attempts (its default grows to 120 s, so a
restarted server was ignored for 20 s and more)."""
TRANSIENT = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
                       "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED"})
REGION_PREFIX = "stemserve"
_REGION = re.compile(rf"^{REGION_PREFIX}_(\d+)_[0-9a-f]{{8}}_\d+$")
"""Shared-memory region names: ``stemserve_<pid>_<token>_<n>``, unique to each client."""


def grpc_client(url: str) -> grpcclient.InferenceServerClient:
    """A gRPC client for ``url`` that reconnects within a second of the server coming back.

    tritonclient's own channel options (unlimited message sizes, its keepalive defaults)
    are kept; only gRPC's reconnection backoff is bounded.
    """
    keepalive = grpcclient.KeepAliveOptions()
    return grpcclient.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ])


def is_transient(error: InferenceServerException) -> bool:
    """Whether another attempt may succeed.

    NOT_FOUND counts: the model and the shared-memory regions were there when the backend
    started, so the server has lost them since. A stopping server unloads the model; one
    restarted on the same port forgets the regions (a retry takes a fresh one).
    """
    return error.status() in TRANSIENT or error.status() == "StatusCode.NOT_FOUND"


def unreachable_message(url: str, detail: str) -> str:
    return (f"no Triton server answers at {url} ({detail}); start one with `stemserve serve`, "
            "point --url at a running one, or separate in-process with --backend onnx")


def is_loopback(url: str) -> bool:
    """Whether ``host:port`` names this host, where system shared memory is shared."""
    host = url.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def check_server_ready(client: grpcclient.InferenceServerClient, url: str) -> None:
    """Refuse a server that does not answer at ``url``, or answers that it is not ready,
    within :data:`CONNECT_TIMEOUT`."""
    try:
        ready = client.is_server_ready(client_timeout=CONNECT_TIMEOUT)
    except InferenceServerException as err:
        raise ServerUnreachable(unreachable_message(url, err.message())) from None
    if not ready:
        raise ServerUnreachable(unreachable_message(url, "server not ready"))


def spec_from_config(config: dict, where: str) -> ModelSpec | None:
    """The sidecar a model repository's config.pbtxt carries as a string parameter, if any."""
    text = config.get("parameters", {}).get(SPEC_PARAMETER, {}).get("string_value")
    if not text:
        return None
    return ModelSpec.from_json(text, where=f"{where}: '{SPEC_PARAMETER}' parameter")


def served_bag(url: str) -> BagSpec | None:
    """The bag of models the stemserve server at ``url`` serves (one Triton model per
    member, each config carrying the bag as the ``stemserve_bag`` parameter), or None when
    it serves a single model."""
    client = grpc_client(url)
    try:
        try:
            index = client.get_model_repository_index(as_json=True,
                                                      client_timeout=CONNECT_TIMEOUT)
        except InferenceServerException as err:
            raise ServerUnreachable(unreachable_message(url, err.message())) from None
        names = {model["name"] for model in index.get("models", [])}
        members = sorted(name for name in names if name.startswith(f"{TRITON_MODEL}_"))
        if TRITON_MODEL in names or not members:
            return None
        try:
            config = client.get_model_config(members[0], as_json=True,
                                             client_timeout=CONTROL_TIMEOUT)
        except InferenceServerException as err:
            raise ServerError(f"the Triton server at {url} has no ready model "
                              f"'{members[0]}' ({err.message()})") from None
        text = (config.get("config", config).get("parameters", {}).get(BAG_PARAMETER, {})
                .get("string_value"))
        if not text:
            return None
        return BagSpec.from_json(text, where=f"model '{members[0]}' at {url}: "
                                             f"'{BAG_PARAMETER}' parameter")
    finally:
        _close_channel(client, url)


@dataclass
class _Slot:
    """One registered shared-memory region: the input at offset 0, the output after it."""

    name: str
    handle: object
    input_bytes: int
    output_bytes: int


def collect_stale_regions(client: grpcclient.InferenceServerClient) -> list[str]:
    """Unregister and delete the shared-memory regions of stemserve clients that are gone.

    A client killed without a chance to clean up (SIGKILL, a crash) leaves its regions
    registered on the server, and their files in /dev/shm, until the server restarts. Region
    names carry the client's process id; a region whose process no longer exists on this
    host is stale. Returns the names removed.
    """
    removed = []
    status = client.get_system_shared_memory_status(as_json=True,
                                                    client_timeout=CONTROL_TIMEOUT)
    for name in status.get("regions", {}):
        match = _REGION.match(name)
        if match is not None and not pid_alive(int(match.group(1))):
            client.unregister_system_shared_memory(name, client_timeout=CONTROL_TIMEOUT)
            removed.append(name)
    shm_folder = "/dev/shm"
    if os.path.isdir(shm_folder):
        for entry in os.scandir(shm_folder):
            match = _REGION.match(entry.name)
            if match is not None and not pid_alive(int(match.group(1))):
                try:
                    os.unlink(entry.path)
                except OSError:
                    continue  # another client collected it first
                removed.append(entry.name)
    if removed:
        logger.info("removed %d shared-memory region(s) of stemserve clients that are gone",
                    len(set(removed)))
    return sorted(set(removed))


class _SharedMemoryPool:
    """Regions for ``size`` requests in flight, each big enough for the largest request.

    The region of a failed request is never reused: the server may still be writing the
    abandoned request's output into it. A token takes its place in the free queue, and the
    next :meth:`acquire` creates a fresh region for it. Regions are read and destroyed under
    one lock, so a late answer never reads a region that :meth:`close` has unmapped.
    """

    def __init__(self, client: grpcclient.InferenceServerClient, spec: ModelSpec, size: int):
        self._client = client
        longest = spec.max_request_length  # the shape contract's longest request
        self.input_bytes = 4 * spec.audio_channels * longest
        self.output_bytes = (4 * len(spec.sources) * spec.audio_channels
                             * spec.request_output_length(longest))
        self._prefix = f"{REGION_PREFIX}_{os.getpid()}_{secrets.token_hex(4)}"
        self._slots: list[_Slot] = []
        self.lock = threading.RLock()
        self._closed = False
        self._free: queue.Queue[_Slot | None] = queue.Queue()
        try:
            collect_stale_regions(client)
            for _ in range(size):
                self._free.put(self._create())
        except BaseException:
            self.close()
            raise

    def _create(self) -> _Slot:
        with self.lock:
            if self._closed:
                raise shm.SharedMemoryException("the shared-memory pool is closed")
            name = f"{self._prefix}_{len(self._slots)}"
            size = self.input_bytes + self.output_bytes
            slot = _Slot(name, shm.create_shared_memory_region(name, "/" + name, size),
                         self.input_bytes, self.output_bytes)
            self._slots.append(slot)
        self._client.register_system_shared_memory(name, "/" + name, size,
                                                   client_timeout=CONTROL_TIMEOUT)
        return slot

    def acquire(self) -> _Slot:
        """A free region, waiting while all are in use (never call it in a gRPC callback)."""
        slot = self._free.get()
        if slot is not None:
            return slot
        try:
            return self._create()
        except BaseException:
            self._free.put(None)
            raise

    def release(self, slot: _Slot, reusable: bool) -> None:
        self._free.put(slot if reusable else None)

    def read(self, slot: _Slot, shape: list[int]) -> np.ndarray:
        """A copy of the output in ``slot``'s region."""
        with self.lock:
            if self._closed:
                raise StemserveError("the shared-memory regions were released")
            return shm.get_contents_as_numpy(slot.handle, np.float32, shape,
                                             offset=slot.input_bytes).copy()

    def close(self) -> None:
        """Unregister and destroy every region; a server that does not answer is skipped.

        A region stays "in use" on the server until the request that holds it is done: the
        unregistering is retried for :data:`REGION_DRAIN` seconds, then left to the next
        client (:func:`collect_stale_regions`).
        """
        with self.lock:
            self._closed = True
            slots, self._slots = self._slots, []
        pending, deadline = slots, time.monotonic() + REGION_DRAIN
        while pending:
            busy = []
            for slot in pending:
                try:
                    self._client.unregister_system_shared_memory(slot.name,
                                                                 client_timeout=CLOSE_TIMEOUT)
                except InferenceServerException as err:
                    if err.status() in TRANSIENT:  # gone or frozen: it forgets them itself
                        busy = []
                        break
                    if "in use" in (err.message() or ""):
                        busy.append(slot)
            if busy and time.monotonic() > deadline:
                logger.info("%d shared-memory region(s) still in use by requests the server "
                            "is finishing: the next stemserve client removes them", len(busy))
                break
            pending = busy
            if pending:
                time.sleep(0.2)
        with self.lock:
            for slot in slots:
                shm.destroy_shared_memory_region(slot.handle)
        # Wake whoever waits for a region; they find the pool closed.
        self._free.put(None)


@dataclass(eq=False)
class _Call:
    """A segment request and everything needed to send it again."""

    mix: np.ndarray
    future: Future
    slot: _Slot | None = None
    attempt: int = 0
    context: object | None = None
    """The gRPC call in flight (``cancel()``-able)."""


class TritonBackend:
    """:class:`~stemserve.pipeline.Backend` that runs segments on a Triton server.

    Args:
        url: gRPC ``host:port`` of the server.
        model: the model's name in the repository.
        timeout: seconds one request may take before it is abandoned (and retried).
        retries: further attempts after a transient failure, with backoff
            ``backoff * 2**attempt`` seconds; then the segment fails with
            :class:`TransientError`. 0 fails at once, so that a
            :class:`~stemserve.client.backends.fleet.FleetBackend` can send it to another server.
        shared_memory: pass tensors through system shared memory, with ``shm_slots`` regions
            (requests beyond that many in flight wait for a free one). None: when the URL is
            a loopback address and the server can map the regions; True: always, or fail.
        spec: the sidecar to use when the server's model config carries none (the
            ``stemserve_spec`` parameter); when it carries one, both must describe the same
            checkpoint.

    Every call to the server has a deadline, and a watchdog probes the server's liveness
    while requests are in flight (:data:`HEALTH_INTERVAL`), so a frozen server fails its
    requests within seconds instead of holding them for ``timeout``.
    """

    def __init__(self, url: str, model: str = TRITON_MODEL, *,
                 timeout: float = REQUEST_TIMEOUT, retries: int = RETRIES, backoff: float = BACKOFF,
                 shared_memory: bool | None = None, shm_slots: int = DEFAULT_IN_FLIGHT,
                 spec: ModelSpec | None = None):
        self.url = url
        self.where = f"Triton at {url}"
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._client = grpc_client(url)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._timers: dict[threading.Timer, _Call] = {}
        self._in_flight: dict[int, _Call] = {}
        self._sends = 0
        self._pool: _SharedMemoryPool | None = None
        try:
            self.spec = self._read_spec(spec)
            if shared_memory or (shared_memory is None and is_loopback(url)):
                self._pool = self._open_pool(shm_slots, required=bool(shared_memory))
        except BaseException:
            self._client.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name=f"stemserve-watchdog-{url}")
        self._watchdog.start()

    @property
    def shared_memory(self) -> bool:
        """Whether tensors go through system shared memory."""
        return self._pool is not None

    def _open_pool(self, slots: int, required: bool) -> _SharedMemoryPool | None:
        try:
            return _SharedMemoryPool(self._client, self.spec, slots)
        except (InferenceServerException, shm.SharedMemoryException) as err:
            if required:
                raise StemserveError(f"the Triton server at {self.url} cannot use this "
                                     f"host's shared memory: {err}") from None
            logger.info("shared memory unavailable with %s (%s): plain gRPC", self.url, err)
            return None

    def _read_spec(self, local: ModelSpec | None) -> ModelSpec:
        """Check the server and the model are ready, then read the model's sidecar."""
        check_server_ready(self._client, self.url)
        try:
            if not self._client.is_model_ready(self.model, client_timeout=CONTROL_TIMEOUT):
                raise InferenceServerException(msg="not ready")
            config = self._client.get_model_config(self.model, as_json=True,
                                                   client_timeout=CONTROL_TIMEOUT)
        except InferenceServerException as err:
            if err.status() in TRANSIENT:
                raise ServerUnreachable(unreachable_message(self.url, err.message())) from None
            raise ServerError(f"the Triton server at {self.url} has no ready model "
                              f"'{self.model}' ({err.message()})") from None
        where = f"model '{self.model}' at {self.url}"
        served = spec_from_config(config.get("config", config), where)
        if served is None and local is None:
            raise StemserveError(f"{where} has no '{SPEC_PARAMETER}' parameter in its config "
                                 "and no local export describes it: serve a repository "
                                 "written by stemserve, or name its export with -n/--model")
        if served is not None and local is not None \
                and served.checkpoint_sha256 != local.checkpoint_sha256:
            raise StemserveError(f"{where} serves {served.checkpoint} "
                                 f"({served.checkpoint_sha256[:12]}), not the local export of "
                                 f"{local.checkpoint} ({local.checkpoint_sha256[:12]})")
        return served or local

    def submit(self, mix: np.ndarray) -> Future:
        call = _Call(np.ascontiguousarray(mix[None], dtype=np.float32), Future())
        call.future.set_running_or_notify_cancel()
        self._send(call)
        return call.future

    def _send(self, call: _Call) -> None:
        spec = self.spec
        if self._closed.is_set():
            self._finish(call, error=StemserveError("the Triton backend is closed"))
            return
        inputs = [grpcclient.InferInput(spec.input_name, list(call.mix.shape), "FP32")]
        outputs = [grpcclient.InferRequestedOutput(spec.output_name)]
        pool = self._pool
        if pool is not None and call.slot is None and call.mix.nbytes <= pool.input_bytes:
            try:
                call.slot = pool.acquire()
            except (InferenceServerException, shm.SharedMemoryException) as err:
                logger.warning("no new shared-memory region (%s): this request goes by gRPC",
                               err)
        slot = call.slot
        if slot is not None:
            shm.set_shared_memory_region(slot.handle, [call.mix])
            inputs[0].set_shared_memory(slot.name, call.mix.nbytes)
            outputs[0].set_shared_memory(slot.name, slot.output_bytes, offset=slot.input_bytes)
        else:
            inputs[0].set_data_from_numpy(call.mix)
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._sends += 1
                send = self._sends
                self._in_flight[send] = call
        if closed:  # close() came while this waited for a region
            self._finish(call, error=StemserveError("the Triton backend is closed"))
            return
        try:
            call.context = self._client.async_infer(
                self.model, inputs, lambda result, error: self._answered(send, result, error),
                outputs=outputs, client_timeout=self.timeout)
        except InferenceServerException as err:
            self._answered(send, None, err)
        except ValueError as err:  # gRPC's "closed channel": close() won the race
            self._answered(send, None, InferenceServerException(msg=str(err)))

    def _answered(self, send: int, result, error: InferenceServerException | None) -> None:
        """gRPC callback of send number ``send``; late answers to abandoned sends are dropped."""
        with self._lock:
            call = self._in_flight.pop(send, None)
        if call is not None:
            self._done(call, result, error)

    def _done(self, call: _Call, result, error: InferenceServerException | None) -> None:
        """Hand over the result, retry a transient failure, or give up."""
        if error is None:
            try:
                self._finish(call, output=self._output(call, result))
            except Exception as err:  # a malformed answer fails this segment, not the thread
                self._finish(call, error=err)
            return
        transient = is_transient(error)
        if transient and call.attempt < self.retries and not self._closed.is_set():
            self._release(call, reusable=False)
            delay = self.backoff * 2 ** call.attempt
            call.attempt += 1
            logger.warning("Triton request failed (%s: %s); retry %d of %d in %.1f s",
                           error.status(), error.message(), call.attempt, self.retries, delay)
            self._schedule(delay, call)
            return
        tried = f" after {call.attempt + 1} attempts" if call.attempt else ""
        self._finish(call, error=(TransientError if transient else ServerError)(
            f"the Triton server at {self.url} failed a request{tried}: "
            f"{error.status() or 'error'}: {error.message()}"))

    def _schedule(self, delay: float, call: _Call) -> None:
        def fire() -> None:
            with self._lock:
                due = self._timers.pop(timer, None)
            if due is not None:  # else close() has already failed it
                self._send(due)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            self._timers[timer] = call
        timer.start()

    def _watch(self) -> None:
        """Fail the requests in flight on a server that stopped answering (see class doc)."""
        misses = 0
        while not self._closed.wait(HEALTH_INTERVAL):
            with self._lock:
                busy = bool(self._in_flight)
            if not busy:
                misses = 0
                continue
            try:
                self._client.is_server_live(client_timeout=HEALTH_TIMEOUT)
                misses = 0
                continue
            except InferenceServerException as err:
                if err.status() not in TRANSIENT:
                    continue  # it answered, with an error: not frozen
                misses += 1
            if misses < HEALTH_FAILURES:
                continue
            misses = 0
            with self._lock:
                abandoned, self._in_flight = list(self._in_flight.values()), {}
            logger.warning("the Triton server at %s stopped answering: %d request(s) in flight "
                           "given up", self.url, len(abandoned))
            error = InferenceServerException(
                msg=f"the server stopped answering (no health answer within "
                    f"{HEALTH_TIMEOUT:g} s, {HEALTH_FAILURES} times in a row)",
                status="StatusCode.DEADLINE_EXCEEDED")
            for call in abandoned:
                self._done(call, None, error)

    def _output(self, call: _Call, result) -> np.ndarray:
        name = self.spec.output_name
        slot = call.slot
        if slot is None:
            return result.as_numpy(name)[0]
        # as_numpy() raises on an output placed in shared memory: read the region.
        return self._pool.read(slot, list(result.get_output(name).shape))[0]

    def _release(self, call: _Call, reusable: bool) -> None:
        if call.slot is not None:
            self._pool.release(call.slot, reusable)
            call.slot = None

    def _finish(self, call: _Call, *, output: np.ndarray | None = None,
                error: BaseException | None = None) -> None:
        self._release(call, reusable=error is None)
        try:
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(output)
        except InvalidStateError:
            pass  # close() failed it first

    def close(self) -> None:
        """Fail what is pending, release shared memory, close the channel; never blocks on a
        server that does not answer for more than :data:`CLOSE_TIMEOUT` seconds."""
        with self._lock:
            self._closed.set()
            waiting, self._timers = self._timers, {}
            in_flight, self._in_flight = list(self._in_flight.values()), {}
        error = StemserveError("the Triton backend was closed")
        for timer, call in waiting.items():
            timer.cancel()
            self._finish(call, error=error)
        for call in in_flight:
            if call.context is not None:
                call.context.cancel()  # a queued request is dropped, freeing its region
            call.slot = None  # the server may still write there: the pool destroys it
            self._finish(call, error=error)
        if self._pool is not None:
            self._pool.close()
        _close_channel(self._client, self.url)

    def __enter__(self) -> "TritonBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_channel(client: grpcclient.InferenceServerClient, url: str) -> None:
    """Close the gRPC channel, waiting at most :data:`CLOSE_TIMEOUT` seconds.

    gRPC's close waits for the calls it cancels to wind down, which a frozen server can
    stall indefinitely: the closing then finishes in the background, and exit does not wait
    for it (the thread is a daemon).
    """
    closing = threading.Thread(target=client.close, daemon=True, name=f"stemserve-close-{url}")
    closing.start()
    closing.join(CLOSE_TIMEOUT)
    if closing.is_alive():
        logger.debug("the gRPC channel to %s is still closing; not waiting for it", url)
