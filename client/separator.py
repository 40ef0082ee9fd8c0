"""The library's front door: a :class:`Separator` turns arrays and files into stems.

As ``demucs.api.Separator`` does, it holds a model (here: a backend, which may be a Triton
server, a fleet of them, or an in-process network) and the options, and separates one
array, one file or many files with them. The command line, the web service and the
benchmarks all build one. Options live in two dataclasses, each field declared once:
:class:`~stemserve.pipeline.SeparationOptions` (how a track is cut and put back) and
:class:`OutputOptions` (what is written).

Example::

    from stemserve.client import Separator, open_backend

    with open_backend("triton", connection="127.0.0.1:8001") as backend:
        separator = Separator(backend, shifts=2, seed=0)
        stems = separator.separate_array(mix, 44100)            # {"vocals": [2, n], ...}
        paths = separator.separate_file("song.flac", "separated")

Everything goes through :func:`stemserve.pipeline.stream_stems`; the backend only runs
the network. Files are read, separated and written in blocks, so memory does not grow with
the track, and ``stream_array`` / ``stream_file`` hand the stems out block by block as they
become final. No torch needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import soundfile as sf

from stemserve.audio import (MIN_SECONDS, AudioInfo, ClipMode, OutputFormat, StemWriter,
                             array_blocks, check_channels, check_sample_rate, probe,
                             read_blocks, resample_blocks)
from stemserve.client.progress import Progress, TrackProgress, progress_bar
from stemserve.client.stems import (SampleRateOut, StemSplitter, check_outputs, output_rate,
                                    stem_names, stem_paths)
from stemserve.client.tracks import unique_tracks
from stemserve.defaults import DEFAULT_TEMPLATE, DEFAULT_URL
from stemserve.errors import InputError, OutputError, StemserveError
from stemserve.pipeline import Backend, BlockSource, SeparationOptions, stream_stems

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What is written for each track, and where."""

    fmt: OutputFormat = OutputFormat()
    """Container, sample encoding and MP3 bit rate (flags of their own on the command line)."""
    clip_mode: ClipMode = dataclasses.field(default="rescale", metadata={
        "help": "rescale: stem / max(1.01 * peak, 1) as demucs does; clamp: clip to [-1, 1]; "
                "none: as is"})
    two_stems: str | None = dataclasses.field(default=None, metadata={
        "help": "write STEM and no_STEM (the sum of the others) only", "metavar": "STEM"})
    samplerate_out: SampleRateOut = dataclasses.field(default="original", metadata={
        "help": "write at the input's rate, so stems line up with the mix, or at the "
                "model's, as demucs does"})
    template: str = dataclasses.field(default=DEFAULT_TEMPLATE, metadata={
        "help": "stem path under the output folder from {track}, {trackext}, {parent}, "
                "{stem} and {ext}", "flag": "--filename"})


def build_options(separation: SeparationOptions | None, output: OutputOptions | None,
                  **fields: Any) -> tuple[SeparationOptions, OutputOptions]:
    """Both option dataclasses: given whole, or built from keyword fields (not both for one
    dataclass); an unknown name is an error."""
    built = []
    known: set[str] = set()
    for kind, given in ((SeparationOptions, separation), (OutputOptions, output)):
        names = {field.name for field in dataclasses.fields(kind)}
        known |= names
        mine = {key: value for key, value in fields.items() if key in names}
        if given is not None and mine:
            raise StemserveError(f"give {kind.__name__} or its fields "
                                 f"({', '.join(sorted(mine))}), not both")
        built.append(given if given is not None else kind(**mine))
    unknown = set(fields) - known
    if unknown:
        raise StemserveError(f"unknown separation option(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known))}")
    return built[0], built[1]


@dataclasses.dataclass(frozen=True)
class TrackResult:
    """How one track of :meth:`Separator.separate_files` ended: its stems, or the error."""

    track: Path
    seconds: float
    stems: dict[str, Path] | None = None
    error: StemserveError | None = None


