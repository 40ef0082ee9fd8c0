"""The library API: turn a song into stems through Triton, or in-process. No torch needed.

Example::

    from stemserve.client import open_backend, separate_array, separate_file

    with open_backend("triton", url="127.0.0.1:8001") as backend:
        stems = separate_array(mix, 44100, backend=backend)        # {"vocals": [2, n], ...}
        paths = separate_file("song.flac", "separated", backend=backend)

Everything goes through :func:`stemserve.pipeline.separate_stream`; the backend only runs
the network. Files are read, separated and written in blocks, so memory does not grow with
the track.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, Union

import numpy as np
import soundfile as sf
import tqdm

from stemserve.audio import (MIN_SECONDS, MP3_RATES, AudioInfo, ClipMode, OutputFormat,
                             Resampler, StemWriter, array_blocks, check_channels,
                             check_sample_rate, probe, read_blocks, resample_blocks)
from stemserve.client.onnx_backend import OnnxBackend, load_export_spec
from stemserve.defaults import DEFAULT_MODEL, export_root
from stemserve.errors import StemserveError
from stemserve.files import file_sha256
from stemserve.pipeline import DEFAULT_WINDOW, REQUEST_TIMEOUT, Backend, separate_stream
from stemserve.spec import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_TEMPLATE = "{track}/{stem}.{ext}"
BackendKind = Literal["triton", "onnx", "torch"]
SampleRateOut = Literal["model", "original"]
ProgressCallback = Callable[[str, float, float], None]
"""Receives ``(stage, done, total)`` in audio seconds: stage ``"separating"`` each time the
backend answers a request, then ``"encoding"`` while the stems are written."""
Progress = Union[bool, ProgressCallback]
"""True: a tqdm bar in audio seconds (shown on a terminal only); a callable: see
:data:`ProgressCallback`."""


# ---------------------------------------------------------------------------------------------
# Backends

def open_backend(kind: BackendKind = "triton", *, model: str | Path | None = None,
                 config: str | None = None, url: str = DEFAULT_URL, window: int = DEFAULT_WINDOW,
                 shared_memory: bool | None = None, timeout: float = REQUEST_TIMEOUT,
                 retries: int = 3) -> Backend:
    """A backend of ``kind``; close it when done (it is a context manager).

    ``model`` is a release name, a checkpoint file or (onnx) an export folder; ``config``
    names the release whose configuration a plain state-dict file has (as ``stemserve
    export --config``). For Triton it is only checked against what the server serves; the
    in-process backends default to :data:`DEFAULT_MODEL`. ``window``, ``shared_memory`` (None: when the server is on this
    host), ``timeout`` and ``retries`` apply to Triton.

    ``url`` may name several servers (``host:port,host:port`` or ``@file``, see
    :func:`~stemserve.client.fleet.parse_endpoints`): the backend is then a
    :class:`~stemserve.client.fleet.FleetBackend` spreading segments over all of them, with
    ``window`` requests in flight per server.
    """
    if kind == "triton":
        from stemserve.client.fleet import FleetBackend, parse_endpoints
        from stemserve.client.triton import TritonBackend

        local = _local_export(model)
        spec = None if local is None else load_export_spec(local)
        urls = parse_endpoints(url)
        backend: TritonBackend | FleetBackend
        if len(urls) == 1:
            backend = TritonBackend(urls[0], timeout=timeout, retries=retries,
                                    shared_memory=shared_memory, slots=window, spec=spec)
        else:
            backend = FleetBackend(urls, timeout=timeout, retries=retries,
                                   shared_memory=shared_memory, window=window, spec=spec)
        if model is not None and local is None and Path(model).stem != backend.spec.checkpoint:
            backend.close()
            raise StemserveError(
                f"Triton at {url} serves '{backend.spec.checkpoint}', not "
                f"'{Path(model).stem}': serve that model, or leave -n/--model out")
        return backend
    if kind == "onnx":
        return OnnxBackend(export_dir_for(model or DEFAULT_MODEL, config))
    if kind == "torch":
        from stemserve.torch_backend import TorchBackend

        return TorchBackend(*_load_model(model or DEFAULT_MODEL, config))
    raise StemserveError(f"unknown backend {kind!r}: use triton, onnx or torch")


def export_dir_for(model: str | Path, config: str | None = None) -> Path:
    """An ONNX export of ``model``: the folder itself, ``<export root>/<name>``, or a new one.

    Exporting needs PyTorch and happens once; later runs, from any working directory, reuse
    the folder under :func:`~stemserve.defaults.export_root` (a checkpoint file changed
    since its export is exported again).
    """
    local = _local_export(model)
    if local is not None:
        return local
    torch_model, info = _load_model(model, config)
    from stemserve.export.to_onnx import export_onnx  # torch is there: _load_model needs it

    out = export_root() / info.name
    logger.info("no ONNX export of %s yet: exporting it to %s (once; about a minute for the "
                "full-size model)", model, out)
    start = time.perf_counter()
    export_onnx(torch_model, info, out)
    logger.info("exported %s in %.1f s", model, time.perf_counter() - start)
    return out


def _local_export(model: str | Path | None) -> Path | None:
    """The up-to-date export folder ``model`` names: itself, or ``<export root>/<name>``."""
    if model is None:
        return None
    path = Path(model)
    if (path / "model.json").is_file():
        return path
    folder = export_root() / path.stem
    sidecar = folder / "model.json"
    if not sidecar.is_file():
        return None
    if path.is_file() and path.stat().st_mtime > sidecar.stat().st_mtime \
            and load_export_spec(folder).checkpoint_sha256 != file_sha256(path):
        logger.info("%s changed since it was exported to %s: exporting it again", path, folder)
        return None
    return folder


def _load_model(model: str | Path, config: str | None = None):
    """(Demucs, CheckpointInfo) for a release name or checkpoint file, with clear errors."""
    try:
        from stemserve.checkpoints import CheckpointError, load_model
    except ImportError as err:
        raise StemserveError(f"model {model}: loading a checkpoint needs PyTorch ({err}); "
                             "install 'stemserve[export]' or use --backend triton") from None
    try:
        return load_model(str(model), config=config)
    except CheckpointError as err:
        raise StemserveError(f"model {model}: {err}") from None


@contextlib.contextmanager
def _using(backend: Backend | None, url: str) -> Iterator[Backend]:
    """The caller's backend, or a Triton backend at ``url`` closed on exit."""
    if backend is not None:
        yield backend
        return
    owned = open_backend("triton", url=url)
    try:
        yield owned
    finally:
        owned.close()


