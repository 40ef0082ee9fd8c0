"""Which family a network belongs to, and what its sidecar needs to know of it, asked of the
family's registration (:mod:`stemserve.models.registry`).

The family (:data:`stemserve.spec.FAMILIES`) says how the network takes lengths and which
demucs applies it; the segment is what ``apply_model`` splits a track by.
"""
from __future__ import annotations

from fractions import Fraction

from torch import nn

from stemserve.models.registry import of_model


def family_of(model: nn.Module) -> str:
    """The family of ``model``; a model its registration does not serve raises ValueError."""
    return of_model(model).name


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
    return of_model(model).segment(model)
