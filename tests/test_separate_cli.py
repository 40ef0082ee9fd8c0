"""`stemserve separate` and separate_file end to end: real files, real ONNX Runtime, real Triton."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stemserve.audio import OutputFormat, to_pcm
from stemserve.cli import build_parser, main
from stemserve.client import separate_array, separate_file
from stemserve.client.backends.onnx import OnnxBackend
from stemserve.spec import load_export_spec
from stemserve.client.backends.triton import TritonBackend
from stemserve.errors import StemserveError
from stemserve.client.backends.local import LocalBackend
from oracle_v2 import demucs2

RATE = 44100
SOURCES = ("drums", "bass", "other", "vocals")


def song(seconds: float = 2.3, channels: int = 2, rate: int = RATE) -> np.ndarray:
    """[channels, n] float32 test mix: tones and noise."""
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * rate)) / rate
    mix = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.1 * rng.standard_normal((channels, t.size))
    return mix.astype(np.float32)


def write_song(path: Path, audio: np.ndarray | None = None, rate: int = RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (song() if audio is None else audio).T, rate, subtype="FLOAT")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def onnx_backend(small_export):
    with OnnxBackend(small_export) as backend:
        yield backend


def run_cli(*args: object) -> int:
    return main(["separate", *map(str, args)])


def test_cli_onnx_writes_demucs_int16_stems(tmp_path, small_export, onnx_backend, capsys):
    track = write_song(tmp_path / "My Song.wav")
    before = sha256(track)
    code = run_cli(track, "--backend", "onnx", "-n", small_export, "-o", tmp_path / "out")
    assert code == 0
    folder = tmp_path / "out" / "small" / "My Song"
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"{s}.wav" for s in SOURCES)
    expected = separate_array(song(), RATE, backend=onnx_backend)
    for name in SOURCES:
        data, rate = sf.read(str(folder / f"{name}.wav"), dtype="int16")
        assert rate == RATE and sf.info(str(folder / f"{name}.wav")).subtype == "PCM_16"
        stem = expected[name]
        reference = to_pcm(stem / max(1.01 * np.abs(stem).max(), 1), "int16")
        # Same float stems up to ~1e-7; truncation may flip the last bit at worst.
        assert np.abs(data.T.astype(int) - reference).max() <= 1
    assert sha256(track) == before
    assert str(folder / "vocals.wav") in capsys.readouterr().out


def test_cli_formats_template_two_stems_and_rate(tmp_path, small_export):
    track = write_song(tmp_path / "in.wav", song(rate=48000), rate=48000)
    common = [track, "--backend", "onnx", "-n", small_export, "-o", tmp_path, "-q"]
    assert run_cli(*common, "--flac", "--int24", "--two-stems", "vocals",
                   "--filename", "{track}-{stem}.{ext}") == 0
    for name in ("vocals", "no_vocals"):  # the input's rate by default, as the library does
        info = sf.info(str(tmp_path / "small" / f"in-{name}.flac"))
        assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_24", 48000)
        assert abs(info.frames - 48000 * 2.3) <= 2
    assert run_cli(*common, "--mp3", "--mp3-bitrate", "128", "--samplerate-out", "model") == 0
    info = sf.info(str(tmp_path / "small" / "in" / "drums.mp3"))
    assert info.samplerate == RATE
    # The LAME header makes decoders drop the encoder's delay and padding: exact length.
    assert abs(info.frames - 2.3 * RATE) <= 1
    assert run_cli(*common, "--float32", "--clip-mode", "none") == 0
    assert sf.info(str(tmp_path / "small" / "in" / "bass.wav")).subtype == "FLOAT"


@pytest.mark.oracle
def test_cli_torch_backend_on_a_checkpoint_file(tmp_path, small_model, onnx_backend):
    """A demucs 2.x training package, loaded by stemserve.checkpoints, run by PyTorch."""
    import argparse

    demucs_model = demucs2("demucs.model")
    demucs_utils = demucs2("demucs.utils")
    model, info = small_model
    reference = demucs_model.Demucs(sources=list(SOURCES), **info.config)
    reference.load_state_dict(model.state_dict())
    checkpoint = tmp_path / "tiny.th"
    demucs_utils.save_model(reference, None, argparse.Namespace(diffq=0, qat=0), checkpoint)
    track = write_song(tmp_path / "t.wav")
    assert run_cli(track, "--backend", "torch", "-n", checkpoint, "-o", tmp_path / "out",
                   "-q", "--float32", "--clip-mode", "none") == 0
    expected = separate_array(song(), RATE, backend=onnx_backend)
    for name in SOURCES:
        data, _ = sf.read(str(tmp_path / "out" / "tiny" / "t" / f"{name}.wav"), dtype="float32")
        assert np.abs(data.T - expected[name]).max() < 1e-5


def test_two_stems_sum_to_the_four(onnx_backend):
    four = separate_array(song(), RATE, backend=onnx_backend)
    two = separate_array(song(), RATE, backend=onnx_backend, two_stems="vocals")
    # Batch composition varies from run to run; ONNX Runtime's sums then differ by ~1e-8.
    assert np.abs(two["vocals"] - four["vocals"]).max() < 1e-6
    others = four["drums"] + four["bass"] + four["other"]
    assert np.abs(two["no_vocals"] - others).max() < 1e-6


def test_bad_inputs_fail_alone_with_clear_errors(tmp_path, small_export, capsys):
    good = write_song(tmp_path / "good.wav")
    empty = tmp_path / "empty.wav"
    empty.touch()
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(bytes(range(256)) * 12)
    short = write_song(tmp_path / "short.wav", song(seconds=0.01))
    surround = write_song(tmp_path / "surround.wav", song(channels=6))
    missing = tmp_path / "missing.wav"
    code = run_cli(missing, empty, good, corrupt, short, surround, "--backend", "onnx",
                   "-n", small_export, "-o", tmp_path / "out", "-q")
    assert code == 1
    errors = capsys.readouterr().err
    for path, why in ((missing, "no such file"), (empty, "empty file"),
                      (corrupt, "not audio that libsndfile can read"), (short, "too short"),
                      (surround, "6 channels")):
        assert f"stemserve: error: {path}: {why}" in errors
    assert "5 of 6 tracks failed" in errors
    assert len(all_files(tmp_path / "out")) == 4  # the good track's stems, nothing else
    assert run_cli(surround, "--downmix", "--backend", "onnx", "-n", small_export,
                   "-o", tmp_path / "out", "-q") == 0


def test_progress_bar_only_on_a_terminal_and_off_with_quiet(tmp_path, small_export,
                                                           monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    track = write_song(tmp_path / "bar.wav")
    shown = []
    for flags in ((), ("--quiet",)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert run_cli(track, "--backend", "onnx", "-n", small_export, "-o", tmp_path,
                       *flags) == 0
        shown.append(terminal.getvalue())
    assert "bar.wav" in shown[0] and " s [" in shown[0]
    assert shown[1] == ""


class FailingBackend:
    """Passes ``good`` segments to ``inner``, then fails every later one."""

    def __init__(self, inner, good: int):
        self.inner, self.spec, self.good = inner, inner.spec, good

    def submit(self, mix: np.ndarray) -> Future:
        self.good -= 1
        if self.good >= 0:
            return self.inner.submit(mix)
        future: Future = Future()
        future.set_exception(StemserveError("backend broke"))
        return future

    def close(self) -> None:
        pass


@pytest.mark.parametrize("clip_mode", ["rescale", "clamp"])
def test_failure_mid_track_leaves_no_stems_and_input_untouched(tmp_path, onnx_backend,
                                                               clip_mode):
    track = write_song(tmp_path / "in" / "song.wav", song(seconds=6))
    before = sha256(track)
    with pytest.raises(StemserveError, match=r"song\.wav: backend broke"):
        separate_file(track, tmp_path / "out", backend=FailingBackend(onnx_backend, 4),
                      clip_mode=clip_mode, in_flight=2)
    assert not (tmp_path / "out").exists()
    assert all_files(tmp_path) == [track] and sha256(track) == before


# ---------------------------------------------------------------------------------------------
# Triton

def test_cli_triton_by_default_when_a_server_answers(tmp_path, triton_server, small_export,
                                                     onnx_backend):
    track = write_song(tmp_path / "t.wav")
    for extra in (("--no-shared-memory",), ("--in-flight", "4", "--server-window", "2")):
        out = tmp_path / "out" / str(len(extra))
        assert run_cli(track, "--url", triton_server.grpc_url, "-n", small_export, "-o", out,
                       "-q", "--float32", "--clip-mode", "none", *extra) == 0
        expected = separate_array(song(), RATE, backend=onnx_backend)
        for name in SOURCES:
            data, _ = sf.read(str(out / "small" / "t" / f"{name}.wav"), dtype="float32")
            assert np.abs(data.T - expected[name]).max() < 1e-5


def _tritonservers(repository: Path) -> set[int]:
    """Pids of running tritonserver processes of a repository under ``repository`` (from
    /proc, no extra dependency; other test runs may have servers of their own)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"tritonserver" in command and str(repository).encode() in command:
            pids.add(int(entry.name))
    return pids