class Separator:
    """Separates arrays and files with one backend and one set of options.

    ``separation`` and ``output`` may be given whole, or their fields as keywords
    (``Separator(backend, shifts=2, fmt=OutputFormat("flac"))``). ``downmix`` accepts inputs
    of more than two channels (averaged to mono first). The backend stays the caller's to
    close.
    """

    def __init__(self, backend: Backend, separation: SeparationOptions | None = None,
                 output: OutputOptions | None = None, *, downmix: bool = False,
                 **options: Any):
        self.backend = backend
        self.separation, self.output = build_options(separation, output, **options)
        self.downmix = downmix
        stem_names(backend.spec, self.output.two_stems)  # refuse a stem the model lacks now

    @property
    def spec(self):
        return self.backend.spec

    # -- one array ------------------------------------------------------------------------------

    def stream_array(self, mix: np.ndarray, sample_rate: int, *,
                     progress: Progress = False) -> Iterator[dict[str, np.ndarray]]:
        """Separate ``mix`` ([time] mono or [channels, time]) block by block: consecutive
        {stem: [2, n] float32} blocks, each as soon as the overlap-add has made it final.

        Blocks are at ``sample_rate`` unless ``samplerate_out="model"``, and not clipped.
        A bad mix is refused at the call; memory follows the requests in flight, not the
        mix; closing the iterator early cancels the requests still in flight.
        """
        mix = np.asarray(mix, dtype=np.float32)
        if mix.ndim not in (1, 2):
            raise InputError(f"mix must be [time] or [channels, time], got shape {mix.shape}")
        check_channels(1 if mix.ndim == 1 else mix.shape[0], self.downmix, "mix")
        check_sample_rate(sample_rate, "mix")
        if mix.shape[-1] < MIN_SECONDS * sample_rate:
            raise InputError(f"mix: too short to separate ({mix.shape[-1]} samples; at "
                             f"least {MIN_SECONDS} s needed)")
        spec = self.spec
        out_rate = sample_rate if self.output.samplerate_out == "original" else spec.sample_rate
        return self._tracked(
            lambda: resample_blocks(array_blocks(mix, downmix=self.downmix), sample_rate,
                                    spec.sample_rate), out_rate, progress,
            mix.shape[-1] / sample_rate, "mix")

    def separate_array(self, mix: np.ndarray, sample_rate: int, *,
                       progress: Progress = False) -> dict[str, np.ndarray]:
        """Separate ``mix`` ([time] mono or [channels, time]) into {stem: [2, time'] float32}:
        :meth:`stream_array`'s blocks joined."""
        blocks = list(self.stream_array(mix, sample_rate, progress=progress))
        names = stem_names(self.spec, self.output.two_stems)
        return {name: np.concatenate([block[name] for block in blocks], axis=-1)
                for name in names}

    # -- one file -------------------------------------------------------------------------------

    def stream_file(self, track: str | Path | AudioInfo, *,
                    progress: Progress = False) -> Iterator[dict[str, np.ndarray]]:
        """Separate one audio file block by block, as :meth:`stream_array` does: the blocks
        :meth:`separate_file` writes, before clipping and encoding (``rescale`` needs a
        stem's peak over the whole track). A file that cannot be read is refused at the
        call; every failure is a :class:`StemserveError` about the track."""
        info = track if isinstance(track, AudioInfo) else probe(Path(track),
                                                                downmix=self.downmix)
        return self._tracked(self._file_blocks(info), self.file_rate(info), progress,
                             info.seconds, info.path.name, where=info.path)

    def file_rate(self, info: AudioInfo) -> int:
        """The rate a file's stems come out at (:func:`~stemserve.client.stems.output_rate`):
        what :meth:`stream_file` yields and :meth:`separate_file` writes."""
        return output_rate(self.output.samplerate_out, self.spec.sample_rate, info.sample_rate,
                           self.output.fmt)

    def separate_file(self, track: str | Path | AudioInfo, out_dir: str | Path, *,
                      progress: Progress = False) -> dict[str, Path]:
        """Separate one audio file into one file per stem under ``out_dir``.

        ``track`` may be an :class:`~stemserve.audio.AudioInfo` already probed. Stems are
        written in ``output.fmt`` with demucs' clip handling by default, and appear only
        once all are complete (or not at all). Every failure is a :class:`StemserveError`
        about the track, of the class it was raised as. Returns {stem: path}.
        """
        info = track if isinstance(track, AudioInfo) else probe(Path(track),
                                                                downmix=self.downmix)
        path, output, spec = info.path, self.output, self.spec
        try:
            out_rate = self.file_rate(info)
            targets = stem_paths(path, Path(out_dir), stem_names(spec, output.two_stems),
                                 output.fmt.ext, output.template)
            with StemWriter(targets, out_rate, spec.audio_channels, output.fmt,
                            output.clip_mode) as writer, \
                    contextlib.closing(TrackProgress(progress, info.seconds, spec.sample_rate,
                                                     path.name)) as track_progress:
                for block in self._stream(self._file_blocks(info), out_rate, track_progress):
                    writer.write(block)
                return writer.commit(on_encoded=track_progress.encoded)
        except StemserveError as err:
            raise err.about(path) from err
        except (OSError, sf.LibsndfileError) as err:  # disk full, file too large, permissions
            raise OutputError(f"cannot write stems under {out_dir}: {err}",
                              where=str(path)) from err
        except MemoryError:
            raise StemserveError("out of memory while separating; try fewer requests in "
                                 "flight (--in-flight) or fewer --jobs", where=str(path)) \
                from None

    # -- the one pipeline under all of them -----------------------------------------------------

    def _file_blocks(self, info: AudioInfo) -> BlockSource:
        """The file's mix at the model's rate, read afresh at each call."""
        return lambda: resample_blocks(read_blocks(info.path, downmix=self.downmix),
                                       info.sample_rate, self.spec.sample_rate)

    def _tracked(self, source: BlockSource, out_rate: int, progress: Progress,
                 seconds: float, label: str,
                 where: Path | None = None) -> Iterator[dict[str, np.ndarray]]:
        """:meth:`_stream` with its own progress, its failures about ``where``."""
        try:
            with contextlib.closing(TrackProgress(progress, seconds, self.spec.sample_rate,
                                                  label)) as track_progress:
                yield from self._stream(source, out_rate, track_progress)
        except StemserveError as err:
            raise (err.about(where) if where is not None else err) from err

    def _stream(self, source: BlockSource, out_rate: int,
                track_progress: TrackProgress) -> Iterator[dict[str, np.ndarray]]:
        """:func:`~stemserve.pipeline.stream_stems` on ``source``, as named stems at
        ``out_rate``; closing it cancels the requests in flight at once."""
        ready: list[dict[str, np.ndarray]] = []
        stems = StemSplitter(self.spec, self.output.two_stems, out_rate, ready.append)
        # A backend that runs the whole pipeline itself (the server's, triton-stream).
        pipeline = getattr(self.backend, "stream", None) or functools.partial(stream_stems,
                                                                            backend=self.backend)
        with contextlib.closing(pipeline(source, options=self.separation,
                                         on_progress=track_progress.separated)) as blocks:
            for block in blocks:
                stems(block)
                yield from ready
                ready.clear()
        stems.flush()
        yield from ready

    # -- many files -----------------------------------------------------------------------------

    def separate_files(self, tracks: Sequence[str | Path], out_dir: str | Path, *,
                       jobs: int = 1, progress: Progress = False) -> Iterator[TrackResult]:
        """Separate many files, ``jobs`` tracks at once.

        Tracks overlap so that every server behind the backend stays busy: one track alone
        leaves them idle while its pipeline waits on its next segments and writes its stems.
        A track named twice is separated once; tracks whose stems would land on the same
        files are refused before anything runs. Yields a :class:`TrackResult` per track as
        each ends; a failing track does not stop the others. ``progress``: True, one bar
        over the audio seconds of all tracks; a callable receives ``("separating", done,
        total)`` over all tracks and each track's ``("encoding", done, total)``. Leaving the
        loop early drops the tracks not started; the running ones end when the caller closes
        the backend.
        """
        paths = unique_tracks(tracks)
        output = self.output
        check_outputs(paths, Path(out_dir), stem_names(self.spec, output.two_stems),
                      output.fmt.ext, output.template)
        infos: list[AudioInfo] = []
        for path in paths:
            try:
                infos.append(probe(path, downmix=self.downmix))
            except StemserveError as err:
                yield TrackResult(path, 0.0, error=err)
        if not infos:
            return
        total = sum(info.seconds for info in infos)
        tally = _Tally(progress, total,
                       infos[0].path.name if len(infos) == 1 else f"{len(infos)} tracks")
        pool = ThreadPoolExecutor(max(1, min(jobs, len(infos))), thread_name_prefix="stemserve")
        try:
            futures = [pool.submit(self._run_track, info, out_dir, tally) for info in infos]
            for future in as_completed(futures):
                yield future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            tally.close()

    def _run_track(self, info: AudioInfo, out_dir: str | Path, tally: "_Tally") -> TrackResult:
        reported = 0.0

        def report(stage: str, done: float, length: float) -> None:
            nonlocal reported
            if stage == "separating":
                tally.advance(done - reported)
                reported = done
            else:
                tally.stage(info.path.name, stage, done, length)

        try:
            stems = self.separate_file(info, out_dir, progress=report)
        except Exception as err:  # every failure is this track's, not the whole run's
            if not isinstance(err, StemserveError):
                logger.debug("%s failed", info.path, exc_info=True)
                err = StemserveError(f"unexpected {type(err).__name__}: {err} (-v shows the "
                                     "traceback)", where=str(info.path))
            tally.drop(info.seconds - reported)  # what this track will never do
            return TrackResult(info.path, info.seconds, error=err)
        return TrackResult(info.path, info.seconds, stems=stems)


