"""From an unpickled checkpoint to a model: which format it is, its configuration checked,
its tensors assigned to the network laid out for them."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from stemserve.checkpoints.bounds import (V2, _configuration, _configuration_v4, _describe,
                                          _mapping, _skeleton)
from stemserve.checkpoints.diffq import (_package_quantizer, _restore_quantized,
                                         _restore_v4_quantized)
from stemserve.checkpoints.messages import _first_lines, _kind, _warn
from stemserve.checkpoints.releases import _release_hint
from stemserve.checkpoints.unpickle import _ClassMarker, _package_field
from stemserve.errors import CheckpointError
from stemserve.defaults import SOURCES
from stemserve.models.configs import HDEMUCS_MMI, HTDEMUCS, HTDEMUCS_6S
from stemserve.models.registry import FamilyRegistration, by_name, registrations
from stemserve.releases import BAGS, RELEASES, UNSUPPORTED
from stemserve.untrusted import brief

DEFAULT_CONFIG = "demucs"
"""Configuration assumed for a plain state dict file when none is given."""
# Plain state dicts of the single-model demucs 4 releases, with --config NAME: their family
# and constructor arguments (stemserve.models.configs).
_STATE_CONFIGS: dict[str, tuple[str, Mapping[str, Any]]] = {
    "htdemucs": ("htdemucs", HTDEMUCS), "htdemucs_6s": ("htdemucs", HTDEMUCS_6S),
    "hdemucs_mmi": ("hdemucs", HDEMUCS_MMI)}

# The checkpoint formats load_model reads, for the error that refuses any other.
_FORMATS = ("a plain state dict (tensors by parameter name) built with a release's configuration "
           "(--config RELEASE, or config= in Python; default 'demucs'); a demucs 2.x training "
           "package (klass, args, kwargs, state, training_args); a diffq-compressed state "
           "({'compressed': ...}, as in demucs_quantized); a demucs 3/4 training package "
           "(klass demucs.htdemucs.HTDemucs, demucs.hdemucs.HDemucs or demucs.demucs.Demucs, "
           "diffq-quantized or not); or {'config': arguments, 'state': state dict} with an optional "
           "'family' (demucs_v3, hdemucs, htdemucs), as stemserve's benchmarks and `stemserve "
           "demo` save it")


class _Loaded(NamedTuple):
    model: torch.nn.Module
    family: str
    config: dict[str, Any]


def _from_loaded(loaded: Any, config: str | None, what: str, *, config_given: bool) -> _Loaded:
    """Model of whichever of the :data:`_FORMATS` ``loaded`` is; anything else is refused.

    ``config`` names the configuration of a plain state dict; None: the file must carry its
    own (a demucs 4 release's files do).
    """
    for registration in registrations():
        read = registration.read and registration.read(loaded, what)
        if read:
            if config_given:
                _warn(f"{what} carries its own configuration; ignoring config={config!r}")
            return _from_registered(registration, *read, what)
    if isinstance(loaded, Mapping) and ("klass" in loaded or {"config", "state"} <= loaded.keys()):
        if config_given:
            _warn(f"{what} carries its own configuration; ignoring config={config!r}")
        return _from_package(loaded, what) if "klass" in loaded else _from_saved(loaded, what)
    if isinstance(loaded, Mapping) and loaded and (
            "compressed" in loaded or all(isinstance(v, torch.Tensor) for v in loaded.values())):
        if config is None:
            raise CheckpointError(f"{what} holds a plain state dict without its configuration, "
                                  f"where a training package was expected")
        return _from_state(loaded, config, what)
    if isinstance(loaded, Mapping):
        keys = list(loaded)
        holds = (f"a dict with keys {', '.join(map(brief, keys[:6]))}"
                 f"{' ...' if len(keys) > 6 else ''}" if keys else "an empty dict")
    else:
        holds = f"a {type(loaded).__name__}"
    raise CheckpointError(f"{what} holds {holds}, which is no checkpoint format stemserve "
                          f"loads. It loads {_FORMATS}.")


def _from_state(state: Mapping[str, Any], config: str, what: str) -> _Loaded:
    """Model of release configuration ``config`` holding a plain or compressed state dict."""
    if config in _STATE_CONFIGS:
        family, kwargs = _STATE_CONFIGS[config]
        used = _configuration_v4(family, (), kwargs, what)
        return _Loaded(_assign(family, used, _state_dict(state, what), what,
                               f"the {config!r} configuration, {_describe(used, family)}"),
                       family, used)
    if config not in RELEASES:
        kind = ("a bag of models, not one configuration" if config in BAGS else
                "a ConvTasNet model" if config in UNSUPPORTED else "no release")
        raise CheckpointError(f"{what}: {config!r} is {kind}; a plain state dict is built "
                              f"with the configuration of one of "
                              f"{', '.join([*RELEASES, *_STATE_CONFIGS])} (--config)")
    release = RELEASES[config]
    used = _configuration((), {"sources": SOURCES, **release.config}, what)
    fits = f"the {config!r} configuration, {_describe(used)}"
    if "compressed" in state:
        # demucs_quantized, as demucs/pretrained.py restores it.
        return _Loaded(_restore_quantized(
            used, state, lambda diffq, m: diffq.DiffQuantizer(m, group_size=8, min_size=1),
            what, fits), V2.name, used)
    return _Loaded(_assign(V2.name, used, _state_dict(state, what), what, fits,
                           hint=lambda: _release_hint(state, config)), V2.name, used)


def _from_package(package: Mapping[str, Any], what: str) -> _Loaded:
    """Model of a demucs training package, restored like demucs' ``load_model``."""
    klass = package["klass"]
    if not (isinstance(klass, type) and issubclass(klass, _ClassMarker)):
        raise CheckpointError(f"{what} is a training package of {brief(klass)}, not of "
                              f"demucs.model.Demucs or demucs 4's HTDemucs, HDemucs or Demucs")
    missing = [key for key in ("kwargs", "state") if key not in package]
    if missing:
        raise CheckpointError(f"{what} is a training package without "
                              f"{' or '.join(map(repr, missing))}")
    args = _package_field(package, "args", what, ())
    kwargs = _package_field(package, "kwargs", what)
    if by_name(klass.family).rules is not None:  # a family bounded by its registration
        return _from_package_v4(package, klass.family, args, kwargs, what)
    used = _configuration(args, kwargs, what)
    fits = f"its own configuration, {_describe(used)}"
    make_quantizer = _package_quantizer(package.get("training_args"), what)
    state = package["state"]
    if make_quantizer is None:
        if isinstance(state, Mapping) and "compressed" in state:
            raise CheckpointError(f"{what}: its state is compressed, but its training_args "
                                  f"name no quantizer (diffq or qat) to restore it with")
        return _Loaded(_assign(V2.name, used, _state_dict(state, what), what, fits), V2.name,
                       used)
    return _Loaded(_restore_quantized(used, state, make_quantizer, what, fits), V2.name, used)


def _from_package_v4(package: Mapping[str, Any], family: str, args: Any, kwargs: Any,
                     what: str) -> _Loaded:
    """Model of a demucs 3/4 package (``demucs.states.serialize_model``): a half-precision
    state dict, or a diffq-quantized state that names its quantizer (``set_state``)."""
    training = _package_field(package, "training_args", what)
    if training is not None and not isinstance(training, Mapping):
        raise CheckpointError(f"{what}: 'training_args' is {_kind(training)}, not the dict "
                              f"(or omegaconf DictConfig) demucs saves")
    used = _configuration_v4(family, args, kwargs, what)
    fits = f"its own configuration, {_describe(used, family)}"
    state = package["state"]
    if isinstance(state, Mapping) and state.get("__quantized"):
        return _Loaded(_restore_v4_quantized(family, used, state, what, fits), family, used)
    return _Loaded(_assign(family, used, _state_dict(state, what), what, fits), family, used)


def _from_saved(saved: Mapping[str, Any], what: str) -> _Loaded:
    """Model of ``{'config': arguments, 'state': state dict}`` and an optional ``'family'``
    (a registered family's name; Demucs v2 without one), as stemserve's benchmarks and
    ``stemserve demo`` save it."""
    family = saved.get("family", V2.name)
    names = [registration.name for registration in registrations()]
    if not (isinstance(family, str) and family in names):
        raise CheckpointError(f"{what}: family={brief(family)} is not one of {', '.join(names)}")
    config = _package_field(saved, "config", what)
    registration = by_name(family)
    if registration.rules is not None:
        return _from_registered(registration, _mapping(config, "config", what), saved["state"],
                                what)
    used = _configuration((), {"sources": SOURCES, **_mapping(config, "config", what)}, what)
    return _Loaded(_assign(V2.name, used, _state_dict(saved["state"], what), what,
                           f"its own configuration, {_describe(used)}"), V2.name, used)


def _from_registered(registration: FamilyRegistration, config: Mapping[str, Any],
                     state: Any, what: str) -> _Loaded:
    """Model of a family bounded by its registration's rules, from its arguments by name and
    a state dict."""
    used = _configuration_v4(registration.name, (), config, what)
    return _Loaded(_assign(registration.name, used, _state_dict(state, what), what,
                           f"its own configuration, {_describe(used, registration.name)}"),
                   registration.name, used)


def _state_dict(state: Any, what: str) -> Mapping[str, torch.Tensor]:
    """``state`` if it is a state dict of dense CPU float tensors by parameter name."""
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{what}: its state is {_kind(state)}, not a state dict "
                              f"(tensors by parameter name)")
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)
                and value.layout == torch.strided and value.device.type == "cpu"
                and value.is_floating_point()):
            raise CheckpointError(f"{what}: its state entry {brief(key)} is {_kind(value)}, not "
                                  f"a float tensor")
    return state


def _assign(family: str, used: Mapping[str, Any], state: Mapping[str, torch.Tensor], what: str,
            fits: str, hint: Callable[[], str] | None = None) -> torch.nn.Module:
    """The model of configuration ``used`` holding ``state``'s tensors themselves (then made
    float32: demucs 4 stores half precision).

    Assigned to the meta skeleton rather than copied into an initialised model: nothing is
    allocated before the file's tensors have been matched name by name and shape by shape.
    """
    model = _skeleton(family, used, what)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        advice = f": {hint()}" if hint else ""
        raise CheckpointError(f"{what} does not fit {fits}{advice}\n{_first_lines(exc)}") \
            from exc
    return model.float()