# ---------------------------------------------------------------------------------------------
# Stems

def stem_names(spec: ModelSpec, two_stems: str | None = None) -> list[str]:
    """The stems written: the model's sources, or ``[stem, "no_" + stem]`` for two stems."""
    if two_stems is None:
        return list(spec.sources)
    if two_stems not in spec.sources:
        raise StemserveError(f"two stems {two_stems!r}: the model's stems are "
                             f"{', '.join(spec.sources)}")
    return [two_stems, f"no_{two_stems}"]


class _Stems:
    """Turns the pipeline's [sources, channels, n] blocks into named stems at the output rate.

    With ``two_stems="vocals"`` the stems are ``vocals`` and ``no_vocals`` (the sum of the
    others), as later demucs releases write them.
    """

    def __init__(self, spec: ModelSpec, two_stems: str | None, out_rate: int,
                 consumer: Callable[[dict[str, np.ndarray]], None]):
        self.names = stem_names(spec, two_stems)
        self._index = None if two_stems is None else spec.sources.index(two_stems)
        self._channels = spec.audio_channels
        self._resampler = Resampler(spec.sample_rate, out_rate,
                                    len(self.names) * spec.audio_channels)
        self._consumer = consumer

    def __call__(self, block: np.ndarray) -> None:
        if self._index is not None:
            others = [index for index in range(block.shape[0]) if index != self._index]
            block = np.stack([block[self._index], block[others].sum(axis=0)])
        self._emit(self._resampler.process(block.reshape(-1, block.shape[-1])))

    def flush(self) -> None:
        self._emit(self._resampler.flush())

    def _emit(self, flat: np.ndarray) -> None:
        if flat.shape[-1]:
            self._consumer({name: flat[index * self._channels:(index + 1) * self._channels]
                            for index, name in enumerate(self.names)})


def progress_bar(seconds: float, label: str) -> tqdm.tqdm:
    """A tqdm bar in audio seconds, shown on a terminal only (one track, or a whole job)."""
    return tqdm.tqdm(total=seconds, desc=label, unit="s", disable=None,
                     bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]")


