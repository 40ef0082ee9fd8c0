"""One client over several real tritonservers: spread, failover, recovery, all down, the CLI
over a folder, and a short run of the benchmark's soak.

The module starts its own three servers (the kill tests would break the session's shared
one); a test that kills or stops some leaves them to the ``fleet_servers`` fixture, which
starts them again for the next test.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from stemserve.client import (Separator, open_backend, separate_array, separate_file,
                              separate_files)
from stemserve.client.backends.fleet import FleetBackend, check_agreement, parse_endpoints
from stemserve.client.backends.onnx import OnnxBackend
from stemserve.client.backends.triton import TritonBackend
from stemserve.cli import main
from stemserve.client.tracks import expand_tracks
from stemserve.defaults import TRITON_MODEL, TRITON_URL_ENV
from stemserve.errors import StemserveError
from stemserve.model_repository.local import local_servers
from stemserve.model_repository.server import TritonServer
from stemserve.spec import load_export_spec
from test_separate_cli import RATE, all_files, python_backend_regions, song, write_song
from tolerance import assert_matches

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.serving.soak import soak  # noqa: E402

pytestmark = pytest.mark.server

MIX = song(seconds=20)
"""27 segments of the small model: long enough to kill a server in the middle."""
ULPS = 8
"""Fleet vs one server, in float32 epsilons of the stems' peak (``tests/tolerance.py``):
batch composition moves ONNX Runtime's sums a little; measured 1.7 (7.5e-9 at a peak of
0.036) on a 2-core Xeon."""


@pytest.fixture(scope="module")
def servers(small_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    with local_servers(small_export, 3, root=root, logs=root) as servers:
        yield servers


@pytest.fixture
def fleet_servers(servers):
    """The module's three servers, each running (a test before may have killed some, or
    frozen one whose python backend did not survive waking)."""
    dead = [server for server in servers if not server.running]
    if dead:
        with ThreadPoolExecutor(len(dead)) as pool:
            list(pool.map(TritonServer.restart, dead))
    return servers


@pytest.fixture(scope="module")
def reference(servers):
    """The stems of MIX from one server through the plain single-server backend."""
    with TritonBackend(servers[0].grpc_url) as backend:
        return separate_array(MIX, RATE, backend=backend)


def urls(servers) -> list[str]:
    return [server.grpc_url for server in servers]


def assert_same_stems(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    assert_matches(np.stack([got[name] for name in sorted(got)]),
                   np.stack([expected[name] for name in sorted(got)]), ULPS, "fleet")


def inferences(server) -> int:
    """Requests the server has run (Triton's own statistics)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(TRITON_MODEL, as_json=True)
    finally:
        client.close()
    return sum(int(model.get("inference_count", 0)) for model in stats["model_stats"])


def kill(server) -> None:
    """SIGKILL the server and its stubs (no goodbye), reap it, and remove what the stubs'
    shared memory leaves behind."""
    regions = python_backend_regions(server.pid)
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()
    for region in regions:
        region.unlink(missing_ok=True)


class KillWhenBusy:
    """Passes segments to ``fleet``; from submit ``after`` on, kills ``victims`` as soon as
    each has requests in flight, so that they die holding work."""

    def __init__(self, fleet: FleetBackend, victims: list[int], servers, after: int = 6):
        self.fleet, self.spec, self.victims, self.servers = fleet, fleet.spec, victims, servers
        self.left = after

    def submit(self, mix: np.ndarray) -> Future:
        future = self.fleet.submit(mix)
        self.left -= 1
        status = self.fleet.status()
        if self.left <= 0 and self.victims and all(status[i].in_flight for i in self.victims):
            for index in self.victims:
                kill(self.servers[index])
            self.victims = []
        return future

    def close(self) -> None:
        pass


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Endpoints and specs (no server)

def test_parse_endpoints_from_a_list_and_a_file(tmp_path):
    assert parse_endpoints("127.0.0.1:8001, localhost:9001,127.0.0.1:8001") == \
        ["127.0.0.1:8001", "localhost:9001"]
    listing = tmp_path / "servers.txt"
    listing.write_text("# the rack\n10.0.0.1:8001   # gpu box\n\n"
                       "10.0.0.2:8001,10.0.0.3:8001\n")
    assert parse_endpoints(f"[::1]:8001,@{listing}") == \
        ["[::1]:8001", "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]
    for bad in ("127.0.0.1", "host:0", "host:70000", "http://host:8001"):
        with pytest.raises(StemserveError, match="is not host:port"):
            parse_endpoints(bad)
    with pytest.raises(StemserveError, match="no Triton endpoint"):
        parse_endpoints(" , ")
    with pytest.raises(StemserveError, match="cannot read the list"):
        parse_endpoints(f"@{tmp_path / 'missing.txt'}")


def test_servers_of_different_models_are_refused_by_name(small_export):
    spec = load_export_spec(small_export)
    other = dataclasses.replace(spec, checkpoint="other", checkpoint_sha256="f" * 64)
    assert check_agreement({"a:1": spec, "b:2": spec}) == spec
    with pytest.raises(StemserveError, match=r"not serve the same model: a:1, c:3 serve small "
                                             r".*; b:2 serves other \(ffffffffffff"):
        check_agreement({"a:1": spec, "b:2": other, "c:3": spec})


def test_tracks_from_files_folders_and_lists(tmp_path):
    album = tmp_path / "album"
    for name in ("b.flac", "a.WAV", ".a.wav.1234.part", "notes.txt", "sub/c.txt"):
        (album / name).parent.mkdir(parents=True, exist_ok=True)
        (album / name).write_bytes(b"")
    listing = tmp_path / "tracks.txt"
    listing.write_text("# tonight\nx/My Song.mp3\n\ny.ogg\n")
    assert expand_tracks([album, f"@{listing}", "z.wav"]) == [
        album / "a.WAV", album / "b.flac", Path("x/My Song.mp3"), Path("y.ogg"), Path("z.wav")]
    with pytest.raises(StemserveError, match="sub: a folder without audio files"):
        expand_tracks([album / "sub"])


def test_separate_files_overlaps_tracks_and_sums_progress(tmp_path, small_export):
    tracks = [write_song(tmp_path / f"{index}.wav", song(seconds=2)) for index in range(3)]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF")
    seen: list[float] = []

    def progress(stage: str, done: float, total: float) -> None:
        if stage == "separating":
            seen.append(done)
            assert total == pytest.approx(6.0)

    with OnnxBackend(small_export) as backend:
        results = list(separate_files([*tracks, broken], tmp_path / "out", backend=backend,
                                      jobs=2, progress=progress))
    assert [result.track for result in results][0] == broken and results[0].error
    assert sorted(result.track for result in results[1:]) == tracks
    assert all(result.stems and result.error is None for result in results[1:])
    assert seen == sorted(seen) and seen[-1] == pytest.approx(6.0)


# ---------------------------------------------------------------------------------------------
# Real servers

def test_segments_spread_over_three_servers_with_single_server_output(fleet_servers,
                                                                      reference):
    before = [inferences(server) for server in fleet_servers]
    with open_backend("triton", connection=",".join(urls(fleet_servers))) as backend:
        assert isinstance(backend, FleetBackend)
        got = separate_array(MIX, RATE, backend=backend)
        status = backend.status()
    after = [inferences(server) for server in fleet_servers]
    assert all(done > earlier for done, earlier in zip(after, before, strict=True)), (before, after)
    assert all(entry.healthy and entry.answered >= 5 for entry in status), status
    assert backend.retried == 0
    assert_same_stems(got, reference)


def test_server_killed_mid_track_loses_nothing(fleet_servers, reference):
    with FleetBackend(urls(fleet_servers), backoff=0.1) as fleet:
        got = separate_array(MIX, RATE, backend=KillWhenBusy(fleet, [1], fleet_servers))
        status = fleet.status()
        assert fleet.retried > 0
    assert [entry.taken_out for entry in status] == [0, 1, 0]
    assert not status[1].healthy and "UNAVAILABLE" in status[1].last_error
    assert_same_stems(got, reference)


def test_a_frozen_server_is_taken_out_within_seconds(fleet_servers, reference):
    """SIGSTOP: the server accepts connections and answers nothing. Its health probes time
    out, so its segments go to the others long before the 600 s request timeout."""
    victim = fleet_servers[1]
    with FleetBackend(urls(fleet_servers[:2]), backoff=0.1) as fleet:
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            got = separate_array(MIX, RATE, backend=fleet)
            took = time.monotonic() - started
            status = fleet.status()
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    assert took < 60, took
    assert not status[1].healthy and "stopped answering" in status[1].last_error
    assert fleet.retried > 0
    assert_same_stems(got, reference)


def test_stopped_server_is_taken_back_once_ready(fleet_servers, reference):
    victim = fleet_servers[2]
    with FleetBackend(urls(fleet_servers), backoff=0.1) as fleet:
        victim.stop()
        got = separate_array(MIX, RATE, backend=fleet)
        assert_same_stems(got, reference)
        assert fleet.retried > 0 and not fleet.status()[2].healthy

        victim.start()
        wait_until(lambda: fleet.status()[2].healthy, 20, "taken back")
        before = inferences(victim)
        assert_same_stems(separate_array(MIX, RATE, backend=fleet), reference)
        assert inferences(victim) > before

        # Restarted behind the fleet's back: the server forgot this client's shared-memory
        # regions; the fleet notices on the first answer, re-sends, and takes it back.
        retried = fleet.retried
        victim.restart()
        assert_same_stems(separate_array(MIX, RATE, backend=fleet), reference)
        assert fleet.retried > retried
        wait_until(lambda: fleet.status()[2].healthy, 20, "taken back after the restart")
        assert fleet.status()[2].taken_out == 2


def test_cli_separates_a_folder_over_two_servers_under_one_bar(fleet_servers, tmp_path,
                                                               monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    album = tmp_path / "album"
    for index in range(6):
        write_song(album / f"{index:02d} take.wav", song(seconds=3) * (index + 1) / 6)
    (album / "cover.txt").write_text("not audio")
    listing = tmp_path / "servers.txt"
    listing.write_text("# two of the three\n" + "\n".join(urls(fleet_servers)[:2]) + "\n")
    monkeypatch.setenv(TRITON_URL_ENV, f"@{listing}")
    running, peak, lock = 0, 0, threading.Lock()
    real = Separator.separate_file

    def counting(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(Separator, "separate_file", counting)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["separate", str(album), "-o", str(tmp_path / "out"), "--float32",
                 "--clip-mode", "none"]) == 0
    written = all_files(tmp_path / "out")
    assert len(written) == 6 * 4 and {path.parent.name for path in written} == \
        {f"{index:02d} take" for index in range(6)}
    shown = terminal.getvalue()
    bars = [piece for piece in re.split(r"[\r\n]", shown) if "|" in piece]
    assert bars and all(piece.startswith("6 tracks:") for piece in bars), shown
    assert "18.0/18.0 s" in shown
    assert "6 of 6 tracks separated" in shown and "segments re-sent" in shown
    assert peak > 1  # tracks overlapped (4 at once: 2 per server)


def test_short_soak_with_a_restart_fails_no_track(fleet_servers):
    """Eight clients against two servers, one restarted under load: the 5-minute soak's
    code. The restart (SIGINT with requests in flight, then a start) takes about 9 s here:
    it begins a quarter of the way in, so the load runs through all of it."""
    result = soak(urls(fleet_servers)[:2], clients=8, duration=14, track_seconds=3,
                  restart_server=fleet_servers[1].restart, restart_at=0.25, backoff=0.1)
    print(result.summary())
    assert result.failed == 0, result.errors
    assert result.completed >= 8 and result.retried > 0
    assert "ready_at_s" in result.restart


def test_every_server_down_fails_the_track_whole_and_names_them(fleet_servers, tmp_path):
    track = write_song(tmp_path / "in" / "long.wav", MIX)
    with FleetBackend(urls(fleet_servers), retries=2, backoff=0.1) as fleet:
        start = time.monotonic()
        with pytest.raises(StemserveError) as raised:
            separate_file(track, tmp_path / "out", in_flight=4,
                          backend=KillWhenBusy(fleet, [0, 1, 2], fleet_servers))
        elapsed = time.monotonic() - start
    message = str(raised.value)
    assert str(track) in message and "every Triton server is down" in message
    assert all(url in message for url in urls(fleet_servers))
    assert elapsed < 30
    assert not (tmp_path / "out").exists()
