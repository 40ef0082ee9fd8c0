"""The releases stemserve knows by name: their files, checksums and bags. No torch.

demucs 2.0.3's releases (``demucs/pretrained.py``) are one file each,
``<name>-<sha256 prefix>.th``; demucs 4.0.1's (``demucs/remote/files.txt`` and
``remote/<name>.yaml``) are bags of one to four models whose outputs are averaged, each model
a file ``<signature>-<sha256 prefix>.th``. The tables are what a release name means: the
checkpoint loader downloads and verifies by them, and the export cache keys a release's
export by them, without loading anything. The band-split RoFormers people use most
(:data:`ROFORMER_RELEASES`) are a weights file and its training config.yaml each.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from stemserve.errors import CheckpointError
from stemserve.spec import MAX_SEGMENT_SECONDS, MAX_SOURCES, MIN_SEGMENT_SECONDS
from stemserve.untrusted import TooLarge, brief, check_size

ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/v3.0/"
"""Where demucs 2.0.3's releases (:data:`RELEASES`) are."""
DEMUCS4_ROOT_URL = "https://dl.fbaipublicfiles.com/demucs/"
"""Where demucs 4.0.1's files are, each in the folder :data:`DEMUCS4_FILES` gives it."""

@dataclass(frozen=True)
class Release:
    """A pretrained model of the demucs 2.0.3 release.

    ``signature`` is the start of the file's sha256 and part of its name; ``config`` holds the
    :class:`Demucs` arguments besides ``sources``, as ``demucs/pretrained.py`` builds it.
    """

    signature: str
    config: Mapping[str, Any] = field(default_factory=dict)


RELEASES: dict[str, Release] = {
    "demucs": Release("e07c671f"),
    "demucs48_hq": Release("28a1282c", {"channels": 48}),
    "demucs_extra": Release("3646af93"),
    # Stored diffq-compressed; restored with DiffQuantizer(group_size=8, min_size=1).
    "demucs_quantized": Release("07afea75"),
    "demucs_unittest": Release("09ebc15f", {"channels": 4}),
}
# Released alongside, but they are ConvTasNet models, which stemserve does not implement.
UNSUPPORTED: dict[str, str] = {"tasnet": "beb46fac", "tasnet_extra": "df3777b2"}

# demucs 4.0.1's remote/files.txt: each model's signature -> (folder under DEMUCS4_ROOT_URL,
# the sha256 prefix in its file name <signature>-<prefix>.th).
DEMUCS4_FILES: dict[str, tuple[str, str]] = {
    # MDX models
    "0d19c1c6": ("mdx_final", "0f06f20e"),
    "5d2d6c55": ("mdx_final", "db83574e"),
    "7d865c68": ("mdx_final", "3d5dd56b"),
    "7ecf8ec1": ("mdx_final", "70f50cc9"),
    "a1d90b5c": ("mdx_final", "ae9d2452"),
    "c511e2ab": ("mdx_final", "fe698775"),
    "cfa93e08": ("mdx_final", "61801ae1"),
    "e51eebcc": ("mdx_final", "c1b80bdd"),
    "6b9c2ca1": ("mdx_final", "3fd82607"),
    "b72baf4e": ("mdx_final", "8778635e"),
    "42e558d4": ("mdx_final", "196e0e1b"),
    "305bc58f": ("mdx_final", "18378783"),
    "14fc6a69": ("mdx_final", "a89dd0ee"),
    "464b36d7": ("mdx_final", "e5a9386e"),
    "7fd6ef75": ("mdx_final", "a905dd85"),
    "83fc094f": ("mdx_final", "4a16d450"),
    "1ef250f1": ("mdx_final", "592467ce"),
    "902315c2": ("mdx_final", "b39ce9c9"),
    "9a6b4851": ("mdx_final", "03af0aa6"),
    "fa0cb7f9": ("mdx_final", "100d8bf4"),
    # Hybrid Transformer models
    "955717e8": ("hybrid_transformer", "8726e21a"),
    "f7e0c4bc": ("hybrid_transformer", "ba3fe64a"),
    "d12395a8": ("hybrid_transformer", "e57c48e6"),
    "92cfc3b6": ("hybrid_transformer", "ef3bcb9c"),
    "04573f0d": ("hybrid_transformer", "f3cf25b2"),
    "75fc33f5": ("hybrid_transformer", "1941ce65"),
    # Experimental 6 sources model
    "5c90dfd2": ("hybrid_transformer", "34c22ccb"),
}


