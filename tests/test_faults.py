"""Server faults and signals, against real tritonservers and real `stemserve` processes.

A frozen server (SIGSTOP) must not hold a client; SIGTERM, SIGHUP and SIGINT stop every
command as Ctrl-C does; what a killed client leaves (hidden `.part` files, shared-memory
regions registered on the server) is collected by the next run; a restarted server is
used again within seconds. The module starts its own server, since freezing or restarting
the session's shared one would disturb other tests.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from stemserve.client import separate_array
from stemserve.client.backends.triton import CONTROL_TIMEOUT, TritonBackend
from stemserve.errors import StemserveError
from stemserve.model_repository.local import local_server
from stemserve.errors import ServerError
from stemserve.model_repository.ports import start_on_free_ports
from stemserve.model_repository.server import TritonServer
from test_separate_cli import RATE, song, write_song

pytestmark = pytest.mark.server

LONG = 60.0
"""Seconds of audio that keep a client busy for a few seconds with the small model."""


@pytest.fixture(scope="module")
def server(small_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with local_server(small_export, root=root, logs=root) as server:
        yield server


@pytest.fixture
def running(server):
    """The module's server, started again if a test before stopped it (or if it did not
    survive being frozen: its python backend may crash on waking)."""
    if not server.running:
        server.restart()
    yield server


class Frozen:
    """SIGSTOP the tritonserver process for a ``with`` block (its stubs run on)."""

    def __init__(self, server: TritonServer):
        self.pid = server.pid

    def __enter__(self) -> "Frozen":
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc) -> None:
        os.kill(self.pid, signal.SIGCONT)


def regions(server: TritonServer) -> list[str]:
    """Names of the system shared-memory regions registered on ``server``."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        status = client.get_system_shared_memory_status(as_json=True,
                                                        client_timeout=CONTROL_TIMEOUT)
    return list(status.get("regions", {}))


def separate_command(track: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stemserve", "separate", str(track), "-o", str(out),
            "--backend", "triton", "--url", url, *extra]


def wait_until(condition, what: str, limit: float = 60.0) -> None:
    """Until ``condition()`` holds, checked every 50 ms for up to ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {limit:g} s"
        time.sleep(0.05)


def wait_for_regions(server: TritonServer, pid: int, limit: float = 60.0) -> None:
    """Until the client ``pid`` has registered its shared memory: it is connected."""
    wait_until(lambda: any(f"_{pid}_" in name for name in regions(server)),
               "the client registered shared memory", limit)


def dead_pid() -> int:
    """A process id that no process has now."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def parts(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".part")]


def writing(folder: Path) -> bool:
    """Whether stems are being written in ``folder``: a hidden ``.part`` file holds data."""
    for path in parts(folder):
        with contextlib.suppress(OSError):  # committed or removed meanwhile
            if path.stat().st_size > 0:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# A frozen server

def test_a_frozen_server_fails_in_flight_requests_within_seconds(running):
    """Mid-track, every request to a frozen server is given up after the health probes
    fail (not after the 600 s request timeout), and close() returns without waiting on it."""
    backend = TritonBackend(running.grpc_url, retries=0)
    try:
        with Frozen(running), ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            result = pool.submit(separate_array, song(seconds=LONG), RATE, backend=backend)
            with pytest.raises(StemserveError, match="stopped answering"):
                result.result(timeout=60)
            assert time.monotonic() - started < 30
            closing = time.monotonic()
            backend.close()
            assert time.monotonic() - closing < 10
    finally:
        backend.close()


