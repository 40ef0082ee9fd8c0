"""Which tracks a command line names: files, folders of them, and list files."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import soundfile as sf

from stemserve.errors import InputError
from stemserve.files import read_list

AUDIO_SUFFIXES = frozenset({f".{name.lower()}" for name in sf.available_formats()}
                           | {".aif", ".oga", ".opus"})
"""File name endings taken from a folder of tracks: what libsndfile reads, and MP3."""


def expand_tracks(items: Iterable[str | Path]) -> list[Path]:
    """The tracks that command-line items name: a file as is; a folder: the audio files in it
    (not its subfolders, hidden files skipped, sorted by name); ``@LIST``: the paths in a list
    file, one a line (``#`` comment lines skipped)."""
    tracks: list[Path] = []
    for item in items:
        path = Path(item)
        if str(item).startswith("@"):
            tracks += [Path(line) for line in read_list(Path(str(item)[1:]))]
        elif path.is_dir():
            found = sorted(child for child in path.iterdir()
                           if child.is_file() and not child.name.startswith(".")
                           and child.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise InputError(f"a folder without audio files (ending in "
                                 f"{', '.join(sorted(AUDIO_SUFFIXES))})", where=str(path))
            tracks += found
        else:
            tracks.append(path)
    return tracks


def unique_tracks(tracks: Iterable[str | Path]) -> list[Path]:
    """``tracks`` in order, each file once (however it was spelled)."""
    unique: dict[Path, Path] = {}
    for path in map(Path, tracks):
        unique.setdefault(path.resolve(), path)
    return list(unique.values())