class _TrackProgress:
    """Turns the pipeline's answered samples and the writer's encoded fraction into what
    ``progress`` asks for: a bar (the encoding stage as its postfix) or a callback."""

    def __init__(self, progress: Progress, seconds: float, sample_rate: int, label: str):
        self._callback = progress if callable(progress) else None
        self._bar = progress_bar(seconds, label) if progress is True else None
        self.seconds = seconds
        self._rate = sample_rate
        self._done = 0.0

    def separated(self, samples: float) -> None:
        # Counted at the model's rate, against the input's length: never past the end.
        done = min(self._done + samples / self._rate, self.seconds)
        step, self._done = done - self._done, done
        if self._bar is not None:
            self._bar.update(step)
        elif self._callback is not None:
            self._callback("separating", self._done, self.seconds)

    def encoded(self, fraction: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"encoding {fraction:.0%}")
        elif self._callback is not None:
            self._callback("encoding", fraction * self.seconds, self.seconds)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------
# Public API

def separate_array(mix: np.ndarray, sample_rate: int, *, backend: Backend | None = None,
                   url: str = DEFAULT_URL, overlap: float = 0.25, shifts: int = 0,
                   seed: int | None = None, transition_power: float = 1.0,
                   window: int = DEFAULT_WINDOW, downmix: bool = False,
                   two_stems: str | None = None, samplerate_out: SampleRateOut = "original",
                   progress: Progress = False) -> dict[str, np.ndarray]:
    """Separate ``mix`` ([time] mono or [channels, time]) into {stem: [2, time'] float32}.

    The result is resampled back to ``sample_rate`` by default (arrays carry no rate);
    ``samplerate_out="model"`` keeps the model's. Stems are not clipped. Without
    ``backend``, a Triton server at ``url`` is used. Parameters as in demucs'
    ``apply_model``; ``seed`` makes ``shifts`` reproducible.
    """
    mix = np.asarray(mix, dtype=np.float32)
    if mix.ndim not in (1, 2):
        raise StemserveError(f"mix must be [time] or [channels, time], got shape {mix.shape}")
    check_channels(1 if mix.ndim == 1 else mix.shape[0], downmix, "mix")
    check_sample_rate(sample_rate, "mix")
    if mix.shape[-1] < MIN_SECONDS * sample_rate:
        raise StemserveError(f"mix: too short to separate ({mix.shape[-1]} samples; "
                             f"at least {MIN_SECONDS} s needed)")
    with _using(backend, url) as used:
        spec = used.spec
        out_rate = sample_rate if samplerate_out == "original" else spec.sample_rate
        blocks: list[dict[str, np.ndarray]] = []
        stems = _Stems(spec, two_stems, out_rate, blocks.append)
        track_progress = _TrackProgress(progress, mix.shape[-1] / sample_rate,
                                        spec.sample_rate, "mix")
        try:
            separate_stream(
                lambda: resample_blocks(array_blocks(mix, downmix=downmix), sample_rate,
                                        spec.sample_rate),
                used, stems, overlap=overlap, shifts=shifts, seed=seed,
                transition_power=transition_power, window=window,
                on_progress=track_progress.separated)
        finally:
            track_progress.close()
        stems.flush()
    return {name: np.concatenate([block[name] for block in blocks], axis=-1)
            for name in stems.names}


def stem_paths(track: Path, out_dir: Path, names: list[str], ext: str,
               template: str = DEFAULT_TEMPLATE) -> dict[str, Path]:
    """Where each stem of ``track`` goes: ``out_dir / template`` filled in per stem.

    The template takes ``{track}`` (file name without extension), ``{trackext}``,
    ``{parent}`` (the name of the track's folder), ``{stem}`` and ``{ext}``, like later
    demucs releases (``{parent}`` is stemserve's, for albums of ``01.wav``, ``02.wav``).
    """
    try:
        targets = {name: Path(out_dir) / template.format(
            track=track.stem, trackext=track.suffix.lstrip("."),
            parent=track.resolve().parent.name, stem=name, ext=ext)
            for name in names}
    except (KeyError, IndexError, ValueError) as err:
        raise StemserveError(f"bad filename template {template!r} ({err!r}): use {{track}}, "
                             "{trackext}, {parent}, {stem} and {ext}") from None
    if len(set(targets.values())) < len(targets):
        raise StemserveError(f"filename template {template!r} gives every stem the same "
                             "file: include {stem}")
    if track.resolve() in {target.resolve() for target in targets.values()}:
        raise StemserveError(f"filename template {template!r} would overwrite the input "
                             f"{track}")
    return targets


