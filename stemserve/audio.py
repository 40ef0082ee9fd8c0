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
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Literal

import numpy as np
import soundfile as sf
import soxr

from stemserve.defaults import BLOCK_FRAMES
from stemserve.errors import InputError, OutputError
from stemserve.files import collect_stale_parts, commit_all, temporary_name

MIN_SECONDS = 0.1
"""Shorter inputs are refused: nothing audible to separate, and their statistics are noise."""
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384000
"""Input rates outside [8 kHz, 384 kHz] are refused: below telephone quality nothing is left
to separate (and soxr crashes on rates of a few Hz), above it no recording format goes."""
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
        raise InputError("no such file", where=str(path))
    if not path.is_file():
        raise InputError("not a file", where=str(path))
    if not os.access(path, os.R_OK):
        raise InputError("not readable (permission denied)", where=str(path))
    if path.stat().st_size == 0:
        raise InputError("empty file", where=str(path))
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise InputError(f"not audio that libsndfile can read ({err}); readable formats: "
                         f"{', '.join(sorted(sf.available_formats()))}", where=str(path)) \
            from None
    audio = AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames))
    check_sample_rate(audio.sample_rate, str(path))
    if audio.frames <= 0 or audio.seconds < MIN_SECONDS:
        raise InputError(f"too short to separate ({audio.frames} samples, "
                         f"{audio.seconds:.3f} s; at least {MIN_SECONDS} s needed)",
                         where=str(path))
    check_channels(audio.channels, downmix, str(path))
    return audio


def check_sample_rate(rate: int, what: str) -> None:
    """Refuse rates outside [:data:`MIN_SAMPLE_RATE`, :data:`MAX_SAMPLE_RATE`]."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InputError(f"sample rate {rate} Hz is outside what stemserve separates "
                         f"({MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz)", where=what)


def check_channels(channels: int, downmix: bool, what: str) -> None:
    """Mono and stereo are fine; more channels only with an explicit ``downmix``."""
    if channels < 1:
        raise InputError("no audio channels", where=what)
    if channels > 2 and not downmix:
        raise InputError(f"{channels} channels; the model separates stereo. Pass --downmix "
                         "(downmix=True) to mix all channels down", where=what)


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
        raise InputError(f"cannot decode audio ({err})", where=str(path)) from None


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
    """Pull-style :class:`Resampler`: resampled blocks, empty ones skipped.

    Blocks are cut so that none yields more than about :data:`BLOCK_FRAMES` output frames:
    memory follows the output rate, never the size of an input block.
    """
    resampler = Resampler(in_rate, out_rate, channels)
    step = max(1, BLOCK_FRAMES * in_rate // out_rate)
    for block in blocks:
        pieces = [block] if block.shape[-1] <= step else \
            [block[:, start:start + step] for start in range(0, block.shape[-1], step)]
        for piece in pieces:
            out = resampler.process(piece)
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
            raise OutputError("FLAC stores integers only: choose 16 or 24 bits for --flac")
        if self.container == "mp3" and self.encoding != "int16":
            raise OutputError("MP3 is encoded from 16-bit samples: drop --int24/--float32")

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


MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
MP3_BITRATES = {1: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
                2: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
"""kb/s that MPEG-1 (32 kHz and up) and MPEG-2/2.5 (below) layer III can store."""


def mp3_compression_level(bitrate: int, sample_rate: int) -> float:
    """libsndfile's compression level that makes LAME write constant ``bitrate`` kb/s.

    libsndfile maps the level linearly onto the MPEG version's bit-rate range (MPEG-1: 320
    down to 32, MPEG-2: 160 to 8, MPEG-2.5: 64 to 8) and LAME takes the nearest valid rate.
    """
    top, bottom = (320, 32) if sample_rate >= 32000 else (160, 8) if sample_rate >= 16000 \
        else (64, 8)
    allowed = [rate for rate in MP3_BITRATES[1 if sample_rate >= 32000 else 2]
               if bottom <= rate <= top]
    if bitrate not in allowed:
        raise OutputError(f"MP3 at {sample_rate} Hz stores {', '.join(map(str, allowed))} "
                             f"kb/s, not {bitrate}")
    return min((top - bitrate) / (top - bottom), 0.999)


class _Encoder:
    """Writes [channels, n] float blocks of one stem to ``path`` in ``fmt``.

    MP3 goes through libsndfile's LAME encoder, which writes the LAME info header: decoders
    that read it (libsndfile, ffmpeg, browsers) drop the encoder's delay and padding, so an
    MP3 stem is exactly as long as the mix, sample for sample aligned.
    """

    def __init__(self, path: Path, fmt: OutputFormat, sample_rate: int, channels: int):
        self.fmt = fmt
        if fmt.container == "mp3":
            options = dict(format="MP3", subtype="MPEG_LAYER_III", bitrate_mode="CONSTANT",
                           compression_level=mp3_compression_level(fmt.mp3_bitrate,
                                                                   sample_rate))
        else:
            options = dict(format=fmt.container.upper(), subtype={
                "int16": "PCM_16", "int24": "PCM_24", "float32": "FLOAT"}[fmt.encoding])
        self._file = sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=channels,
                                  **options)

    def write(self, block: np.ndarray) -> None:
        pcm = to_pcm(block, self.fmt.encoding)
        if self.fmt.container == "mp3":
            # The same 16-bit samples, handed over as float: libsndfile 1.2's stereo 16-bit
            # MP3 path copies half of each buffer (a byte count taken for a sample count).
            pcm = pcm.astype(np.float32) / np.float32(2 ** 15)
        self._file.write(np.ascontiguousarray(pcm.T))

    def close(self) -> None:
        self._file.close()


def rescale_divisor(peak: float) -> np.float32:
    """demucs' clip handling divides a stem by ``max(1.01 * peak, 1)``, in float32."""
    return max(np.float32(1.01) * np.float32(peak), np.float32(1))


