"""Model families as registrations: one value says everything stemserve needs of a family.

A family (Demucs v2, the v3 waveform Demucs, Hybrid Demucs, HT Demucs, or one of your own)
is a :class:`FamilyRegistration` declared in its model's module and passed to
:func:`register`, in the manner of transformers' ``AutoConfig.register``: the checkpoint
loader, the exporter, the backends and the web catalog ask it (by name, by class, by the
class name a checkpoint pickles) instead of testing family names. Its torch-free length
rule, what a client needs to cut requests, is :data:`stemserve.spec.FAMILIES`' row of the
same name.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from stemserve.models.arguments import Rule
from stemserve.spec import import_family_modules

BUILT_IN = ("stemserve.model", "stemserve.models.demucs_v3", "stemserve.models.hdemucs",
            "stemserve.models.htdemucs", "stemserve.models.roformer")
"""The modules that register stemserve's own families, imported on the first lookup."""


@dataclasses.dataclass(frozen=True)
class FamilyRegistration:
    """A model family.

    ``name``: its key (sidecars, checkpoints' ``family``, :data:`stemserve.spec.FAMILIES`);
    ``model_class``: its ``nn.Module``, built from keyword arguments; ``label``: the class as
    messages name it; ``pickled``: the ``module.Class`` names a training package may name it
    by (each unpickles to an inert marker, never the class); ``rules``: a bound for every
    constructor argument but ``sources`` (None: the family's checkpoint code bounds them
    itself, as Demucs v2's does); ``segment``: what ``apply_model``
    splits a track by for a model, in samples; ``input_needed``: the input a model needs for
    that segment, when it is more (bounded by the loader); ``graph``: what the exporter traces
    instead of the network, as ``module:callable`` called with the model and the segment in
    samples (the STFTs as real products: the complex ``torch.stft`` does not export), None
    for the network itself; ``unsupported``: precisions it has no graph of, and why; ``check``: refuses a
    model of the class that stemserve does not serve; ``read``: reads a checkpoint format of
    its own (the unpickled object and the file's name in, ``(arguments, state dict)`` out,
    None when the object is not one).
    """

    name: str
    model_class: type[nn.Module]
    label: str
    pickled: tuple[str, ...]
    rules: Mapping[str, Rule] | None
    segment: Callable[[nn.Module], int]
    input_needed: Callable[[nn.Module], int] | None = None
    graph: str | None = None
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)
    check: Callable[[nn.Module], None] | None = None
    read: Callable[[Any, str], tuple[Mapping[str, Any], Mapping[str, Any]] | None] | None = None


_REGISTERED: dict[str, FamilyRegistration] = {}


def register(registration: FamilyRegistration) -> FamilyRegistration:
    """Add ``registration`` (a name is registered once: again only by the same value)."""
    known = _REGISTERED.get(registration.name)
    if known is not None and known != registration:
        raise ValueError(f"a model family named {registration.name!r} is already registered")
    _REGISTERED[registration.name] = registration
    return registration


def unregister(name: str) -> None:
    """Remove the family ``name`` (a test's own family, after the test)."""
    _REGISTERED.pop(name, None)


def registrations() -> tuple[FamilyRegistration, ...]:
    """Every registered family: stemserve's own, then those of the modules
    ``$STEMSERVE_FAMILY_MODULES`` names."""
    for module in BUILT_IN:
        importlib.import_module(module)
    import_family_modules()
    return tuple(_REGISTERED.values())


def by_name(name: str) -> FamilyRegistration:
    """The family ``name``; a KeyError names the registered ones."""
    found = {registration.name: registration for registration in registrations()}
    if name not in found:
        raise KeyError(f"no model family {name!r}: registered are {', '.join(found)}")
    return found[name]


def of_model(model: nn.Module) -> FamilyRegistration:
    """The family of ``model`` (its exact class), after its own ``check``."""
    for registration in registrations():
        if type(model) is registration.model_class:
            if registration.check is not None:
                registration.check(model)
            return registration
    raise ValueError(f"{type(model).__name__} is no model family stemserve serves")