def check_outputs(tracks: Sequence[Path], out_dir: Path, names: list[str], ext: str,
                  template: str = DEFAULT_TEMPLATE) -> None:
    """Refuse, before anything runs, tracks whose stems would land on the same files.

    ``a/song.wav`` and ``b/song.wav`` (or two albums' ``01.wav``) share ``{track}``: one
    would silently overwrite the other's stems, or mix with them when run at once. A stem
    that would land on another input is refused too.
    """
    owners: dict[Path, Path] = {}
    inputs = {track.resolve(): track for track in tracks}
    clashes: list[str] = []
    for track in tracks:
        for target in stem_paths(track, out_dir, names, ext, template).values():
            key = target.resolve()
            if key in inputs:
                raise StemserveError(f"the stems of {track} would overwrite the input "
                                     f"{inputs[key]} ({target}): choose another -o/--filename")
            other = owners.setdefault(key, track)
            if other != track:
                clashes.append(f"{other} and {track} (both to {target})")
                break
    if clashes:
        raise StemserveError(
            "tracks with the same name would overwrite each other's stems: "
            + "; ".join(clashes[:5]) + (f"; and {len(clashes) - 5} more" if len(clashes) > 5
                                       else "")
            + ". Add {parent} (the track's folder) to the file name template, e.g. "
              "--filename '{parent}/{track}/{stem}.{ext}', or separate them in two runs")


def output_rate(samplerate_out: SampleRateOut, model_rate: int, input_rate: int,
                fmt: OutputFormat) -> int:
    """The rate stems are written at: the input's by default (stems line up with the mix,
    sample for sample), or the model's as demucs writes them. MP3 stores a few rates only:
    an input at another rate gets MP3 stems at the model's rate."""
    if samplerate_out == "model":
        return model_rate
    if fmt.container == "mp3" and input_rate not in MP3_RATES:
        logger.info("MP3 cannot store %d Hz: writing MP3 stems at the model's %d Hz",
                    input_rate, model_rate)
        return model_rate
    return input_rate


def separate_file(path: str | Path, out_dir: str | Path, *, backend: Backend | None = None,
                  url: str = DEFAULT_URL, template: str = DEFAULT_TEMPLATE,
                  fmt: OutputFormat = OutputFormat(), clip_mode: ClipMode = "rescale",
                  two_stems: str | None = None, samplerate_out: SampleRateOut = "original",
                  downmix: bool = False, overlap: float = 0.25, shifts: int = 0,
                  seed: int | None = None, transition_power: float = 1.0,
                  window: int = DEFAULT_WINDOW, progress: Progress = False) -> dict[str, Path]:
    """Separate the audio file at ``path`` into one file per stem under ``out_dir``.

    Stems are written at the input's rate by default (:func:`output_rate`), in ``fmt``, with
    demucs' clip handling (``clip_mode="rescale"``), and appear only once all are complete.
    Every failure is a :class:`StemserveError` that names the file. Returns {stem: path}.
    """
    path = Path(path)
    info = probe(path, downmix=downmix)
    try:
        with _using(backend, url) as used:
            spec = used.spec
            out_rate = output_rate(samplerate_out, spec.sample_rate, info.sample_rate, fmt)
            targets = stem_paths(path, Path(out_dir), stem_names(spec, two_stems),
                                 fmt.ext, template)
            track_progress = _TrackProgress(progress, info.seconds, spec.sample_rate,
                                            path.name)
            with StemWriter(targets, out_rate, spec.audio_channels, fmt, clip_mode) as writer, \
                    contextlib.closing(track_progress):
                stems = _Stems(spec, two_stems, out_rate, writer.write)
                separate_stream(
                    lambda: resample_blocks(read_blocks(path, downmix=downmix),
                                            info.sample_rate, spec.sample_rate),
                    used, stems, overlap=overlap, shifts=shifts, seed=seed,
                    transition_power=transition_power, window=window,
                    on_progress=track_progress.separated)
                stems.flush()
                return writer.commit(on_encoded=track_progress.encoded)
    except StemserveError as err:
        raise StemserveError(f"{path}: {err}") from err
    except (OSError, sf.LibsndfileError) as err:  # disk full, file too large, permissions
        raise StemserveError(f"{path}: cannot write stems under {out_dir}: {err}") from err
    except MemoryError:
        raise StemserveError(f"{path}: out of memory while separating; try a smaller "
                             "--window or fewer --jobs") from None


# ---------------------------------------------------------------------------------------------
# Many tracks

AUDIO_SUFFIXES = frozenset({f".{name.lower()}" for name in sf.available_formats()}
                           | {".aif", ".oga", ".opus"})
"""File name endings taken from a folder of tracks: what libsndfile reads, and MP3."""


