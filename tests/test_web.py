"""``stemserve web``: the job API and the demucs image's API, against a real tritonserver.

The service runs as users start it (``python -m stemserve web``, a child process) on the
session's tritonserver with the small random-weight model, with low limits so that the
limit tests need only small files. The queue itself is tested with a runner the test holds.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import soundfile as sf

from stemserve.defaults import DEFAULT_MODEL
from stemserve.errors import StemserveError
from stemserve.web.jobs import (ARCHIVE, JOB_ID, LOCK, MARKER, Job, JobQueue, QueueFull,
                                StoreFull, folder_bytes)
from stemserve.web.names import AUDIO_TYPES
from stemserve.web.settings import MB, Settings

SOURCES = ["drums", "bass", "other", "vocals"]
MAX_UPLOAD_MB = 1
MAX_DURATION = 5
MP3_320_HEADER = b"\xff\xfb\xe0"  # MPEG-1 layer III frame, 320 kb/s, 44.1 kHz


def make_track(path: Path, seconds: float = 2.5, sample_rate: int = 44100,
               channels: int = 2) -> Path:
    """A short, reproducible mix: two decaying tones and a little noise, 16-bit WAV."""
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tones = [np.sin(2 * np.pi * f * t) * np.exp(-(t % 0.5) * 6) for f in (220, 330)]
    mix = 0.3 * np.stack(tones[:channels]).T + 0.02 * rng.standard_normal((t.size, channels))
    sf.write(path, mix.astype(np.float32), sample_rate, subtype="PCM_16")
    return path


ANNOUNCED = re.compile(r"stemserve web on (http://127\.0\.0\.1:[1-9]\d*) ")
"""The log line that says where the service listens: the port it bound for ``--port 0``."""


@contextlib.contextmanager
def web_process(port: int, jobs_dir: Path, *args: str, env: dict[str, str] | None = None
                ) -> Iterator[tuple[subprocess.Popen, str]]:
    """``stemserve web`` in a child process until the block ends (then Ctrl-C); yields the
    process and its base URL once the page answers.

    ``port`` 0 (what these tests pass) has the service bind a free port itself, which its
    log announces: no port is picked, released, and bound later by a server that may find
    it taken. Its output goes to ``web.log`` beside ``jobs_dir``; a failed start shows it.
    """
    log_path = jobs_dir.parent / "web.log"
    base = f"http://127.0.0.1:{port}" if port else None
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stemserve", "web", "--port", str(port),
             "--jobs-dir", str(jobs_dir), *args], stdout=log, stderr=subprocess.STDOUT,
            env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stemserve web did not start:\n{log_path.read_text()}")
            if base is None:
                announced = ANNOUNCED.search(log_path.read_text(errors="replace"))
                base = announced and announced.group(1)
            try:
                if base is not None:
                    httpx.get(f"{base}/", timeout=2).raise_for_status()  # public, token or not
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield process, base
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_web(port: int, jobs_dir: Path, *args: str, **options) -> Iterator[str]:
    """:func:`web_process`, for tests that need only the base URL."""
    with web_process(port, jobs_dir, *args, **options) as (_, base):
        yield base


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web") / "jobs"


@pytest.fixture(scope="module")
def web(triton_server, small_export, jobs_dir) -> Iterator[str]:
    with running_web(0, jobs_dir, "--url", triton_server.grpc_url,
                     "--model", str(small_export), "--max-upload-mb", str(MAX_UPLOAD_MB),
                     "--max-duration", str(MAX_DURATION), "--queue-size", "4") as base:
        yield base


@pytest.fixture(scope="module")
def client(web) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=web, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> Path:
    return make_track(tmp_path_factory.mktemp("tracks") / "song.wav")


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/api/jobs/{job_id}").raise_for_status().json()
        if status["state"] not in ("queued", "running") or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def submit(client: httpx.Client, path: Path, name: str | None = None, **form) -> httpx.Response:
    with open(path, "rb") as file:
        return client.post("/api/jobs", files={"file": (name or path.name, file)}, data=form)


# ---------------------------------------------------------------------------------------------
# The job API

def small_model_info(small_export: Path) -> dict:
    """What a job on the small model says separated it: its sidecar's checkpoint, sha256,
    precision and family."""
    spec = json.loads((small_export / "model.json").read_text())
    return {"checkpoint": "small", "checkpoint_sha256": spec["checkpoint_sha256"],
            "precision": "fp32", "family": "demucs", "family_title": "Demucs v2"}


def test_job_api_separates_and_serves_every_stem(client, track, small_export):
    response = submit(client, track)
    assert response.status_code == 202, response.text
    job = response.json()
    assert JOB_ID.fullmatch(job["id"]) and job["name"] == "song.wav"
    assert job["model"] == "small" and job["format"] == "wav" and job["shifts"] == 0
    assert job["state"] in ("queued", "running")

    done = wait_done(client, job["id"])
    assert done["state"] == "done", done
    assert done["model_info"] == small_model_info(small_export)
    assert (done["stage"], done["stage_text"]) == (None, None)
    assert done["progress"] == pytest.approx(done["seconds"]) == pytest.approx(2.5)
    assert [stem["name"] for stem in done["stems"]] == SOURCES
    for stem in done["stems"]:
        answer = client.get(stem["url"])
        assert answer.status_code == 200 and answer.headers["content-type"] == "audio/wav"
        assert f'filename="song_{stem["name"]}.wav"' in answer.headers["content-disposition"]
        info = sf.info(io.BytesIO(answer.content))
        assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_16")
        assert info.frames == round(2.5 * 44100)
    assert client.get(done["mix_url"]).content == track.read_bytes()
    with zipfile.ZipFile(io.BytesIO(client.get(done["zip_url"]).content)) as archive:
        assert sorted(archive.namelist()) == sorted(f"{stem}.wav" for stem in SOURCES)
    assert done["expires"] > time.time()


def test_options_two_stems_flac_and_shifts(client, track):
    job = submit(client, track, two_stems="vocals", format="flac24", shifts="2").json()
    done = wait_done(client, job["id"])
    assert done["state"] == "done", done
    assert (done["two_stems"], done["shifts"]) == ("vocals", 2)
    assert [stem["name"] for stem in done["stems"]] == ["vocals", "no_vocals"]
    info = sf.info(io.BytesIO(client.get(done["stems"][1]["url"]).content))
    assert (info.format, info.subtype) == ("FLAC", "PCM_24")


def test_config_offers_the_served_model_and_cli_defaults(client, small_export):
    config = client.get("/api/config").json()
    assert config["backend"] == "triton"
    assert config["models"] == ["small"] and config["default_model"] == "small"
    assert config["model_info"] == small_model_info(small_export)
    assert (config["default_format"], config["default_shifts"]) == ("wav", 0)
    assert config["sources"] == SOURCES and config["model_sources"] == {"small": SOURCES}
    assert (config["max_upload_mb"], config["max_duration"]) == (MAX_UPLOAD_MB, MAX_DURATION)


@pytest.mark.parametrize("form,status,message", [
    (dict(model="demucs_extra"), 400, "Unknown model 'demucs_extra': choose one of small."),
    (dict(format="ogg"), 422, "format: Input should be 'wav', 'wav24', 'wav32f', 'flac', "
                              "'flac24' or 'mp3'"),
    (dict(shifts="99"), 422, "shifts: Input should be less than or equal to 10"),
    (dict(shifts="two"), 422, "shifts: Input should be a valid integer, unable to parse "
                              "string as an integer"),
    (dict(two_stems="ukulele"), 422, "two_stems: Input should be 'drums', 'bass', 'other', "
                                     "'vocals', 'guitar' or 'piano'"),
    (dict(two_stems="piano"), 400, "small separates drums, bass, other, vocals: it has no "
                                   "piano stem."),
])
def test_bad_options_are_refused_with_one_readable_message(client, track, form, status,
                                                           message):
    """Every refusal, 422 included, is {"detail": "..."}, as docs/web.md says."""
    response = submit(client, track, **form)
    assert response.status_code == status
    assert response.json() == {"detail": message}


def test_a_missing_file_names_the_field(client):
    response = client.post("/api/jobs", data={"format": "wav"},
                           files={"other": ("x.txt", b"x")})
    assert response.status_code == 422
    assert response.json() == {"detail": "file: Field required"}


def test_openapi_describes_both_apis_and_every_refusal_shape(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/stems/{stem}",
            "/api/jobs/{job_id}/zip", "/api/config", "/api/music/{file_name}"} <= set(paths)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    refusal = paths["/api/jobs"]["post"]["responses"]["422"]["content"]["application/json"]
    assert refusal["schema"] == {"$ref": "#/components/schemas/Refusal"}


def test_the_api_says_what_stemserve_is_now(client):
    """/docs showed "Demucs v2 on NVIDIA Triton" long after every generation ran."""
    description = client.get("/openapi.json").json()["info"]["description"]
    assert "Demucs v2" not in description
    assert "Hybrid Transformer Demucs" in description and f"`{DEFAULT_MODEL}`" in description
    assert "separates on NVIDIA Triton, with `small`" in description


def test_the_page_accepts_the_files_the_server_takes(client):
    """The file chooser offers what the server stores with its extension, and no less."""
    page = client.get("/").text
    accept = re.search(r'<input id="file" type="file"\s+accept="([^"]+)"', page).group(1)
    assert accept.split(",") == ["audio/*", *AUDIO_TYPES]


def test_the_favicon_is_a_small_svg(client):
    page = client.get("/").text
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in page
    for path in ("/favicon.ico", "/static/favicon.svg"):
        icon = client.get(path)
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
        assert icon.content.startswith(b"<svg") and len(icon.content) < 2048


@pytest.fixture(scope="module")
def onnx_web(small_export, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A second service, in-process ONNX Runtime (``--backend onnx``) with ``-v``, though
    $STEMSERVE_TRITON_URL names a Triton: its base URL and its log."""
    root = tmp_path_factory.mktemp("web-onnx")
    env = dict(os.environ, STEMSERVE_TRITON_URL="127.0.0.1:1")  # --backend onnx wins over it
    with running_web(0, root / "jobs", "-v", "--backend", "onnx", "--model", str(small_export),
                     env=env) as base:
        yield base, root / "web.log"


