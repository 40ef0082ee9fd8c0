"""A bag of models (demucs 4's ``BagOfModels``) as one backend.

The pipeline sends every member its own requests (each member batches with its own
segments, on its own server model or in-process network) and weighs their stems per
source with the bag's matrix; the bag itself only holds them together.
"""
from __future__ import annotations

import dataclasses
import hashlib
from concurrent.futures import Future
from typing import Sequence

import numpy as np

from stemserve.errors import StemserveError
from stemserve.pipeline import Backend, bag_of
from stemserve.spec import ModelSpec


class BagBackend:
    """``members`` (backends, one per model) weighed by ``weights`` (per member, one weight
    per source; all ones when None), named ``name`` (where its stems are written).

    ``spec`` is the first member's with the bag's name and a checkpoint hash of all the
    members', so servers and exports of other bags are told apart. Closing the bag closes
    its members.
    """

    def __init__(self, members: Sequence[Backend], weights: Sequence[Sequence[float]] | None,
                 name: str):
        if not members:
            raise StemserveError("a bag needs at least one model")
        self.members = list(members)
        self.weights = [list(row) for row in weights] if weights is not None else \
            [[1.0] * len(self.members[0].spec.sources) for _ in self.members]
        bag_of(self)  # the members agree and the weights fit, or a clear error now
        digest = hashlib.sha256("".join(member.spec.checkpoint_sha256
                                        for member in self.members).encode()).hexdigest()
        self.spec: ModelSpec = dataclasses.replace(self.members[0].spec, checkpoint=name,
                                                   checkpoint_sha256=digest)

    @property
    def where(self) -> str:
        return self.members[0].where

    def submit(self, mix: np.ndarray) -> Future:
        raise StemserveError("a bag's requests go to its members: pass the bag to the "
                             "pipeline, which sends each member its own")

    def close(self) -> None:
        for member in {id(member): member for member in self.members}.values():
            member.close()  # once each: a model the bag lists twice is one backend

    def __enter__(self) -> "BagBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
