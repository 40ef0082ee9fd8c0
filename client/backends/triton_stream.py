"""The pipeline on the server: a whole track to Triton's ``separate`` model, its stems
streamed back (``--backend triton-stream``).

The server runs stemserve's one pipeline (the decoupled model of every CPU repository, see
model_repository/separate/) and answers with each block of stems as soon as it is final;
this backend only sends the mix and checks and hands on the blocks. What it does not do
itself it cannot get wrong, which is the point for clients in other languages
(``examples/stream_separate.py`` does the same with tritonclient alone). The track goes in
one request, so the client holds it whole (the other backends hold a window of segments).
"""
from __future__ import annotations

import json
import queue
from concurrent.futures import Future
from typing import Callable, Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from stemserve.client.backends.triton import CONTROL_TIMEOUT, check_server_ready, grpc_client
from stemserve.defaults import STREAM_MODEL
from stemserve.errors import ServerError, StemserveError
from stemserve.pipeline import BlockSource, SeparationOptions
from stemserve.spec import SPECS_PARAMETER, ModelSpec

_RESPONSE_WAIT = 3600.0
"""Seconds one block may take: a CPU server may queue a track behind minutes of work."""


class TritonStreamBackend:
    """Runs the whole pipeline on the Triton server at ``url`` (its ``separate`` model).

    :meth:`stream` replaces the client's own pipeline (``Separator`` calls it when a
    backend has one); ``submit`` is not offered, as the server cuts the segments itself.
    """

    def __init__(self, url: str, timeout: float = _RESPONSE_WAIT):
        self.url, self.timeout = url, timeout
        self.where = f"Triton at {url} (pipeline on the server, streamed)"
        self._client = grpc_client(url)
        try:
            self.spec = self._read_spec()
        except BaseException:
            self._client.close()
            raise

    def _read_spec(self) -> ModelSpec:
        check_server_ready(self._client, self.url)
        try:
            config = self._client.get_model_config(STREAM_MODEL, as_json=True,
                                                   client_timeout=CONTROL_TIMEOUT)
        except InferenceServerException as err:
            raise ServerError(f"the Triton server at {self.url} has no '{STREAM_MODEL}' model "
                              f"({err.message()}): serve a CPU repository filled by this "
                              "stemserve (stemserve serve), or use --backend triton") \
                from None
        where = f"model '{STREAM_MODEL}' at {self.url}"
        text = (config.get("config", config).get("parameters", {}).get(SPECS_PARAMETER, {})
                .get("string_value", ""))
        try:
            first = json.loads(text)[0]
        except (ValueError, IndexError, TypeError, KeyError):
            raise ServerError(f"{where}: no '{SPECS_PARAMETER}' parameter naming its "
                              "network") from None
        return ModelSpec.from_json(first, where=f"{where}: '{SPECS_PARAMETER}'")

    def submit(self, mix: np.ndarray) -> Future:
        raise StemserveError("the streaming backend runs the whole pipeline on the server: "
                             "use stream()")

    def stream(self, source: BlockSource, options: SeparationOptions, *,
               on_progress: Callable[[float], None] | None = None) -> Iterator[np.ndarray]:
        """The stems of the mix ``source`` yields, as the server makes them final: the
        [sources, channels, n] blocks :func:`~stemserve.pipeline.stream_stems` would yield.
        Closing it cancels the request on the server."""
        spec = self.spec
        mix = np.concatenate(list(source()), axis=-1).astype(np.float32, copy=False)
        inputs = [_tensor(spec.input_name, mix),
                  _tensor("shifts", np.array([options.shifts], np.int32)),
                  _tensor("overlap", np.array([options.overlap], np.float32))]
        if options.seed is not None:
            inputs.append(_tensor("seed", np.array([options.seed], np.int64)))
        answers: queue.Queue = queue.Queue()
        client = grpc_client(self.url)  # one stream per client: one per track at once
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        finished = False  # the server is done with the request: nothing to cancel
        try:
            client.async_stream_infer(STREAM_MODEL, inputs, enable_empty_final_response=True)
            done = 0
            while True:
                try:
                    result, error = answers.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServerError(f"{self.where}: no answer in {self.timeout:.0f} s") \
                        from None
                if error is not None:
                    finished = True
                    raise ServerError(f"{self.where} failed: {error.message()}")
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = True
                    break
                block = self._checked(result, done, mix.shape[-1])
                done += block.shape[-1]
                if on_progress is not None:
                    on_progress(block.shape[-1])
                yield block
            if done != mix.shape[-1]:
                raise ServerError(f"{self.where} ended the stems after {done} of "
                                  f"{mix.shape[-1]} samples")
        finally:
            # Cancelling a request Triton 2.51 already refused keeps the model from ever
            # unloading: only a request still running is cancelled (a consumer that left).
            client.stop_stream(cancel_requests=not finished)
            client.close()

    def _checked(self, result, done: int, length: int) -> np.ndarray:
        """A block of the server's answer, refused unless it is the next stretch of the
        track in the model's shape (an answer is untrusted)."""
        spec = self.spec
        block, offset = result.as_numpy("stems"), result.as_numpy("offset")
        shape = (len(spec.sources), spec.audio_channels)
        if block is None or offset is None or block.dtype != np.float32 or \
                block.shape[:2] != shape or block.ndim != 3:
            raise ServerError(f"{self.where} answered a block that is not float32 "
                              f"[{shape[0]}, {shape[1]}, n]")
        if int(offset.reshape(-1)[0]) != done or done + block.shape[-1] > length:
            raise ServerError(f"{self.where} answered samples {int(offset.reshape(-1)[0])} + "
                              f"{block.shape[-1]}, expected the next after {done} of {length}")
        return block

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonStreamBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape),
                                   {np.float32: "FP32", np.int32: "INT32",
                                    np.int64: "INT64"}[array.dtype.type])
    tensor.set_data_from_numpy(np.ascontiguousarray(array))
    return tensor
