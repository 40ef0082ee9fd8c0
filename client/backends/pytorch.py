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


AUTOCAST = ("fp16", "bf16")
"""The dtypes ``torch.autocast`` may run a model in (its ``autocast`` argument)."""


class TorchBackend(LocalBackend):
    """:class:`~stemserve.pipeline.Backend` running any Demucs network in-process.

    ``segment`` (seconds) overrides the model's own, as a bag's does. Segments go through
    the model one at a time by default, like demucs' ``apply_model``; ``max_batch`` stacks
    queued ones (what pays on a GPU). ``device`` is a torch device (``cuda`` on a GPU
    host; the model is moved there); ``autocast`` ``fp16``/``bf16`` runs it under
    ``torch.autocast`` (GPU measurements; the exact path is None: float32). The model's
    precision is fp32 either way: autocast is how it runs, not a graph of an export.
    """

    def __init__(self, model: nn.Module, info: CheckpointInfo, *,
                 segment: float | Fraction | None = None, max_batch: int = 1,
                 device: str = "cpu", autocast: str | None = None):
        import torch

        from stemserve.models.families import family_of, forward_randrange, segment_samples

        if autocast not in (None, *AUTOCAST):
            raise ModelError(f"autocast must be one of {', '.join(AUTOCAST)} or None, "
                             f"not {autocast!r}")
        model = model.eval().to(device)
        spec = ModelSpec.for_model(model, checkpoint=safe_name(info.name),
                                   checkpoint_sha256=info.sha256,
                                   segment_length=segment_samples(model, segment),
                                   model_name=TRITON_MODEL, family=family_of(model),
                                   forward_randrange=forward_randrange(model))
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(autocast)
        device_type = torch.device(device).type

        def run(batch: np.ndarray) -> np.ndarray:
            mix = torch.from_numpy(batch).to(device)
            with torch.no_grad(), torch.autocast(device_type, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
                return model(mix).float().cpu().numpy()

        super().__init__(spec, run, max_batch=max_batch, name="stemserve-torch")
        self.where = f"in-process PyTorch on {device}" + (f", {autocast} autocast" if autocast
                                                          else "")
