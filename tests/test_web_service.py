"""The web's job service from plain Python: no FastAPI, no HTTP, no backend.

:class:`~stemserve.web.service.JobService` decides everything an upload must pass and what
a job's owner gets back; the router only maps its errors to status codes. Here it runs on a
catalog that offers two model names and a runner that writes a stem without separating.
"""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
from test_web import make_track

from stemserve.defaults import SOURCES, STEM_NAMES
from stemserve.errors import (InputError, JobFailed, JobNotDone, ModelError, QueueFull,
                              StemserveError, TooLarge, UnknownJob)
from stemserve.web.jobs import MARKER, RECORD, Job, JobQueue, ModelInfo
from stemserve.web.options import JobOptions
from stemserve.web.service import JobService
from stemserve.web.settings import MB, Settings


SMALL = ModelInfo(checkpoint="small", checkpoint_sha256="5e1f" * 16, precision="int8",
                  family="demucs", family_title="Demucs v2")


class Catalog:
    """Offers two models, a 4-source and a 6-source one, and opens nothing; the default
    one's backend is a stand-in with a spec."""

    kind = "onnx"

    def models(self) -> dict[str, str]:
        return {"small": "/exports/small", "other": "/exports/other"}

    def backend(self, name: str) -> SimpleNamespace:
        assert name == "small", "only the default model is open"
        return SimpleNamespace(spec=SimpleNamespace(**vars(SMALL)))

    def sources(self, name: str) -> tuple[str, ...] | None:
        return {"small": SOURCES, "other": STEM_NAMES}.get(name)

    def describe(self, name: str) -> str:
        return f"a test's {name} model"

    def close(self) -> None:
        pass