def expand_tracks(items: Iterable[str | Path]) -> list[Path]:
    """The tracks that command-line items name: a file as is; a folder: the audio files in it
    (not its subfolders, hidden files skipped, sorted by name); ``@LIST``: the paths in a list
    file, one a line (``#`` comment lines skipped)."""
    from stemserve.client.fleet import read_list

    tracks: list[Path] = []
    for item in items:
        path = Path(item)
        if str(item).startswith("@"):
            tracks += [Path(line) for line in read_list(Path(str(item)[1:]))]
        elif path.is_dir():
            found = sorted(child for child in path.iterdir()
                           if child.is_file() and not child.name.startswith(".")
                           and child.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise StemserveError(f"{path}: a folder without audio files (ending in "
                                     f"{', '.join(sorted(AUDIO_SUFFIXES))})")
            tracks += found
        else:
            tracks.append(path)
    return tracks


@dataclasses.dataclass(frozen=True)
class TrackResult:
    """How one track of :func:`separate_files` ended: its stems, or the error that stopped it."""

    track: Path
    seconds: float
    stems: dict[str, Path] | None = None
    error: StemserveError | None = None


def separate_files(paths: Sequence[str | Path], out_dir: str | Path, *, backend: Backend,
                   jobs: int = 1, progress: Progress = False, downmix: bool = False,
                   **options: Any) -> Iterator[TrackResult]:
    """Separate many files through one backend, ``jobs`` tracks at once.

    Tracks overlap so that every server behind the backend stays busy: one track alone
    leaves them idle while its pipeline waits on its next segments and writes its stems.
    Yields a :class:`TrackResult` per track as each ends; a failing track does not stop the
    others. ``progress``: True, one bar over the audio seconds of all tracks; a callable
    receives ``("separating", done, total)`` over all tracks and each track's
    ``("encoding", done, total)``. ``options`` are
    :func:`separate_file`'s. Leaving the loop early drops the tracks not started; the
    running ones end when the caller closes the backend.
    """
    unique: dict[Path, Path] = {}
    for path in map(Path, paths):  # a track named twice is separated once
        unique.setdefault(path.resolve(), path)
    paths = list(unique.values())
    check_outputs(paths, Path(out_dir), stem_names(backend.spec, options.get("two_stems")),
                  options.get("fmt", OutputFormat()).ext,
                  options.get("template", DEFAULT_TEMPLATE))
    infos: list[AudioInfo] = []
    for path in paths:
        try:
            infos.append(probe(path, downmix=downmix))
        except StemserveError as err:
            yield TrackResult(path, 0.0, error=err)
    if not infos:
        return
    lock = threading.Lock()
    bar = None
    if progress is True:
        bar = progress_bar(sum(info.seconds for info in infos),
                           infos[0].path.name if len(infos) == 1 else f"{len(infos)} tracks")
    done, total = 0.0, sum(info.seconds for info in infos)

    def advance(seconds: float) -> None:
        nonlocal done
        with lock:
            step = max(0.0, min(seconds, total - done))  # float sums never pass the total
            done += step
            if bar is not None:
                bar.update(step)
            elif callable(progress):
                progress("separating", done, total)

    def run(info: AudioInfo) -> TrackResult:
        reported = 0.0

        def report(stage: str, seconds: float, length: float) -> None:
            nonlocal reported
            if stage == "separating":
                advance(seconds - reported)
                reported = seconds
            elif bar is not None:
                with lock:
                    bar.set_postfix_str(f"encoding {info.path.name} {seconds / length:.0%}")
            elif callable(progress):
                progress(stage, seconds, length)

        try:
            stems = separate_file(info.path, out_dir, backend=backend, downmix=downmix,
                                  progress=report, **options)
        except Exception as err:  # every failure is this track's, not the whole run's
            if not isinstance(err, StemserveError):
                logger.debug("%s failed", info.path, exc_info=True)
                err = StemserveError(f"{info.path}: unexpected {type(err).__name__}: {err} "
                                     "(-v shows the traceback)")
            if bar is not None:  # what this track will never do leaves the bar's total
                with lock:
                    bar.total -= info.seconds - reported
                    bar.refresh()
            return TrackResult(info.path, info.seconds, error=err)
        return TrackResult(info.path, info.seconds, stems=stems)

    pool = ThreadPoolExecutor(max(1, min(jobs, len(infos))), thread_name_prefix="stemserve")
    try:
        for future in as_completed([pool.submit(run, info) for info in infos]):
            yield future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()
