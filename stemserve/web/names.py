"""What users see of the server's files: labels instead of paths, in both directions.

An uploaded file name (or the legacy API's ``file_name``) may be ``../../etc/passwd``: it
becomes a label, shown on the page and used for download names, never a path. The other
way round, errors shown to users name the upload by its label and lose the server's own
paths.
"""
from __future__ import annotations

import re
from pathlib import Path

from stemserve.errors import StemserveError

AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg",
               ".ogg": "audio/ogg", ".oga": "audio/ogg", ".opus": "audio/ogg",
               ".aif": "audio/aiff", ".aiff": "audio/aiff", ".au": "audio/basic",
               ".w64": "audio/x-w64", ".rf64": "audio/x-rf64", ".caf": "audio/x-caf"}
"""The stored upload keeps its extension only when it is one of these (libsndfile reads some
formats by extension); anything else is stored without one. Served with these types."""
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"<>]+")
TRAILING = ".,:;)]"


def display_name(name: str | None) -> str:
    """The uploaded name as a label: its last path part, printable, at most 200 characters."""
    last = re.split(r"[/\\]", name or "")[-1]
    label = "".join(char for char in last if char.isprintable()).strip()[:200]
    return label if label.strip(".") else "track"


def download_stem(name: str) -> str:
    """A file name stem for downloads made from a label: letters, digits, ``._-``."""
    return re.sub(r"[^\w.-]+", "_", Path(name).stem).strip("._") or "track"


def upload_name(name: str) -> str:
    """The server's name for an upload: ``upload`` with the original audio extension."""
    suffix = Path(name).suffix.lower()
    return "upload" + (suffix if suffix in AUDIO_TYPES else "")


def media_type(path: Path) -> str:
    """The type an audio file is served with, from its extension."""
    return AUDIO_TYPES.get(path.suffix, "application/octet-stream")


def public_error(err: StemserveError, labels: dict[Path, str]) -> str:
    """``err`` as a user who should not learn the server's paths sees it.

    The file it is about (its ``where``) is shown by its label when it is one of ``labels``
    (the upload: its file name; the job's folder: "job"); any other absolute path, there or
    in the message, is cut to ``…/<last part>``, which still says what it is.
    """
    where = err.where
    if where is not None:
        where = next((label for path, label in labels.items() if Path(where) == path), where)
    text = f"{where}: {err.message}" if where else err.message

    def shorten(match: re.Match[str]) -> str:
        path = match.group()
        core = path.rstrip(TRAILING)
        return "…/" + (Path(core).name or "") + path[len(core):]

    return ABSOLUTE_PATH.sub(shorten, text)
