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
from stemserve.errors import ModelError
from stemserve.spec import ModelSpec
from stemserve.untrusted import safe_name

if TYPE_CHECKING:
    from torch import nn

    from stemserve.checkpoints import CheckpointInfo


PRECISIONS = ("fp32", "fp16", "bf16")


class TorchBackend(LocalBackend):
    """:class:`~stemserve.pipeline.Backend` running any Demucs network in-process.

    ``segment`` (seconds) overrides the model's own, as a bag's does. Segments go through
    the model one at a time by default, like demucs' ``apply_model``; ``max_batch`` stacks
    queued ones (what pays on a GPU). ``device`` is a torch device (``cuda`` on a GPU
    host; the model is moved there); ``precision`` ``fp16``/``bf16`` runs under autocast
    (GPU measurements; the exact path is ``fp32``).
    """

    def __init__(self, model: nn.Module, info: CheckpointInfo, *,
                 segment: float | Fraction | None = None, max_batch: int = 1,
                 device: str = "cpu", precision: str = "fp32"):
        import torch

        from stemserve.models.families import family_of, forward_randrange, segment_samples

        if precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"not {precision!r}")
        model = model.eval().to(device)
        spec = ModelSpec.for_model(model, checkpoint=safe_name(info.name),
                                   checkpoint_sha256=info.sha256,
                                   segment_length=segment_samples(model, segment),
                                   model_name=TRITON_MODEL, family=family_of(model),
                                   forward_randrange=forward_randrange(model),
                                   precision=precision)
        autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        device_type = torch.device(device).type

        def run(batch: np.ndarray) -> np.ndarray:
            mix = torch.from_numpy(batch).to(device)
            with torch.no_grad(), torch.autocast(device_type, dtype=autocast or torch.float32,
                                                 enabled=autocast is not None):
                return model(mix).float().cpu().numpy()

        super().__init__(spec, run, max_batch=max_batch, name="stemserve-torch")
        self.where = f"in-process PyTorch on {device}"
