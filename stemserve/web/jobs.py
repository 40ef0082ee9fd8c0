"""Separation jobs: a bounded queue, worker threads, and a store on disk under random ids.

Separating a track takes from seconds to minutes, so the web page submits a job and follows
it instead of holding a request open. Every job owns one folder named by an id the server
draws (``secrets.token_urlsafe``): the uploaded file name is kept as a label only, so no
upload ever names a path, and a job's files can be reached only by whoever holds its id.

A finished job is recorded in ``job.json``, so results outlive a restart until they expire.
A job that failed keeps only that record (its error); one interrupted by a restart is removed
whole. Only folders that carry the marker file written when stemserve created them are ever
removed, and one lock file keeps a second server from sharing (and cleaning) the folder.
Disk use is bounded: old jobs expire after ``ttl`` seconds, uploads still arriving hold their
size, and a new job is admitted only when its estimated size fits the budget, after the
oldest finished jobs made room.
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Literal

from stemserve.errors import QueueFull, StemserveError, StoreFull
from stemserve.files import atomic_path, atomic_write
from stemserve.spec import ModelSpec, family_rule
from stemserve.web.names import public_error

logger = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed"]
ACTIVE: tuple[JobState, ...] = ("queued", "running")
JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")
"""What ``secrets.token_urlsafe(16)`` returns: 128 random bits, nothing to guess."""
RECORD = "job.json"
MARKER = ".stemserve-job"
"""Written into every job folder as it is made: what proves that stemserve may delete it."""
LOCK = ".lock"
"""Locked (flock) by the one server that uses the jobs folder, for as long as it runs."""
STEMS = "stems"
ARCHIVE = "stems.zip"
# Disk estimate per second of audio and stem, before a job runs: float32 stereo at 44.1 kHz,
# three times (the rescale spill, the stems themselves at most that large, the zip of them).
ESTIMATE_BYTES_PER_STEM_SECOND = 44100 * 2 * 4 * 3

Stage = Literal["preparing", "separating", "encoding", "zipping"]
STAGE_TEXT: dict[Stage, str] = {
    "preparing": "preparing the model", "separating": "separating",
    "encoding": "encoding the stems", "zipping": "zipping the stems"}
"""Each stage as the page says it: preparing is the model opened (exported first, the first
time) for the job."""
ProgressCallback = Callable[[str, float, float], None]
"""Receives ``(stage, done, total)``: audio seconds separated, or stems encoded, so far."""
Runner = Callable[["Job", ProgressCallback], dict[str, Path]]
"""Separates a job's upload into files under ``job.folder / STEMS``; returns {stem: path}.
Sets ``job.model_info`` once it knows the model."""


def estimate_bytes(seconds: float, stems: int) -> int:
    """A generous bound on what a job of ``seconds`` writes, to admit it before it runs."""
    return int(seconds * stems * ESTIMATE_BYTES_PER_STEM_SECOND)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, links not followed.

    Jobs are written and deleted while this walks (other requests, expiry): a file or folder
    that vanishes meanwhile counts as zero instead of failing the request that asked.
    """
    total, pending = 0, [os.fspath(folder)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Which network separated a job (its backend's spec), so that stems can be traced to
    their checkpoint: a model name alone may be re-exported or re-quantized."""

    checkpoint: str
    checkpoint_sha256: str
    precision: str
    family: str
    family_title: str = ""
    """The family's name for users (``HT Demucs``), so the page needs no list of families."""

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelInfo:
        try:
            title = family_rule(spec.family).title
        except KeyError:
            title = spec.family
        return cls(checkpoint=spec.checkpoint, checkpoint_sha256=spec.checkpoint_sha256,
                   precision=spec.precision, family=spec.family, family_title=title)


@dataclasses.dataclass
class Job:
    """One upload and what became of it.

    ``name`` is the uploaded file's name, shown to the user and nowhere used as a path;
    ``upload`` is the server's own file name for it inside ``folder``. ``options`` are the
    runner's (model, stems, format). ``stems`` maps each stem to its file under ``folder``.
    ``model_info`` is set by the runner once the job's model is open. ``position`` is filled
    in on the copies :meth:`JobQueue.get` returns: the job's place in the queue, 1 being
    next, or None once it left the queue.
    """

    id: str
    name: str
    folder: Path
    upload: str
    seconds: float
    options: dict[str, Any]
    estimate: int = 0
    created: float = dataclasses.field(default_factory=time.time)
    state: JobState = "queued"
    progress: float = 0.0
    stage: Stage | None = None
    stage_progress: float = 0.0
    error: str | None = None
    stems: dict[str, str] = dataclasses.field(default_factory=dict)
    finished: float | None = None
    model_info: ModelInfo | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model_info, dict):  # as job.json keeps it
            self.model_info = ModelInfo(**self.model_info)

    @property
    def upload_path(self) -> Path:
        return self.folder / self.upload

    def stem_path(self, stem: str) -> Path:
        return self.folder / self.stems[stem]

    def record(self) -> dict[str, Any]:
        """What ``job.json`` keeps: everything but the folder and the queue position."""
        data = dataclasses.asdict(self)
        del data["folder"], data["position"]
        return data


@dataclasses.dataclass(eq=False)
class Reservation:
    """Disk budget held for an upload while it arrives: its spool file lies in no job folder,
    so no walk sees it. Hand it back with :meth:`JobQueue.release`."""

    size: int


class JobQueue:
    """Runs jobs with ``workers`` threads, at most ``queue_size`` waiting, in folders under
    ``root`` that take at most ``max_disk_bytes`` together.

    Opening one locks ``root`` (:class:`StemserveError` if another server holds it). Call
    :meth:`start` to start the workers and the sweeper that deletes expired jobs, and
    :meth:`close` at shutdown, which also unlocks ``root``.
    """

    def __init__(self, root: Path, runner: Runner, *, workers: int = 1, queue_size: int = 8,
                 ttl: float = 3600.0, max_disk_bytes: int = 10 << 30):
        if workers < 1 or queue_size < 1:
            raise StemserveError("the web service needs at least one worker and one queue slot")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file: IO[str] | None = _lock_folder(self.root)
        self.runner = runner
        self.workers = workers
        self.queue_size = queue_size
        self.ttl = ttl
        self.max_disk_bytes = max_disk_bytes
        self._lock = threading.Condition()
        self._archive_lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._pending: collections.deque[Job] = collections.deque()
        self._reservations: set[Reservation] = set()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._load()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._work, name=f"stemserve-job-{index}",
                                          daemon=True) for index in range(self.workers)]
        self._threads.append(threading.Thread(target=self._sweep, name="stemserve-sweeper",
                                              daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; running ones get ``timeout`` seconds to finish. Unlocks ``root``."""
        with self._lock:
            self._closed.set()
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _load(self) -> None:
        """Take back the finished jobs of an earlier run; remove interrupted ones.

        Only folders stemserve made (see :func:`_is_job_folder`) are read or removed: a
        user's folder in the jobs folder is never touched, whatever its name.
        """
        for folder in self.root.iterdir():
            if not _is_job_folder(folder):
                continue
            try:
                data = json.loads((folder / RECORD).read_text())
                job = Job(folder=folder, **data)
            except (OSError, ValueError, TypeError):
                job = None
            if job is None or job.id != folder.name or job.state in ACTIVE \
                    or self._expired(job, time.time()):
                shutil.rmtree(folder, ignore_errors=True)
            else:
                self._jobs[job.id] = job

    # -- admission --------------------------------------------------------------------------

    def new_folder(self) -> tuple[str, Path]:
        """A fresh job id and its folder (only the marker inside), where an upload is checked
        before it is a job.

        Remove the folder (:func:`shutil.rmtree`) if the upload is refused.
        """
        while True:
            job_id = secrets.token_urlsafe(16)
            folder = self.root / job_id
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            (folder / MARKER).touch()
            return job_id, folder

    def reserve(self, size: int) -> Reservation:
        """Hold ``size`` bytes of the budget for an upload about to arrive, before any of it
        is stored, deleting the oldest finished jobs to make room; :meth:`release` it once
        the upload is in its job folder (where the budget sees it) or refused.

        Raises :class:`QueueFull` or :class:`StoreFull` with a message for the user.
        """
        with self._lock:
            self._check_queue()
            self._make_room(size)
            reservation = Reservation(size)
            self._reservations.add(reservation)
            return reservation

    def release(self, reservation: Reservation) -> None:
        """Hand a reservation back; releasing one twice is harmless."""
        with self._lock:
            self._reservations.discard(reservation)

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (its upload already in its folder); refuses as :meth:`reserve`."""
        with self._lock:
            if self._closed.is_set():
                raise StemserveError("the server is shutting down")
            self._check_queue()
            self._make_room(job.estimate)
            job.state = "queued"
            self._jobs[job.id] = job
            self._pending.append(job)
            self._lock.notify()
        logger.info("job %s queued: %s (%.1f s)", job.id, job.name, job.seconds)
        return job

    def _check_queue(self) -> None:
        if len(self._pending) >= self.queue_size:
            raise QueueFull(f"the server is busy: {len(self._pending)} tracks are waiting. "
                            "Try again in a few minutes")

    def _make_room(self, size: int) -> None:
        self._expire()
        reserved = (sum(job.estimate for job in self._jobs.values() if job.state in ACTIVE)
                    + sum(reservation.size for reservation in self._reservations))
        used = folder_bytes(self.root)
        finished = sorted((job for job in self._jobs.values() if job.state not in ACTIVE),
                          key=lambda job: job.finished or job.created)
        for job in finished:
            if used + reserved + size <= self.max_disk_bytes:
                break
            used -= folder_bytes(job.folder)
            self._delete(job)
        if used + reserved + size > self.max_disk_bytes:
            raise StoreFull("the server's storage for uploads and stems is full with tracks "
                            "still being separated. Try again in a few minutes")

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """A copy of job ``job_id`` with its queue position, or None if there is none."""
        if not JOB_ID.fullmatch(job_id):
            return None
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            position = next((index + 1 for index, waiting in enumerate(self._pending)
                             if waiting is job), None)
            return dataclasses.replace(job, position=position, stems=dict(job.stems))

    def expires(self, job: Job) -> float | None:
        """When a finished job will be deleted (seconds since the epoch)."""
        return None if job.finished is None else job.finished + self.ttl

    def archive(self, job: Job) -> Path:
        """A zip of a job's stems, written once (by the job itself, or for an older job on
        first request)."""
        path = job.folder / ARCHIVE
        with self._archive_lock:
            if not path.exists():
                with atomic_path(path) as temporary, \
                        zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
                    for stem in job.stems:
                        source = job.stem_path(stem)
                        archive.write(source, f"{stem}{source.suffix}")
        return path

    def remove(self, job_id: str) -> None:
        """Delete a finished job now, e.g. once the only client that knew of it is served."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state not in ACTIVE:
                self._delete(job)

    # -- running ----------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._lock:
            while not self._pending and not self._closed.is_set():
                self._lock.wait()
            if self._closed.is_set():
                return None
            job = self._pending.popleft()
            job.state = "running"
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            started = time.monotonic()
            try:
                paths = self.runner(job, lambda *event: self._progress(job, *event))
                job.stems = {stem: path.relative_to(job.folder).as_posix()
                             for stem, path in paths.items()}
                self._progress(job, "zipping", 0.0, 1.0)
                self.archive(job)  # part of the job: the download is then at once
            except Exception as err:  # every failure belongs to the job, not the worker
                self._finish(job, state="failed", error=self._failure(job, err), stage=None)
            else:
                self._finish(job, state="done", progress=job.seconds, stage=None,
                             stage_progress=1.0)
                logger.info("job %s done in %.1f s", job.id, time.monotonic() - started)

    @staticmethod
    def _progress(job: Job, stage: Stage, done: float, total: float) -> None:
        """What the page shows of a running job: its stage, and how far that is."""
        if stage == "separating":
            job.progress = min(done, job.seconds)
        job.stage, job.stage_progress = stage, min(done / total, 1.0) if total else 0.0

    @staticmethod
    def _failure(job: Job, err: Exception) -> str:
        """The error as the user sees it; removes the upload and whatever stems were begun."""
        if isinstance(err, StemserveError):
            message = public_error(err, {job.upload_path: job.name, job.folder: "job"})
            logger.warning("job %s failed: %s", job.id, err)
        else:
            message = f"internal error ({type(err).__name__}); the server log has the details"
            logger.exception("job %s failed", job.id)
        shutil.rmtree(job.folder / STEMS, ignore_errors=True)
        job.upload_path.unlink(missing_ok=True)
        return message

    def _finish(self, job: Job, **changes: Any) -> None:
        """Record the job's end in ``job.json`` first, then show it to readers."""
        changes["finished"] = time.time()
        self._save(dataclasses.replace(job, **changes))
        with self._lock:
            for name, value in changes.items():
                setattr(job, name, value)

    def _save(self, job: Job) -> None:
        """Write ``job.json`` atomically, unless the job was deleted meanwhile."""
        try:
            with atomic_write(job.folder / RECORD, "w") as file:
                json.dump(job.record(), file)
        except OSError as err:
            logger.warning("job %s: cannot record its result: %s", job.id, err)

    # -- cleaning ---------------------------------------------------------------------------

    def _expired(self, job: Job, now: float) -> bool:
        return job.finished is not None and job.finished + self.ttl <= now

    def _expire(self) -> None:
        now = time.time()
        for job in [job for job in self._jobs.values() if self._expired(job, now)]:
            self._delete(job)

    def _delete(self, job: Job) -> None:
        del self._jobs[job.id]
        shutil.rmtree(job.folder, ignore_errors=True)
        logger.info("job %s deleted", job.id)

    def _sweep(self) -> None:
        """Delete expired jobs every tenth of their lifetime (1 s to 1 min)."""
        interval = min(max(self.ttl / 10, 1.0), 60.0)
        while not self._closed.wait(interval):
            with self._lock:
                self._expire()


def _is_job_folder(path: Path) -> bool:
    """Whether stemserve made ``path``: named by a job id, a folder itself (not a link to
    one), and holding the marker written at creation."""
    return (JOB_ID.fullmatch(path.name) is not None and path.is_dir()
            and not path.is_symlink() and (path / MARKER).is_file())


def _lock_folder(root: Path) -> IO[str]:
    """Lock ``root`` for this process (released when the returned file closes, or the
    process ends): two servers on one jobs folder would delete each other's running jobs."""
    handle = open(root / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise StemserveError(f"the jobs folder {root} is in use by another stemserve web "
                             f"({owner}): stop that one, or give this one its own "
                             "--jobs-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle
