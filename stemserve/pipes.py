"""Audio through pipes: ``... | stemserve separate - --stem vocals -o - | ffplay -``.

stdin is copied to a temporary file before separating: libsndfile needs to seek to read
most formats, and the whole-track statistics that normalise the mix (as demucs does) need
the whole input, so a piped track gives exactly the stems of the same file. A WAV written
to a pipe (ffmpeg's ``-f wav -``) cannot say how long it is; its sizes are corrected in the
copy. stdout gets a WAV stream: the header first, then each block of the stem as soon as
the pipeline has made it final, so a player starts while the track is still separating.
"""
from __future__ import annotations

import contextlib
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from stemserve.audio import Encoding, to_pcm
from stemserve.defaults import STDIN
from stemserve.errors import InputError, OutputError

STDIN_LIMIT_BYTES = 4 * 2**30
"""The most stdin copied to disk: what one WAV can hold (its sizes are 32-bit)."""
UNKNOWN_SIZE = 0xFFFFFFFF
"""A RIFF or data size a writer that cannot seek back leaves (ffmpeg and stemserve both)."""
_COPY_BYTES = 1 << 20


@contextlib.contextmanager
def spooled_stdin(stream: BinaryIO, limit: int = STDIN_LIMIT_BYTES) -> Iterator[Path]:
    """``stream`` (stdin) copied into a temporary folder as a file named ``stdin``, removed
    on exit; a WAV's unknown sizes corrected. Refuses a terminal and more than ``limit``
    bytes."""
    if stream.isatty():
        raise InputError("stdin is a terminal: pipe audio into it, e.g. ffmpeg -i song.mp3 "
                         "-f wav - | stemserve separate - ...", where=STDIN)
    folder = Path(tempfile.mkdtemp(prefix="stemserve-stdin-"))
    try:
        path = folder / "stdin"
        copied = 0
        with open(path, "wb") as spool:
            while chunk := stream.read(_COPY_BYTES):
                copied += len(chunk)
                if copied > limit:
                    raise InputError(f"more than {limit / 2**30:.0f} GiB on stdin: give the "
                                     "file itself", where=STDIN)
                spool.write(chunk)
        if not copied:
            raise InputError("nothing on stdin", where=STDIN)
        fix_wav_sizes(path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fix_wav_sizes(path: Path) -> None:
    """Give a RIFF/WAVE file whose writer could not seek back its real sizes: the RIFF size
    and the size of a last ``data`` chunk that says 0 or :data:`UNKNOWN_SIZE`. Anything
    else is left as it is (libsndfile judges it)."""
    size = path.stat().st_size
    with open(path, "r+b") as file:
        head = file.read(12)
        if size < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        at = 12
        while at + 8 <= size:
            file.seek(at)
            name, length = struct.unpack("<4sI", file.read(8))
            if name == b"data":
                if length in (0, UNKNOWN_SIZE) or at + 8 + length > size:
                    file.seek(at + 4)
                    file.write(struct.pack("<I", min(size - at - 8, UNKNOWN_SIZE - 1)))
                break
            at += 8 + length + (length & 1)
        file.seek(4)
        file.write(struct.pack("<I", min(size - 8, UNKNOWN_SIZE)))


class WavStream:
    """One stem written to a pipe as it comes: a WAV header whose sizes say "unknown"
    (:data:`UNKNOWN_SIZE`, which ffmpeg, ffplay, sox and libsndfile read to the end of the
    stream), then the samples block by block, flushed at once."""

    _FORMATS = {"int16": (1, 2), "int24": (1, 3), "float32": (3, 4)}  # format tag, bytes

    def __init__(self, stream: BinaryIO, sample_rate: int, channels: int, encoding: Encoding):
        if stream.isatty():
            raise OutputError("stdout is a terminal: pipe the stem into a player or a file "
                              "(-o - | ffplay -), or give -o FOLDER", where="-o -")
        tag, width = self._FORMATS[encoding]
        self._stream, self._encoding = stream, encoding
        fmt = struct.pack("<HHIIHH", tag, channels, sample_rate, sample_rate * channels * width,
                          channels * width, 8 * width)
        stream.write(b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                     + b"data" + struct.pack("<I", UNKNOWN_SIZE))
        stream.flush()

    def write(self, block: np.ndarray) -> None:
        """Append one [channels, n] float block (clipped as the caller chose)."""
        pcm = np.ascontiguousarray(to_pcm(block, self._encoding).T)
        if self._encoding == "int24":  # the top three bytes of each little-endian int32
            data = pcm.astype("<i4").view(np.uint8).reshape(-1, 4)[:, 1:].tobytes()
        else:
            data = pcm.astype(pcm.dtype.newbyteorder("<"), copy=False).tobytes()
        self._stream.write(data)
        self._stream.flush()
