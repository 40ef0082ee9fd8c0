"""Loading: every release, bag YAML and checkpoint file as a :class:`Bag` of verified
models (a single model is a bag of one), so that callers handle them all alike."""
from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from stemserve.checkpoints.bounds import V2
from stemserve.checkpoints.build import DEFAULT_CONFIG, _from_loaded, _Loaded
from stemserve.checkpoints.fetch import _check_zip_crcs, _fetch, _sha256
from stemserve.checkpoints.hf import read_package
from stemserve.checkpoints.unpickle import _torch_load
from stemserve.errors import CheckpointError
from stemserve.models.families import segment_samples
from stemserve.releases import (BAGS, ROFORMER_RELEASES, BagRelease, is_bag_yaml,
                                is_release_name, msst_config_of, v2_file, v4_file)
from stemserve.releases import local_member as _local_member
from stemserve.releases import read_bag_yaml as _read_bag_yaml
from stemserve.spec import MAX_SEGMENT_SECONDS, MIN_SEGMENT_SECONDS, family_rule


@dataclass
class CheckpointInfo:
    """Where a model's weights came from.

    ``name`` is the release name, a bag member's signature or the file's stem; ``sha256`` the
    full hex digest of the file; ``family`` which class the model is (a key of
    :func:`stemserve.models.registry.by_name`: ``demucs`` for v2, ``demucs_v3``, ``hdemucs``,
    ``htdemucs``);
    ``config`` every argument that class was built with, as the file stores it (a bag's
    segment override is on the model, not here).
    """

    name: str
    path: Path
    sha256: str
    config: dict[str, Any]
    family: str = V2.name


@dataclass
class Bag:
    """Models whose outputs a separation averages with per-source weights, as demucs 4's
    ``BagOfModels``: every release and every file loads as one (a single model is a bag of
    one), so that callers handle them all alike.

    ``models`` are in eval mode (a model listed twice is the same object); ``infos`` go with
    them; ``weights`` hold one row of per-source weights per model (ones when the release
    gives none); ``segment`` is the release's override in seconds, or None. Like
    ``BagOfModels``, loading sets each v3/v4 model's ``segment`` to the override.
    """

    name: str
    models: list[torch.nn.Module]
    infos: list[CheckpointInfo]
    weights: list[list[float]]
    segment: float | None

    @property
    def sources(self) -> list[str]:
        return list(self.models[0].sources)

    @property
    def samplerate(self) -> int:
        return self.models[0].samplerate

    @property
    def audio_channels(self) -> int:
        return self.models[0].audio_channels


def load_model(name_or_path: str | Path, *, config: str | None = None,
               cache_dir: str | Path | None = None, base_url: str | None = None,
               progress: bool = True) -> tuple[torch.nn.Module, CheckpointInfo]:
    """One model in eval mode, from a single-model release name or a local checkpoint file.

    A string naming a release (:data:`KNOWN_MODELS`) downloads or reuses that release; any
    other value is a file in one of the :data:`.build._FORMATS`: a plain state dict is built
    with the release configuration ``config`` (default :data:`~.build.DEFAULT_CONFIG`); the
    other formats carry their own configuration. Bags of several models load with
    :func:`load_bag`.
    """
    if isinstance(name_or_path, str) and is_release_name(name_or_path):
        if name_or_path in BAGS and len(BAGS[name_or_path].models) > 1:
            raise CheckpointError(f"{name_or_path!r} is a bag of "
                                  f"{len(BAGS[name_or_path].models)} models; load it with "
                                  f"load_bag()")
    elif is_bag_yaml(Path(name_or_path)):
        raise CheckpointError(f"{name_or_path} is a bag of models; load it with load_bag()")
    bag = load_bag(name_or_path, config=config, cache_dir=cache_dir, base_url=base_url,
                   progress=progress)
    return bag.models[0], bag.infos[0]


