"""diffq-quantized checkpoints: demucs 2's compressed states and demucs 4's quantized ones,
restored with diffq (imported only for them) into a model that the bounds allow."""
from __future__ import annotations

import argparse
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from stemserve.checkpoints.bounds import (V2, _QAT_BITS, _QUANTIZER_RULES, _describe,
                                          _parameter_count, _skeleton)
from stemserve.checkpoints.messages import _first_lines, _kind
from stemserve.checkpoints.unpickle import _torch_load
from stemserve.errors import CheckpointError
from stemserve.model import Demucs
from stemserve.models.registry import by_name
from stemserve.releases import is_number as _is_number
from stemserve.untrusted import brief


def _package_quantizer(training: Any, what: str) -> Callable[[Any, Demucs], Any] | None:
    """demucs 2's ``get_quantizer``: the quantizer that a package's training arguments imply."""
    if training is None:
        return None
    if not isinstance(training, argparse.Namespace):
        raise CheckpointError(f"{what}: 'training_args' is {_kind(training)}, not the "
                              f"argparse.Namespace demucs saves")
    penalty = getattr(training, "diffq", 0)
    bits = getattr(training, "qat", None)
    min_size = getattr(training, "q_min_size", 1)
    if not _is_number(penalty) or penalty < 0:
        raise CheckpointError(f"{what}: training_args.diffq={brief(penalty)} is not a penalty "
                              f">= 0")
    if bits is not None and not (_is_number(bits, integer=True) and bits in _QAT_BITS):
        raise CheckpointError(f"{what}: training_args.qat={brief(bits)} is not a bit width in "
                              f"{_QAT_BITS.start}..{_QAT_BITS.stop - 1}")
    if not _is_number(min_size) or min_size < 0:
        raise CheckpointError(f"{what}: training_args.q_min_size={brief(min_size)} is not a "
                              f"size in MB >= 0")
    if penalty:
        return lambda diffq, m: diffq.DiffQuantizer(m, min_size=min_size, group_size=8)
    if bits:
        return lambda diffq, m: diffq.UniformQuantizer(m, bits=bits, min_size=min_size)
    return None


def _import_diffq(what: str) -> Any:
    """diffq, imported only for the compressed checkpoints that need it."""
    try:
        import diffq
    except ImportError as exc:
        raise CheckpointError(f"{what} is stored quantized; loading it needs diffq "
                              f"(pip install diffq==0.2.4)") from exc
    return diffq


# What a malformed quantized state makes diffq raise while restoring it.
_RESTORE_ERRORS = (AssertionError, AttributeError, IndexError, KeyError, RuntimeError,
                   TypeError, ValueError)


def _restore_quantized(used: Mapping[str, Any], state: Any,
                       make_quantizer: Callable[[Any, Demucs], Any], what: str,
                       fits: str) -> Demucs:
    """demucs 2's ``set_state`` for ``{'compressed': zlib(torch.save(quantized_state))}``.

    The quantizer is detached afterwards: its hooks go, the dequantized float weights stay.
    """
    diffq = _import_diffq(what)
    raw = _inflate(state, _parameter_count(_skeleton(V2.name, used, what)), what)
    quantized = _torch_load(raw, f"the quantized state in {what}")
    model = Demucs(**used)
    _restore(make_quantizer(diffq, model), quantized, what, fits)
    return model


def _restore_v4_quantized(family: str, used: Mapping[str, Any], state: Mapping[str, Any],
                          what: str, fits: str) -> torch.nn.Module:
    """demucs 4's ``set_state`` of a quantized state: ``diffq.restore_quantized_state``,
    which rebuilds the quantizer the state names (``meta``) on the model, restores the
    weights and detaches it, leaving plain float weights.

    diffq restores into a real model, so it is only built for a state that can fill it: every
    weight takes at least a bit (1 to 15 bits, float16 or float32), whatever the packing.
    """
    klass, kwargs = _state_quantizer(state, what)
    diffq = _import_diffq(what)
    parameters = _parameter_count(_skeleton(family, used, what))
    held = _storage_bytes([state.get(part) for part in ("quantized", "float16", "others")])
    if 8 * held < parameters:
        raise CheckpointError(f"{what}: its quantized state holds {held} bytes of tensors, less "
                              f"than a bit for each of the {parameters / 1e6:.1f} M weights of "
                              f"{_describe(used, family)}; refused before building it")
    model = by_name(family).model_class(**used)
    try:
        quantizer = {"diffq.diffq.DiffQuantizer": diffq.DiffQuantizer,
                     "diffq.uniform.UniformQuantizer": diffq.UniformQuantizer}[klass](
            model, **kwargs)
    except _RESTORE_ERRORS as exc:
        raise CheckpointError(f"{what}: its quantizer settings do not fit {fits}: "
                              f"{_first_lines(exc) or type(exc).__name__}") from exc
    for part, expected in (("float16", quantizer._float16), ("others", quantizer._others)):
        if len(state.get(part, ())) != len(expected):  # diffq would zip them silently
            raise CheckpointError(f"the quantized state in {what} does not fit {fits}:\n"
                                  f"{len(state.get(part, ()))} {part} tensors where the model "
                                  f"has {len(expected)}")
    _restore(quantizer, state, what, fits)
    return model


