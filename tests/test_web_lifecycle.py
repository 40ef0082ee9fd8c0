"""``stemserve web`` starting and stopping: one server per jobs folder, a default model that
cannot load stops the start, a plain state dict with ``--config``, no server path in job
errors, and SIGTERM or SIGHUP shut it down as cleanly as Ctrl-C.

Every test runs real ``stemserve web`` child processes; in-process ones are given their own
caches (``STEMSERVE_CACHE``, ``TORCH_HOME``) and an unreachable checkpoint mirror, so nothing
is downloaded and nothing of the user's is read.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_web import make_track, submit, wait_done, web_process

from stemserve.defaults import DEFAULT_MODEL

pytestmark = pytest.mark.server


def isolated_env(tmp_path: Path, dead_port: int) -> dict[str, str]:
    """Caches of the test's own, and a checkpoint mirror where nothing answers."""
    return dict(os.environ, STEMSERVE_CACHE=str(tmp_path / "cache"),
                TORCH_HOME=str(tmp_path / "torch"),
                STEMSERVE_CHECKPOINT_URL=f"http://127.0.0.1:{dead_port}/")


def run_web(*args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``stemserve web`` that is expected to stop by itself; killed if it serves instead."""
    process = subprocess.Popen([sys.executable, "-m", "stemserve", "web", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# ---------------------------------------------------------------------------------------------
# One server per jobs folder

def test_a_second_server_on_the_same_jobs_folder_stops_and_leaves_the_first_ones_jobs(
        triton_server, small_export, tmp_path):
    """Before the lock, the second server's start deleted the first one's queued jobs (no
    job.json yet), which then failed reading their vanished uploads.

    The first server is stopped (SIGSTOP) while the second one starts, so its jobs are
    still queued then however long that start takes: they need not be long to outlast it."""
    jobs = tmp_path / "jobs"
    track = make_track(tmp_path / "song.wav", seconds=10.0)
    with web_process(0, jobs, "--url", triton_server.grpc_url, "--model",
                     str(small_export)) as (first, base), \
            httpx.Client(base_url=base, timeout=60) as client:
        ids = [submit(client, track, shifts="2").json()["id"] for _ in range(3)]
        states = [client.get(f"/api/jobs/{job_id}").json()["state"] for job_id in ids]
        assert "queued" in states or "running" in states  # the case that went wrong
        first.send_signal(signal.SIGSTOP)
        try:
            second = run_web("--port", "0", "--jobs-dir", str(jobs),
                             "--url", triton_server.grpc_url, "--model", str(small_export),
                             timeout=60)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip().endswith(
            f"stemserve: error: the jobs folder {jobs} is in use by another stemserve web "
            f"(pid {first.pid}): stop that one, or give this one its own --jobs-dir")
        assert [wait_done(client, job_id)["state"] for job_id in ids] == ["done"] * 3


# ---------------------------------------------------------------------------------------------
# The default model is opened at the start

def test_a_default_model_that_cannot_be_downloaded_stops_the_start(dead_port, tmp_path):
    env = isolated_env(tmp_path, dead_port)
    result = run_web("--backend", "onnx", "--port", "0", "--jobs-dir",
                     str(tmp_path / "jobs"), env=env)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("stemserve: error: ") and DEFAULT_MODEL in error
    assert f"could not download {env['STEMSERVE_CHECKPOINT_URL']}" in error
    assert "Uvicorn running" not in result.stderr


def test_a_plain_state_dict_is_served_with_its_config(dead_port, tmp_path):
    """``-n mine.th`` alone is built as ``demucs`` (64 channels) and does not fit; with
    ``--config demucs_unittest`` (4 channels) it is exported, served and separates."""
    import torch

    from stemserve.defaults import SOURCES

    from stemserve.model import Demucs

    torch.manual_seed(5)
    checkpoint = tmp_path / "mine.th"
    torch.save(Demucs(SOURCES, channels=4).state_dict(), checkpoint)
    env = isolated_env(tmp_path, dead_port)

    refused = run_web("--backend", "onnx", "-n", str(checkpoint), "--port", "0",
                      "--jobs-dir", str(tmp_path / "jobs"), env=env)
    assert refused.returncode == 1 and "does not fit the 'demucs' configuration" in \
        refused.stderr, refused.stderr

    with web_process(0, tmp_path / "jobs", "--backend", "onnx", "-n",
                     str(checkpoint), "--config", "demucs_unittest", env=env) as (_, base), \
            httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/api/config").json()["models"][0] == "mine"
        job = submit(client, make_track(tmp_path / "song.wav", seconds=1.0)).json()
        assert wait_done(client, job["id"])["state"] == "done"
    assert [path.parent.name.split("-")[0]
            for path in (tmp_path / "cache" / "export").glob("*/model.onnx")] == ["mine"]


def test_job_errors_never_show_the_servers_paths(small_export, dead_port, tmp_path):
    """A cached checkpoint that fails its check is offered, and its job fails: the error,
    which the page shows, names the file but not the server's cache folder."""
    from stemserve.checkpoints import checkpoint_url

    env = isolated_env(tmp_path, dead_port)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    name = checkpoint_url("demucs").rsplit("/", 1)[-1]
    (cache / name).write_bytes(b"not the checkpoint")
    with web_process(0, tmp_path / "jobs", "--backend", "onnx", "-n",
                     str(small_export), env=env) as (_, base), \
            httpx.Client(base_url=base, timeout=60) as client:
        assert "demucs" in client.get("/api/config").json()["models"]
        job = submit(client, make_track(tmp_path / "song.wav", seconds=1.0),
                     model="demucs").json()
        failed = wait_done(client, job["id"])
    assert failed["state"] == "failed"
    assert f"…/checkpoints holds no valid {name}" in failed["error"], failed["error"]
    assert str(tmp_path) not in failed["error"] and "/tmp/" not in failed["error"]


# ---------------------------------------------------------------------------------------------
# Stopping

def descendants(pid: int) -> set[int]:
    """Processes started by ``pid``, at any depth."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_sigterm_and_sighup_shut_down_as_cleanly_as_ctrl_c(triton_server, small_export,
                                                           tmp_path, signum):
    """The queue and backends are closed, nothing is left running, and a job that was
    running does not hold the shutdown up for long."""
    jobs = tmp_path / "jobs"
    track = make_track(tmp_path / "song.wav", seconds=4.0)
    with web_process(0, jobs, "--url", triton_server.grpc_url, "--model",
                     str(small_export)) as (process, base):
        with httpx.Client(base_url=base, timeout=60) as client:
            submit(client, track, shifts="4").raise_for_status()
        children = descendants(process.pid)
        start = time.monotonic()
        process.send_signal(signum)
        returncode = process.wait(30)
        elapsed = time.monotonic() - start
    log = (tmp_path / "web.log").read_text()
    assert "stemserve: stemserve web stopped: queue and backends closed" in log, log
    assert "Application shutdown complete" in log
    assert returncode == 130 and log.rstrip().endswith("stemserve: interrupted")  # as Ctrl-C
    assert elapsed < 20
    # multiprocessing's resource tracker, the one child, leaves once its parent is gone.
    deadline = time.monotonic() + 10
    while (left := [pid for pid in children if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left
