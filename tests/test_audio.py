"""Reading, resampling, channel handling, stem formats, clip modes and atomic stem files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from stemserve.audio import (MIN_SECONDS, OutputFormat, StemWriter, probe, read_blocks,
                             resample_blocks, to_pcm, to_stereo)
from stemserve.errors import StemserveError

RATE = 44100


def tone(channels: int, seconds: float = 1.3, rate: int = RATE, peak: float = 0.5) -> np.ndarray:
    """[channels, n] float32: a different tone per channel."""
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([peak * np.sin(2 * np.pi * (220 + 110 * c) * t)
                     for c in range(channels)]).astype(np.float32)


def write_input(path: Path, audio: np.ndarray, rate: int = RATE, **kwargs) -> Path:
    sf.write(str(path), audio.T, rate, **kwargs)
    return path


def read_all(path: Path, **kwargs) -> np.ndarray:
    return np.concatenate(list(read_blocks(path, block_frames=10000, **kwargs)), axis=-1)


# ---------------------------------------------------------------------------------------------
# Reading

@pytest.mark.parametrize("fmt,subtype,tolerance", [
    ("WAV", "PCM_16", 1 / 2 ** 15), ("FLAC", "PCM_24", 1 / 2 ** 23),
    ("OGG", "VORBIS", 0.05), ("MP3", "MPEG_LAYER_III", 0.1)])
def test_reads_what_libsndfile_reads(tmp_path, fmt, subtype, tolerance):
    audio = tone(2)
    path = write_input(tmp_path / f"in.{fmt.lower()}", audio, format=fmt, subtype=subtype)
    info = probe(path)
    assert (info.sample_rate, info.channels) == (RATE, 2)
    decoded = read_all(path)
    assert decoded.shape[0] == 2 and decoded.dtype == np.float32
    if fmt in ("WAV", "FLAC"):
        assert np.abs(decoded - audio).max() <= tolerance
    else:  # lossy: same length (up to codec padding) and similar energy
        assert abs(decoded.shape[-1] - audio.shape[-1]) < 0.1 * RATE
        assert np.std(decoded) == pytest.approx(np.std(audio), rel=tolerance)


def test_mono_is_duplicated_and_more_channels_need_downmix(tmp_path):
    mono = write_input(tmp_path / "mono.wav", tone(1), subtype="FLOAT")
    decoded = read_all(mono)
    assert decoded.shape[0] == 2 and np.array_equal(decoded[0], decoded[1])

    surround = write_input(tmp_path / "six.wav", tone(6), subtype="FLOAT")
    with pytest.raises(StemserveError, match=r"six\.wav: 6 channels.*--downmix"):
        probe(surround)
    probe(surround, downmix=True)
    down = read_all(surround, downmix=True)
    assert np.allclose(down[0], tone(6).mean(axis=0), atol=1e-6)
    assert np.array_equal(down[0], down[1])
    assert to_stereo(tone(2)).shape == (2, tone(2).shape[-1])


def test_streamed_resampling_equals_one_shot_soxr():
    audio = tone(2, seconds=2.0, rate=48000)
    blocks = [audio[:, i:i + 3001] for i in range(0, audio.shape[-1], 3001)]
    streamed = np.concatenate(list(resample_blocks(blocks, 48000, RATE)), axis=-1)
    once = soxr.resample(audio.T, 48000, RATE).T
    assert streamed.shape == once.shape
    assert np.array_equal(streamed, once)
    assert list(resample_blocks(blocks, RATE, RATE)) == blocks


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "short", "folder"])
def test_bad_inputs_are_clear_errors_naming_the_file(tmp_path, case):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        path.touch()
    elif case == "corrupt":
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    elif case == "short":
        write_input(path, tone(2, seconds=MIN_SECONDS / 2))
    elif case == "folder":
        path.mkdir()
    expected = {"missing": "no such file", "empty": "empty file", "corrupt": "libsndfile",
                "short": "too short", "folder": "not a file"}[case]
    with pytest.raises(StemserveError, match=expected) as raised:
        probe(path)
    assert str(path) in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Writing

def stems_signal() -> dict[str, np.ndarray]:
    """Two stems; ``loud`` peaks at 1.5 so every clip mode does something different."""
    return {"quiet": tone(2, peak=0.4), "loud": tone(2, peak=1.5)}


def write_stems(folder: Path, fmt: OutputFormat, clip_mode: str = "rescale",
                rate: int = RATE) -> dict[str, Path]:
    stems = stems_signal()
    targets = {name: folder / "track" / f"{name}.{fmt.ext}" for name in stems}
    with StemWriter(targets, rate, 2, fmt, clip_mode) as writer:
        for start in range(0, stems["quiet"].shape[-1], 10000):  # written in blocks
            writer.write({name: audio[:, start:start + 10000] for name, audio in stems.items()})
        return writer.commit()


@pytest.mark.parametrize("container,encoding,subtype,dtype", [
    ("wav", "int16", "PCM_16", "int16"), ("wav", "int24", "PCM_24", "int32"),
    ("wav", "float32", "FLOAT", "float32"), ("flac", "int16", "PCM_16", "int16"),
    ("flac", "int24", "PCM_24", "int32")])
def test_lossless_round_trip(tmp_path, container, encoding, subtype, dtype):
    fmt = OutputFormat(container, encoding)
    paths = write_stems(tmp_path, fmt)
    for name, audio in stems_signal().items():
        info = sf.info(str(paths[name]))
        assert (info.format, info.subtype, info.samplerate) == (container.upper(), subtype, RATE)
        data, _ = sf.read(str(paths[name]), dtype=dtype)
        expected = to_pcm(audio / max(np.float32(1.01) * np.abs(audio).max(), 1), encoding)
        assert np.array_equal(data.T, expected)


def test_int16_is_demucs_conversion():
    torch = pytest.importorskip("torch")
    audio = np.concatenate([tone(2, peak=1.2), np.float32([[0.99997, -1.0, 0.5, -0.3]] * 2)],
                           axis=-1)
    expected = (torch.from_numpy(audio) * 2 ** 15).clamp_(-2 ** 15, 2 ** 15 - 1).short()
    assert np.array_equal(to_pcm(audio, "int16"), expected.numpy())


def test_mp3_is_gapless_and_close_to_the_stem(tmp_path):
    paths = write_stems(tmp_path, OutputFormat("mp3", mp3_bitrate=192))
    data, rate = sf.read(str(paths["quiet"]), dtype="float32")
    assert rate == RATE and data.shape[1] == 2
    # Encoder delay and padding dropped by the decoder (LAME header): same length, aligned.
    assert len(data) == tone(2).shape[-1]
    assert np.abs(data.T - tone(2, peak=0.4)).max() < 0.03  # lossy, but not shifted
    assert 185_000 < paths["quiet"].stat().st_size * 8 / 1.3 < 215_000  # 192 kb/s + headers
    with pytest.raises(StemserveError, match="not 100"):
        write_stems(tmp_path / "bad", OutputFormat("mp3", mp3_bitrate=100))
    with pytest.raises(StemserveError, match="16-bit"):
        OutputFormat("mp3", "int24")
    with pytest.raises(StemserveError, match="FLAC"):
        OutputFormat("flac", "float32")


@pytest.mark.parametrize("clip_mode", ["rescale", "clamp", "none"])
def test_clip_modes(tmp_path, clip_mode):
    paths = write_stems(tmp_path, OutputFormat("wav", "float32"), clip_mode)
    quiet, _ = sf.read(str(paths["quiet"]), dtype="float32")
    loud, _ = sf.read(str(paths["loud"]), dtype="float32")
    original = stems_signal()
    # A stem that never clips is left alone by every mode (rescale divides by max(.., 1)).
    assert np.array_equal(quiet.T, original["quiet"])
    if clip_mode == "rescale":
        assert np.allclose(loud.T, original["loud"] / (1.01 * 1.5), atol=1e-6)
        assert np.abs(loud).max() == pytest.approx(1 / 1.01, abs=1e-6)
    elif clip_mode == "clamp":
        assert np.array_equal(loud.T, np.clip(original["loud"], -1, 1))
    else:
        assert np.array_equal(loud.T, original["loud"])


def test_failed_write_leaves_nothing(tmp_path):
    fmt = OutputFormat()
    for clip_mode in ("rescale", "clamp"):
        targets = {name: tmp_path / "out" / "track" / f"{name}.wav" for name in ("a", "b")}
        with pytest.raises(RuntimeError, match="boom"):
            with StemWriter(targets, RATE, 2, fmt, clip_mode) as writer:
                writer.write({"a": tone(2), "b": tone(2)})
                assert len(list((tmp_path / "out" / "track").iterdir())) == 2  # .part files
                raise RuntimeError("boom")
        assert not (tmp_path / "out").exists()  # temporary files and created folders gone


def test_stems_appear_only_at_commit(tmp_path):
    targets = {"a": tmp_path / "a.wav"}
    with StemWriter(targets, RATE, 2, OutputFormat(), "clamp") as writer:
        writer.write({"a": tone(2)})
        names = [path.name for path in tmp_path.iterdir()]
        assert names and all(name.startswith(".a.wav.") and name.endswith(".part")
                             for name in names)
        writer.commit()
    assert [path.name for path in tmp_path.iterdir()] == ["a.wav"]
