"""``stemserve web`` against slow and greedy clients: deadlines for headers and bodies, form
fields kept small, uploads held in the jobs folder's disk budget while they arrive, and a
disk-usage walk that survives files vanishing under it.

Raw sockets play the clients that httpx would not: one that sends its headers a line at a
time, one that stops halfway through its body, one that never finishes.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from test_web import make_track, running_web

from stemserve.web.jobs import folder_bytes
from stemserve.web.settings import MB

BOUNDARY = "limitsboundary"
SLACK = 4.0
"""Seconds allowed beyond a 1 s deadline: the test machine's cores are shared."""


@pytest.fixture(scope="module")
def strict(triton_server, small_export, tmp_path_factory) -> Iterator[str]:
    """A server with 1 s deadlines for headers and body pauses, and 1 MB uploads."""
    root = tmp_path_factory.mktemp("web-strict")
    with running_web(0, root / "jobs", "--url", triton_server.grpc_url,
                     "--model", str(small_export), "--header-timeout", "1",
                     "--body-timeout", "1", "--max-upload-mb", "1") as base:
        yield base


@contextlib.contextmanager
def connect(base: str) -> Iterator[socket.socket]:
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        yield sock


def read_answer(sock: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def multipart(content: bytes, name: str = "notes.bin") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_head(base: str, length: int, path: str = "/api/jobs", close: bool = False) -> bytes:
    """``close``: ask the server to close the connection once it answered, so that
    :func:`read_answer` ends then, not after uvicorn's 5 s keep-alive."""
    return (f"POST {path} HTTP/1.1\r\nHost: {urlsplit(base).netloc}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            + ("Connection: close\r\n" if close else "")
            + f"Content-Length: {length}\r\n\r\n").encode()


# ---------------------------------------------------------------------------------------------
# Slow clients

def test_headers_sent_a_line_at_a_time_are_cut_off(strict):
    """Slowloris: each header line comes just before uvicorn's keep-alive would expire."""
    with connect(strict) as sock:
        sock.sendall(b"GET /api/config HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - start < 20:
                if select.select([sock], [], [], 0.3)[0]:
                    break  # the server answered or closed
                sock.sendall(b"X-Slow: 1\r\n")
        elapsed = time.monotonic() - start
    assert elapsed < 1 + SLACK


def test_a_connection_that_never_sends_a_request_is_closed(strict):
    with connect(strict) as sock:
        start = time.monotonic()
        answer = read_answer(sock)
        elapsed = time.monotonic() - start
    assert elapsed < 1 + SLACK
    assert status_of(answer) == 408


def test_a_request_whose_headers_stop_halfway_gets_408(strict):
    with connect(strict) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: x\r\nContent-Ty")
        answer = read_answer(sock)
    assert status_of(answer) == 408
    assert b"connection: close" in answer.lower()
    assert b'"The request headers did not arrive within 1 s."' in answer


def test_a_body_that_stops_halfway_gets_408(strict):
    body = multipart(bytes(100_000))
    with connect(strict) as sock:
        sock.sendall(upload_head(strict, len(body)) + body[:1000])
        start = time.monotonic()
        answer = read_answer(sock)
        elapsed = time.monotonic() - start
    assert elapsed < 1 + SLACK
    assert status_of(answer) == 408
    assert (b"The upload was too slow and was cut off: the server waits at most 1 s for more "
            b"data and needs 16 KB/s on average.") in answer


def test_a_body_that_trickles_is_cut_off(strict):
    """A byte every 0.3 s never pauses for the 1 s deadline, but is far below 16 KB/s."""
    body = multipart(bytes(100_000))
    with connect(strict) as sock:
        sock.sendall(upload_head(strict, len(body)))
        start = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in body:
                if select.select([sock], [], [], 0.3)[0] or time.monotonic() - start > 30:
                    break
                sock.sendall(bytes([byte]))
        elapsed = time.monotonic() - start
        answer = read_answer(sock, timeout=5)
    assert elapsed < 1 + SLACK
    assert status_of(answer) in (0, 408)  # 0: the reset beat the answer to the client


# ---------------------------------------------------------------------------------------------
# Form fields stay small

@pytest.mark.parametrize("fields,files,message", [
    ({"model": "x" * 2000}, 1, "Part exceeded maximum size of 1KB."),
    ({f"field{index}": "1" for index in range(9)}, 1,
     "Too many fields. Maximum number of fields is 8."),
    ({}, 2, "Too many files. Maximum number of files is 1."),
])
def test_forms_beyond_the_few_short_fields_the_api_takes_are_refused(strict, tmp_path, fields,
                                                                     files, message):
    """Starlette keeps fields other than files in memory; only a few short ones are read."""
    track = make_track(tmp_path / "song.wav", seconds=0.5)
    uploads = [("file", (f"song{index}.wav", track.read_bytes())) for index in range(files)]
    response = httpx.post(f"{strict}/api/jobs", data=fields, files=uploads, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"detail": message}


# ---------------------------------------------------------------------------------------------
# The disk budget sees uploads while they arrive

def server_pid(jobs_dir: Path) -> int:
    """The pid of the ``stemserve web`` serving ``jobs_dir``."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(jobs_dir).encode() in \
                    (entry / "cmdline").read_bytes().split(b"\0"):
                return int(entry.name)
    raise AssertionError(f"no stemserve web for {jobs_dir}")


def open_files(pid: int) -> list[str]:
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            links.append(os.readlink(fd))
    return links


def test_uploads_in_flight_count_in_the_budget_and_spool_in_the_jobs_folder(
        triton_server, small_export, tmp_path):
    """A 1.5 MB upload halfway in holds its size: a 1.8 MB one no longer fits the 3 MB
    budget and is refused before its body is sent; once the first ends, it fits. The
    half-arrived upload's spool file lies in the jobs folder, never in /tmp."""
    jobs = tmp_path / "jobs"
    with running_web(0, jobs, "--url", triton_server.grpc_url, "--model",
                     str(small_export), "--max-upload-mb", "2", "--max-disk-mb", "3") as base, \
            connect(base) as first:
        first_body = multipart(bytes(int(1.5 * MB)))
        first.sendall(upload_head(base, len(first_body), close=True)
                      + first_body[:int(1.2 * MB)])
        spool = str(jobs / ".uploads") + "/"
        deadline = time.monotonic() + 10
        while not any(link.startswith(spool) for link in open_files(server_pid(jobs))) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(link.startswith(spool) for link in open_files(server_pid(jobs)))

        second_body = multipart(bytes(int(1.8 * MB)))
        with connect(base) as second:
            second.sendall(upload_head(base, len(second_body)))  # no body at all
            answer = read_answer(second, timeout=10)
        assert status_of(answer) == 507 and b"retry-after: 30" in answer.lower()
        assert b"storage for uploads and stems is full" in answer

        first.sendall(first_body[int(1.2 * MB):])
        assert status_of(read_answer(first, timeout=30)) == 400  # admitted: not audio
        again = httpx.post(f"{base}/api/jobs", timeout=30, content=second_body,
                           headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert again.status_code == 400 and "not audio" in again.json()["detail"]
        assert not any(link.startswith(spool) for link in open_files(server_pid(jobs)))


# ---------------------------------------------------------------------------------------------
# Counting the disk while jobs come and go

@pytest.mark.slow
def test_folder_bytes_survives_files_and_folders_vanishing(tmp_path):
    """The budget walk runs while other requests create and delete job folders: whatever
    vanishes counts as zero, never as an error (it was a 500 for a valid upload)."""
    root = tmp_path / "jobs"
    root.mkdir()
    stop = threading.Event()

    def churn() -> None:
        index = 0
        while not stop.is_set():
            folder = root / f"job{index % 8}"
            shutil.rmtree(folder, ignore_errors=True)
            for sub in range(4):
                (folder / f"stems{sub}").mkdir(parents=True, exist_ok=True)
                (folder / f"stems{sub}" / "vocals.wav").write_bytes(b"x" * 10)
            index += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        deadline = time.monotonic() + 3
        walks = 0
        while time.monotonic() < deadline:
            assert folder_bytes(root) >= 0
            walks += 1
    finally:
        stop.set()
        worker.join()
    assert walks > 10
    assert folder_bytes(root) == 8 * 4 * 10
    assert folder_bytes(tmp_path / "gone") == 0
