"""Running one job: the client library's :class:`~stemserve.client.Separator`, as
``stemserve separate`` uses it, on the catalog's shared backend."""
from __future__ import annotations

from pathlib import Path

from stemserve.client import OutputOptions, SeparationOptions, Separator
from stemserve.web.catalog import ModelCatalog
from stemserve.web.jobs import STEMS, Job, ModelInfo, ProgressCallback
from stemserve.web.options import FORMATS, JobOptions

STEM_TEMPLATE = "{stem}.{ext}"
"""Stems lie flat in the job's ``stems`` folder: the job folder already names the track."""


def run_job(catalog: ModelCatalog, job: Job, on_progress: ProgressCallback) -> dict[str, Path]:
    """The :data:`~stemserve.web.jobs.Runner` of the web service (bind ``catalog`` first).

    Opening a model for its first job may export it (minutes): the job says so meanwhile,
    and then which checkpoint and precision it separates with.
    """
    options = JobOptions(**job.options)
    on_progress("preparing", 0.0, 0.0)
    backend = catalog.backend(options.model)
    job.model_info = ModelInfo.of(backend.spec)
    separator = Separator(backend,
                          SeparationOptions(shifts=options.shifts),
                          OutputOptions(fmt=FORMATS[options.format], two_stems=options.two_stems,
                                        template=STEM_TEMPLATE))
    return separator.separate_file(job.upload_path, job.folder / STEMS, progress=on_progress)
