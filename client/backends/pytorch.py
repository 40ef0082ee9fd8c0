"""The PyTorch model as a backend: the reference and debugging path of the same pipeline.

torch is imported only here (and only when this backend is built), so the client runs
without it.
"""
from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from stemserve.client.backends.local import LocalBackend
from stemserve.defaults import TRITON_MODEL
from stemserve.spec import ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from stemserve.checkpoints import CheckpointInfo


class TorchBackend(LocalBackend):
    """:class:`~stemserve.pipeline.Backend` running any Demucs network in-process.

    ``segment`` (seconds) overrides the model's own, as a bag's does. Segments go through
    the model one at a time by default, like demucs' ``apply_model``.
    """

    def __init__(self, model: nn.Module, info: CheckpointInfo, *,
                 segment: float | Fraction | None = None, max_batch: int = 1):
        import torch

        from stemserve.models.families import family_of, forward_randrange, segment_samples

        model = model.eval()
        spec = ModelSpec.for_model(model, checkpoint=info.name, checkpoint_sha256=info.sha256,
                                   segment_length=segment_samples(model, segment),
                                   model_name=TRITON_MODEL, family=family_of(model),
                                   forward_randrange=forward_randrange(model))

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(batch)).numpy()

        super().__init__(spec, run, max_batch=max_batch, name="stemserve-torch")