def test_access_lines_only_with_verbose_logging(client, track, jobs_dir, onnx_web):
    """A player's range requests made a log line each: uvicorn's access log is on with -v
    only (the stemserve logger at DEBUG)."""
    done = wait_done(client, submit(client, track).json()["id"])
    for _ in range(3):
        client.get(done["mix_url"], headers={"Range": "bytes=0-1023"})
    quiet = (jobs_dir.parent / "web.log").read_text()
    assert "stemserve web on http://127.0.0.1:" in quiet
    assert "HTTP/1.1\" 206" not in quiet and "GET /api/" not in quiet

    base, log = onnx_web
    assert httpx.get(f"{base}/api/config").status_code == 200
    deadline = time.monotonic() + 10  # uvicorn logs the line once the answer is sent
    while '"GET /api/config HTTP/1.1" 200' not in log.read_text() \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"GET /api/config HTTP/1.1" 200' in log.read_text()


def test_a_port_in_use_stops_the_start_naming_the_port_and_the_flag(tmp_path):
    """uvicorn used to say "address already in use" after the server was announced, and
    exit with 3; the port is now bound first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "stemserve", "web", "--port", str(port),
                                 "--jobs-dir", str(tmp_path / "jobs"), "--backend", "onnx"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == (f"stemserve: error: cannot listen on 127.0.0.1:{port}: the port "
                             "is in use; pick another with --port\n")
    assert result.stdout == ""


def test_a_port_of_stemserve_serve_names_the_flag_that_moves_triton(monkeypatch, tmp_path):
    """8000 is a local tritonserver's HTTP port: the error says how to move either. The
    port is taken here (by this test when it is free, else by whoever holds it)."""
    import stemserve.web.server as server

    monkeypatch.setattr(server, "create_app", lambda settings: pytest.fail("not bound first"))
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(socket.socket())
        try:
            holder.bind(("127.0.0.1", 8000))
            holder.listen()
        except OSError as err:
            assert err.errno == errno.EADDRINUSE
        with pytest.raises(StemserveError) as refused:
            server.serve(Settings(port=8000, jobs_dir=tmp_path / "jobs"))
    assert str(refused.value) == (
        "cannot listen on 127.0.0.1:8000: the port is in use; pick another with --port (8000 "
        "is the HTTP port of `stemserve serve`: a local Triton may hold it, and can move with "
        "`stemserve serve --http-port`)")


def test_docs_load_nothing_from_elsewhere(client):
    """Swagger UI's CDN scripts leave /docs blank offline: the page and its script are ours."""
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(source.startswith("/") for source in sources), sources
    for source in sources:
        assert client.get(source).status_code == 200, source
    assert client.get("/redoc").status_code == 404


