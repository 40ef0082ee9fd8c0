"""RoFormer weights as people have them: a ``.ckpt`` / ``.pth`` state dict, or a
``.safetensors`` file, read into a plain ``dict[str, torch.Tensor]`` without running anything.

A ``.ckpt`` is a pickle: it is read with stemserve's restricted unpickler
(:func:`stemserve.checkpoints.unpickle._torch_load`, torch's ``weights_only`` loader and a
short allowlist), so a pickled call such as ``os.system`` is refused by name and never made.
MSST saves ``model.state_dict()`` bare; Lightning-style files put it under ``state_dict``, and
MSST's own loader also unwraps ``state`` and ``model_state_dict``; keys may carry a ``model.``
(Lightning) or ``module.`` (DataParallel) prefix on every key, which is removed.

A ``.safetensors`` file is read by hand (the format: an 8-byte little-endian header length,
a JSON header mapping each tensor's name to its ``dtype``, ``shape`` and ``data_offsets``
into the byte buffer that follows, and an optional ``__metadata__`` of strings), bounded: the
header's size, the number of tensors, their ranks, a dtype allowlist, and offsets that tile
the buffer exactly (no gap, no overlap, nothing past the file), as the reference
implementation requires. No dependency beyond torch.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stemserve.checkpoints.messages import _kind
from stemserve.checkpoints.unpickle import _torch_load
from stemserve.errors import CheckpointError
from stemserve.untrusted import brief

MAX_HEADER_BYTES = 16 << 20
"""A safetensors header: about 100 bytes a tensor, so 16 MiB is over 100 000 tensors (a
BS-RoFormer of depth 12 has about 1 000; the reference implementation allows 100 MB)."""
MAX_TENSORS = 65_536
"""Tensors in a state dict or a safetensors file."""
MAX_RANK = 8
MAX_KEY_CHARS = 1024
MAX_METADATA_ITEMS = 1024
WRAPPERS = ("state_dict", "state", "model_state_dict")
"""Keys a state dict may sit under (Lightning; MSST's loader unwraps all three)."""
PREFIXES = ("model.", "module.")
"""A prefix removed when every key has it (Lightning's module attribute; DataParallel)."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
"""The dtypes read from a safetensors file (the format's names); weights are F32, F16 or
BF16, and buffers the integer types."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.ckpt`` / ``.pth`` / ``.pt`` / ``.th`` state dict or a
    ``.safetensors`` file, by parameter name (a wrapper and a common prefix removed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix.lower() == ".safetensors":
        tensors, _ = read_safetensors(path)
        if not tensors:
            raise CheckpointError(f"{path} holds no tensors")
    else:
        tensors = _state_dict(_torch_load(path, str(path)), str(path))
    return _strip_prefix(tensors)


def _state_dict(loaded: Any, what: str) -> dict[str, torch.Tensor]:
    """The state dict inside what a checkpoint file unpickled to, every value a tensor."""
    for _ in range(len(WRAPPERS)):  # nested wrappers, at most one of each
        if not isinstance(loaded, Mapping):
            break
        wrapper = next((key for key in WRAPPERS if isinstance(loaded.get(key), Mapping)), None)
        if wrapper is None:
            break
        loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{what} holds {_kind(loaded)}, not a state dict (tensors by "
                              f"parameter name, bare or under {' or '.join(WRAPPERS)})")
    if not loaded:
        raise CheckpointError(f"{what} holds an empty state dict")
    if len(loaded) > MAX_TENSORS:
        raise CheckpointError(f"{what} holds {len(loaded)} entries; stemserve reads state "
                              f"dicts of at most {MAX_TENSORS} tensors")
    tensors = {}
    for key, value in loaded.items():
        if not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS):
            raise CheckpointError(f"{what}: its state dict has the key {brief(key)}, not a "
                                  f"parameter name")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise CheckpointError(f"{what}: its state dict's {brief(key)} is {_kind(value)}, "
                                  f"not a tensor of weights")
        tensors[key] = value
    return tensors


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for _ in PREFIXES:
        prefix = next((p for p in PREFIXES if all(key.startswith(p) and len(key) > len(p)
                                                   for key in tensors)), None)
        if prefix is None:
            break
        tensors = {key[len(prefix):]: value for key, value in tensors.items()}
    return tensors


# --- safetensors ---------------------------------------------------------------------------

def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        repeated = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"the header names {brief(repeated)} twice")
    return dict(pairs)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file by name, and its ``__metadata__`` (empty if none).

    Everything the header says is checked before any tensor is allocated; a tensor is read
    into memory of exactly the size its offsets give, which the file holds.
    """
    path = Path(path)
    what = str(path)
    if sys.byteorder != "little":
        raise CheckpointError(f"{what}: safetensors files are little-endian; this machine is not")
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{what} is {size} bytes, too short for a safetensors "
                                      f"file (an 8-byte header length, then the header)")
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{what}: its safetensors header is {length} bytes; "
                                      f"stemserve reads headers of at most "
                                      f"{MAX_HEADER_BYTES >> 20} MiB")
            if 8 + length > size:
                raise CheckpointError(f"{what}: its safetensors header length ({length} bytes) "
                                      f"runs past the end of the file ({size} bytes); the file "
                                      f"is truncated or not safetensors")
            header = _header(file.read(length), what)
            metadata = _metadata(header.pop("__metadata__", None), what)
            if len(header) > MAX_TENSORS:
                raise CheckpointError(f"{what}: its safetensors header lists {len(header)} "
                                      f"tensors; stemserve reads at most {MAX_TENSORS}")
            entries = _entries(header, size - 8 - length, what)
            tensors = {}
            for name, dtype, shape, begin, end in entries:
                data = torch.empty(end - begin, dtype=torch.uint8)
                file.seek(8 + length + begin)
                if end > begin and file.readinto(memoryview(data.numpy())) != end - begin:
                    raise CheckpointError(f"{what}: the file ended inside tensor "
                                          f"{brief(name)}")
                if dtype == torch.bool and bool((data > 1).any()):
                    raise CheckpointError(f"{what}: tensor {brief(name)} is BOOL but holds "
                                          f"bytes other than 0 and 1")
                tensors[name] = data.view(dtype).reshape(shape)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {what}: {exc}") from exc
    return tensors, metadata


def _header(raw: bytes, what: str) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{what}: its safetensors header is not JSON: "
                              f"{brief(str(exc))}") from None
    except RecursionError:
        raise CheckpointError(f"{what}: its safetensors header nests too deep") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what}: its safetensors header is {_kind(header)}, not a JSON "
                              f"object of tensors")
    return header


def _metadata(metadata: Any, what: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not (isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_ITEMS
            and all(isinstance(value, str) for value in metadata.values())):
        raise CheckpointError(f"{what}: its safetensors __metadata__ is {brief(metadata)}, not "
                              f"a mapping of at most {MAX_METADATA_ITEMS} strings")
    return dict(metadata)


def _entries(header: Mapping[str, Any], buffer: int,
             what: str) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """Each tensor's name, dtype, shape and byte range, in file order; the ranges tile the
    ``buffer`` bytes after the header exactly."""
    entries = []
    for name, info in header.items():
        if not (isinstance(name, str) and 0 < len(name) <= MAX_KEY_CHARS):
            raise CheckpointError(f"{what}: its safetensors header names a tensor "
                                  f"{brief(name)}")
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise CheckpointError(f"{what}: tensor {brief(name)} is described by "
                                  f"{brief(info)}, not dtype, shape and data_offsets")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (isinstance(code, str) and code in SAFETENSORS_DTYPES):
            raise CheckpointError(f"{what}: tensor {brief(name)} has dtype {brief(code)}; "
                                  f"stemserve reads {', '.join(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK
                and all(_count(n) for n in shape)):
            raise CheckpointError(f"{what}: tensor {brief(name)} has shape {brief(shape)}, not "
                                  f"a list of at most {MAX_RANK} sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
                and offsets[0] <= offsets[1] <= buffer):
            raise CheckpointError(f"{what}: tensor {brief(name)} has data_offsets "
                                  f"{brief(offsets)}, not a range inside the {buffer} bytes "
                                  f"after the header")
        dtype = SAFETENSORS_DTYPES[code]
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{what}: tensor {brief(name)} is {code} of shape {shape} "
                                  f"({nbytes} bytes), but its data_offsets {offsets} span "
                                  f"{offsets[1] - offsets[0]}")
        entries.append((name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda entry: (entry[3], entry[4]))
    position = 0
    for name, _, _, begin, end in entries:
        if begin != position:
            raise CheckpointError(f"{what}: tensor {brief(name)} starts at byte {begin} of the "
                                  f"buffer, but the tensors before it end at {position}: "
                                  f"{'they overlap' if begin < position else 'a gap'}; a "
                                  f"safetensors file's tensors tile its buffer exactly")
        position = end
    if position != buffer:
        raise CheckpointError(f"{what}: its tensors cover {position} of the {buffer} bytes "
                              f"after the header; a safetensors file's tensors tile its buffer "
                              f"exactly")
    return entries


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
