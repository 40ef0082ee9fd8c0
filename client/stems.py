"""What is written for a track: which stems, at which rate, under which file names."""
from __future__ import annotations

import logging
import os
import string
from pathlib import Path, PurePath
from typing import Callable, Literal, Sequence

import numpy as np

from stemserve.audio import MP3_RATES, OutputFormat, Resampler
from stemserve.defaults import DEFAULT_TEMPLATE
from stemserve.errors import OutputError, StemserveError
from stemserve.spec import ModelSpec
from stemserve.untrusted import brief

logger = logging.getLogger(__name__)

SampleRateOut = Literal["original", "model"]
TEMPLATE_FIELDS = ("track", "trackext", "parent", "stem", "ext")
"""What a file name template may name, each as a plain ``{field}``."""


def stem_names(spec: ModelSpec, two_stems: str | None = None) -> list[str]:
    """The stems written: the model's sources, or ``[stem, "no_" + stem]`` for two stems."""
    if two_stems is None:
        return list(spec.sources)
    if two_stems not in spec.sources:
        raise StemserveError(f"two stems {two_stems!r}: the model's stems are "
                             f"{', '.join(spec.sources)}")
    return [two_stems, f"no_{two_stems}"]


class StemSplitter:
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


def stem_paths(track: Path, out_dir: Path, names: list[str], ext: str,
               template: str = DEFAULT_TEMPLATE) -> dict[str, Path]:
    """Where each stem of ``track`` goes: ``out_dir / template`` filled in per stem.

    The template takes ``{track}`` (file name without extension), ``{trackext}``,
    ``{parent}`` (the name of the track's folder), ``{stem}`` and ``{ext}``, like later
    demucs releases (``{parent}`` is stemserve's, for albums of ``01.wav``, ``02.wav``).
    """
    check_template(template)
    targets = {name: Path(out_dir) / template.format(
        track=track.stem, trackext=track.suffix.lstrip("."),
        parent=track.resolve().parent.name, stem=name, ext=ext)
        for name in names}
    inside = os.path.normpath(out_dir)
    for target in targets.values():
        if os.path.commonpath([inside, os.path.normpath(target)]) != inside:
            raise OutputError(f"the stems of {track} would be written outside the output "
                              f"folder {out_dir} ({target}): rename the track or change "
                              "--filename")
    if len(set(targets.values())) < len(targets):
        raise OutputError(f"filename template {template!r} gives every stem the same "
                          "file: include {stem}")
    if track.resolve() in {target.resolve() for target in targets.values()}:
        raise OutputError(f"filename template {template!r} would overwrite the input "
                          f"{track}")
    return targets


def check_template(template: str) -> None:
    """Refuse a file name template that is more than :data:`TEMPLATE_FIELDS` in braces: no
    attribute or index access, conversion or format spec (``{stem:>9999999999}`` asks for
    gigabytes), no absolute path and no ``..``, which would leave the output folder."""
    fields = ", ".join(f"{{{field}}}" for field in TEMPLATE_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise OutputError(f"bad filename template {brief(template)} ({err}): use "
                          f"{fields}") from None
    for _, field, spec, conversion in parsed:
        if field is not None and (field not in TEMPLATE_FIELDS or spec or conversion):
            shown = ("{" + field + (f"!{conversion}" if conversion else "")
                     + (f":{spec}" if spec else "") + "}")
            raise OutputError(f"filename template {brief(template)}: {brief(shown)} is not "
                              f"a plain field; use {fields}")
    path = PurePath(template)
    if path.is_absolute() or ".." in path.parts:
        raise OutputError(f"filename template {brief(template)} leaves the output folder: "
                          "give a relative path without '..' (the folder is -o)")


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
                raise OutputError(f"the stems of {track} would overwrite the input "
                                  f"{inputs[key]} ({target}): choose another -o/--filename")
            other = owners.setdefault(key, track)
            if other != track:
                clashes.append(f"{other} and {track} (both to {target})")
                break
    if clashes:
        raise OutputError(
            "tracks with the same name would overwrite each other's stems: "
            + "; ".join(clashes[:5]) + (f"; and {len(clashes) - 5} more" if len(clashes) > 5
                                       else "")
            + ". Add {parent} (the track's folder) to the file name template, e.g. "
              "--filename '{parent}/{track}/{stem}.{ext}', or separate them in two runs")