class _Tally:
    """Progress of many tracks together: one bar, or one callback, shared by the threads."""

    def __init__(self, progress: Progress, total: float, label: str):
        self._lock = threading.Lock()
        self._callback = progress if callable(progress) else None
        self._bar = progress_bar(total, label) if progress is True else None
        self._total, self._done = total, 0.0

    def advance(self, seconds: float) -> None:
        with self._lock:
            step = max(0.0, min(seconds, self._total - self._done))  # float sums stay below
            self._done += step
            if self._bar is not None:
                self._bar.update(step)
            elif self._callback is not None:
                self._callback("separating", self._done, self._total)

    def stage(self, name: str, stage: str, done: float, length: float) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(f"{stage} {name} {done / length:.0%}")
            elif self._callback is not None:
                self._callback(stage, done, length)

    def drop(self, seconds: float) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.total -= seconds
                self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------
# One call each, for a backend at hand or a Triton server at ``url``

@contextlib.contextmanager
def _separator(backend: Backend | None, url: str, downmix: bool,
               options: dict[str, Any]) -> Iterator[Separator]:
    """A :class:`Separator` on the caller's backend, or on a Triton backend at ``url`` that
    is closed on exit."""
    if backend is not None:
        yield Separator(backend, downmix=downmix, **options)
        return
    from stemserve.client.backends import open_backend

    with open_backend("triton", connection=url) as owned:
        yield Separator(owned, downmix=downmix, **options)