def _restore(quantizer: Any, state: Any, what: str, fits: str) -> None:
    """diffq's ``restore_quantized_state`` into the quantizer's model, then ``detach`` (plain
    float weights left); diffq's own errors become a CheckpointError saying what did not fit."""
    try:
        quantizer.restore_quantized_state(state)
    except _RESTORE_ERRORS as exc:
        raise CheckpointError(f"the quantized state in {what} does not fit {fits}:\n"
                              f"{_first_lines(exc) or type(exc).__name__}") from exc
    quantizer.detach()


def _storage_bytes(value: Any) -> int:
    """Bytes of the distinct tensor storages in nested lists and tuples: what a quantized state
    really holds (a pickle can list one storage many times, or a list inside itself)."""
    storages: dict[int, int] = {}
    pending, seen = [value], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return sum(storages.values())


def _state_quantizer(state: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """The quantizer class a demucs 4 quantized state names and its checked arguments."""
    meta = state.get("meta")
    klass = meta.get("klass") if isinstance(meta, Mapping) else None
    if not (isinstance(klass, str) and klass in _QUANTIZER_RULES):
        raise CheckpointError(f"{what}: its state is quantized but names no diffq quantizer "
                              f"(meta.klass is {brief(klass)}; expected "
                              f"{' or '.join(_QUANTIZER_RULES)})")
    kwargs = meta.get("init_kwargs", {})
    if not (isinstance(kwargs, Mapping) and all(isinstance(key, str) for key in kwargs)):
        raise CheckpointError(f"{what}: its quantizer arguments are {_kind(kwargs)}, not a "
                              f"dict by name")
    rules = _QUANTIZER_RULES[klass]
    for name, value in kwargs.items():
        rule = rules.get(name)
        if rule is None:
            raise CheckpointError(f"{what}: its quantizer {klass} has no argument "
                                  f"{brief(name)}")
        if not rule.accepts(value):
            raise CheckpointError(f"{what}: quantizer {name}={brief(value)} is out of bounds: "
                                  f"stemserve loads {rule.accepted} (demucs uses "
                                  f"{rule.releases})")
    return klass, dict(kwargs)


def _inflate(state: Any, parameters: int, what: str) -> bytes:
    """The zlib-compressed quantized state, inflated to at most what the model can need.

    diffq's quantized state takes a quarter to a half of the float32 weights; twice the
    float32 size (plus 1 MiB of torch's framing) is the bound. A 2 MB zlib bomb would
    otherwise inflate to gigabytes before anything could look at it.
    """
    blob = state.get("compressed") if isinstance(state, Mapping) else None
    if not isinstance(blob, bytes):
        raise CheckpointError(f"{what}: no compressed quantized state (expected "
                              f"{{'compressed': zlib bytes}}, found {_kind(state)})")
    limit = 2 * 4 * parameters + (1 << 20)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob, limit + 1)
    except zlib.error as exc:
        raise CheckpointError(f"{what}: its compressed quantized state is not valid zlib data "
                              f"({exc})") from exc
    if len(raw) > limit:
        raise CheckpointError(f"{what}: its compressed quantized state inflates to more than "
                              f"{limit / 2**20:.0f} MiB, more than a model of "
                              f"{parameters / 1e6:.1f} M parameters can need; refused")
    if not inflater.eof:
        raise CheckpointError(f"{what}: its compressed quantized state is truncated")
    return raw