@dataclass(frozen=True)
class BagRelease:
    """A demucs 4.0.1 release, ``demucs/remote/<name>.yaml``.

    ``models`` are signatures of :data:`DEMUCS4_FILES`; ``weights`` one row of per-source
    weights per model (None: all ones); ``segment`` the seconds that replace every model's own
    training segment (None: no override).
    """

    models: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...] | None = None
    segment: float | None = None


_ONE_EACH = ((1., 0., 0., 0.), (0., 1., 0., 0.), (0., 0., 1., 0.), (0., 0., 0., 1.))
_MDX_WEIGHTS = ((1., 1., 0., 0.), (0., 1., 0., 0.), (1., 0., 1., 1.), (1., 0., 1., 1.))
BAGS: dict[str, BagRelease] = {
    "htdemucs": BagRelease(("955717e8",)),
    "htdemucs_ft": BagRelease(("f7e0c4bc", "d12395a8", "92cfc3b6", "04573f0d"), _ONE_EACH),
    "htdemucs_6s": BagRelease(("5c90dfd2",)),
    "hdemucs_mmi": BagRelease(("75fc33f5",), segment=44),
    "mdx": BagRelease(("0d19c1c6", "7ecf8ec1", "c511e2ab", "7d865c68"), _MDX_WEIGHTS, 44),
    "mdx_extra": BagRelease(("e51eebcc", "a1d90b5c", "5d2d6c55", "cfa93e08"), segment=44),
    "mdx_q": BagRelease(("6b9c2ca1", "b72baf4e", "42e558d4", "305bc58f"), _MDX_WEIGHTS, 44),
    "mdx_extra_q": BagRelease(("83fc094f", "464b36d7", "14fc6a69", "7fd6ef75"), segment=44),
    "repro_mdx_a": BagRelease(("9a6b4851", "1ef250f1", "fa0cb7f9", "902315c2"), segment=44),
    "repro_mdx_a_hybrid_only": BagRelease(("fa0cb7f9", "902315c2", "fa0cb7f9", "902315c2"),
                                          segment=44),
    "repro_mdx_a_time_only": BagRelease(("9a6b4851", "9a6b4851", "1ef250f1", "1ef250f1"),
                                        segment=44),
}


class RemoteFile(NamedTuple):
    """A release file: its name (in the cache and on a mirror), the sha256 prefix its content
    must have, and its official URL."""

    name: str
    checksum: str
    url: str


@dataclass(frozen=True)
class RoformerRelease:
    """A RoFormer checkpoint as UVR and audio-separator publish it: the weights and the
    training config.yaml that goes with them (:mod:`stemserve.checkpoints.msst`), each
    verified by its whole sha256. ``title`` says whose model it is, for users."""

    title: str
    checkpoint: RemoteFile
    config: RemoteFile


UVR_MODELS_URL = "https://github.com/TRvlvr/model_repo/releases/download/all_public_uvr_models/"
"""Where UVR and audio-separator download the public RoFormer checkpoints (its
``models.json`` / UVR's ``download_checks.json`` name them)."""
AUDIO_SEPARATOR_CONFIGS_URL = ("https://github.com/nomadkaraoke/python-audio-separator/"
                               "releases/download/model-configs/")
"""Where audio-separator keeps the RoFormers' config.yaml files."""


def _uvr(checkpoint: str, sha256: str, config: str, config_sha256: str, title: str,
         checkpoint_url: str = UVR_MODELS_URL, config_url: str = AUDIO_SEPARATOR_CONFIGS_URL
         ) -> RoformerRelease:
    return RoformerRelease(title, RemoteFile(checkpoint, sha256, checkpoint_url + checkpoint),
                           RemoteFile(config, config_sha256, config_url + config))