class Runner:
    """Prepares the job's model, then writes one stem per job once ``release`` is set (as
    the small model in int8); fails jobs whose name says so. ``started`` is set once a job
    runs."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, job: Job, on_progress) -> dict[str, Path]:
        on_progress("preparing", 0.0, 0.0)
        self.started.set()
        self.release.wait(10)
        job.model_info = SMALL
        if "fail" in job.name:
            raise StemserveError("cannot decode audio (test)", where=str(job.upload_path))
        stems = job.folder / "stems"
        stems.mkdir()
        (stems / "vocals.flac").write_bytes(b"fLaC")
        return {"vocals": stems / "vocals.flac"}


@pytest.fixture
def runner() -> Runner:
    return Runner()


@pytest.fixture
def service(tmp_path, runner) -> Iterator[JobService]:
    settings = Settings(jobs_dir=tmp_path / "jobs", max_upload_mb=1, max_duration=5,
                        queue_size=2)
    queue = JobQueue(settings.jobs_dir, runner, queue_size=settings.queue_size)
    service = JobService(settings, queue, Catalog())
    service.start()
    yield service
    runner.release.set()
    service.close()


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> bytes:
    return make_track(tmp_path_factory.mktemp("service") / "song.wav", seconds=1.0).read_bytes()


def jobs_left(service: JobService) -> list[Path]:
    return [path for path in service.settings.jobs_dir.iterdir() if (path / MARKER).exists()]


def test_the_service_imports_without_fastapi():
    """The job service and the settings need neither FastAPI, Starlette, uvicorn nor
    pydantic: they are blocked here, and the import must still work."""
    blocked = ("fastapi", "starlette", "uvicorn", "pydantic")
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            "import stemserve.web.service, stemserve.web.settings")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_upload_becomes_a_job_that_is_followed_to_its_files(service, wav):
    upload = io.BytesIO(wav)
    job = service.accept(upload, "../../music/Song #1.wav", JobOptions(format="flac"))
    assert upload.closed and job.name == "Song #1.wav" and job.upload == "upload.wav"
    assert job.options == dict(model="small", two_stems=None, shifts=0, format="flac")

    done = asyncio.run(service.wait(job.id))
    report = service.status(job.id)
    assert (done.state, report.state, report.stems, report.has_mix) == \
        ("done", "done", ["vocals"], True)
    assert (report.model, report.format, report.seconds) == ("small", "flac", 1.0)
    stem = service.stem(job.id, "vocals")
    assert (stem.filename, stem.media_type) == ("Song_1_vocals.flac", "audio/flac")
    archive = service.archive(job.id)
    assert (archive.filename, archive.media_type) == ("Song_1.zip", "application/zip")
    assert archive.path.is_file()
    assert service.mix(job.id).path.read_bytes() == wav


@pytest.mark.parametrize("content,name,options,error,message", [
    (bytes(int(1.5 * MB)), "big.wav", JobOptions(), TooLarge,
     "The file is 1.5 MB: uploads are limited to 1 MB."),
    (None, "song.wav", JobOptions(model="demucs"), ModelError,
     "Unknown model 'demucs': choose one of small, other."),
    (b"just text\n" * 50, "notes.txt", JobOptions(), InputError,
     "notes.txt: not audio that libsndfile can read"),
    (None, "song.wav", JobOptions(two_stems="guitar"), InputError,
     "small separates drums, bass, other, vocals: it has no guitar stem."),
])
def test_refused_uploads_leave_nothing_behind(service, wav, content, name, options, error,
                                              message):
    with pytest.raises(error) as refused:
        service.accept(io.BytesIO(wav if content is None else content), name, options)
    assert str(refused.value).startswith(message)
    assert str(service.settings.jobs_dir) not in str(refused.value)
    assert jobs_left(service) == []


def test_a_six_source_model_takes_two_stems_of_guitar(service, wav):
    job = service.accept(io.BytesIO(wav), "song.wav", JobOptions(model="other",
                                                                   two_stems="guitar"))
    assert asyncio.run(service.wait(job.id)).options["two_stems"] == "guitar"


def test_a_track_over_the_duration_limit_is_too_large(service, tmp_path):
    long = make_track(tmp_path / "long.wav", seconds=6, sample_rate=8000, channels=1)
    with pytest.raises(TooLarge, match=r"^long.wav is 0:06 long: tracks up to 0:05 are "
                                       r"accepted.$"):
        service.accept(io.BytesIO(long.read_bytes()), "long.wav")


def test_the_budget_held_for_an_upload_is_released_once_it_is_stored(service, wav):
    service.queue.max_disk_bytes = 10 * MB
    reservation = service.reserve(9 * MB)
    with pytest.raises(StemserveError, match="storage for uploads and stems is full"):
        service.reserve(2 * MB)
    service.accept(io.BytesIO(wav), "song.wav", reservation=reservation)
    service.release(service.reserve(2 * MB))


def test_unknown_jobs_unfinished_jobs_and_a_full_queue(service, runner, wav):
    with pytest.raises(UnknownJob, match="No such job"):
        service.status("0" * 22)
    runner.release.clear()
    first = service.accept(io.BytesIO(wav), "first.wav")
    with pytest.raises(JobNotDone, match=r"^The job is (queued|running), not done.$"):
        service.archive(first.id)
    assert runner.started.wait(5)  # out of the queue: two more may wait
    service.accept(io.BytesIO(wav), "second.wav")
    service.accept(io.BytesIO(wav), "third.wav")
    with pytest.raises(QueueFull):
        service.accept(io.BytesIO(wav), "fourth.wav")
    runner.release.set()
    assert asyncio.run(service.wait(first.id)).state == "done"
    with pytest.raises(UnknownJob, match=r"No stem 'drums': this job has vocals."):
        service.stem(first.id, "drums")


def test_a_one_shot_job_that_fails_is_removed_with_its_error(service, wav):
    with pytest.raises(JobFailed, match=r"^fail.wav: cannot decode audio \(test\)$"):
        asyncio.run(service.separate_once(io.BytesIO(wav), "fail.wav", JobOptions()))
    assert jobs_left(service) == []


def test_a_one_shot_job_is_done_when_it_returns(service, wav):
    job = asyncio.run(service.separate_once(io.BytesIO(wav), "song.wav",
                                            JobOptions(format="mp3")))
    assert job.state == "done" and job.options["format"] == "mp3"
    service.remove(job.id)
    assert jobs_left(service) == []


def test_config_offers_the_catalog_and_the_limits(service):
    config = service.config()
    assert (config.backend, config.models, config.default_model) == \
        ("onnx", ["small", "other"], "small")
    assert config.sources == list(SOURCES)
    assert config.model_sources == {"small": list(SOURCES), "other": list(STEM_NAMES)}
    assert config.model_descriptions == {"small": "a test's small model",
                                         "other": "a test's other model"}
    assert (config.default_format, config.default_shifts, config.max_shifts) == ("wav", 0, 10)
    assert (config.max_upload_mb, config.max_duration) == (1, 5)
    assert config.model_info == SMALL


def test_a_job_says_its_stage_in_words_and_keeps_the_model_it_ran_on(service, runner, wav):
    """While its model is prepared (exported, the first time) a job says so; once done it
    names the checkpoint, sha256 and precision that made its stems, also after a restart."""
    runner.release.clear()
    job = service.accept(io.BytesIO(wav), "song.wav")
    assert runner.started.wait(5)
    preparing = service.status(job.id)
    assert (preparing.state, preparing.stage, preparing.stage_text, preparing.model_info) == \
        ("running", "preparing", "preparing the model", None)
    runner.release.set()
    asyncio.run(service.wait(job.id))
    done = service.status(job.id)
    assert (done.stage, done.stage_text, done.model_info) == (None, None, SMALL)
    record = json.loads((service.settings.jobs_dir / job.id / RECORD).read_text())
    assert record["model_info"] == vars(SMALL)
    service.queue.close()
    again = JobQueue(service.settings.jobs_dir, runner)
    assert again.get(job.id).model_info == SMALL
    again.close()


@pytest.mark.parametrize("options,message", [
    (dict(format="ogg"), "format must be one of wav, wav24, wav32f, flac, flac24, mp3"),
    (dict(shifts=11), "shifts must be from 0 to 10"),
    (dict(two_stems="ukulele"), "two_stems must be one of drums, bass, other, vocals, guitar, "
                                "piano"),
])
def test_job_options_are_checked_without_the_form(options, message):
    with pytest.raises(InputError, match=message):
        JobOptions(**options)
