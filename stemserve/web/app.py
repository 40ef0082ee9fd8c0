"""The HTTP router of ``stemserve web``: each route parses its request and calls the job
service (:mod:`stemserve.web.service`), whose errors become status codes in one place
(:mod:`stemserve.web.refusals`).

The page (``static/``) uses the JSON job API: ``POST /api/jobs`` answers at once with a job
id, ``GET /api/jobs/{id}`` tells its queue position and progress in audio seconds, and the
stems, the original mix and a zip of the stems are downloads under the job's id. The demucs
image's API, ``POST /api/music/{file_name}``, runs the same kind of job and answers with the
zip (MP3 320 kb/s), as it always did. ``/docs`` describes both, from ``/openapi.json``, with
nothing loaded from elsewhere. Requests pass :mod:`stemserve.web.guards` first (cross-site
writes, the token, the upload limit, the disk budget).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Annotated, AsyncIterator, Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from stemserve import __version__
from stemserve.defaults import DEFAULT_MODEL, STEM_NAMES
from stemserve.errors import StemserveError
from stemserve.web.guards import (TOKEN_COOKIE, AccessGuard, TokenThrottle, UploadGuard,
                                  client_key, is_loopback, parse_origins, same_token,
                                  throttled, upload_reservation)
from stemserve.web.jobs import JobState, ModelInfo, Stage
from stemserve.web.options import DEFAULT_FORMAT, FORMATS, MAX_SHIFTS, JobOptions
from stemserve.web.refusals import documented, refusal, validation_message
from stemserve.web.service import Download, JobReport, JobService, ServiceConfig
from stemserve.web.settings import Settings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD = 64 << 10
"""Room for multipart boundaries and the other form fields, beyond the file itself."""
FORM_LIMITS = {"max_files": 1, "max_fields": 8, "max_part_size": 1024}
"""Starlette keeps form fields other than files in memory: a handful of short ones is all
the forms here have (model, two_stems, shifts, format)."""
LEGACY_OPTIONS = JobOptions(format="mp3")
"""What the demucs image's API always gave: the default model's four stems, MP3 320 kb/s."""

FormatName = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
StemName = Literal[STEM_NAMES]  # type: ignore[valid-type]


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
    stage: Stage | None = Field(
        None, description="what a running job does now: preparing its model (exporting it "
                          "first, on its first use), separating, then encoding the stems "
                          "(those that wait for the track's peak), then zipping them")
    stage_text: str | None = Field(None, description="the stage in words, for the page")
    stage_progress: float = Field(0.0, description="how far the stage is, from 0 to 1")
    error: str | None = None
    model: str
    model_info: ModelInfo | None = Field(
        None, description="the checkpoint, its sha256, precision and family the job "
                          "separates with; null until its model is open")
    two_stems: str | None
    shifts: int
    format: str
    stems: list[StemFile] = Field(description="one download per stem, once done")
    mix_url: str | None = Field(description="the uploaded track (gone if the job failed)")
    zip_url: str | None = Field(description="all stems in one zip, once done")
    expires: float | None = Field(description="when a finished job is deleted (Unix time)")

    @classmethod
    def of(cls, report: JobReport) -> JobStatus:
        """The service's report, with the URLs of the job's files."""
        fields = dataclasses.asdict(report)
        stems, has_mix = fields.pop("stems"), fields.pop("has_mix")
        base = f"/api/jobs/{report.id}"
        return cls(**fields,
                   stems=[StemFile(name=stem, url=f"{base}/stems/{stem}") for stem in stems],
                   mix_url=f"{base}/mix" if has_mix else None,
                   zip_url=f"{base}/zip" if report.state == "done" else None)


class Login(BaseModel):
    token: str


def download(file: Download, background: BackgroundTask | None = None) -> FileResponse:
    return FileResponse(file.path, filename=file.filename, media_type=file.media_type,
                        background=background)


def describe(service: JobService) -> str:
    """What ``/docs`` says the server is: the generations stemserve runs, and how this one
    separates (its backend and default model)."""
    where = "on NVIDIA Triton" if service.catalog.kind == "triton" else \
        "in-process with ONNX Runtime"
    return (f"Separate music into stems with Demucs, any generation: v2, v3, Hybrid Demucs "
            f"and Hybrid Transformer Demucs (stemserve's default model is `{DEFAULT_MODEL}`). "
            f"This server separates {where}, with `{next(iter(service.catalog.models()))}` "
            f"unless a job names another model. The page at / uses the job API; the demucs "
            f"image's `POST /api/music/{{file_name}}` still answers with a zip of MP3 stems.")


def create_app(settings: Settings) -> FastAPI:
    """The web service for ``settings``; its job service opens now
    (:meth:`JobService.open`), so that what cannot work stops the start with its error."""
    allowed = parse_origins(settings.allow_origins)  # a typo stops the start before all else
    service = JobService.open(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.close()
            logger.info("stemserve web stopped: queue and backends closed")

    app = FastAPI(title="stemserve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, form_limits=FORM_LIMITS,
                  description=describe(service))
    throttle = TokenThrottle()
    app.add_middleware(UploadGuard, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD,
                       message=f"The file is too large: uploads are limited to "
                               f"{settings.max_upload_mb:g} MB.", service=service)
    app.add_middleware(AccessGuard, allowed=allowed, token=settings.token,
                       loopback=is_loopback(settings.host), throttle=throttle)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(StemserveError)
    async def refused(request: Request, err: StemserveError) -> JSONResponse:
        return refusal(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(err.errors())}, 422)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        """The API reference, drawn by ``static/docs.js`` from ``/openapi.json``."""
        return FileResponse(STATIC / "docs.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        """The pages link their icon; this answers browsers and tools that ask anyway."""
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    if settings.token:
        token = settings.token

        @app.post("/api/login", status_code=204, tags=["access"],
                  responses=documented(401, 403, 422, 429))
        async def login(body: Login, request: Request) -> Response:
            """Check the token and keep it in an HttpOnly cookie for the page, whose audio
            players and download links cannot send an ``Authorization`` header. Wrong
            tokens are throttled per address, as everywhere else (429 and ``Retry-After``)."""
            client = client_key(request.scope)
            if wait := throttle.wait(client):
                return throttled(wait)
            if not same_token(body.token, token):
                throttle.failed(client)
                raise HTTPException(401, "Wrong token.")
            response = Response(status_code=204)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            return response

    @app.get("/api/config", tags=["jobs"], responses=documented(401, 429))
    async def config() -> ServiceConfig:
        """Models, stems, formats and limits, for the page's form."""
        return await run_in_threadpool(service.config)

    @app.post("/api/jobs", status_code=202, tags=["jobs"],
              responses=documented(400, 401, 403, 413, 422, 429, 503, 507))
    async def submit(request: Request,
                     file: Annotated[UploadFile, File(description="the track")],
                     model: Annotated[str | None, Form()] = None,
                     two_stems: Annotated[StemName | None, Form(
                         description="separate this stem from the rest only")] = None,
                     shifts: Annotated[int, Form(ge=0, le=MAX_SHIFTS)] = 0,
                     format: Annotated[FormatName, Form()] = DEFAULT_FORMAT) -> JobStatus:
        """Upload a track; separation runs in the background. Follow it with its id."""
        options = JobOptions(model=model, two_stems=two_stems, shifts=shifts, format=format)
        job = await run_in_threadpool(service.accept, file.file, file.filename, options,
                                      upload_reservation(request))
        return JobStatus.of(service.report(job))

    @app.get("/api/jobs/{job_id}", tags=["jobs"], responses=documented(401, 404, 422, 429))
    async def job_status(job_id: str) -> JobStatus:
        """Queue position, progress, error or stems of a job."""
        return JobStatus.of(service.status(job_id))

    @app.get("/api/jobs/{job_id}/mix", tags=["jobs"], response_class=FileResponse,
             responses=documented(401, 404, 422, 429))
    async def mix(job_id: str) -> FileResponse:
        """The uploaded track, for the player."""
        return download(service.mix(job_id))

    @app.get("/api/jobs/{job_id}/stems/{stem}", tags=["jobs"], response_class=FileResponse,
             responses=documented(401, 404, 409, 422, 429))
    async def stem_file(job_id: str, stem: str) -> FileResponse:
        """One stem of a finished job."""
        return download(service.stem(job_id, stem))

    @app.get("/api/jobs/{job_id}/zip", tags=["jobs"], response_class=FileResponse,
             responses=documented(401, 404, 409, 422, 429))
    async def stems_zip(job_id: str) -> FileResponse:
        """Every stem of a finished job in one zip."""
        return download(await run_in_threadpool(service.archive, job_id))

    @app.post("/api/music/{file_name:path}", tags=["legacy"], response_class=FileResponse,
              responses={200: {"content": {"application/zip": {}},
                               "description": "the default model's stems (drums, bass, "
                                              "other, vocals) as MP3 320 kb/s"},
                         **documented(400, 401, 403, 413, 422, 429, 500, 503, 507)})
    async def legacy_music(request: Request, file_name: str,
                           file: Annotated[UploadFile, File(description="the track")]
                           ) -> FileResponse:
        """The demucs image's API: upload, wait, get a zip of the default model's stems as
        MP3.

        ``file_name`` names the zip only; it is never used as a path. The client never
        learns the job's id, so the job is deleted once its zip is sent (or it failed).
        """
        job = await service.separate_once(file.file, file_name, LEGACY_OPTIONS,
                                          upload_reservation(request))
        return download(await run_in_threadpool(service.archive, job.id),
                        BackgroundTask(service.remove, job.id))

    return app
