"""Audio in and out for the separation client, in blocks so memory never grows with a track.

Reading goes through libsndfile (``soundfile``): WAV, FLAC, OGG and, where the installed
libsndfile has it, MP3. Sample rates are converted with soxr, streamed, which gives exactly
the samples a one-shot ``soxr.resample`` of the whole track gives. Stems are written under
hidden temporary names and renamed into place only once every stem of a track is complete.
No torch here: the client must run without it.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Literal

import numpy as np
import soundfile as sf
import soxr

from stemserve.errors import StemserveError

BLOCK_FRAMES = 1 << 16
MIN_SECONDS = 0.1
"""Shorter inputs are refused: nothing audible to separate, and their statistics are noise."""
RESAMPLE_QUALITY = "HQ"

ClipMode = Literal["rescale", "clamp", "none"]
CLIP_MODES: tuple[str, ...] = ("rescale", "clamp", "none")
Encoding = Literal["int16", "int24", "float32"]


# ---------------------------------------------------------------------------------------------
# Reading

@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What libsndfile says about an input file."""

    path: Path
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def probe(path: Path, *, downmix: bool = False) -> AudioInfo:
    """Check that ``path`` is audio this client can separate; every refusal names the file."""
    path = Path(path)
    if not path.exists():
        raise StemserveError(f"{path}: no such file")
    if not path.is_file():
        raise StemserveError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise StemserveError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise StemserveError(f"{path}: empty file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise StemserveError(f"{path}: not audio that libsndfile can read ({err}); "
                             f"readable formats: {', '.join(sorted(sf.available_formats()))}"
                             ) from None
    audio = AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames))
    if audio.frames <= 0 or audio.seconds < MIN_SECONDS:
        raise StemserveError(f"{path}: too short to separate ({audio.frames} samples, "
                             f"{audio.seconds:.3f} s; at least {MIN_SECONDS} s needed)")
    check_channels(audio.channels, downmix, str(path))
    return audio


def check_channels(channels: int, downmix: bool, what: str) -> None:
    """Mono and stereo are fine; more channels only with an explicit ``downmix``."""
    if channels < 1:
        raise StemserveError(f"{what}: no audio channels")
    if channels > 2 and not downmix:
        raise StemserveError(f"{what}: {channels} channels; the model separates stereo. "
                             "Pass --downmix (downmix=True) to mix all channels down")


def to_stereo(block: np.ndarray, downmix: bool = False) -> np.ndarray:
    """[channels, n] -> [2, n] float32.

    Mono is duplicated as demucs' ``convert_audio_channels`` does. More channels are averaged
    to mono first (when ``downmix``): libsndfile reports no channel layout, and keeping only
    the first two channels, as demucs does, would drop a 5.1 mix's centre (the vocals).
    """
    channels = block.shape[0]
    check_channels(channels, downmix, "input")
    if channels > 2:
        block = block.mean(axis=0, keepdims=True)
    if block.shape[0] == 1:
        block = np.repeat(block, 2, axis=0)
    return np.ascontiguousarray(block, dtype=np.float32)


