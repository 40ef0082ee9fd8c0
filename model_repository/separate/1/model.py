"""Triton python-backend model ``separate``: a whole track in, its stems streamed back.

A decoupled model: ``execute`` hands each request to a thread of its own and returns, so
one instance serves many tracks at once. The thread runs stemserve's one pipeline
(:func:`stemserve.pipeline.stream_stems`, the client library's code, not a copy) on the
request's mix, with a backend that sends every segment to the network model(s) of this
repository through BLS, so the network's dynamic batcher groups the segments of every
track, streamed or not. Each block the pipeline makes final goes back at once as a
response (``stems``, and ``offset``: its first sample). A cancelled request (the client
closed its stream) stops within one segment: the pipeline is closed, which cancels the
segments not yet sent. It imports no more of stemserve than the network's model.py does
(numpy, no audio libraries): the Triton image carries stemserve without its dependencies.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from stemserve.defaults import BLOCK_FRAMES, STREAM_MODEL
from stemserve.errors import StemserveError
from stemserve.pipeline import SeparationOptions, stream_stems
from stemserve.spec import BAG_PARAMETER, SPECS_PARAMETER, BagSpec, ModelSpec


class _Network:
    """:class:`~stemserve.pipeline.Backend` for one network model of this server, called
    through BLS from a pool of threads (a BLS call blocks its thread)."""

    def __init__(self, spec: ModelSpec, pool: ThreadPoolExecutor):
        self.spec, self.where, self._pool = spec, f"Triton model {spec.model_name!r}", pool

    def submit(self, mix: np.ndarray) -> Future:
        return self._pool.submit(self._infer, mix)

    def _infer(self, mix: np.ndarray) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=self.spec.model_name, requested_output_names=[self.spec.output_name],
            inputs=[pb_utils.Tensor(self.spec.input_name, mix[None])])
        response = request.exec()
        if response.has_error():
            raise StemserveError(f"{self.where} failed: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, self.spec.output_name).as_numpy()[0]

    def close(self) -> None:
        pass


class _Bag:
    """The repository's bag of networks, as the client's BagBackend presents one."""

    def __init__(self, members: list[_Network], weights: list[list[float]]):
        self.members, self.weights = members, weights
        self.spec, self.where = members[0].spec, "this server's bag"

    def close(self) -> None:
        pass


def _optional(request, name: str, kind: type):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else kind(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"]
                      for key, value in config.get("parameters", {}).items()}
        bag = BagSpec.from_json(parameters[BAG_PARAMETER], where=f"{STREAM_MODEL} config")
        specs = {spec.model_name: spec for spec in (
            ModelSpec.from_json(text, where=f"{STREAM_MODEL} config")
            for text in json.loads(parameters[SPECS_PARAMETER]))}
        self.in_flight = int(parameters.get("in_flight", "4"))
        max_tracks = int(parameters.get("max_tracks", "16"))
        self.tracks = threading.BoundedSemaphore(max_tracks)
        # Every track's requests in flight at once, each holding a thread while it waits.
        self.pool = ThreadPoolExecutor(self.in_flight * max_tracks, thread_name_prefix="bls")
        # As the client's BagBackend: one member per listing (a bag may list a model twice).
        members = [_Network(specs[name], self.pool) for name in bag.members]
        self.backend = members[0] if len(members) == 1 else _Bag(
            members, [list(row) for row in bag.weights])
        self.spec = members[0].spec
        pb_utils.Logger.log_info(
            f"{STREAM_MODEL}: streams the stems of {bag.name} ({', '.join(bag.members)}), "
            f"{self.in_flight} segments in flight per track")

    def execute(self, requests: list) -> None:
        for request in requests:
            threading.Thread(target=self._separate, args=(request,), daemon=True,
                             name="track").start()
        return None

    def _separate(self, request) -> None:
        sender = request.get_response_sender()
        try:
            with self.tracks:
                self._stream(request, sender)
        except Exception as err:  # the client learns why; the server goes on
            code = (pb_utils.TritonError.INVALID_ARG if isinstance(err, StemserveError)
                    else pb_utils.TritonError.INTERNAL)
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code)))
        finally:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _stream(self, request, sender) -> None:
        spec = self.spec
        mix = pb_utils.get_input_tensor_by_name(request, spec.input_name).as_numpy()
        if mix.dtype != np.float32 or mix.ndim != 2 or mix.shape[0] != spec.audio_channels:
            raise StemserveError(f"'{spec.input_name}' must be float32 [{spec.audio_channels}, "
                                 f"time] at {spec.sample_rate} Hz, got {mix.dtype} "
                                 f"{list(mix.shape)}")
        given = {"shifts": _optional(request, "shifts", int),
                 "seed": _optional(request, "seed", int),
                 "overlap": _optional(request, "overlap", float)}
        options = SeparationOptions(in_flight=self.in_flight,
                                    **{key: value for key, value in given.items()
                                       if value is not None})
        offset = 0
        blocks = stream_stems(lambda: (mix[:, start:start + BLOCK_FRAMES]
                                       for start in range(0, mix.shape[-1], BLOCK_FRAMES)),
                              self.backend, options)
        try:
            for block in blocks:
                if sender.is_cancelled():
                    return
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("stems", np.ascontiguousarray(block)),
                    pb_utils.Tensor("offset", np.array([offset], np.int64))]))
                offset += block.shape[-1]
        finally:
            blocks.close()  # cancels the segments not yet sent

    def finalize(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
