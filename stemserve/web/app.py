"""The web page and HTTP API of ``stemserve web``: upload a track, get its stems.

The page (``static/``) uses the JSON job API: ``POST /api/jobs`` answers at once with a job
id, ``GET /api/jobs/{id}`` tells its queue position and progress in audio seconds, and the
stems, the original mix and a zip of the stems are downloads under the job's id. The demucs
image's API, ``POST /api/music/{file_name}``, runs the same kind of job and answers with the
zip (MP3 320 kb/s), as it always did. ``/docs`` describes both, from ``/openapi.json``, with
nothing loaded from elsewhere.

Requests pass :mod:`stemserve.web.guards` first (cross-site writes, the token, the upload
limit, the disk budget). Uploads are checked before they become jobs: size while they
arrive, then that libsndfile reads them and how long they are. Separation runs in
:mod:`stemserve.web.jobs`'s worker threads through the same client library as
``stemserve separate``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, Sequence

from fastapi import FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from stemserve.audio import probe
from stemserve.errors import StemserveError
from stemserve.web.guards import (TOKEN_COOKIE, AccessGuard, UploadGuard, is_loopback,
                                  parse_origins, refusal, same_token, upload_reservation)
from stemserve.web.jobs import (Job, JobQueue, JobState, ProgressCallback, QueueFull,
                                Reservation, StoreFull, estimate_bytes, public_message)
from stemserve.web.separator import DEFAULT_FORMAT, FORMATS, SOURCES, Separator
from stemserve.web.settings import MB, Settings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_SHIFTS = 10
"""Each shift runs the whole track once more: more than demucs' paper used is no help."""
FORM_OVERHEAD = 64 << 10
"""Room for multipart boundaries and the other form fields, beyond the file itself."""
FORM_LIMITS = {"max_files": 1, "max_fields": 8, "max_part_size": 1024}
"""Starlette keeps form fields other than files in memory: a handful of short ones is all
the forms here have (model, two_stems, shifts, format)."""
POLL_SECONDS = 0.25
LEGACY_FORMAT = "mp3"
# The stored upload keeps its extension only when it is one of these (libsndfile reads some
# formats by extension); anything else is stored without one. Served with these types.
AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg",
               ".ogg": "audio/ogg", ".oga": "audio/ogg", ".opus": "audio/ogg",
               ".aif": "audio/aiff", ".aiff": "audio/aiff", ".au": "audio/basic",
               ".w64": "audio/x-w64", ".rf64": "audio/x-rf64", ".caf": "audio/x-caf"}

FormatName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
StemName = Literal[SOURCES]  # type: ignore[valid-type]


# ---------------------------------------------------------------------------------------------
# What the API answers

class StemFile(BaseModel):
    name: str
    url: str


class JobStatus(BaseModel):
    """A job as the page follows it."""

    id: str = Field(description="the job's id: the only way to reach its files")
    name: str = Field(description="the uploaded file's name (a label, never a path)")
    state: JobState
    position: int | None = Field(None, description="place in the queue, 1 being next; "
                                                   "null when not waiting")
    seconds: float = Field(description="length of the track in seconds")
    progress: float = Field(description="audio seconds separated so far")
    stage: Literal["separating", "encoding", "zipping"] | None = Field(
        None, description="what a running job does now: separating, then encoding the "
                          "stems (those that wait for the track's peak), then zipping them")
    stage_progress: float = Field(0.0, description="how far the stage is, from 0 to 1")
    error: str | None = None
    model: str
    two_stems: str | None
    shifts: int
    format: str
    stems: list[StemFile] = Field(description="one download per stem, once done")
    mix_url: str | None = Field(description="the uploaded track (gone if the job failed)")
    zip_url: str | None = Field(description="all stems in one zip, once done")
    expires: float | None = Field(description="when a finished job is deleted (Unix time)")


class Refusal(BaseModel):
    """Every refusal: what went wrong, in a sentence for the user."""

    detail: str


class Login(BaseModel):
    token: str