def read_blocks(path: Path, *, downmix: bool = False,
                block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """The file's audio as stereo [2, n] float32 blocks at its own rate."""
    try:
        with sf.SoundFile(str(path)) as handle:
            for block in handle.blocks(block_frames, dtype="float32", always_2d=True):
                yield to_stereo(block.T, downmix)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise StemserveError(f"{path}: cannot decode audio ({err})") from None


def array_blocks(mix: np.ndarray, *, downmix: bool = False,
                 block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """An in-memory mix ([time] or [channels, time]) as stereo [2, n] float32 blocks."""
    mix = np.asarray(mix)
    if mix.ndim == 1:
        mix = mix[None]
    for start in range(0, mix.shape[-1], block_frames):
        yield to_stereo(mix[:, start:start + block_frames], downmix)


class Resampler:
    """Streaming soxr resampling of [channels, n] float32 blocks; a no-op at equal rates.

    Feed blocks to :meth:`process` and call :meth:`flush` once at the end for the tail.
    """

    def __init__(self, in_rate: int, out_rate: int, channels: int):
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, channels, dtype="float32", quality=RESAMPLE_QUALITY)
        self._channels = channels

    def process(self, block: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return block
        return self._run(np.ascontiguousarray(block.T, dtype=np.float32), last=False)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros((self._channels, 0), np.float32)
        return self._run(np.zeros((0, self._channels), np.float32), last=True)

    def _run(self, frames: np.ndarray, last: bool) -> np.ndarray:
        return np.ascontiguousarray(self._stream.resample_chunk(frames, last=last).T)


def resample_blocks(blocks: Iterable[np.ndarray], in_rate: int, out_rate: int,
                    channels: int = 2) -> Iterator[np.ndarray]:
    """Pull-style :class:`Resampler`: resampled blocks, empty ones skipped."""
    resampler = Resampler(in_rate, out_rate, channels)
    for block in blocks:
        out = resampler.process(block)
        if out.shape[-1]:
            yield out
    tail = resampler.flush()
    if tail.shape[-1]:
        yield tail


# ---------------------------------------------------------------------------------------------
# Writing

@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """How stems are encoded: container, sample encoding and, for MP3, the bit rate."""

    container: Literal["wav", "flac", "mp3"] = "wav"
    encoding: Encoding = "int16"
    mp3_bitrate: int = 320

    def __post_init__(self) -> None:
        if self.container == "flac" and self.encoding == "float32":
            raise StemserveError("FLAC stores integers only: choose 16 or 24 bits for --flac")
        if self.container == "mp3" and self.encoding != "int16":
            raise StemserveError("MP3 is encoded from 16-bit samples: drop --int24/--float32")

    @property
    def ext(self) -> str:
        return self.container


def to_pcm(block: np.ndarray, encoding: Encoding) -> np.ndarray:
    """Float samples -> what libsndfile stores, saturating at full scale.

    16 bit follows demucs' ``(x * 2**15).clamp(-2**15, 2**15 - 1).short()`` exactly
    (truncation toward zero). 24-bit samples go in the top bits of int32, which libsndfile
    writes as PCM_24 without further rounding.
    """
    if encoding == "float32":
        return block.astype(np.float32, copy=False)
    bits = 16 if encoding == "int16" else 24
    full = float(2 ** (bits - 1))
    ints = np.clip(block * full, -full, full - 1)
    if bits == 16:
        return ints.astype(np.int16)
    return ints.astype(np.int32) << 8


class _Encoder:
    """Writes [channels, n] float blocks of one stem to ``path`` in ``fmt``."""

    def __init__(self, path: Path, fmt: OutputFormat, sample_rate: int, channels: int):
        self.fmt = fmt
        self._lame = None
        self._file: sf.SoundFile | BinaryIO
        if fmt.container == "mp3":
            import lameenc

            self._lame = lameenc.Encoder()
            self._lame.set_bit_rate(fmt.mp3_bitrate)
            self._lame.set_in_sample_rate(sample_rate)
            self._lame.set_channels(channels)
            self._lame.set_quality(2)  # what demucs uses: 2 is the highest quality
            self._lame.silence()
            self._file = open(path, "wb")
        else:
            subtype = {"int16": "PCM_16", "int24": "PCM_24", "float32": "FLOAT"}[fmt.encoding]
            self._file = sf.SoundFile(str(path), "w", samplerate=sample_rate,
                                      channels=channels, subtype=subtype,
                                      format=fmt.container.upper())

    def write(self, block: np.ndarray) -> None:
        pcm = np.ascontiguousarray(to_pcm(block, self.fmt.encoding).T)
        if self._lame is not None:
            self._file.write(self._lame.encode(pcm.tobytes()))
        else:
            self._file.write(pcm)

    def close(self) -> None:
        if self._lame is not None:
            self._file.write(self._lame.flush())
        self._file.close()


def temporary_name(target: Path) -> Path:
    """A hidden name next to ``target`` that no one mistakes for a finished file."""
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")


def rescale_divisor(peak: float) -> np.float32:
    """demucs' clip handling divides a stem by ``max(1.01 * peak, 1)``, in float32."""
    return max(np.float32(1.01) * np.float32(peak), np.float32(1))


class StemWriter:
    """Streams the stems of one track to disk; :meth:`commit` makes them all appear at once.

    Every stem goes to a hidden ``.part`` file in its target folder and is renamed into place
    by :meth:`commit` after all are complete, so a failed or interrupted run never leaves a
    file that looks finished. With ``clip_mode="rescale"`` a stem's scale depends on its peak
    over the whole track: the float samples are spilled to a temporary file and encoded at
    commit, so memory stays bounded for any track length.
    Use it as a context manager: leaving on an exception removes every temporary file and
    every folder it created.
    """

    def __init__(self, targets: dict[str, Path], sample_rate: int, channels: int,
                 fmt: OutputFormat, clip_mode: ClipMode):
        if clip_mode not in CLIP_MODES:
            raise StemserveError(f"unknown clip mode {clip_mode!r}; use one of {CLIP_MODES}")
        if fmt.container == "mp3" and not 8000 <= sample_rate <= 48000:
            raise StemserveError(f"MP3 cannot store {sample_rate} Hz; write WAV or FLAC, "
                                 "or keep the model's sample rate")
        self.targets = dict(targets)
        self.sample_rate = sample_rate
        self.channels = channels
        self.fmt = fmt
        self.clip_mode = clip_mode
        self._created: list[Path] = []
        self._temps: dict[str, Path] = {}
        self._encoders: dict[str, _Encoder] = {}
        self._spills: dict[str, BinaryIO] = {}
        self._peaks = dict.fromkeys(self.targets, 0.0)
        try:
            for stem, target in self.targets.items():
                self._make_dirs(target.parent)
                self._temps[stem] = temporary_name(target)
                if clip_mode == "rescale":
                    self._spills[stem] = open(temporary_name(target.with_suffix(".f32")),
                                              "w+b")
                else:
                    self._encoders[stem] = _Encoder(self._temps[stem], fmt, sample_rate,
                                                    channels)
        except BaseException:
            self.abort()
            raise

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            self._created.append(path)

    def write(self, stems: dict[str, np.ndarray]) -> None:
        """Append one [channels, n] block per stem."""
        for stem, block in stems.items():
            if self.clip_mode == "rescale":
                self._peaks[stem] = max(self._peaks[stem], float(np.abs(block).max(initial=0)))
                self._spills[stem].write(np.ascontiguousarray(block.T, np.float32).tobytes())
            else:
                if self.clip_mode == "clamp":
                    block = np.clip(block, -1.0, 1.0)
                self._encoders[stem].write(block)

    def commit(self) -> dict[str, Path]:
        """Finish every stem, then rename all of them into place."""
        for stem, spill in self._spills.items():
            divisor = rescale_divisor(self._peaks[stem])
            encoder = self._encoders[stem] = _Encoder(self._temps[stem], self.fmt,
                                                      self.sample_rate, self.channels)
            spill.seek(0)
            frame_bytes = 4 * self.channels
            while chunk := spill.read(BLOCK_FRAMES * frame_bytes):
                block = np.frombuffer(chunk, np.float32).reshape(-1, self.channels).T
                encoder.write(block / divisor)
        self._close_all()
        for stem, target in self.targets.items():
            os.replace(self._temps[stem], target)
        self._temps.clear()
        return dict(self.targets)

    def _close_all(self) -> None:
        for spill in self._spills.values():
            spill.close()
            Path(spill.name).unlink(missing_ok=True)
        self._spills.clear()
        for encoder in self._encoders.values():
            encoder.close()
        self._encoders.clear()

    def abort(self) -> None:
        """Remove every temporary file and every folder this writer created."""
        try:
            self._close_all()
        finally:
            for temp in self._temps.values():
                temp.unlink(missing_ok=True)
            self._temps.clear()
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty: something else lives there now

    def __enter__(self) -> "StemWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
