"""Downloading and caching checkpoint files: torch hub's cache, mirrors, sha256 and zip CRCs.

Every file is checked against the sha256 prefix in its name before use, exactly like
``torch.hub`` does, and lands in torch hub's checkpoint folder under the name demucs itself
gives it, so an existing cache is reused. A local file is checked against the CRCs of its zip
records instead, which torch does not read.
"""
from __future__ import annotations

import hashlib
import http.client
import itertools
import logging
import os
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

import torch
import tqdm

from stemserve.defaults import CHECKPOINT_URL_ENV
from stemserve.errors import CheckpointError
from stemserve.files import atomic_write, file_sha256
from stemserve.releases import RemoteFile

# The package's logger, as before it was split: what users configure and the CLI prints.
logger = logging.getLogger(__package__)

URL_ENV = CHECKPOINT_URL_ENV
"""Environment variable naming a mirror to use instead of the official server: an http(s) or
file:// URL, or a folder. A mirror is flat: every file under its own name, as in torch hub's
cache folder (no ``v3.0/``, ``hybrid_transformer/`` or ``mdx_final/``)."""

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def checkpoint_cache_dir() -> Path:
    """torch hub's checkpoint folder (honours $TORCH_HOME), shared with demucs and torch.hub."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _url(remote: RemoteFile, base_url: str | None) -> str:
    base = base_url or os.environ.get(URL_ENV)
    if not base:
        return remote.url
    if "://" not in base and not base.startswith("file:"):
        base = Path(base).expanduser().absolute().as_uri()
    return base.rstrip("/") + "/" + remote.name


def _fetch(remote: RemoteFile, cache_dir: str | Path | None, base_url: str | None,
           progress: bool) -> tuple[Path, str]:
    """Verified cached file ``remote`` and its sha256; downloads it if needed.

    A cached file that does not match its name is moved aside, never deleted: it may be a
    truncated download, or a user's own model saved under a release's name.
    """
    folder = Path(cache_dir) if cache_dir is not None else checkpoint_cache_dir()
    path = folder / remote.name
    aside = None
    if path.is_file():
        sha256 = _sha256(path)
        if sha256.startswith(remote.checksum):
            return path, sha256
        aside = _move_aside(path, sha256)
    url = _url(remote, base_url)
    try:
        return path, _download(url, path, remote.checksum, progress)
    except CheckpointError as exc:
        if aside is None:
            raise
        raise CheckpointError(f"{exc}\n(The file that was cached as {path.name} did not match "
                              f"its name and is kept as {aside}.)") from exc


def _move_aside(path: Path, sha256: str) -> Path | None:
    """Rename ``path`` to ``<stem>.mismatch-<sha8>.th`` (the first free such name) and say so.

    None when another process moved it first.
    """
    for attempt in itertools.count():
        tag = f".mismatch-{sha256[:8]}" + (f"-{attempt}" if attempt else "")
        aside = path.with_name(f"{path.stem}{tag}{path.suffix}")
        if not aside.exists():
            break
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"{path} does not match the sha256 in its name (it starts with "
                              f"{sha256[:8]}) and could not be moved aside ({exc}); move it "
                              f"away yourself") from exc
    logger.warning("%s does not match the sha256 in its name (it starts with %s): kept it as "
                   "%s and fetching the release", path, sha256[:8], aside)
    return aside


def _download(url: str, path: Path, signature: str, progress: bool) -> str:
    """Stream ``url`` (http(s) or file) next to ``path``, verify it, move it into place.

    The partial file never carries the final name (:func:`~stemserve.files.atomic_write`),
    so an interrupted or corrupt download can never be mistaken for a cached checkpoint.
    """
    digest, received, expected = hashlib.sha256(), 0, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                    length = response.headers.get("Content-Length")
                    expected = int(length) if length is not None else None
                    with tqdm.tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                   desc=path.name, disable=not progress) as bar:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise CheckpointError(_unavailable(url, exc, path)) from exc
            if expected is not None and received != expected:
                raise CheckpointError(f"download of {url} was cut short ({received} of "
                                      f"{expected} bytes); nothing was kept, try again")
            sha256 = digest.hexdigest()
            if not sha256.startswith(signature):
                raise CheckpointError(f"checksum mismatch for {url}: sha256 starts with "
                                      f"{sha256[:8]}, the file name says {signature}; "
                                      f"the download was discarded")
    except OSError as exc:
        raise CheckpointError(f"cannot write into the checkpoint cache {path.parent} "
                              f"({exc}); choose another with $TORCH_HOME or cache_dir=") \
            from exc
    return sha256


def _unavailable(url: str, exc: Exception, path: Path) -> str:
    """Why ``url`` could not be fetched, and every other way to provide the file."""
    problem = _mirror_problem(url, exc) if url.startswith("file:") else \
        f"could not download {url} ({exc})"
    return (f"{problem}, and {path.parent} holds no valid {path.name}. Connect to the network, "
            f"copy {path.name} into {path.parent}, or set {URL_ENV} to a mirror that has it "
            f"(an http(s):// or file:// URL, or a folder). Offline, a checkpoint file of your "
            f"own works too (-n my_model.th [--config RELEASE]), and `stemserve demo` writes a "
            f"random-weight model to try things with")


def _mirror_problem(url: str, exc: Exception) -> str:
    """What is wrong with a folder mirror, in its own terms rather than urllib's."""
    source = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if not source.parent.is_dir():
        return f"the mirror folder {source.parent} does not exist"
    if not source.exists():
        return f"the mirror folder {source.parent} has no {source.name}"
    return f"could not read {source} ({exc})"


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _check_zip_crcs(path: Path) -> None:
    """Refuse a zip checkpoint whose records do not match their CRC-32.

    torch reads tensor records without checking their CRCs, so flipped bits in a weight load
    silently. Releases need no such check: their sha256 is. Records with a CRC of 0 come from
    torch's ``compute_crc32=False`` and cannot be checked.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: torch's loader says what it is
    with archive:
        for member in archive.infolist():
            if member.CRC == 0:
                continue
            try:
                with archive.open(member) as record:
                    while record.read(_CHUNK):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise CheckpointError(f"{path} is corrupt: its record {member.filename} does "
                                      f"not match its CRC ({exc}); copy or download the file "
                                      f"again") from exc