ROFORMER_RELEASES: dict[str, RoformerRelease] = {
    # The checksums: the Hugging Face LFS object ids as bs-roformer-infer 0.1.5 and
    # melband-roformer-infer 0.1.5 pin them (data/checksums.json), and the sha256 pins of
    # another public project for viperx's model and both configs, which agree where both
    # list a file. viperx's BS-RoFormer 1296 (ep_368) is left out: no published sha256.
    "bs_roformer_1297": _uvr(
        "model_bs_roformer_ep_317_sdr_12.9755.ckpt",
        "5b84f37e8d444c8cb30c79d77f613a41c05868ff9c9ac6c7049c00aefae115aa",
        "model_bs_roformer_ep_317_sdr_12.9755.yaml",
        "2bfdd16c656bd9519aba757cc4f8834b7ede675eb1e00ec4772d74ae1c41af7f",
        "BS-RoFormer 1297 by viperx (vocals, instrumental)"),
    "mel_band_roformer_kim": _uvr(
        "vocals_mel_band_roformer.ckpt",
        "87201f4d31afb5bc79993230fc49446918425574db48c01c405e44f365c7559e",
        "vocals_mel_band_roformer.yaml",
        "b958b29c8f7195f0d86bee6759a33980db675c4ecaf2fcaa80fa125828e6cd38",
        "Mel-Band RoFormer by Kimberley Jensen (vocals, instrumental)"),
    "bs_roformer_sw": _uvr(
        "BS-Rofo-SW-Fixed.ckpt",
        "24e7d35ee9c64415673d3fd33e06a67cac2c103c5df6267ba1576459c775916e",
        "BS-Rofo-SW-Fixed.yaml",
        "f9fada9f94e5ba2d2e4600196299459294bc5f532b314c209cc156ac63e4329b",
        "BS-RoFormer SW by jarredou, fixed (6 stems)",
        checkpoint_url="https://huggingface.co/enerjazzer/BS-ROFO-SW-Fixed/resolve/main/",
        config_url="https://huggingface.co/enerjazzer/BS-ROFO-SW-Fixed/resolve/main/"),
}
"""The RoFormer releases stemserve knows by name (``-n bs_roformer_1297``)."""
KNOWN_MODELS: tuple[str, ...] = (*RELEASES, *BAGS, *ROFORMER_RELEASES)


def is_release_name(text: str) -> bool:
    """Release names win; anything that could be a file is a file; the rest is a bad name."""
    if text in RELEASES or text in UNSUPPORTED or text in BAGS or text in ROFORMER_RELEASES:
        return True
    return not (Path(text).exists() or Path(text).suffix or "/" in text or os.sep in text)


def is_bag_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def release(name: str) -> Release:
    """demucs 2.0.3's release ``name``; a clear error for a ConvTasNet or unknown name."""
    if name in UNSUPPORTED:
        raise CheckpointError(f"{name!r} is a ConvTasNet model, which stemserve does not "
                              f"support; supported models: {', '.join(KNOWN_MODELS)}")
    try:
        return RELEASES[name]
    except KeyError:
        raise CheckpointError(f"unknown model {name!r}; known models: "
                              f"{', '.join(KNOWN_MODELS)}, or a checkpoint file "
                              "(-n my_model.th [--config RELEASE]) or an export folder") \
            from None


def v2_file(name: str) -> RemoteFile:
    signature = release(name).signature
    file_name = f"{name}-{signature}.th"
    return RemoteFile(file_name, signature, ROOT_URL + file_name)


def v4_file(signature: str) -> RemoteFile:
    """demucs 4's file of ``signature``, named as ``torch.hub`` names it in the cache."""
    folder, checksum = DEMUCS4_FILES[signature]
    file_name = f"{signature}-{checksum}.th"
    return RemoteFile(file_name, checksum, f"{DEMUCS4_ROOT_URL}{folder}/{file_name}")


