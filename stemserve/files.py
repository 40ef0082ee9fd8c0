"""Files written so that no reader ever sees half of one, and files known by their content.

Everything stemserve writes for others to find (stems, checkpoints, exports, job records,
zips) is first written under a hidden temporary name in the target's folder, then renamed
into place. A temporary name carries the writer's process id, so a later run can tell the
leftovers of a killed process (collected by :func:`collect_stale_parts`) from the work of
a live one. Several files that belong together (the stems of a track) are committed all or
none by :func:`commit_all`.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import IO, Iterator, Mapping

from stemserve.errors import StemserveError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_PART = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.part$")
"""Temporary names: ``.<name>.<pid>-<token>.part``."""


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(target: Path) -> Path:
    """A hidden name next to ``target`` that no one mistakes for a finished file, unique to
    this process and call."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.part")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside ``target``, for writers that open files themselves (ONNX,
    zip); on a clean exit it replaces ``target``, on an exception it is removed and
    ``target`` is left as it was."""
    target = Path(target)
    temporary = temporary_name(target)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(target: str | Path, mode: str = "wb", **open_args) -> Iterator[IO]:
    """:func:`atomic_path` with the temporary file opened in ``mode``."""
    with atomic_path(target) as temporary, \
            open(temporary, mode.replace("w", "x"), **open_args) as file:
        yield file


def commit_all(moves: Mapping[Path, Path]) -> None:
    """Rename every ``temporary -> target`` in ``moves``, all or none.

    Targets that exist are first moved aside; if any rename fails, the targets already
    placed are removed and the ones moved aside are put back, so the caller sees the old
    files or all new ones, never a mix. Raises the ``OSError`` of the failed rename.
    """
    placed: list[Path] = []
    aside: dict[Path, Path] = {}
    try:
        for temporary, target in moves.items():
            if target.is_dir() and not target.is_symlink():
                raise IsADirectoryError(f"{target} is a folder")
            if target.exists() or target.is_symlink():
                backup = temporary_name(target)
                os.replace(target, backup)
                aside[target] = backup
            os.replace(temporary, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        for target, backup in aside.items():
            try:
                os.replace(backup, target)
            except OSError as err:  # leave it where the user can find it
                logger.error("could not restore %s from %s: %s", target, backup, err)
        raise
    for backup in aside.values():
        backup.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_stale_parts(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` whose writer process is gone.

    A process killed without a chance to clean up (SIGKILL, power loss) leaves them; the
    next run that writes into the same folder removes them. Returns what it removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _PART.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # another run collected it first
    if removed:
        logger.info("removed %d temporary file(s) left in %s by an interrupted run",
                    len(removed), folder)
    return removed


def read_list(path: Path) -> list[str]:
    """The lines of a list file (Triton endpoints, or tracks for ``separate``), stripped,
    less blank lines and ``#`` comment lines."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise StemserveError(f"cannot read the list: {err}", where=str(path)) from None
    return [line for line in map(str.strip, text.splitlines())
            if line and not line.startswith("#")]