@pytest.mark.server
def test_serve_flag_starts_and_stops_a_local_server(tmp_path, small_export, onnx_backend,
                                                     stemserve_cache):
    """The README's first command: a local Triton server for the run, then gone."""
    track = write_song(tmp_path / "t.wav")
    repositories = stemserve_cache / "model_repository"
    before = _tritonservers(repositories)
    done = subprocess.run(
        [sys.executable, "-m", "stemserve", "separate", "--serve", "-n", str(small_export),
         str(track), "-o", "out", "--float32", "--clip-mode", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tritonserver ready at 127.0.0.1:" in done.stderr
    expected = separate_array(song(), RATE, backend=onnx_backend)
    for name in SOURCES:
        data, _ = sf.read(str(tmp_path / "out" / "small" / "t" / f"{name}.wav"), dtype="float32")
        assert np.abs(data.T - expected[name]).max() < 1e-5
    assert _tritonservers(repositories) <= before
    assert not list((stemserve_cache / "model_repository").glob("serve-*"))


def test_request_timeout_is_retried_then_reported(triton_server, small_export, onnx_backend):
    with TritonBackend(triton_server.grpc_url, spec=load_export_spec(small_export),
                       timeout=0.001, retries=1, backoff=0.01) as backend:
        assert backend.shared_memory
        with pytest.raises(StemserveError, match=r"after 2 attempts: .*DEADLINE_EXCEEDED"):
            separate_array(song(), RATE, backend=backend)
        # Abandoned requests may still write into their regions: fresh ones replace them.
        backend.timeout = 60
        got = separate_array(song(), RATE, backend=backend)
    expected = separate_array(song(), RATE, backend=onnx_backend)
    assert all(np.abs(got[name] - expected[name]).max() < 1e-5 for name in SOURCES)


def test_server_unreachable_names_the_url(tmp_path, dead_port, small_export, capsys):
    url = f"127.0.0.1:{dead_port}"
    track = write_song(tmp_path / "u.wav")
    assert run_cli(track, "--backend", "triton", "--url", url, "-o", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert f"no Triton server answers at {url}" in error
    assert "stemserve serve" in error and "--backend onnx" in error
    assert not (tmp_path / "out").exists()
    # Without --backend the command says it falls back to in-process ONNX Runtime.
    assert run_cli(track, "--url", url, "-n", small_export, "-o", tmp_path / "out", "-q") == 0
    assert "separating in-process with ONNX Runtime" in capsys.readouterr().err
    assert len(all_files(tmp_path / "out")) == 4


def python_backend_regions(pgid: int) -> list[Path]:
    """The shared-memory files of the python-backend stubs in process group ``pgid``.

    A SIGKILLed server cannot remove them; the test does, naming exactly its own.
    """
    regions = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == pgid:
                args = (proc / "cmdline").read_bytes().split(b"\0")
                regions += [Path("/dev/shm") / arg.decode() for arg in args
                            if arg.startswith(b"triton_python_backend_shm_region_")]
        except OSError:
            continue  # the process exited meanwhile
    return regions


class KillingBackend:
    """Kills the server (SIGKILL, no goodbye) when the pipeline submits segment ``at``."""

    def __init__(self, inner, server, at: int):
        self.inner, self.spec, self.server, self.left = inner, inner.spec, server, at

    def submit(self, mix: np.ndarray) -> Future:
        self.left -= 1
        if self.left == 0:
            os.killpg(self.server.pid, signal.SIGKILL)
        return self.inner.submit(mix)

    def close(self) -> None:
        pass


@pytest.mark.server
def test_server_killed_mid_track_fails_clearly_after_retries(tmp_path, small_export):
    from stemserve.model_repository.ports import start_on_free_ports
    from stemserve.model_repository.server import TritonServer
    from stemserve.model_repository.writer import fill_repository

    track = write_song(tmp_path / "in" / "long.wav", song(seconds=20))
    before = sha256(track)
    fill_repository(small_export, tmp_path / "repository", "cpu")

    def start(ports: list[int]) -> TritonServer:
        http, grpc, metrics = ports
        server = TritonServer(tmp_path / "repository", http_port=http, grpc_port=grpc,
                              metrics_port=metrics, log_file=tmp_path / "server.log")
        server.start()
        return server

    server = start_on_free_ports(start)
    regions = python_backend_regions(server.pid)
    try:
        backend = TritonBackend(server.grpc_url, spec=load_export_spec(small_export),
                                retries=2, backoff=0.1, timeout=10)
        with pytest.raises(StemserveError) as raised, backend:
            separate_file(track, tmp_path / "out", backend=KillingBackend(backend, server, 4),
                          in_flight=2, clip_mode="clamp")
    finally:
        server.stop()
        for region in regions:
            region.unlink(missing_ok=True)
    message = str(raised.value)
    assert str(track) in message and server.grpc_url in message
    assert "after 3 attempts" in message
    assert not (tmp_path / "out").exists()
    assert sha256(track) == before


def test_client_runs_without_torch(small_export):
    """The library API imports and separates with torch made unimportable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from stemserve.client import open_backend, separate_array\n"
            f"with open_backend('onnx', model={str(small_export)!r}) as backend:\n"
            "    stems = separate_array(np.zeros(22050, np.float32) + 0.1, 22050,"
            " backend=backend)\n"
            "assert sorted(stems) == ['bass', 'drums', 'other', 'vocals']\n"
            "assert stems['vocals'].shape == (2, 22050)\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m]]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_format_errors_are_clear():
    with pytest.raises(StemserveError, match="FLAC"):
        OutputFormat("flac", "float32")


def test_progress_callback_gets_stages_in_audio_seconds(onnx_backend, tmp_path):
    seen: list[tuple[str, float, float]] = []
    separate_array(song(), RATE, backend=onnx_backend,
                   progress=lambda *event: seen.append(event))
    seconds = song().shape[-1] / RATE
    assert len(seen) > 1 and {stage for stage, _, _ in seen} == {"separating"}
    done = [value for _, value, _ in seen]
    assert done == sorted(done) and done[-1] == pytest.approx(seconds)
    assert all(total == pytest.approx(seconds) for _, _, total in seen)

    # A track shorter than one segment moves with every answer too (shifts: 3 requests);
    # a file then reports its encoding, up to its whole length.
    seen.clear()
    track = write_song(tmp_path / "short.wav", song(seconds=0.6))
    separate_file(track, tmp_path / "out", backend=onnx_backend, shifts=3, seed=0,
                  progress=lambda *event: seen.append(event))
    separating = [value for stage, value, _ in seen if stage == "separating"]
    encoding = [value for stage, value, _ in seen if stage == "encoding"]
    assert len(separating) == 3 and 0 < separating[0] < separating[1] < separating[2]
    assert encoding and encoding[-1] == pytest.approx(0.6, abs=1e-3)
    assert [stage for stage, _, _ in seen] == sorted(stage for stage, _, _ in seen)[::-1]


# ---------------------------------------------------------------------------------------------
# Hardening: no data lost, no crash on hostile input

def test_same_name_tracks_are_refused_before_anything_runs(tmp_path, small_export, capsys):
    first = write_song(tmp_path / "a" / "song.wav")
    second = write_song(tmp_path / "b" / "song.wav", song(seconds=1.5))
    common = ["--backend", "onnx", "-n", small_export, "-o", tmp_path / "out", "-q"]
    assert run_cli(first, second, *common) == 1
    error = capsys.readouterr().err
    assert f"{first} and {second}" in error and "{parent}" in error
    assert not (tmp_path / "out").exists()

    # {parent} tells them apart; the same track named twice is separated once.
    assert run_cli(first, second, tmp_path / "a" / ".." / "a" / "song.wav", *common,
                   "--filename", "{parent}/{track}/{stem}.{ext}") == 0
    assert sorted(path.relative_to(tmp_path / "out" / "small").as_posix()
                  for path in all_files(tmp_path / "out")) == sorted(
        f"{folder}/song/{name}.wav" for folder in "ab" for name in SOURCES)


def test_stems_never_overwrite_another_input(tmp_path, small_export, capsys):
    """x.wav's drums stem would be out/small/x/drums.wav: another input of the same run."""
    track = write_song(tmp_path / "out" / "small" / "x" / "drums.wav")
    other = write_song(tmp_path / "x.wav")
    before = sha256(track)
    assert run_cli(other, track, "--backend", "onnx", "-n", small_export, "-o",
                   tmp_path / "out", "--filename", "{track}/{stem}.{ext}", "-q") == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert sha256(track) == before


def test_a_failed_commit_keeps_the_earlier_stems_whole(tmp_path, small_export, capsys):
    """All stems or none: a rename that fails (a folder in the way) rolls back the others."""
    track = write_song(tmp_path / "song.wav")
    common = [track, "--backend", "onnx", "-n", small_export, "-o", tmp_path / "out", "-q"]
    assert run_cli(*common) == 0
    folder = tmp_path / "out" / "small" / "song"
    earlier = {path.name: sha256(path) for path in all_files(folder)}
    (folder / "vocals.wav").unlink()
    (folder / "vocals.wav").mkdir()
    assert run_cli(*common, "--float32") == 1
    assert "song.wav" in capsys.readouterr().err
    after = {path.name: sha256(path) for path in all_files(folder)}
    assert after == {name: digest for name, digest in earlier.items() if name != "vocals.wav"}


def test_commit_all_rolls_back_on_a_failed_rename(tmp_path):
    from stemserve.files import commit_all, temporary_name

    targets = [tmp_path / f"{name}.wav" for name in ("a", "b", "c")]
    targets[0].write_text("old a")
    targets[2].mkdir()  # the last rename fails
    temporaries = {}
    for target in targets:
        temporaries[temporary_name(target)] = target
        next(reversed(temporaries)).write_text(f"new {target.stem}")
    with pytest.raises(IsADirectoryError):
        commit_all(temporaries)
    assert targets[0].read_text() == "old a" and not targets[1].exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".a.wav")]


@pytest.mark.parametrize("rate,frames", [(1, 800), (1, 70_000), (7999, 20_000),
                                         (400_000, 50_000)])
@pytest.mark.slow
def test_sample_rates_outside_the_range_are_refused(tmp_path, small_export, rate, frames):
    """A 1 Hz file crashed soxr (rc 139) or asked for gigabytes: refused, in a separate
    process so that a crash cannot take the test run with it; the next track still runs."""
    odd = tmp_path / "odd.wav"
    sf.write(str(odd), np.zeros((frames, 2), np.float32), rate)
    good = write_song(tmp_path / "good.wav")
    done = subprocess.run([sys.executable, "-m", "stemserve", "separate", str(odd), str(good),
                           "--backend", "onnx", "-n", str(small_export), "-o", "out", "-q"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"odd.wav: sample rate {rate} Hz is outside" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(path.name for path in all_files(tmp_path / "out")) == sorted(
        f"{name}.wav" for name in SOURCES)


def test_resampling_memory_follows_the_output_rate():
    """An 8 kHz block is cut before resampling, so no output block is much over 64 Ki frames."""
    from stemserve.audio import BLOCK_FRAMES, resample_blocks

    block = np.zeros((2, 1 << 20), np.float32)  # a million frames at 8 kHz
    sizes = [out.shape[-1] for out in resample_blocks([block], 8000, 44100)]
    assert max(sizes) <= 1.1 * BLOCK_FRAMES
    assert sum(sizes) == pytest.approx(block.shape[-1] * 44100 / 8000, abs=2)


@pytest.mark.slow
def test_write_errors_fail_their_track_only(tmp_path, small_export):
    """Disk full (here: a file size limit) fails the long track with a named error; the
    short one is written; no traceback, no hidden files."""
    import resource

    long = write_song(tmp_path / "long.wav", song(seconds=20))
    short = write_song(tmp_path / "short.wav", song(seconds=1))
    limit = 2 << 20  # 2 MB: one float stem of 1 s is 350 KB, of 20 s 7 MB

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "stemserve", "separate", str(long), str(short),
                           "--backend", "onnx", "-n", str(small_export), "-o", "out", "-q",
                           "--float32", "--jobs", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, preexec_fn=cap)
    assert done.returncode == 1, done.stderr
    assert "long.wav: cannot write stems under" in done.stderr
    assert "Traceback" not in done.stderr
    files = all_files(tmp_path / "out")
    assert sorted(path.relative_to(tmp_path / "out").as_posix() for path in files) == sorted(
        f"small/short/{name}.wav" for name in SOURCES)


def test_any_failure_of_a_track_is_its_own(tmp_path, small_export):
    """An out-of-memory error (or any other) in one track is named for that track."""
    from stemserve.client import separate_files

    with OnnxBackend(small_export) as onnx:
        calls = 0

        def run(batch: np.ndarray) -> np.ndarray:
            """ONNX Runtime, but the fifth call (in the first track) runs out of memory."""
            nonlocal calls
            calls += 1
            if calls == 5:
                raise MemoryError
            return onnx.session.run(["stems"], {"mix": batch})[0]

        tracks = [write_song(tmp_path / "long.wav", song(seconds=20)),
                  write_song(tmp_path / "short.wav", song(seconds=1))]
        with LocalBackend(onnx.spec, run) as backend:
            results = {result.track.name: result
                       for result in separate_files(tracks, tmp_path / "out", backend=backend)}
    assert "long.wav: out of memory" in str(results["long.wav"].error)
    assert results["short.wav"].stems is not None


def test_config_works_for_separate_and_an_export_is_found_from_anywhere(
        tmp_path, stemserve_cache, monkeypatch, capsys):
    """A plain state dict of another configuration: --config, as for export; the export
    lands in the cache and is found by name from any working directory."""
    import torch

    from stemserve.model import Demucs

    torch.manual_seed(3)
    state = tmp_path / "mine.th"
    torch.save(Demucs(list(SOURCES), channels=4).state_dict(), state)
    track = write_song(tmp_path / "t.wav")
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    common = ["--backend", "onnx", "-o", tmp_path / "out", "-q"]
    assert run_cli(track, "-n", state, *common) == 1
    assert "--config demucs_unittest" in capsys.readouterr().err
    assert run_cli(track, "-n", state, "--config", "demucs_unittest", *common) == 0
    (export,) = (stemserve_cache / "export").glob("mine-*/model.json")
    exported_at = export.stat().st_mtime_ns
    assert run_cli(track, "-n", "mine", *common) == 0  # by name, no checkpoint needed
    assert run_cli(track, "-n", state, "--config", "demucs_unittest", *common) == 0
    assert export.stat().st_mtime_ns == exported_at  # the same content: not exported again
    torch.save(Demucs(list(SOURCES), channels=4).state_dict(), state)  # retrained
    assert run_cli(track, "-n", state, "--config", "demucs_unittest", *common) == 0
    assert export.stat().st_mtime_ns == exported_at  # its export stays the old file's
    assert len(list((stemserve_cache / "export").glob("mine-*/model.json"))) == 2
    capsys.readouterr()
    assert run_cli(track, "-n", "mine", *common) == 1  # two exports of that name now
    assert "2 exports are named 'mine'" in capsys.readouterr().err


def test_cli_version_and_verbose_after_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("stemserve ")
    args = build_parser().parse_args(["separate", "-v", "x.wav"])
    assert args.verbose is True
    assert build_parser().parse_args(["-v", "separate", "x.wav"]).verbose is True
    assert build_parser().parse_args(["separate", "x.wav"]).verbose is False


@pytest.mark.slow
def test_export_says_what_it_does_once(tmp_path, small_model, stemserve_cache):
    """Every message once (the export line was printed and logged), the parity check
    announced with its progress."""
    import torch

    model, _ = small_model
    state = tmp_path / "tiny.th"
    torch.save(model.state_dict(), state)
    done = subprocess.run([sys.executable, "-m", "stemserve", "export", "-n", str(state),
                           "--config", "demucs_unittest", "--segment", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), output
    assert "checking ONNX Runtime against PyTorch" in output
    assert "exported tiny to" in output and "max abs error" in output