def load_bag(name_or_path: str | Path, *, config: str | None = None,
             cache_dir: str | Path | None = None, base_url: str | None = None,
             progress: bool = True) -> Bag:
    """The :class:`Bag` of a release name, a local bag YAML or a local checkpoint file.

    A release downloads (or reuses) each of its files. A YAML file in demucs 4's format
    (``models: [signatures]``, optional ``weights:`` and ``segment:``) finds each model next
    to it, as ``<signature>.th`` or ``<signature>-<sha256 prefix>.th`` (demucs' ``LocalRepo``).
    Any other path is one checkpoint file: an MSST RoFormer's with its config.yaml
    (``config`` a YAML path, or the one beside it: :func:`~.msst.load_msst`), else read as
    :func:`load_model` reads it.
    """
    if isinstance(name_or_path, str) and is_release_name(name_or_path):
        return _release_bag(name_or_path, config, cache_dir, base_url, progress)
    path = Path(name_or_path)
    if is_bag_yaml(path):
        if config is not None:
            raise CheckpointError(f"config={config!r} applies to a single local file; the "
                                  f"models of the bag {path} carry their own configuration")
        return _local_bag(path)
    from stemserve.checkpoints.msst import load_msst  # it imports this module

    if msst_config_of(path, config) is not None:
        model, info, _ = load_msst(path, None if config is None else Path(config))
    else:
        model, info = _load_local(path, config, path.stem)
    return _bag(path.stem, [(model, info)], BagRelease((path.stem,)), str(path))


def _release_bag(name: str, config: str | None, cache_dir: str | Path | None,
                 base_url: str | None, progress: bool) -> Bag:
    """Release ``name``'s bag: every file fetched and verified first, then each loaded once."""
    if config not in (None, name):
        raise CheckpointError(f"config={config!r} applies to local files only; "
                              f"release {name!r} has its own configuration")
    if name in ROFORMER_RELEASES:
        from stemserve.checkpoints.msst import load_msst  # it imports this module

        files = ROFORMER_RELEASES[name]
        checkpoint = _fetch(files.checkpoint, cache_dir, base_url, progress)[0]
        config = _fetch(files.config, cache_dir, base_url, progress)[0]  # both verified
        model, info, _ = load_msst(checkpoint, config)
        info = replace(info, name=name)
        return _bag(name, [(model, info)], BagRelease((name,)), name)
    if name not in BAGS:
        path, sha256 = _fetch(v2_file(name), cache_dir, base_url, progress)  # sha256 verified
        loaded = _from_loaded(_torch_load(path, str(path)), name, str(path), config_given=False)
        return _bag(name, [_member(loaded, name, path, sha256)], BagRelease((name,)), name)
    release = BAGS[name]
    files = {signature: _fetch(v4_file(signature), cache_dir, base_url, progress)
             for signature in dict.fromkeys(release.models)}
    members = {}
    for signature, (path, sha256) in files.items():
        loaded = _from_loaded(_torch_load(path, str(path)), None, str(path), config_given=False)
        members[signature] = _member(loaded, name if len(files) == 1 else signature, path,
                                     sha256)
    return _bag(name, [members[signature] for signature in release.models], release, name)


def _local_bag(path: Path) -> Bag:
    """The bag of a demucs 4 YAML file, its models found next to it."""
    spec = _read_bag_yaml(path)
    files = {signature: _local_member(path, signature) for signature in dict.fromkeys(spec.models)}
    members = {signature: _load_local(file, None, signature, checksum)
               for signature, (file, checksum) in files.items()}
    return _bag(path.stem, [members[signature] for signature in spec.models], spec, str(path))


