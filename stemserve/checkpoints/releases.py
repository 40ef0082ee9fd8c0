"""Release names, the torch side: a name to its files and URLs, and the release whose
configuration a plain state dict fits. The tables themselves are torch-free
(:mod:`stemserve.releases`), for the client."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import torch

from stemserve.checkpoints.fetch import _fetch, _url
from stemserve.errors import CheckpointError
from stemserve.defaults import SOURCES
from stemserve.model import Demucs
from stemserve.releases import BAGS, RELEASES, Release, RemoteFile, release_files


def checkpoint_url(name: str, *, base_url: str | None = None) -> str:
    """URL of the file of single-file release ``name`` on the mirror ``base_url``, else
    $STEMSERVE_CHECKPOINT_URL, else the official server.

    A mirror is flat (every file under its own name); a base without a scheme is a folder on
    this host (a mirror on disk or a shared mount), fetched as a ``file://`` URL with the
    same verification as a download.
    """
    return _url(_single_file(name), base_url)


def checkpoint_files(name: str) -> tuple[str, ...]:
    """The names of release ``name``'s files, in torch hub's cache and on a mirror."""
    return tuple(remote.name for remote in release_files(name))


def download_checkpoint(name: str, *, cache_dir: str | Path | None = None,
                        base_url: str | None = None, progress: bool = True) -> Path:
    """Path of single-file release ``name``'s verified file, downloaded only when the cache
    lacks it."""
    return _fetch(_single_file(name), cache_dir, base_url, progress)[0]


def _single_file(name: str) -> RemoteFile:
    files = release_files(name)
    if len(files) > 1:
        raise CheckpointError(f"{name!r} is a bag of {len(BAGS[name].models)} models in "
                              f"{len(files)} files ({', '.join(f.name for f in files)}); load "
                              f"it with load_bag(), list its files with checkpoint_files()")
    return files[0]


def _release_hint(state: Mapping[str, torch.Tensor], tried: str) -> str:
    """Which release configuration a plain state dict does fit, for its error message."""
    first = state.get("encoder.0.0.weight")
    detected = (f"its first encoder layer has {first.shape[0]} channels"
                if isinstance(first, torch.Tensor) and first.dim() == 3 else
                "it has no Demucs first encoder layer")
    fitting = [name for name in RELEASES if name != tried and _fits(RELEASES[name], state)]
    if fitting:
        return (f"{detected}, and it fits the configuration of {', '.join(fitting)}: try "
                f"--config {fitting[0]} (config={fitting[0]!r} in Python).")
    default = inspect.signature(Demucs).parameters["channels"].default
    by_channels: dict[int, list[str]] = {}
    for name, release in RELEASES.items():
        by_channels.setdefault(release.config.get("channels", default), []).append(name)
    releases = "; ".join(f"{', '.join(names)}: {channels} channels"
                         for channels, names in by_channels.items())
    return (f"{detected}, and no release configuration fits it ({releases}). Save it with "
            f"its configuration instead: torch.save({{'config': {{...Demucs arguments}}, "
            f"'state': state_dict}}, path)")


def _fits(release: Release, state: Mapping[str, torch.Tensor]) -> bool:
    with torch.device("meta"):
        model = Demucs(SOURCES, **release.config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        return False
    return True
