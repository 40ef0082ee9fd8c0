"""The web service without HTTP: accept uploads as jobs, report them, hand out their files.

Everything an upload must pass is decided here: its size, the model it names, that
libsndfile reads it, its duration, the disk budget and the queue. :mod:`stemserve.web.app`
only parses requests, calls a :class:`JobService` and turns its errors into status codes, so
the service is used and tested from plain Python (no FastAPI needed). Every refusal is a
:class:`~stemserve.errors.StemserveError` whose message is one sentence for the user,
naming the upload by its label and never a server path.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Literal

from stemserve.audio import probe
from stemserve.defaults import SOURCES, STEM_NAMES
from stemserve.errors import (InputError, JobFailed, JobNotDone, ModelError, StemserveError,
                              TooLarge, UnknownJob)
from stemserve.web.catalog import ModelCatalog
from stemserve.web.jobs import (ACTIVE, STAGE_TEXT, Job, JobQueue, JobState, ModelInfo,
                                Reservation, Stage, estimate_bytes)
from stemserve.web.names import (display_name, download_stem, media_type, public_error,
                                 upload_name)
from stemserve.web.options import DEFAULT_FORMAT, FORMATS, MAX_SHIFTS, JobOptions
from stemserve.web.runner import run_job
from stemserve.web.settings import MB, Settings

POLL_SECONDS = 0.25
"""How often :meth:`JobService.wait` looks at a job it waits for."""


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Choices and limits the page offers, with the command line's defaults."""

    backend: Literal["triton", "onnx"]
    models: list[str]
    model_descriptions: dict[str, str]
    """What each model is: a release or a local file (and where), its family, checkpoint
    sha256 and precision where known."""
    default_model: str
    model_info: ModelInfo
    """The default model's checkpoint, its sha256, precision and family."""
    sources: list[str]
    """The default model's stems."""
    model_sources: dict[str, list[str]]
    """Each model's stems, where known without loading it (a model not yet exported: not
    listed; its job checks two_stems when it runs)."""
    formats: list[str]
    default_format: str
    default_shifts: int
    max_shifts: int
    max_upload_mb: float
    max_duration: float
    job_ttl: float


@dataclasses.dataclass(frozen=True)
class JobReport:
    """A job as its owner follows it: state, queue position, progress, error and files."""

    id: str
    name: str
    state: JobState
    position: int | None
    seconds: float
    progress: float
    stage: Stage | None
    stage_text: str | None
    stage_progress: float
    error: str | None
    model: str
    model_info: ModelInfo | None
    two_stems: str | None
    shifts: int
    format: str
    stems: list[str]
    has_mix: bool
    expires: float | None


@dataclasses.dataclass(frozen=True)
class Download:
    """A job's file, with the name and type it is downloaded as."""

    path: Path
    filename: str
    media_type: str


