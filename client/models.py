"""Which model a name means, and its one export: exports keyed by what made them.

A name is an export folder (used as it is), a release name, a bag YAML or a checkpoint
file. Every one but a folder has its export under the export root in a folder named
``<name>-<key prefix>``; the key is the sha256 of everything that shaped the graph: the
release and its files' checksums, or the content of a local file (of a bag YAML and each of
its models), the configuration and the segment. So two files of one name never share an
export, a changed file is always noticed (by content, not by time), and a release name only
ever means the release's own files. ``source.json`` in the folder holds the whole key and
what it describes; the folders of stemserve before content keys are never used.

The one module of the client that may reach PyTorch, and only lazily: a name whose export
exists needs none; a release or a checkpoint without one is loaded (and exported once,
into the cache) with the ``export`` extra.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from stemserve.defaults import export_root
from stemserve.errors import CheckpointError, ModelError, StemserveError
from stemserve.files import atomic_write, file_sha256, temporary_name
from stemserve.precision import Precision, check_precision, row
from stemserve.releases import (KNOWN_MODELS, UNSUPPORTED, is_bag_yaml, is_release_name,
                                local_member, msst_config_of, read_bag_yaml, release,
                                release_files)
from stemserve.spec import has_precision, is_export, load_export
from stemserve.untrusted import brief, is_safe_name, safe_name

if TYPE_CHECKING:
    from stemserve.checkpoints import Bag, CheckpointInfo

logger = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
"""What an export under the export root was made from (:class:`ModelSource`), written last."""
KEY_VERSION = 1
"""Part of every key: raise it when the exporter's graphs change, so old exports are made
again instead of served."""
KEY_PREFIX = 12
"""Hex digits of the key in an export folder's name (the whole key is in source.json)."""
_MAX_SOURCE_CHARS = 1 << 16
SourceKind = Literal["release", "file", "bag"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What an export is made of, known before anything is loaded; its :attr:`key`.

    ``files`` are ``(file name, sha256)``: a release's files with the checksum their name
    carries (every download is verified against it), a local file with its whole digest, a
    bag YAML and then each of its models. ``path`` is where a local file was (shown, not
    keyed: a copy elsewhere is the same model).
    """

    kind: SourceKind
    name: str
    files: tuple[tuple[str, str], ...]
    config: str | None = None
    segment: float | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        """Also the check of a ``source.json`` read back: its fields become a folder name."""
        if self.kind not in ("release", "file", "bag"):
            raise ModelError(f"unknown model source kind {brief(self.kind)}")
        if not is_safe_name(self.name) or (self.config is not None
                                           and not is_safe_name(self.config)):
            raise ModelError(f"model name {brief(self.name)} or configuration "
                             f"{brief(self.config)} is not a plain name")
        if not (1 <= len(self.files) <= 64 and all(
                isinstance(name, str) and isinstance(digest, str) and len(name) <= 256
                and len(digest) <= 64 for name, digest in self.files)):
            raise ModelError(f"model files {brief(self.files)} are not (name, sha256) pairs")
        if self.segment is not None and not (isinstance(self.segment, (int, float))
                                             and math.isfinite(self.segment)):
            raise ModelError(f"segment {brief(self.segment)} is not a number of seconds")

    @property
    def key(self) -> str:
        """The sha256 of everything that shapes the export (not :attr:`path`)."""
        shaped = {"version": KEY_VERSION, "kind": self.kind, "name": self.name,
                  "files": [list(pair) for pair in self.files], "config": self.config,
                  "segment": self.segment}
        return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()

    @property
    def folder(self) -> Path:
        """This model's export folder under the export root."""
        return export_root() / f"{self.name}-{self.key[:KEY_PREFIX]}"

    def describe(self) -> str:
        """One line: what the export is of, for a user choosing between them."""
        if self.kind == "release":
            return f"release {self.name}"
        what = "bag YAML" if self.kind == "bag" else "local file"
        return (f"{what} {self.path or self.name}, sha256 {self.files[0][1][:8]}"
                + (f", --config {self.config}" if self.config else ""))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["files"] = [list(pair) for pair in self.files]
        data["key"] = self.key
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> "ModelSource | None":
        """The source of an export folder, if it has a readable one that matches its key."""
        path = Path(folder) / SOURCE_FILE
        try:
            if path.stat().st_size > _MAX_SOURCE_CHARS:
                return None
            data = json.loads(path.read_text())
            source = cls(kind=data["kind"], name=data["name"],
                         files=tuple((str(name), str(digest)) for name, digest in data["files"]),
                         config=data.get("config"), segment=data.get("segment"),
                         path=str(data["path"]) if data.get("path") is not None else None)
        except (OSError, ValueError, KeyError, TypeError, StemserveError):
            return None
        return source if data.get("key") == source.key else None


def model_source(model: str | Path, config: str | None = None,
                 segment: float | None = None) -> ModelSource:
    """What ``model`` (a release name, bag YAML or checkpoint file) is, by content.

    A local file is read once for its sha256 (about a second per GB). ``config`` is the
    release configuration of a plain state dict; ``segment`` an export's segment in seconds
    (None: the model's own).
    """
    text = str(model)
    if is_release_name(text):
        if text not in KNOWN_MODELS:
            release(text)  # the error for a ConvTasNet or unknown name
        if config not in (None, text):
            raise CheckpointError(f"--config {config} applies to local files only; release "
                                  f"{text!r} has its own configuration")
        return ModelSource("release", text,
                           tuple((file.name, file.checksum) for file in release_files(text)),
                           segment=segment)
    path = Path(model)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    name = safe_name(path.stem)
    if is_bag_yaml(path):
        if config is not None:
            raise CheckpointError(f"--config {config} applies to a single local file; the "
                                  f"models of the bag {path} carry their own configuration")
        members = [local_member(path, signature)[0]
                   for signature in dict.fromkeys(read_bag_yaml(path).models)]
        files = [(path.name, file_sha256(path))] + [(file.name, file_sha256(file))
                                                    for file in members]
        return ModelSource("bag", name, tuple(files), segment=segment,
                           path=str(path.resolve()))
    msst_config = _msst_config(path, config)
    if msst_config is not None:  # the YAML shapes the network: keyed by its content too
        return ModelSource("file", name, ((path.name, file_sha256(path)),
                                          (msst_config.name, file_sha256(msst_config))),
                           segment=segment, path=str(path.resolve()))
    return ModelSource("file", name, ((path.name, file_sha256(path)),), config=config,
                       segment=segment, path=str(path.resolve()))


def _msst_config(path: Path, config: str | None) -> Path | None:
    """The config.yaml of a RoFormer checkpoint, checked to exist; None for a Demucs file."""
    found = msst_config_of(path, config)
    if found is not None and not found.is_file():
        raise CheckpointError(f"no model configuration at {found}: a RoFormer checkpoint needs "
                              "its training config.yaml, beside it as <name>.yaml or named "
                              "with --config")
    return found


def find_export(source: ModelSource) -> Path | None:
    """The finished export of ``source`` under the export root, if there is one."""
    folder = source.folder
    found = ModelSource.read(folder) if is_export(folder) else None
    return folder if found is not None and found.key == source.key else None


def export_dir_for(model: str | Path, config: str | None = None,
                   precision: str = "fp32") -> Path:
    """An ONNX export of ``model`` with its ``precision`` variant: the folder itself, its
    export under the export root, or a new one made there (once, with PyTorch).

    ``config`` is the release whose configuration a plain state-dict file has. A bag of
    models exports every model. A variant made from the fp32 export (int8, bf16) is added
    to it once (:func:`add_variant`).
    """
    folder, source = _resolve(model, config)
    if folder is None:
        folder = export_model(model, config, source=source)[0]
    add_variant(folder, precision)
    return folder


def add_variant(export_dir: Path, precision: str) -> None:
    """Add the ``precision`` variant to an export, once, where it is made from the fp32
    export (:data:`~stemserve.precision.PRECISIONS`' ``make``): ``quantize`` runs ONNX
    Runtime's quantizer (no PyTorch), ``sidecar`` writes the sidecar that sends the fp32
    graph to another runtime. One the export itself writes (fp16) is only checked for."""
    make = row(precision).make
    if has_precision(export_dir, precision) or make == "export":
        return
    if make == "quantize":
        from stemserve.export.quantize import quantize_export

        logger.info("quantizing %s to %s (once)", export_dir, precision)
        quantize_export(export_dir)
    elif make == "sidecar":
        from stemserve.export.bf16 import bf16_export

        bf16_export(export_dir)
    else:
        raise ModelError(f"no way to make the {precision} variant ({make!r})")


MemberCallback = Callable[[int, int, "CheckpointInfo"], None]


def export_model(model: str | Path, config: str | None = None, *,
                 segment: float | None = None, out: Path | None = None,
                 precisions: Iterable[str] = (), source: ModelSource | None = None,
                 on_member: MemberCallback | None = None,
                 portable: bool = False) -> tuple[Path, Bag]:
    """Export ``model`` (every model of a bag) to ONNX with its ``precisions`` variants
    besides fp32: into ``out``, or into its keyed folder under the export root; the folder
    and the loaded :class:`Bag`. The one export orchestration, for the command line and
    :func:`export_dir_for`. ``portable``: standard ONNX operators only (for TensorRT),
    without ONNX Runtime's fused attention (:mod:`stemserve.export.attention`).

    The keyed folder is written under a temporary name and renamed when complete, so a
    reader never finds half an export and two runs never write into one folder.
    ``segment`` is in seconds (None: the model's own).
    """
    wanted = {check_precision(name) for name in precisions}
    source = source or model_source(model, config, segment)
    bag = load_models(model, config)
    from stemserve.export.to_onnx import export_bag  # torch is there: the load needed it

    target = Path(out) if out is not None else source.folder
    logger.info("exporting %s to ONNX in %s (%s): tracing %s, about a minute per full-size "
                "model", model, target, source.describe(),
                "it" if len(bag.models) == 1 else f"its {len(bag.models)} models")
    start = time.perf_counter()
    segment_length = None if segment is None else round(segment * bag.samplerate)
    writing = target if out is not None else _fresh_folder(target)
    try:
        export_bag(bag, writing, segment_length=segment_length,
                   fp16=Precision.FP16 in wanted, on_member=on_member, portable=portable)
        for precision in sorted(wanted - {Precision.FP32, Precision.FP16}):
            add_variant(writing, precision)
        with atomic_write(writing / SOURCE_FILE, "w") as file:
            file.write(source.to_json())
        if out is None:
            _put_in_place(writing, target)
    finally:
        if writing != target:
            shutil.rmtree(writing, ignore_errors=True)
    logger.info("exported %s in %.1f s", model, time.perf_counter() - start)
    return target, bag


def _fresh_folder(target: Path) -> Path:
    """An empty folder beside ``target`` that no reader takes for an export."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = temporary_name(target)
    folder.mkdir()
    return folder


def _put_in_place(folder: Path, target: Path) -> None:
    """Rename the finished export ``folder`` to ``target``, replacing an earlier one (a
    partial export left by a killed run, or one made again with ``stemserve export``)."""
    if target.exists():
        aside = temporary_name(target)
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, target)


def keyed_exports() -> list[tuple[Path, ModelSource]]:
    """Every finished export under the export root with its source, by folder name.

    Folders of stemserve before content keys (no ``source.json``) are never used: a note
    names them once, so a user can delete them.
    """
    found, unkeyed = [], []
    for folder in sorted(export_root().glob("*/")):
        if folder.name.startswith(".") or not is_export(folder):
            continue
        source = ModelSource.read(folder)
        if source is not None and source.folder == folder:
            found.append((folder, source))
        else:
            unkeyed.append(folder.name)
    unkeyed = [name for name in unkeyed if name not in _told_unkeyed]
    if unkeyed:
        _told_unkeyed.update(unkeyed)
        logger.info("ignoring %d export folder(s) in %s not keyed by content (made by an "
                    "earlier stemserve, or renamed): %s; delete them", len(unkeyed),
                    export_root(), ", ".join(unkeyed[:5]) + (" ..." if len(unkeyed) > 5 else ""))
    return found


_told_unkeyed: set[str] = set()
"""Unkeyed folders already named in a note (the web page lists exports on every visit)."""


def local_export(model: str | Path | None, config: str | None = None) -> Path | None:
    """The export ``model`` names, without making one: the folder itself, the one export of
    a local model of that name (a name that is no release), or the keyed export of a
    release or file if there is one."""
    return None if model is None else _resolve(model, config)[0]


def _resolve(model: str | Path, config: str | None) -> tuple[Path | None, ModelSource | None]:
    """The export of ``model`` if there is one, and its source when it is not a folder."""
    if is_export(Path(model)):
        return Path(model), None
    text = str(model)
    if is_release_name(text) and text not in KNOWN_MODELS and text not in UNSUPPORTED:
        named = [folder for folder, source in keyed_exports()
                 if source.kind != "release" and source.name == text]
        if len(named) > 1:
            raise ModelError(f"{len(named)} exports are named {text!r} ("
                             + "; ".join(f"{folder}: {source.describe()}" for folder, source
                                         in keyed_exports() if folder in named)
                             + "): name one by its folder or by its checkpoint file")
        if named:
            return named[0], None
    source = model_source(model, config)
    return find_export(source), source


def served_mismatch(model: str | Path, config: str | None, served: Any) -> str | None:
    """Why the model a server serves (its ``spec``) is not ``model``, or None when it is.

    A release is recognised by name; a local file, bag YAML or export folder by content
    (the served checkpoint's sha256), so another file of the same name is caught.
    """
    if is_export(Path(model)):
        layout = load_export(Path(model))
        expected = layout.spec if len(layout.members) == 1 else None
        if expected is not None and expected.checkpoint_sha256 == served.checkpoint_sha256:
            return None
        if expected is None and layout.bag.name == served.checkpoint:
            return None
        wanted = f"the export {model}"
    else:
        source = model_source(model, config)
        if source.kind == "release" and source.name == served.checkpoint:
            return None
        if source.kind == "file" and source.files[0][1] == served.checkpoint_sha256:
            return None
        if source.kind == "bag" and source.name == served.checkpoint:
            return None
        wanted = (f"'{source.name}'" if source.kind == "release" else
                  f"{source.path} (sha256 {source.files[0][1][:8]})")
    return (f"serves '{served.checkpoint}' (sha256 {served.checkpoint_sha256[:8]}, "
            f"{served.family}), not {wanted}: serve that model, or leave -n/--model out")


def load_models(model: str | Path, config: str | None = None) -> Bag:
    """The :class:`~stemserve.checkpoints.Bag` (of one, for a single model) of a release
    name, bag YAML or checkpoint file, with clear errors."""
    try:
        from stemserve.checkpoints import load_bag
    except ImportError as err:
        raise ModelError(f"loading a checkpoint needs PyTorch ({err}); install "
                         "'stemserve[export]' or use --backend triton", where=str(model)) \
            from None
    try:
        return load_bag(str(model), config=config)
    except CheckpointError as err:
        raise err.about(f"model {model}") from None