def release_files(name: str) -> list[RemoteFile]:
    """Each distinct file of release ``name``, in the order of its models."""
    if name in BAGS:
        return [v4_file(signature) for signature in dict.fromkeys(BAGS[name].models)]
    if name in ROFORMER_RELEASES:
        return [ROFORMER_RELEASES[name].checkpoint, ROFORMER_RELEASES[name].config]
    return [v2_file(name)]


# --------------------------------------------------------------------------- local bags

_MAX_BAG_MODELS = 16  # the releases have 1 or 4
_MAX_BAG_YAML = 64 << 10
# Items of a bag YAML counted as a tree (YAML aliases each time they are reached): the
# largest bag loaded (16 models, 16 rows of 8 weights) has under 200.
_MAX_BAG_ITEMS = 1000
_BAG_KEYS = ("models", "weights", "segment")
# A model's signature in a bag: part of a file name, so no separators, dots or dashes.
_SIGNATURE = re.compile(r"[A-Za-z0-9_]{1,64}")
_HEX = re.compile(r"[0-9a-f]{1,64}")


def is_number(value: Any, *, integer: bool = False) -> bool:
    """A finite int (or float, unless ``integer``); bools and tensors are not numbers here.

    An int is always finite: ``math.isfinite`` overflows on one past a float's range, which
    a pickle or a YAML hex number spells in a few hundred bytes."""
    return (isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value)))


def is_segment(value: Any) -> bool:
    """Seconds, as a finite number or a ``Fraction`` (htdemucs: 39/5), within the bounds."""
    return ((is_number(value) or isinstance(value, Fraction))
            and MIN_SEGMENT_SECONDS <= value <= MAX_SEGMENT_SECONDS)


SEGMENTS = f"seconds from {MIN_SEGMENT_SECONDS} to {MAX_SEGMENT_SECONDS}"


def read_bag_yaml(path: Path) -> BagRelease:
    """A bag YAML's models, weights and segment, their types and counts checked."""
    try:
        if path.stat().st_size > _MAX_BAG_YAML:
            raise CheckpointError(f"{path} is over {_MAX_BAG_YAML >> 10} KiB, which no bag of "
                                  f"models needs")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the bag of models {path}: {exc}") from exc
    try:
        import yaml
    except ImportError as exc:
        raise CheckpointError(f"{path} is a bag of models in YAML; reading it needs PyYAML "
                              f"(pip install pyyaml)") from exc
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise CheckpointError(f"{path} nests deeper than YAML can be read; a bag of models "
                              f"is 3 levels deep") from None
    except ValueError as exc:  # an integer past Python's 4300 digits
        raise CheckpointError(f"{path} holds a value that cannot be read ({exc})") from None
    try:
        check_size(spec, _MAX_BAG_ITEMS)
    except TooLarge:
        raise CheckpointError(f"{path} holds more than {_MAX_BAG_ITEMS} items (YAML aliases "
                              f"counted each time they are used), which no bag of models "
                              f"needs") from None
    if not isinstance(spec, dict) or "models" not in spec:
        raise CheckpointError(f"{path} is not a bag of models: demucs 4's format is a mapping "
                              f"with 'models' (a list of signatures) and optional 'weights' "
                              f"and 'segment'")
    unknown = [key for key in spec if key not in _BAG_KEYS]
    if unknown:
        raise CheckpointError(f"{path}: unknown key {brief(unknown[0])}; a bag of models has "
                              f"{', '.join(_BAG_KEYS)}")
    models, weights, segment = spec["models"], spec.get("weights"), spec.get("segment")
    check_bag(models, weights, segment, str(path))
    return BagRelease(tuple(models), None if weights is None else
                      tuple(tuple(row) for row in weights), segment)