class JobService:
    """Jobs of one jobs folder (``queue``), separated with the models of ``catalog``.

    :meth:`open` builds one from :class:`~stemserve.web.settings.Settings`; :meth:`start`
    starts the workers, :meth:`close` stops them and closes the backends.
    """

    def __init__(self, settings: Settings, queue: JobQueue, catalog: ModelCatalog):
        self.settings = settings
        self.queue = queue
        self.catalog = catalog

    @classmethod
    def open(cls, settings: Settings) -> JobService:
        """Lock the jobs folder, then open the default model's backend.

        The lock comes first, so that a second server on the same folder stops before it
        exports a model or cleans up; the model next, so that a Triton server that does not
        answer or a model that cannot load stops the start instead of failing every upload.
        """
        catalog = ModelCatalog(settings.triton_url, settings.model, settings.config,
                               precision=settings.precision, connection=settings.connection)
        queue = JobQueue(settings.jobs_dir, functools.partial(run_job, catalog),
                         workers=settings.workers, queue_size=settings.queue_size,
                         ttl=settings.job_ttl, max_disk_bytes=settings.max_disk_bytes)
        try:
            catalog.open()
        except BaseException:
            queue.close()
            raise
        return cls(settings, queue, catalog)

    def start(self) -> None:
        self.queue.start()

    def close(self) -> None:
        self.queue.close()
        self.catalog.close()

    # -- what the page offers ---------------------------------------------------------------

    def config(self) -> ServiceConfig:
        """Models, stems, formats and limits, for the page's form (lists the export folder
        and checkpoint cache: call it off the event loop)."""
        models = list(self.catalog.models())
        known = {name: list(sources) for name in models
                 if (sources := self.catalog.sources(name)) is not None}
        return ServiceConfig(
            backend=self.catalog.kind, models=models,
            model_descriptions={name: self.catalog.describe(name) for name in models},
            default_model=models[0],
            model_info=ModelInfo.of(self.catalog.backend(models[0]).spec),  # open since start
            sources=known.get(models[0], list(SOURCES)), model_sources=known,
            formats=list(FORMATS), default_format=DEFAULT_FORMAT,
            default_shifts=JobOptions().shifts, max_shifts=MAX_SHIFTS,
            max_upload_mb=self.settings.max_upload_mb,
            max_duration=self.settings.max_duration, job_ttl=self.settings.job_ttl)

    # -- admission --------------------------------------------------------------------------

    def reserve(self, size: int) -> Reservation:
        """Hold ``size`` bytes of the disk budget for an upload about to arrive
        (:meth:`JobQueue.reserve`); hand it to :meth:`accept`, or :meth:`release` it."""
        return self.queue.reserve(size)

    def release(self, reservation: Reservation) -> None:
        self.queue.release(reservation)

    def accept(self, upload: BinaryIO, name: str | None, options: JobOptions = JobOptions(),
               reservation: Reservation | None = None) -> Job:
        """Store an upload in a new job folder, check it and queue it; returns the job.

        ``name`` is the client's file name, kept only as a label. ``upload`` is read from
        its start and closed once copied; ``reservation``, the budget held for it while it
        arrived, is then released, so that it counts once. Raises :class:`TooLarge` (size,
        duration), :class:`~stemserve.errors.ModelError` (a model not offered),
        :class:`~stemserve.errors.InputError` (not audio), ``QueueFull`` or ``StoreFull``;
        a refused upload leaves nothing behind. Blocks on disk I/O.
        """
        label = display_name(name)
        size = upload.seek(0, os.SEEK_END)
        upload.seek(0)
        if size > self.settings.max_upload_bytes:
            raise TooLarge(f"The file is {size / MB:.1f} MB: uploads are limited to "
                           f"{self.settings.max_upload_mb:g} MB.")
        models = self.catalog.models()
        model = options.model or next(iter(models))
        if model not in models:
            raise ModelError(f"Unknown model {model!r}: choose one of {', '.join(models)}.")
        sources = self.catalog.sources(model)
        if options.two_stems is not None and sources is not None \
                and options.two_stems not in sources:
            raise InputError(f"{model} separates {', '.join(sources)}: it has no "
                             f"{options.two_stems} stem.")
        job_id, folder = self.queue.new_folder()
        try:
            path = folder / upload_name(label)
            with open(path, "wb") as out:
                shutil.copyfileobj(upload, out, 1 << 20)
            upload.close()
            if reservation is not None:
                self.queue.release(reservation)
            try:
                info = probe(path)
            except StemserveError as err:
                raise InputError(public_error(err, {path: label})) from None
            if info.seconds > self.settings.max_duration:
                raise TooLarge(f"{label} is {_minutes(info.seconds)} long: tracks up to "
                               f"{_minutes(self.settings.max_duration)} are accepted.")
            stems = 2 if options.two_stems else len(sources or STEM_NAMES)
            job = self.queue.submit(Job(
                id=job_id, name=label, folder=folder, upload=path.name, seconds=info.seconds,
                options=dataclasses.asdict(dataclasses.replace(options, model=model)),
                estimate=estimate_bytes(info.seconds, stems)))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self.queue.get(job.id) or job

    # -- following a job --------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """Job ``job_id`` as it is now; :class:`UnknownJob` if there is none."""
        job = self.queue.get(job_id)
        if job is None:
            raise UnknownJob("No such job: it may have expired.")
        return job

    def report(self, job: Job) -> JobReport:
        """What the page shows of ``job``."""
        return JobReport(
            id=job.id, name=job.name, state=job.state, position=job.position,
            seconds=round(job.seconds, 2), progress=round(job.progress, 2), stage=job.stage,
            stage_text=STAGE_TEXT[job.stage] if job.stage else None,
            stage_progress=round(job.stage_progress, 3), error=job.error,
            model=job.options["model"], model_info=job.model_info,
            two_stems=job.options["two_stems"],
            shifts=job.options["shifts"], format=job.options["format"],
            stems=list(job.stems), has_mix=job.upload_path.exists(),
            expires=self.queue.expires(job))

    def status(self, job_id: str) -> JobReport:
        return self.report(self.job(job_id))

    async def wait(self, job_id: str) -> Job:
        """The job once it is done; :class:`JobFailed` with its error if it failed.

        A coroutine that polls, so that a request waiting for a job holds no thread and a
        shutdown can cancel it.
        """
        job = self.job(job_id)
        while job.state in ACTIVE:
            await asyncio.sleep(POLL_SECONDS)
            job = self.job(job_id)
        if job.state == "failed":
            raise JobFailed(job.error or "The separation failed.")
        return job

    async def separate_once(self, upload: BinaryIO, name: str | None, options: JobOptions,
                            reservation: Reservation | None = None) -> Job:
        """:meth:`accept` and :meth:`wait`, for a client that never learns the job's id (the
        demucs image's API): a failed job is removed before :class:`JobFailed` is raised;
        :meth:`remove` a done one once its results are sent."""
        job = await asyncio.to_thread(self.accept, upload, name, options, reservation)
        try:
            return await self.wait(job.id)
        except JobFailed:
            await asyncio.to_thread(self.remove, job.id)
            raise

    def remove(self, job_id: str) -> None:
        """Delete a finished job now (a running one is left to finish)."""
        self.queue.remove(job_id)

    # -- a job's files ----------------------------------------------------------------------

    def mix(self, job_id: str) -> Download:
        """The uploaded track, for the player (gone once its job failed)."""
        job = self.job(job_id)
        path = job.upload_path
        if not path.exists():
            raise UnknownJob("The upload of a failed job is deleted.")
        return Download(path, f"{download_stem(job.name)}{path.suffix}", media_type(path))

    def stem(self, job_id: str, stem: str) -> Download:
        """One stem of a finished job."""
        job = self._done(job_id)
        if stem not in job.stems:
            raise UnknownJob(f"No stem {stem!r}: this job has {', '.join(job.stems)}.")
        path = job.stem_path(stem)
        return Download(path, f"{download_stem(job.name)}_{stem}{path.suffix}",
                        media_type(path))

    def archive(self, job_id: str) -> Download:
        """Every stem of a finished job in one zip (written on first request for a job from
        before zips were part of the job; call it off the event loop)."""
        job = self._done(job_id)
        return Download(self.queue.archive(job), f"{download_stem(job.name)}.zip",
                        "application/zip")

    def _done(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.state != "done":
            raise JobNotDone(f"The job is {job.state}, not done.")
        return job


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"
