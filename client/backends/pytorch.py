"""The PyTorch model as a backend: the reference and debugging path of the same pipeline.

torch is imported only here (and only when this backend is built), so the client runs
without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stemserve.client.backends.local import LocalBackend
from stemserve.defaults import TRITON_MODEL
from stemserve.spec import ModelSpec

if TYPE_CHECKING:
    from stemserve.checkpoints import CheckpointInfo
    from stemserve.model import Demucs


class TorchBackend(LocalBackend):
    """:class:`~stemserve.pipeline.Backend` running a :class:`Demucs` in-process.

    Segments go through the model one at a time by default, like demucs' ``apply_model``.
    """

    def __init__(self, model: Demucs, info: CheckpointInfo, *,
                 segment_length: int | None = None, max_batch: int = 1):
        import torch

        model = model.eval()
        spec = ModelSpec.for_model(model, checkpoint=info.name, checkpoint_sha256=info.sha256,
                                   segment_length=int(segment_length or model.segment_length),
                                   model_name=TRITON_MODEL)

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(batch)).numpy()

        super().__init__(spec, run, max_batch=max_batch, name="stemserve-torch")