def test_separate_exits_when_the_server_freezes(running, tmp_path):
    """The CLI with --timeout 3 --retries 1 (and --retries 0) prints its error and exits,
    with no stems and no temporary files left, while the server is still frozen.

    Both clients at once, mid-track when the server freezes (3 x LONG: a client needs about
    8 s for it, far longer than the other takes to connect), so the run waits out the
    slower one's give-up only, not both one after the other."""
    track = write_song(tmp_path / "long.wav", song(seconds=3 * LONG))
    clients: dict[str, tuple[Path, subprocess.Popen]] = {}
    stderr: dict[str, str] = {}
    try:
        for retries in ("1", "0"):
            out = tmp_path / f"out-{retries}"
            clients[retries] = out, subprocess.Popen(
                separate_command(track, out, running.grpc_url, "--timeout", "3", "--retries",
                                 retries), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
        for _, client in clients.values():
            wait_for_regions(running, client.pid)
        assert all(client.poll() is None for _, client in clients.values()), \
            "a client finished before the server froze"
        with Frozen(running):
            for retries, (_, client) in clients.items():
                stderr[retries] = client.communicate(timeout=90)[1]
    finally:
        for _, client in clients.values():
            client.kill()
    for retries, (out, client) in clients.items():
        assert client.returncode == 1, (retries, stderr[retries])
        assert "long.wav" in stderr[retries] and "Traceback" not in stderr[retries]
        assert not [path for path in out.rglob("*") if path.is_file()]


def test_separate_exits_when_the_server_is_frozen_from_the_start(running, tmp_path):
    track = write_song(tmp_path / "t.wav")
    with Frozen(running):
        started = time.monotonic()
        done = subprocess.run(separate_command(track, tmp_path / "out", running.grpc_url),
                              capture_output=True, text=True, timeout=120)
        assert time.monotonic() - started < 60
    assert done.returncode == 1
    assert f"no Triton server answers at {running.grpc_url}" in done.stderr


# ---------------------------------------------------------------------------------------------
# Signals

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_separate_stops_cleanly_on_signals(running, tmp_path, signum):
    """Like Ctrl-C: exit 130, no stems, no hidden .part files, no regions left on the server."""
    track = write_song(tmp_path / "long.wav", song(seconds=LONG))
    out = tmp_path / "out"
    client = subprocess.Popen(separate_command(track, out, running.grpc_url),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_regions(running, client.pid)
        wait_until(lambda: writing(out), "stems being written")  # requests in flight too
        assert client.poll() is None, "the client finished before the signal"
        client.send_signal(signum)
        _, stderr = client.communicate(timeout=60)
    finally:
        client.kill()
    assert client.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not [path for path in out.rglob("*") if path.is_file()]
    assert not [name for name in regions(running) if f"_{client.pid}_" in name]


def _serve(export: Path) -> tuple[subprocess.Popen, list[int]]:
    """`stemserve serve` started from a script as `serve &` (so with SIGINT ignored, as
    shells start background jobs), on free ports (fresh ones again if one was taken before
    the server bound it), once it is ready."""
    def start(ports: list[int]) -> tuple[subprocess.Popen, list[int], list[str]]:
        command = (f"{sys.executable} -m stemserve serve -n {export} --cpu "
                   f"--http-port {ports[0]} --grpc-port {ports[1]} --metrics-port {ports[2]} "
                   "& wait")
        shell = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines = []
        for line in shell.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                return shell, ports, lines
        shell.wait(60)
        raise ServerError("stemserve serve did not start:\n" + "".join(lines))

    shell, ports, lines = start_on_free_ports(start)
    # What every host without a GPU logs is left out of the forwarded log.
    assert not [line for line in lines
                if "CudaDriverHelper" in line or "pinned system memory" in line]
    threading.Thread(target=shell.stdout.read, daemon=True).start()  # keep the pipe drained
    return shell, ports


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _child(shell: subprocess.Popen) -> int:
    """The `stemserve serve` process the ``bash -c`` of :func:`_serve` started."""
    children = Path(f"/proc/{shell.pid}/task/{shell.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _assert_stopped(shell: subprocess.Popen, ports: list[int]) -> None:
    """serve exits within a minute and its tritonserver stops listening soon after."""
    shell.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _listening(ports[1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listening(ports[1]), "tritonserver outlived stemserve serve"


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_serve_stops_tritonserver_on_signals(small_export, signum):
    shell, ports = _serve(small_export)
    try:
        os.kill(_child(shell), signum)
        _assert_stopped(shell, ports)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left: as it should be
            os.killpg(shell.pid, signal.SIGKILL)


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to one thread of ``pid``, as the kernel may pick any thread for a
    signal sent to the process."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, signum) != 0:  # SYS_tgkill on x86_64
        raise OSError(ctypes.get_errno(), "tgkill")


def test_serve_stops_on_a_signal_another_thread_receives(small_export):
    """A SIGTERM handled by the log reader thread, not the main one, still stops serve:
    the main thread must not sit in a waitpid that only its own signals interrupt."""
    shell, ports = _serve(small_export)
    try:
        pid = _child(shell)
        threads = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
        others = [tid for tid in threads if tid != pid]
        assert others, "serve runs a log reader thread"
        _tgkill(pid, others[0], signal.SIGTERM)
        _assert_stopped(shell, ports)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# What a killed client leaves

def test_the_next_run_collects_what_a_killed_client_left(running, tmp_path):
    """Hidden .part files and registered regions of a process that is gone are removed."""
    pid = dead_pid()
    track = write_song(tmp_path / "song.wav")
    folder = tmp_path / "out" / "small" / "song"
    folder.mkdir(parents=True)
    stale = folder / f".drums.wav.{pid}-0123abcd.part"
    stale.write_bytes(b"left by a killed run")
    alive = folder / f".drums.wav.{os.getpid()}-0123abcd.part"
    alive.write_bytes(b"a live writer's")
    name = f"stemserve_{pid}_0123abcd_0"
    region = Path("/dev/shm", name)
    region.write_bytes(bytes(64))  # what shm_open + ftruncate leave
    with grpcclient.InferenceServerClient(running.grpc_url) as client:
        client.register_system_shared_memory(name, "/" + name, 64)
    try:
        done = subprocess.run(separate_command(track, tmp_path / "out", running.grpc_url),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert not stale.exists() and alive.exists()
        assert name not in regions(running)
        assert not region.exists()
        assert (folder / "drums.wav").is_file()
    finally:
        region.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# A restarted server

def test_a_restarted_server_is_used_again_within_seconds(running):
    """gRPC's reconnection backoff (20 s and more by default) is bounded to a second."""
    mix = song(seconds=2)
    with TritonBackend(running.grpc_url, retries=0, shared_memory=False) as backend:
        expected = separate_array(mix, RATE, backend=backend)
        running.stop()
        with pytest.raises(StemserveError):
            separate_array(mix, RATE, backend=backend)
        time.sleep(3)  # failed reconnects meanwhile grow gRPC's backoff
        running.restart()
        ready = time.monotonic()
        while True:
            try:
                got = separate_array(mix, RATE, backend=backend)
                break
            except StemserveError:
                assert time.monotonic() - ready < 5, "the backend did not reconnect"
                time.sleep(0.2)
        assert max(np.abs(got[name] - expected[name]).max() for name in got) < 1e-5
