"""``stemserve separate - --stem STEM -o -``: audio in on stdin, one stem out on stdout.

A piped track must give exactly the stems of the same file (clamped: a stream cannot wait
for the track's peak), a WAV whose writer could not seek (ffmpeg to a pipe) must be read
whole, and every misuse must be a clear error before any model loads.
"""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stemserve.audio import to_pcm
from stemserve.cli import main
from stemserve.errors import InputError, OutputError
from stemserve.pipes import UNKNOWN_SIZE, WavStream, fix_wav_sizes, spooled_stdin
from test_separate_cli import song, write_song


class Pipe(io.BytesIO):
    """A pipe's end: bytes, not a terminal unless told."""

    def __init__(self, data: bytes = b"", tty: bool = False):
        super().__init__(data)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def as_piped_by_ffmpeg(path: Path, size: int) -> bytes:
    """The WAV at ``path`` with the RIFF and data sizes a writer that cannot seek leaves."""
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", size)
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", size)
    return bytes(data)


def parse_stream(data: bytes) -> tuple[int, int, int, bytes]:
    """format tag, channels, rate and samples of a WavStream's output."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    tag, channels, rate = struct.unpack("<HHI", data[20:28])
    assert data[36:40] == b"data"
    return tag, channels, rate, data[44:]


def run_piped(monkeypatch, stdin: bytes, *args: object, stdout_tty: bool = False) -> tuple[int, bytes]:
    out = Pipe(tty=stdout_tty)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=Pipe(stdin)))
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=out, write=sys.stderr.write,
                                                             flush=lambda: None))
    code = main(["separate", *map(str, args)])
    return code, out.getvalue()


@pytest.mark.parametrize("size", [0, UNKNOWN_SIZE])
@pytest.mark.parametrize("encoding,subtype,dtype", [("int16", "PCM_16", "<i2"),
                                                    ("float32", "FLOAT", "<f4")])
def test_a_piped_track_gives_the_files_stem_sample_for_sample(tmp_path, small_export, monkeypatch,
                                                                size, encoding, subtype, dtype):
    track = write_song(tmp_path / "song.wav")
    # One request at a time, so that no run's float rounding depends on its batches.
    flags = ["--backend", "onnx", "-n", small_export, "--clip-mode", "clamp", "-q",
             "--in-flight", "1"]
    if encoding == "float32":
        flags.append("--float32")
    assert main(["separate", str(track), *map(str, flags), "-o", str(tmp_path / "out")]) == 0
    expected, rate = sf.read(str(tmp_path / "out" / "small" / "song" / "vocals.wav"),
                             dtype="int16" if encoding == "int16" else "float32")
    code, data = run_piped(monkeypatch, as_piped_by_ffmpeg(track, size), "-", *flags,
                           "--stem", "vocals", "-o", "-")
    assert code == 0
    tag, channels, got_rate, samples = parse_stream(data)
    assert (tag, channels, got_rate) == ((1 if encoding == "int16" else 3), 2, rate)
    got = np.frombuffer(samples, dtype).reshape(-1, 2)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_two_stems_pick_the_instrumental(tmp_path, small_export, monkeypatch):
    track = write_song(tmp_path / "song.wav")
    code, data = run_piped(monkeypatch, track.read_bytes(), "-", "--backend", "onnx", "-n",
                           small_export, "--two-stems", "vocals", "--stem", "no_vocals",
                           "-o", "-", "-q")
    assert code == 0
    assert len(parse_stream(data)[3]) == song().shape[-1] * 2 * 2


@pytest.mark.parametrize("args,message", [
    (["-", "--backend", "onnx", "-o", "-"], "choose it with --stem"),
    (["{track}", "--backend", "onnx", "--stem", "vocals"], "add -o -"),
    (["-", "{track}", "--backend", "onnx"], "must be the only track"),
    (["-", "--backend", "onnx", "--stem", "vocals", "-o", "-", "--flac"], "WAV stream"),
    (["{track}", "{track}", "--backend", "onnx", "-n", "{model}", "--stem", "vocals", "-o",
      "-"], "one track"),
    (["{track}", "--backend", "onnx", "-n", "{model}", "--stem", "guitar", "-o", "-"],
     "the stems are drums, bass, other, vocals"),
])
def test_misuse_is_a_clear_error(tmp_path, small_export, monkeypatch, capsys, args, message):
    track = write_song(tmp_path / "song.wav")
    args = [arg.format(track=track, model=small_export) for arg in args]
    code, data = run_piped(monkeypatch, b"", *args)
    assert code != 0 and data == b""
    assert message in capsys.readouterr().err


def test_a_terminal_or_nothing_on_stdin_and_a_terminal_on_stdout_are_refused(
        tmp_path, small_export, monkeypatch, capsys):
    track = write_song(tmp_path / "song.wav")
    with pytest.raises(InputError, match="stdin is a terminal"):
        with spooled_stdin(Pipe(tty=True)):
            pass
    with pytest.raises(InputError, match="nothing on stdin"):
        with spooled_stdin(Pipe()):
            pass
    with pytest.raises(InputError, match="more than"):
        with spooled_stdin(Pipe(b"x" * 100), limit=99):
            pass
    code, _ = run_piped(monkeypatch, b"", track, "--backend", "onnx", "-n", small_export,
                        "--stem", "vocals", "-o", "-", stdout_tty=True)
    assert code == 1 and "stdout is a terminal" in capsys.readouterr().err
    code, _ = run_piped(monkeypatch, b"not audio at all", "-", "--backend", "onnx", "-n",
                        small_export, "--stem", "vocals", "-o", "-")
    assert code == 1 and "not audio that libsndfile can read" in capsys.readouterr().err
    assert not list(Path(tempfile.gettempdir()).glob("stemserve-stdin-*/stdin"))


def test_the_spool_is_removed_and_ffmpeg_sizes_are_fixed(tmp_path):
    track = write_song(tmp_path / "song.wav")
    with spooled_stdin(Pipe(as_piped_by_ffmpeg(track, UNKNOWN_SIZE))) as spool:
        assert sf.info(str(spool)).frames == song().shape[-1]
        assert spool.name == "stdin"
    assert not spool.exists() and not spool.parent.exists()
    flac = tmp_path / "song.flac"
    sf.write(str(flac), song().T, 44100)
    before = flac.read_bytes()
    fix_wav_sizes(flac)  # not RIFF: left alone
    assert flac.read_bytes() == before


@pytest.mark.parametrize("encoding,subtype", [("int16", "PCM_16"), ("int24", "PCM_24"),
                                              ("float32", "FLOAT")])
def test_the_wav_stream_reads_back_to_its_end(tmp_path, encoding, subtype):
    audio = np.clip(song(seconds=0.5) * 3, -1, 1)
    out = Pipe()
    stream = WavStream(out, 22050, 2, encoding)
    for start in range(0, audio.shape[-1], 1000):
        stream.write(audio[:, start:start + 1000])
    path = tmp_path / "stream.wav"
    path.write_bytes(out.getvalue())
    read, rate = sf.read(str(path), dtype="float32")
    assert rate == 22050 and sf.info(str(path)).subtype == subtype
    expected = to_pcm(audio, encoding).T
    scale = {"int16": 2**15, "int24": 2**31, "float32": 1}[encoding]
    assert np.array_equal(np.round(read * scale).astype(np.int64) if scale > 1 else read,
                          expected.astype(np.int64) if scale > 1 else expected)
    with pytest.raises(OutputError, match="stdout is a terminal"):
        WavStream(Pipe(tty=True), 22050, 2, encoding)


@pytest.mark.slow
def test_a_reader_that_leaves_stops_the_run(tmp_path, small_export):
    """Through real pipes: a reader that leaves early (a player closed) ends the run within
    seconds, exit code 1, with the reason on stderr."""
    track = write_song(tmp_path / "song.wav", song(seconds=20))
    command = [sys.executable, "-m", "stemserve", "separate", "-", "--backend", "onnx", "-n",
               str(small_export), "--stem", "vocals", "-o", "-", "-q", "--in-flight", "1"]
    with open(track, "rb") as stdin:
        process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        first = process.stdout.read(44 + 4096)
        process.stdout.close()  # the player leaves; the stem is far larger than a pipe holds
        began = time.monotonic()
        code = process.wait(timeout=60)
    assert len(first) == 44 + 4096 and first[:4] == b"RIFF"
    assert code == 1 and time.monotonic() - began < 30
    assert b"stdout was closed" in process.stderr.read()