class ServiceConfig(BaseModel):
    """Choices and limits the page offers, with the command line's defaults."""

    backend: Literal["triton", "onnx"]
    models: list[str]
    default_model: str
    sources: list[str]
    formats: list[str]
    default_format: str
    default_shifts: int
    max_shifts: int
    max_upload_mb: float
    max_duration: float
    job_ttl: float


# ---------------------------------------------------------------------------------------------
# Upload checks and messages

def display_name(name: str | None) -> str:
    """The uploaded name as a label: its last path part, printable, at most 200 characters."""
    last = re.split(r"[/\\]", name or "")[-1]
    label = "".join(char for char in last if char.isprintable()).strip()[:200]
    return label if label.strip(".") else "track"


def download_stem(name: str) -> str:
    """A file name stem for downloads made from a label: letters, digits, ``._-``."""
    return re.sub(r"[^\w.-]+", "_", Path(name).stem).strip("._") or "track"


def _upload_name(name: str) -> str:
    """The server's name for an upload: ``upload`` with the original audio extension."""
    suffix = Path(name).suffix.lower()
    return "upload" + (suffix if suffix in AUDIO_TYPES else "")


def _limit_message(settings: Settings) -> str:
    return f"The file is too large: uploads are limited to {settings.max_upload_mb:g} MB."


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def validation_message(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one sentence naming each field, like every refusal."""
    def field(location: Sequence[Any]) -> str:
        names = [str(part) for part in location
                 if part not in ("body", "query", "path", "header", "cookie")]
        return ".".join(names) or "request"

    return "; ".join(f"{field(error['loc'])}: {error['msg']}" for error in errors)


def _refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for refusal ``codes``, with the shape they really have."""
    descriptions = {400: "not audio, an unknown model or a malformed form",
                    401: "the token is missing or wrong", 403: "a write from another site",
                    404: "no such job (it may have expired)", 409: "the job is not done",
                    413: "file too large or track too long", 422: "a bad option",
                    500: "the separation failed", 503: "queue full: retry later",
                    507: "disk budget used up: retry later"}
    return {code: {"model": Refusal, "description": descriptions[code]} for code in codes}


# ---------------------------------------------------------------------------------------------
# The app

def create_app(settings: Settings) -> FastAPI:
    """The web service for ``settings``.

    Locks the jobs folder and opens the default model's backend now (a Triton server that
    does not answer, a model that cannot be downloaded or loaded), so that what cannot work
    stops the start with its error instead of failing every upload.
    """
    allowed = parse_origins(settings.allow_origins)

    def run(job: Job, on_progress: ProgressCallback) -> dict[str, Path]:
        return separator.separate(job, on_progress)

    # The lock first: a second server must fail before it exports a model or cleans up.
    queue = JobQueue(settings.jobs_dir, run, workers=settings.workers,
                     queue_size=settings.queue_size, ttl=settings.job_ttl,
                     max_disk_bytes=settings.max_disk_bytes)
    try:
        separator = Separator(settings.triton_url, settings.model, settings.config)
    except BaseException:
        queue.close()
        raise

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        try:
            yield
        finally:
            queue.close()
            separator.close()
            logger.info("stemserve web stopped: queue and backends closed")

    app = FastAPI(title="stemserve", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, form_limits=FORM_LIMITS,
                  description="Separate music into drums, bass, other and vocals (Demucs v2 "
                              "on NVIDIA Triton). The page at / uses the job API; the "
                              "demucs image's `POST /api/music/{file_name}` still answers "
                              "with a zip of MP3 stems.")
    app.add_middleware(UploadGuard, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD,
                       message=_limit_message(settings), queue=queue)
    app.add_middleware(AccessGuard, allowed=allowed, token=settings.token,
                       loopback=is_loopback(settings.host))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(QueueFull)
    @app.exception_handler(StoreFull)
    async def busy(request: Request, err: QueueFull | StoreFull) -> JSONResponse:
        return refusal(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(err.errors())}, 422)

    def accept(upload: UploadFile, name: str, options: dict[str, Any],
               reservation: Reservation | None) -> Job:
        """Store and check an upload, then queue it; every refusal is an HTTP error.

        ``options["model"]`` None stands for the default model. ``reservation`` is the
        budget :class:`UploadGuard` held for the upload while it arrived: handed back once
        the upload is copied into its job folder and its spool file closed, so that it
        counts once.
        """
        size = upload.size or 0
        if size > settings.max_upload_bytes:
            raise HTTPException(413, f"The file is {size / MB:.1f} MB: uploads are limited "
                                     f"to {settings.max_upload_mb:g} MB.")
        models = separator.models()
        options = dict(options, model=options["model"] or next(iter(models)))
        if options["model"] not in models:
            raise HTTPException(400, f"Unknown model {options['model']!r}: choose one of "
                                     f"{', '.join(models)}.")
        job_id, folder = queue.new_folder()
        try:
            path = folder / _upload_name(name)
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
            upload.file.close()
            if reservation is not None:
                queue.release(reservation)
            try:
                info = probe(path)
            except StemserveError as err:
                raise HTTPException(400, public_message(str(err), {str(path): name})) from None
            if info.seconds > settings.max_duration:
                raise HTTPException(413, f"{name} is {_minutes(info.seconds)} long: tracks "
                                         f"up to {_minutes(settings.max_duration)} are "
                                         "accepted.")
            stems = 2 if options["two_stems"] else len(SOURCES)
            return queue.submit(Job(id=job_id, name=name, folder=folder, upload=path.name,
                                    seconds=info.seconds, options=options,
                                    estimate=estimate_bytes(info.seconds, stems)))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def find(job_id: str, *, done: bool = False) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(404, "No such job: it may have expired.")
        if done and job.state != "done":
            raise HTTPException(409, f"The job is {job.state}, not done.")
        return job

    def status(job: Job) -> JobStatus:
        base = f"/api/jobs/{job.id}"
        done = job.state == "done"
        return JobStatus(
            id=job.id, name=job.name, state=job.state, position=job.position,
            seconds=round(job.seconds, 2), progress=round(job.progress, 2), error=job.error,
            stage=job.stage, stage_progress=round(job.stage_progress, 3),
            model=job.options["model"], two_stems=job.options["two_stems"],
            shifts=job.options["shifts"], format=job.options["format"],
            stems=[StemFile(name=stem, url=f"{base}/stems/{stem}") for stem in job.stems],
            mix_url=f"{base}/mix" if job.upload_path.exists() else None,
            zip_url=f"{base}/zip" if done else None, expires=queue.expires(job))

    def zip_response(job: Job, background: BackgroundTask | None = None) -> FileResponse:
        return FileResponse(queue.archive(job), filename=f"{download_stem(job.name)}.zip",
                            media_type="application/zip", background=background)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        """The API reference, drawn by ``static/docs.js`` from ``/openapi.json``."""
        return FileResponse(STATIC / "docs.html")

    if settings.token:
        token = settings.token

        @app.post("/api/login", status_code=204, tags=["access"],
                  responses=_refusals(401, 403, 422))
        async def login(body: Login, request: Request) -> Response:
            """Check the token and keep it in an HttpOnly cookie for the page, whose audio
            players and download links cannot send an ``Authorization`` header."""
            if not same_token(body.token, token):
                raise HTTPException(401, "Wrong token.")
            response = Response(status_code=204)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            return response

    @app.get("/api/config", tags=["jobs"])
    async def config() -> ServiceConfig:
        """Models, stems, formats and limits, for the page's form."""
        models = await run_in_threadpool(separator.models)
        return ServiceConfig(
            backend=separator.backend_kind, models=list(models), default_model=next(iter(models)),
            sources=list(SOURCES), formats=list(FORMATS), default_format=DEFAULT_FORMAT,
            default_shifts=0, max_shifts=MAX_SHIFTS, max_upload_mb=settings.max_upload_mb,
            max_duration=settings.max_duration, job_ttl=settings.job_ttl)

    @app.post("/api/jobs", status_code=202, tags=["jobs"],
              responses=_refusals(400, 401, 403, 413, 422, 503, 507))
    async def submit(request: Request,
                     file: Annotated[UploadFile, File(description="the track")],
                     model: Annotated[str | None, Form()] = None,
                     two_stems: Annotated[StemName | None, Form(
                         description="separate this stem from the rest only")] = None,
                     shifts: Annotated[int, Form(ge=0, le=MAX_SHIFTS)] = 0,
                     format: Annotated[FormatName, Form()] = DEFAULT_FORMAT) -> JobStatus:
        """Upload a track; separation runs in the background. Follow it with its id."""
        options = dict(model=model, two_stems=two_stems, shifts=shifts, format=format)
        job = await run_in_threadpool(accept, file, display_name(file.filename), options,
                                      upload_reservation(request))
        return status(queue.get(job.id) or job)

    @app.get("/api/jobs/{job_id}", tags=["jobs"], responses=_refusals(401, 404, 422))
    async def job_status(job_id: str) -> JobStatus:
        """Queue position, progress, error or stems of a job."""
        return status(find(job_id))

    @app.get("/api/jobs/{job_id}/mix", tags=["jobs"], response_class=FileResponse,
             responses=_refusals(401, 404, 422))
    async def mix(job_id: str) -> FileResponse:
        """The uploaded track, for the player."""
        job = find(job_id)
        if not job.upload_path.exists():
            raise HTTPException(404, "The upload of a failed job is deleted.")
        suffix = job.upload_path.suffix
        return FileResponse(job.upload_path, filename=f"{download_stem(job.name)}{suffix}",
                            media_type=AUDIO_TYPES.get(suffix, "application/octet-stream"))

    @app.get("/api/jobs/{job_id}/stems/{stem}", tags=["jobs"], response_class=FileResponse,
             responses=_refusals(401, 404, 409, 422))
    async def stem_file(job_id: str, stem: str) -> FileResponse:
        """One stem of a finished job."""
        job = find(job_id, done=True)
        if stem not in job.stems:
            raise HTTPException(404, f"No stem {stem!r}: this job has {', '.join(job.stems)}.")
        path = job.stem_path(stem)
        return FileResponse(path, filename=f"{download_stem(job.name)}_{stem}{path.suffix}",
                            media_type=AUDIO_TYPES.get(path.suffix))

    @app.get("/api/jobs/{job_id}/zip", tags=["jobs"], response_class=FileResponse,
             responses=_refusals(401, 404, 409, 422))
    async def stems_zip(job_id: str) -> FileResponse:
        """Every stem of a finished job in one zip."""
        job = find(job_id, done=True)
        return await run_in_threadpool(zip_response, job)

    @app.post("/api/music/{file_name:path}", tags=["legacy"], response_class=FileResponse,
              responses={200: {"content": {"application/zip": {}},
                               "description": "drums, bass, other and vocals as MP3 320 kb/s"},
                         **_refusals(400, 401, 403, 413, 422, 500, 503, 507)})
    async def legacy_music(request: Request, file_name: str,
                           file: Annotated[UploadFile, File(description="the track")]
                           ) -> FileResponse:
        """The demucs image's API: upload, wait, get a zip of the four stems as MP3.

        ``file_name`` names the zip only; it is never used as a path. The client never
        learns the job's id, so the job is deleted once its zip is sent (or it failed).
        """
        name = display_name(file_name)
        options = dict(model=None, two_stems=None, shifts=0, format=LEGACY_FORMAT)
        job = await run_in_threadpool(accept, file, name, options, upload_reservation(request))
        while job.state in ("queued", "running"):
            await asyncio.sleep(POLL_SECONDS)
            job = find(job.id)
        if job.state == "failed":
            await run_in_threadpool(queue.remove, job.id)
            raise HTTPException(500, job.error)
        return await run_in_threadpool(zip_response, job,
                                       BackgroundTask(queue.remove, job.id))

    return app