def separate_array(mix: np.ndarray, sample_rate: int, *, backend: Backend | None = None,
                   url: str = DEFAULT_URL, downmix: bool = False, progress: Progress = False,
                   **options: Any) -> dict[str, np.ndarray]:
    """:meth:`Separator.separate_array` in one call; ``options`` are the fields of
    :class:`~stemserve.pipeline.SeparationOptions` and :class:`OutputOptions`. Without
    ``backend``, a Triton server at ``url`` is used."""
    with _separator(backend, url, downmix, options) as separator:
        return separator.separate_array(mix, sample_rate, progress=progress)


def separate_file(path: str | Path, out_dir: str | Path, *, backend: Backend | None = None,
                  url: str = DEFAULT_URL, downmix: bool = False, progress: Progress = False,
                  **options: Any) -> dict[str, Path]:
    """:meth:`Separator.separate_file` in one call; ``options`` as for
    :func:`separate_array`."""
    with _separator(backend, url, downmix, options) as separator:
        return separator.separate_file(path, out_dir, progress=progress)


def separate_files(paths: Sequence[str | Path], out_dir: str | Path, *, backend: Backend,
                   jobs: int = 1, downmix: bool = False, progress: Progress = False,
                   **options: Any) -> Iterator[TrackResult]:
    """:meth:`Separator.separate_files` in one call; ``options`` as for
    :func:`separate_array`."""
    separator = Separator(backend, downmix=downmix, **options)
    yield from separator.separate_files(paths, out_dir, jobs=jobs, progress=progress)
