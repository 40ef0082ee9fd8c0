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
from stemserve.cli import main
from stemserve.client import separate_array, separate_file
from stemserve.client.onnx_backend import OnnxBackend, load_export_spec
from stemserve.client.triton import TritonBackend
from stemserve.errors import StemserveError

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
                   "--filename", "{track}-{stem}.{ext}", "--samplerate-out", "original") == 0
    for name in ("vocals", "no_vocals"):
        info = sf.info(str(tmp_path / "small" / f"in-{name}.flac"))
        assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_24", 48000)
        assert abs(info.frames - 48000 * 2.3) <= 2
    assert run_cli(*common, "--mp3", "--mp3-bitrate", "128") == 0
    assert sf.info(str(tmp_path / "small" / "in" / "drums.mp3")).samplerate == RATE
    assert run_cli(*common, "--float32", "--clip-mode", "none") == 0
    assert sf.info(str(tmp_path / "small" / "in" / "bass.wav")).subtype == "FLOAT"


def test_cli_torch_backend_on_a_checkpoint_file(tmp_path, small_model, onnx_backend):
    """A demucs 2.x training package, loaded by stemserve.checkpoints, run by PyTorch."""
    import argparse

    demucs_model = pytest.importorskip("demucs.model")
    demucs_utils = pytest.importorskip("demucs.utils")
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
                      clip_mode=clip_mode, window=2)
    assert not (tmp_path / "out").exists()
    assert all_files(tmp_path) == [track] and sha256(track) == before


# ---------------------------------------------------------------------------------------------
# Triton

def test_cli_triton_by_default_when_a_server_answers(tmp_path, triton_server, small_export,
                                                     onnx_backend):
    track = write_song(tmp_path / "t.wav")
    for extra in (("--no-shared-memory",), ("--window", "4")):
        out = tmp_path / "out" / str(len(extra))
        assert run_cli(track, "--url", triton_server.grpc_url, "-n", small_export, "-o", out,
                       "-q", "--float32", "--clip-mode", "none", *extra) == 0
        expected = separate_array(song(), RATE, backend=onnx_backend)
        for name in SOURCES:
            data, _ = sf.read(str(out / "small" / "t" / f"{name}.wav"), dtype="float32")
            assert np.abs(data.T - expected[name]).max() < 1e-5


def _tritonservers() -> set[int]:
    """Pids of running tritonserver processes (from /proc, no extra dependency)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"tritonserver" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def test_serve_flag_starts_and_stops_a_local_server(tmp_path, small_export, onnx_backend):
    """The README's first command: a local Triton server for the run, then gone."""
    track = write_song(tmp_path / "t.wav")
    before = _tritonservers()
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
    assert _tritonservers() <= before
    assert not list((tmp_path / "build" / "model_repository").iterdir())


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


def test_server_unreachable_names_the_url(tmp_path, free_ports, small_export, capsys):
    (port,) = free_ports(1)
    url = f"127.0.0.1:{port}"
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


def test_server_killed_mid_track_fails_clearly_after_retries(tmp_path, small_export,
                                                             free_ports):
    from stemserve.model_repository.writer import fill_repository
    from stemserve.triton_server import TritonServer

    track = write_song(tmp_path / "in" / "long.wav", song(seconds=20))
    before = sha256(track)
    fill_repository(small_export, tmp_path / "repository", "cpu")
    http, grpc, metrics = free_ports(3)
    server = TritonServer(tmp_path / "repository", http_port=http, grpc_port=grpc,
                          metrics_port=metrics, log_file=tmp_path / "server.log")
    server.start()
    regions = python_backend_regions(server.pid)
    try:
        backend = TritonBackend(server.grpc_url, spec=load_export_spec(small_export),
                                retries=2, backoff=0.1, timeout=10)
        with pytest.raises(StemserveError) as raised, backend:
            separate_file(track, tmp_path / "out", backend=KillingBackend(backend, server, 4),
                          window=2, clip_mode="clamp")
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


def test_progress_callback_gets_audio_seconds(onnx_backend):
    seen: list[float] = []
    separate_array(song(), RATE, backend=onnx_backend, progress=seen.append)
    assert len(seen) > 1 and seen == sorted(seen)
    assert seen[-1] == pytest.approx(song().shape[-1] / RATE)