def test_in_process_fallback_when_asked(onnx_web, track):
    base, _ = onnx_web
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/api/config").json()["backend"] == "onnx"
        done = wait_done(client, submit(client, track, format="mp3").json()["id"])
        assert done["state"] == "done" and [stem["name"] for stem in done["stems"]] == SOURCES


def test_an_unreachable_triton_stops_the_start_with_a_clear_error(dead_port, tmp_path):
    url = f"127.0.0.1:{dead_port}"
    result = subprocess.run([sys.executable, "-m", "stemserve", "web", "--url", url,
                             "--jobs-dir", str(tmp_path / "jobs")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("stemserve: error: ") and url in result.stderr


# ---------------------------------------------------------------------------------------------
# The demucs image's API

def test_legacy_api_answers_a_zip_of_four_mp3_stems(client, track):
    with open(track, "rb") as file:
        response = client.post("/api/music/my song.wav", files={"file": ("x.wav", file)})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert 'filename="my_song.zip"' in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert sorted(archive.namelist()) == sorted(f"{stem}.mp3" for stem in SOURCES)
        for name in archive.namelist():
            data = archive.read(name)
            assert data.startswith(MP3_320_HEADER), name
            info = sf.info(io.BytesIO(data))
            assert (info.format, info.samplerate, info.channels) == ("MP3", 44100, 2)
            assert info.frames / info.samplerate == pytest.approx(2.5, abs=0.1)


def job_folders(jobs_dir: Path) -> set[str]:
    return {path.name for path in jobs_dir.iterdir() if JOB_ID.fullmatch(path.name)}


def test_legacy_api_deletes_its_job_once_the_zip_is_sent(client, track, jobs_dir):
    """The legacy client never learns the job's id: nothing of the job stays behind."""
    before = job_folders(jobs_dir)
    with open(track, "rb") as file:
        response = client.post("/api/music/song.wav", files={"file": ("song.wav", file)})
    assert response.status_code == 200, response.text
    assert zipfile.ZipFile(io.BytesIO(response.content)).testzip() is None
    deadline = time.monotonic() + 10  # deleted by a background task after the response
    while job_folders(jobs_dir) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job_folders(jobs_dir) - before


def test_legacy_api_refuses_what_the_job_api_refuses(client, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a song\n" * 100)
    with open(text, "rb") as file:
        response = client.post("/api/music/notes.txt", files={"file": file})
    assert response.status_code == 400
    assert "notes.txt: not audio that libsndfile can read" in response.json()["detail"]


# ---------------------------------------------------------------------------------------------
# Safe by default

def test_names_with_paths_are_labels_never_paths(client, track, tmp_path, jobs_dir):
    target = tmp_path / "escaped"
    traversal = f"../../../../../../..{target}/evil.wav"
    for file_name, zip_name in ((traversal, "evil.zip"), ("../../etc/passwd", "passwd.zip")):
        with open(track, "rb") as file:
            response = client.post(f"/api/music/{quote(file_name, safe='')}",
                                   files={"file": (file_name, file)})
        assert response.status_code == 200, response.text
        assert f'filename="{zip_name}"' in response.headers["content-disposition"]

    job = submit(client, track, name=traversal).json()
    assert job["name"] == "evil.wav"
    assert wait_done(client, job["id"])["state"] == "done"
    assert not target.exists()
    stored = {path.name for path in (jobs_dir / job["id"]).iterdir()}
    assert stored == {"upload.wav", "stems", ARCHIVE, "job.json", MARKER}


@pytest.mark.parametrize("job_id", ["0" * 22, "..", "..%2F..%2Fetc%2Fpasswd", "a" * 21,
                                    "%2Fetc%2Fpasswd"])
def test_unknown_job_ids_are_404(client, job_id):
    for suffix in ("", "/mix", "/zip", "/stems/vocals"):
        assert client.get(f"/api/jobs/{job_id}{suffix}").status_code == 404


def test_unfinished_job_and_unknown_stem(client, track):
    job = submit(client, track, shifts="2").json()
    early = client.get(f"/api/jobs/{job['id']}/zip")
    assert early.status_code == 409 and "not done" in early.json()["detail"]
    assert wait_done(client, job["id"])["state"] == "done"
    response = client.get(f"/api/jobs/{job['id']}/stems/..%2Fjob.json")
    assert response.status_code == 404


def test_oversized_upload_is_refused_with_the_limit(client, tmp_path):
    big = tmp_path / "big.wav"
    big.write_bytes(b"RIFF" + bytes(int(1.5 * MAX_UPLOAD_MB * MB)))
    response = submit(client, big)
    assert response.status_code == 413
    assert response.json()["detail"] == ("The file is too large: uploads are limited to "
                                         f"{MAX_UPLOAD_MB} MB.")


def test_oversized_upload_without_length_is_cut_off(client):
    """A chunked body declares no size: it is counted as it arrives."""
    boundary = "stemserveboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(4 * MAX_UPLOAD_MB):
            yield bytes(MB // 2) * 2
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/api/jobs", content=body(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert "uploads are limited to 1 MB" in response.json()["detail"]


def test_long_track_is_refused_with_the_limit(client, tmp_path):
    long = make_track(tmp_path / "long.wav", seconds=MAX_DURATION + 1, sample_rate=8000,
                      channels=1)
    response = submit(client, long)
    assert response.status_code == 413
    assert response.json()["detail"] == "long.wav is 0:06 long: tracks up to 0:05 are accepted."


@pytest.mark.parametrize("name,content", [("notes.txt", b"just some text\n" * 50),
                                          ("fake.wav", b"RIFF\x00\x00\x00\x00WAVEjunk" * 20),
                                          ("empty.mp3", b"")])
def test_files_that_are_not_audio_are_refused(client, tmp_path, jobs_dir, name, content):
    before = set(jobs_dir.iterdir())
    response = client.post("/api/jobs", files={"file": (name, content)})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith(f"{name}: ") and str(jobs_dir) not in detail
    assert set(jobs_dir.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# The queue, with a runner the test controls

class HeldRunner:
    """Writes one stem per job when released; fails jobs whose name says so.

    ``started`` is released once a job has written half its stem and reported half its
    progress, so a test that acquired it sees both.
    """

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.error = "cannot decode audio (test)"
        self.about_upload = True  # the error's ``where`` is the upload, as audio.py's are

    def __call__(self, job: Job, on_progress) -> dict[str, Path]:
        stems = job.folder / "stems"
        stems.mkdir()
        (stems / "vocals.wav").write_bytes(b"half")
        on_progress("separating", job.seconds / 2, job.seconds)
        self.started.release()
        self.release.wait(10)
        if "fail" in job.name:
            raise StemserveError(self.error, where=str(job.upload_path) if self.about_upload
                                 else None)
        return {"vocals": stems / "vocals.wav"}


def add_job(queue: JobQueue, name: str, estimate: int = 0) -> Job:
    job_id, folder = queue.new_folder()
    (folder / "upload.wav").write_bytes(b"x" * 100)
    return queue.submit(Job(id=job_id, name=name, folder=folder, upload="upload.wav",
                            seconds=4.0, options={}, estimate=estimate))


def wait_state(queue: JobQueue, job: Job, state: str) -> Job:
    deadline = time.monotonic() + 5
    while (current := queue.get(job.id)) is not None and current.state != state \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    return current


@pytest.fixture
def held(tmp_path) -> Iterator[tuple[JobQueue, HeldRunner]]:
    runner = HeldRunner()
    queue = JobQueue(tmp_path / "jobs", runner, workers=1, queue_size=2)
    queue.start()
    yield queue, runner
    runner.release.set()
    queue.close()


def test_queue_positions_and_a_bounded_queue(held):
    queue, runner = held
    first = add_job(queue, "first.wav")
    assert runner.started.acquire(timeout=5)
    second, third = add_job(queue, "second.wav"), add_job(queue, "third.wav")
    assert queue.get(first.id).state == "running" and queue.get(first.id).position is None
    running = queue.get(first.id)
    assert (running.progress, running.stage, running.stage_progress) == (2.0, "separating", 0.5)
    assert [queue.get(job.id).position for job in (second, third)] == [1, 2]
    with pytest.raises(QueueFull, match="2 tracks are waiting"):
        add_job(queue, "fourth.wav")
    runner.release.set()
    for job in (first, second, third):
        assert wait_state(queue, job, "done").stems == {"vocals": "stems/vocals.wav"}


def test_a_failed_job_keeps_its_error_and_nothing_else(held):
    queue, runner = held
    runner.release.set()
    job = add_job(queue, "fail.wav")
    failed = wait_state(queue, job, "failed")
    assert failed.error == "fail.wav: cannot decode audio (test)"
    assert sorted(path.name for path in job.folder.iterdir()) == [MARKER, "job.json"]


def test_finished_jobs_outlive_a_restart_interrupted_ones_do_not(tmp_path):
    runner = HeldRunner()
    runner.release.set()
    queue = JobQueue(tmp_path / "jobs", runner)
    queue.start()
    done = add_job(queue, "done.wav")
    wait_state(queue, done, "done")
    _, interrupted = queue.new_folder()  # made, then the server stopped before it was a job
    (interrupted / "upload.wav").write_bytes(b"x")
    queue.close()
    foreign = tmp_path / "jobs" / "notes"
    foreign.mkdir()

    again = JobQueue(tmp_path / "jobs", runner)
    assert again.get(done.id).state == "done" and again.get(done.id).stems
    assert not interrupted.exists() and foreign.exists()


def test_a_restart_removes_only_the_folders_stemserve_made(tmp_path):
    """A jobs folder may hold a user's folders whose names look like job ids: only folders
    with the marker written at creation are ever removed, and nothing is followed."""
    root = tmp_path / "jobs"
    root.mkdir()
    collection = root / "my-music-collection-v2"  # 22 letters, digits and dashes: a job id
    (collection / "album").mkdir(parents=True)
    (collection / "album" / "01.flac").write_bytes(b"fLaC" + bytes(1000))
    broken = root / ("b" * 22)
    broken.mkdir()
    (broken / "job.json").write_text("{not json")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / MARKER).touch()
    (outside / "keep.txt").write_text("mine")
    link = root / ("l" * 22)
    link.symlink_to(outside, target_is_directory=True)

    queue = JobQueue(root, HeldRunner())
    queue.close()
    assert (collection / "album" / "01.flac").stat().st_size == 1004
    assert (broken / "job.json").read_text() == "{not json"
    assert link.is_symlink() and (outside / "keep.txt").read_text() == "mine"


def test_one_jobs_folder_one_queue(tmp_path):
    first = JobQueue(tmp_path / "jobs", HeldRunner())
    with pytest.raises(StemserveError, match=r"is in use by another stemserve web \(pid \d+\): "
                                             r"stop that one, or give this one its own "
                                             r"--jobs-dir"):
        JobQueue(tmp_path / "jobs", HeldRunner())
    first.close()
    JobQueue(tmp_path / "jobs", HeldRunner()).close()


def test_oldest_finished_jobs_make_room_within_the_disk_budget(held):
    queue, runner = held
    runner.release.set()
    old, new = add_job(queue, "old.wav"), add_job(queue, "new.wav")
    assert wait_state(queue, new, "done") is not None
    queue.max_disk_bytes = folder_bytes(queue.root) + 50
    queue.release(queue.reserve(100))
    assert queue.get(old.id) is None and not old.folder.exists()
    assert queue.get(new.id).state == "done"

    # A running job whose 100-byte upload and estimate fill the budget (beside the lock
    # file): the finished job makes room for it, and after that nothing fits.
    runner.release.clear()
    lock = (queue.root / LOCK).stat().st_size
    add_job(queue, "running.wav", estimate=queue.max_disk_bytes - 100 - lock)
    assert queue.get(new.id) is None
    with pytest.raises(StoreFull, match="storage for uploads and stems is full"):
        queue.reserve(1)


def test_finished_jobs_expire(tmp_path):
    runner = HeldRunner()
    runner.release.set()
    queue = JobQueue(tmp_path / "jobs", runner, ttl=0.5)
    queue.start()
    try:
        job = add_job(queue, "short-lived.wav")
        deadline = time.monotonic() + 5
        while queue.get(job.id) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queue.get(job.id) is None and not job.folder.exists()
    finally:
        queue.close()


def test_uploads_still_arriving_hold_their_size_in_the_budget(held):
    queue, _ = held
    queue.max_disk_bytes = folder_bytes(queue.root) + 1000
    first = queue.reserve(600)
    with pytest.raises(StoreFull):
        queue.reserve(600)
    queue.release(first)
    queue.release(queue.reserve(600))


def test_job_errors_show_no_server_paths(held, tmp_path):
    """A job's error is shown to whoever uploaded: no path of the server's, whatever
    raised it (here a checkpoint cache, as a failed download names it)."""
    queue, runner = held
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    runner.about_upload = False
    runner.error = (f"could not download http://127.0.0.1:1/demucs-e07c671f.th (refused) and "
                    f"{cache} holds no valid demucs-e07c671f.th; copy that file there")
    runner.release.set()
    job = add_job(queue, "fail.wav")
    failed = wait_state(queue, job, "failed")
    assert failed.error == ("could not download http://127.0.0.1:1/demucs-e07c671f.th "
                            "(refused) and …/checkpoints holds no valid demucs-e07c671f.th; "
                            "copy that file there")


def test_encoding_and_zipping_are_stages_of_the_job(tmp_path):
    """Progress does not sit at 100 % while the stems are encoded and zipped: both are
    stages the job reports, and the zip is ready when the job is done."""
    encoding = threading.Event()
    release = threading.Event()

    def runner(job: Job, on_progress) -> dict[str, Path]:
        stems = job.folder / "stems"
        stems.mkdir()
        (stems / "vocals.wav").write_bytes(b"stem")
        on_progress("separating", job.seconds, job.seconds)
        on_progress("encoding", 1.0, job.seconds)
        encoding.set()
        release.wait(10)
        return {"vocals": stems / "vocals.wav"}

    queue = JobQueue(tmp_path / "jobs", runner, workers=1, queue_size=2)
    queue.start()
    try:
        job = add_job(queue, "song.wav")
        assert encoding.wait(5)
        running = queue.get(job.id)
        assert (running.state, running.stage, running.stage_progress) == \
            ("running", "encoding", 0.25)
        assert running.progress == running.seconds
        release.set()
        done = wait_state(queue, job, "done")
        assert done.stage is None and (done.folder / ARCHIVE).is_file()
    finally:
        release.set()
        queue.close()