def _load_local(path: Path, config: str | None, name: str,
                checksum: str | None = None) -> tuple[torch.nn.Module, CheckpointInfo]:
    """A local checkpoint file's model: its name's sha256 prefix and zip CRCs checked first."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    sha256 = _sha256(path)
    if checksum is not None and not sha256.startswith(checksum):
        raise CheckpointError(f"{path} does not match the sha256 in its name: it starts with "
                              f"{sha256[:len(checksum)]}, the name says {checksum}; copy or "
                              f"download the file again")
    if path.suffix.lower() == ".safetensors":  # demucs 4.1.0's: it carries its configuration
        package = read_package(path)
    else:
        _check_zip_crcs(path)
        package = _torch_load(path, str(path))
    loaded = _from_loaded(package, config or DEFAULT_CONFIG, str(path),
                          config_given=config is not None)
    return _member(loaded, name, path, sha256)


def _member(loaded: _Loaded, name: str, path: Path,
            sha256: str) -> tuple[torch.nn.Module, CheckpointInfo]:
    return loaded.model.eval(), CheckpointInfo(name=name, path=path, sha256=sha256,
                                               config=loaded.config, family=loaded.family)


def _bag(name: str, members: list[tuple[torch.nn.Module, CheckpointInfo]], spec: BagRelease,
         what: str) -> Bag:
    """The bag of loaded ``members``, once they agree on what they separate, as
    ``BagOfModels`` checks; the segment override is set on the models, as it does."""
    models, infos = [model for model, _ in members], [info for _, info in members]
    first = models[0]

    def separates(model: torch.nn.Module) -> tuple[list[str], int, int]:
        return list(model.sources), model.samplerate, model.audio_channels

    for model, info in zip(models[1:], infos[1:]):
        for attribute, mine, theirs in zip(("sources", "samplerate", "audio_channels"),
                                           separates(first), separates(model)):
            if mine != theirs:
                raise CheckpointError(f"{what}: its models disagree on {attribute}: "
                                      f"{infos[0].name} has {mine!r}, {info.name} has "
                                      f"{theirs!r}; a bag averages models of the same sources, "
                                      f"sample rate and audio channels")
    v2 = [info.name for info in infos if not family_rule(info.family).shifts_around_split]
    if v2 and len(v2) < len(infos):
        raise CheckpointError(f"{what}: it mixes demucs 2 models ({', '.join(v2)}) with demucs "
                              f"3/4 models, which shift and split tracks differently; a bag "
                              f"averages models of one generation")
    if spec.segment is None:
        _check_segments(members, what)
    count = len(first.sources)
    weights = [[1.] * count for _ in models] if spec.weights is None else \
        [[float(w) for w in row] for row in spec.weights]
    for row in weights:
        if len(row) != count:
            raise CheckpointError(f"{what}: its weights have a row of {len(row)}, but its "
                                  f"models separate {count} sources "
                                  f"({', '.join(first.sources)})")
    silent = [source for index, source in enumerate(first.sources)
              if not sum(row[index] for row in weights)]
    if silent:
        raise CheckpointError(f"{what}: its weights give {', '.join(silent)} no model (a "
                              f"weight of 0 in every row)")
    if spec.segment is not None:
        for model, info in members:
            if family_rule(info.family).shifts_around_split:  # demucs 4 sets it on each model
                model.segment = spec.segment
    return Bag(name=name, models=models, infos=infos, weights=weights, segment=spec.segment)


def _check_segments(members: list[tuple[torch.nn.Module, CheckpointInfo]], what: str) -> None:
    """Refuse a bag whose models split tracks into segments of different lengths, which no
    backend serves (the pipeline refuses it too, for exports made before this check): the
    bag's YAML has to set one ``segment`` for all."""
    lengths = {info.name: segment_samples(model) for model, info in members}
    if len(set(lengths.values())) == 1:
        return
    rate = members[0][0].samplerate
    listed = ", ".join(f"{name}: {length / rate:g} s" for name, length in lengths.items())
    trained = [Fraction(model.segment) for model, info in members
               if family_rule(info.family).lengths == "fixed"]
    # demucs' own bound for a bag holding HTDemucs models (BagOfModels.max_allowed_segment):
    # no segment longer than the one they were trained on.
    bound = (f"{float(min(trained)):g}, the shortest training segment of its HTDemucs models"
             if trained else f"{MAX_SEGMENT_SECONDS}")
    raise CheckpointError(f"{what}: its models split tracks into segments of different lengths "
                          f"({listed}), and a bag's models are served on one; add "
                          f"'segment: N' to the bag's YAML, N seconds from {MIN_SEGMENT_SECONDS} to "
                          f"{bound}")