def check_bag(models: Any, weights: Any, segment: Any, what: str) -> None:
    """Bound what a bag YAML lists before any model is loaded."""
    if not (isinstance(models, (list, tuple)) and 1 <= len(models) <= _MAX_BAG_MODELS
            and all(isinstance(s, str) and _SIGNATURE.fullmatch(s) for s in models)):
        raise CheckpointError(f"{what}: models={brief(models)} is not a list of 1 to "
                              f"{_MAX_BAG_MODELS} signatures (letters, digits and _)")
    if weights is not None and not (
            isinstance(weights, (list, tuple)) and len(weights) == len(models)
            and all(isinstance(row, (list, tuple)) and 1 <= len(row) <= MAX_SOURCES
                    and all(is_number(w) and w >= 0 for w in row) for row in weights)):
        raise CheckpointError(f"{what}: weights={brief(weights)} is not one row of per-source "
                              f"weights (numbers >= 0) for each of its {len(models)} models")
    if segment is not None and not is_segment(segment):
        raise CheckpointError(f"{what}: segment={brief(segment)} is out of bounds: stemserve "
                              f"loads {SEGMENTS} (the releases use 44)")


def local_member(bag: Path, signature: str) -> tuple[Path, str | None]:
    """The file of ``signature`` next to ``bag`` and the sha256 prefix its name gives, if any:
    ``<signature>.th`` or ``<signature>-<sha256 prefix>.th``, as demucs 4's LocalRepo, or
    ``<signature>.safetensors``, as demucs 4.1.0's Hugging Face repositories hold them."""
    folder = bag.parent
    found = []
    for file in sorted([*folder.glob(f"{signature}*.th"),
                        *folder.glob(f"{signature}.safetensors")]):
        head, dash, checksum = file.stem.partition("-")
        if head == signature and (not dash or _HEX.fullmatch(checksum)):
            found.append((file, checksum or None))
    if not found:
        raise CheckpointError(f"{bag}: model {signature!r} has no file next to it: put "
                              f"{signature}.th, {signature}-<sha256 prefix>.th or "
                              f"{signature}.safetensors (demucs 4.1.0's) into {folder}")
    if len(found) > 1:
        raise CheckpointError(f"{bag}: model {signature!r} has {len(found)} files in {folder} "
                              f"({', '.join(file.name for file, _ in found)}); keep one")
    return found[0]


MSST_CONFIG_SUFFIXES = (".yaml", ".yml")
"""The config beside ``<name>.ckpt`` is ``<name>.yaml``, else ``<name>.yml``."""
MSST_WEIGHTS_SUFFIXES = (".ckpt", ".safetensors")
"""Weights files that are MSST's, never demucs' (``.pth`` may be either)."""


def msst_config_of(checkpoint: Path, config: str | None) -> Path | None:
    """The training config.yaml that makes ``checkpoint`` an MSST RoFormer's, or None for a
    Demucs file: ``config`` when it names a YAML file, else ``<name>.yaml`` (or ``.yml``)
    beside it; for a ``.ckpt`` or ``.safetensors`` file without one, the path where it
    belongs (which does not exist: the loader says so)."""
    if config is not None:
        return Path(config) if Path(config).suffix.lower() in MSST_CONFIG_SUFFIXES else None
    beside = [Path(checkpoint).with_suffix(suffix) for suffix in MSST_CONFIG_SUFFIXES]
    found = next((path for path in beside if path.is_file()), None)
    if found is None and Path(checkpoint).suffix.lower() in MSST_WEIGHTS_SUFFIXES \
            and not is_demucs_safetensors(Path(checkpoint)):
        return beside[0]
    return found


_MAX_PEEK = 1 << 20  # a demucs 4.1.0 file's header: its tensors' names, shapes and arguments


def is_demucs_safetensors(path: Path) -> bool:
    """Whether ``path`` is a demucs 4.1.0 model file: safetensors whose metadata names the
    model's class (``klass``), as demucs' ``tools/export_hf.py`` writes them. Only the
    header is read, up to a bound; anything else is not one."""
    try:
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if not 0 < length <= _MAX_PEEK:
                return False
            header = json.loads(file.read(length))
    except (OSError, ValueError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and "klass" in metadata