class StemWriter:
    """Streams the stems of one track to disk; :meth:`commit` makes them all appear at once.

    Every stem goes to a hidden ``.part`` file in its target folder and :meth:`commit` renames
    them all into place, or none (:func:`~stemserve.files.commit_all`), once all are complete,
    so a failed or interrupted run never leaves a file that looks finished, nor a track with
    some stems new and some old. Temporary files a killed run left in those folders are
    removed first. With ``clip_mode="rescale"`` a stem's scale depends on its peak
    over the whole track: the float samples are spilled to a temporary file and encoded at
    commit, so memory stays bounded for any track length.
    Use it as a context manager: leaving on an exception removes every temporary file and
    every folder it created.
    """

    def __init__(self, targets: dict[str, Path], sample_rate: int, channels: int,
                 fmt: OutputFormat, clip_mode: ClipMode):
        if clip_mode not in CLIP_MODES:
            raise OutputError(f"unknown clip mode {clip_mode!r}; use one of {CLIP_MODES}")
        if fmt.container == "mp3" and sample_rate not in MP3_RATES:
            raise OutputError(f"MP3 cannot store {sample_rate} Hz (only "
                                 f"{', '.join(map(str, MP3_RATES))}); write WAV or FLAC, "
                                 "or keep the model's sample rate")
        if fmt.container == "mp3":
            mp3_compression_level(fmt.mp3_bitrate, sample_rate)  # refuse a bad rate now
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
                collect_stale_parts(target.parent)
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

    def commit(self, on_encoded: Callable[[float], None] | None = None) -> dict[str, Path]:
        """Finish every stem, then rename all of them into place.

        With ``clip_mode="rescale"`` this is where the stems are encoded (seconds for a long
        track); ``on_encoded`` receives the fraction done as it goes, and 1.0 at the end.
        """
        frame_bytes = 4 * self.channels
        total = max(1, sum(Path(spill.name).stat().st_size for spill in self._spills.values()))
        encoded = 0
        for stem, spill in self._spills.items():
            divisor = rescale_divisor(self._peaks[stem])
            encoder = self._encoders[stem] = _Encoder(self._temps[stem], self.fmt,
                                                      self.sample_rate, self.channels)
            spill.seek(0)
            while chunk := spill.read(BLOCK_FRAMES * frame_bytes):
                block = np.frombuffer(chunk, np.float32).reshape(-1, self.channels).T
                encoder.write(block / divisor)
                encoded += len(chunk)
                if on_encoded is not None:
                    on_encoded(encoded / total)
        self._close_all()
        commit_all({self._temps[stem]: target for stem, target in self.targets.items()})
        self._temps.clear()
        if on_encoded is not None:
            on_encoded(1.0)
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
