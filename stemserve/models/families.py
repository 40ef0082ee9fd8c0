"""Which family a network belongs to, and what its sidecar needs to know of it.

The family (:data:`stemserve.spec.FAMILIES`) says how the network takes lengths and which
demucs applies it; the segment is what ``apply_model`` splits a track by.
"""
from __future__ import annotations

from fractions import Fraction

from torch import nn

from stemserve.model import Demucs
from stemserve.models.demucs_v3 import DemucsV3
from stemserve.models.hdemucs import HDemucs
from stemserve.models.htdemucs import HTDemucs

FAMILY_OF = {Demucs: "demucs", DemucsV3: "demucs_v3", HDemucs: "hdemucs",
             HTDemucs: "htdemucs"}


def family_of(model: nn.Module) -> str:
    """The family of ``model``; an HTDemucs that does not run on its training segment is
    not one stemserve serves."""
    if isinstance(model, HTDemucs) and not model.use_train_segment:
        raise ValueError("HTDemucs(use_train_segment=False) takes any length; stemserve "
                         "serves it on its training segment only")
    for cls, family in FAMILY_OF.items():
        if type(model) is cls:
            return family
    raise ValueError(f"{type(model).__name__} is no Demucs model stemserve serves")


def forward_randrange(model: nn.Module) -> int:
    """``n`` of the ``random.randrange(n)`` the network draws on every call, or 0: HTDemucs
    shifts its sinusoidal embedding by a random amount (0 to ``t_sin_random_shift``), in
    eval mode too."""
    transformer = getattr(model, "crosstransformer", None)
    if transformer is None or transformer.emb != "sin":
        return 0
    return transformer.sin_random_shift + 1


def segment_samples(model: nn.Module, segment: float | Fraction | None = None) -> int:
    """What ``apply_model`` splits by, in samples: ``segment`` seconds (a bag's override)
    or the model's own segment."""
    if segment is not None:
        return int(Fraction(segment) * model.samplerate)
    if isinstance(model, Demucs):
        return int(model.segment_length)
    return int(Fraction(model.segment) * model.samplerate)
