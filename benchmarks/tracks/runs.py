"""One path separating one WAV track in a child process of its own (its memory and threads its
own): wall time per stage, the client's peak memory and, on Triton, the server's. Every path
runs one random-weight model; the reference (the official demucs) loads its state dict."""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import itertools
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import soundfile as sf

from stemserve.defaults import DEFAULT_IN_FLIGHT
from stemserve.files import atomic_path

from ..isolated import ROOT, run_isolated
from ..machine import usable_cpus
from ..memory import GroupMemory
from .. import models
from ..scenario import CACHE, tritonservers
from ..timing import Stats, loadavg

SEED, OVERLAP, RATE, SIZES = models.SEED, 0.25, 44100, tuple(models.SIZES["htdemucs"])
TIMEOUT, MAX_BATCH = 4 * 3600.0, 8  # one child's seconds; PyTorch's segments per forward call
OUT = CACHE / "tracks" / "out" / str(os.getpid())  # two runs never delete each other's stems
PATHS = ("triton", "triton_int8", "triton_bf16", "onnx", "onnx_int8", "onnx_bf16", "onnx_pair",
         "onnx_pair_int8", "onnx_pair_bf16", "torch_cuda", "torch_cuda_fp16",
         "torch_cuda_bf16", "reference")
_MSST = {"package": ("audio-separator", "0.47.1"), "oracle": ROOT / ".oracle" / "roformer",
         "shifts": 0}
FAMILIES = {"v2": {"package": ("demucs", "2.0.3"), "oracle": None, "shifts": 0},
            "htdemucs": {"package": ("demucs", "4.0.1"), "oracle": ROOT / ".oracle" / "demucs4",
                         "shifts": 1},
            "bs_roformer": _MSST, "mel_band_roformer": _MSST}
"""Each family's reference: its package and version, the folder it is installed in apart
(.ci/oracle-v4.sh, .ci/oracle-roformer.sh), separate.py's shifts (none for MSST's demix)."""


def precision(path: str) -> str:
    """The graph (or autocast) a path runs: its suffix, else fp32."""
    return next((graph for graph in ("int8", "bf16", "fp16") if path.endswith(graph)), "fp32")


def unavailable(path: str, family: str) -> str | None:
    """Why ``path`` cannot run here (a ``skipped:`` status), or None."""
    if path == "reference":
        (package, want), oracle = FAMILIES[family]["package"], FAMILIES[family]["oracle"]
        found = importlib.metadata.distributions(name=package,
                                                 path=[str(oracle)] if oracle else sys.path)
        return None if [dist.version for dist in found][:1] == [want] else (
            f"skipped: {package} {want} is not installed in {oracle or 'the venv'}")
    if path.startswith("torch"):
        import torch

        return None if torch.cuda.is_available() else "skipped: no CUDA device"
    from stemserve.runtime.openvino_session import cpu_has_bf16

    return ("skipped: no bf16 arithmetic on this CPU (AMX or AVX512_BF16) or no OpenVINO"
            if precision(path) == "bf16" and not cpu_has_bf16() else None)


def write_track(seconds: float) -> Path:
    """A 16-bit stereo WAV of seeded noise, cached, written a minute at a time."""
    path, frames = CACHE / "tracks" / f"track-{seconds:g}s.wav", round(seconds * RATE)
    if not path.is_file() or sf.info(str(path)).frames != frames:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial, sf.SoundFile(str(partial), "w", RATE, 2, "PCM_16",
                                                        format="WAV") as out:
            for start in range(0, frames, 60 * RATE):
                out.write(0.2 * np.random.default_rng(start).standard_normal(
                    (min(60 * RATE, frames - start), 2)))
    return path


def pair(session: Callable) -> SimpleNamespace:
    """A backend of two one-thread sessions dealt segments in turn, as two Triton instances."""
    stack = contextlib.ExitStack()
    sessions = [stack.enter_context(contextlib.closing(session(threads=1))) for _ in range(2)]
    deal = itertools.cycle(sessions)
    return SimpleNamespace(spec=sessions[0].spec, submit=lambda mix: next(deal).submit(mix),
                           close=stack.close)


def stemserve(job: dict) -> dict:
    """Child: ``Separator.separate_file``; "separate" ends at the last "separating" call."""
    from stemserve.client import Separator, open_backend
    from stemserve.connection import ConnectionOptions

    began, path, graph = time.perf_counter(), job["path"], job["precision"]
    if path.startswith("torch"):
        import torch

        from stemserve.client.backends.pytorch import TorchBackend

        backend = TorchBackend(models.build(job["family"], job["size"]),
                               models.checkpoint_info(job["family"], job["size"]), device="cuda",
                               max_batch=MAX_BATCH, autocast=None if graph == "fp32" else graph)
    elif path.startswith("triton"):  # the timeout: a CPU server may queue one for minutes
        backend = open_backend("triton", precision=graph, connection=ConnectionOptions(
            job["url"], server_window=job["window"], timeout=3600.0))
    else:
        from stemserve.client.backends.onnx import OnnxBackend

        session = functools.partial(OnnxBackend, Path(job["export"]), precision=graph)
        backend = pair(session) if "pair" in path else session()
    load_s, runs = time.perf_counter() - began, []
    with contextlib.closing(backend):
        separator = Separator(backend, shifts=job["shifts"], seed=SEED, overlap=OVERLAP,
                              in_flight=job["window"])
        for repeat in range(job["repeats"]):
            marks = [time.perf_counter()]
            separator.separate_file(job["track"], Path(job["out"]) / f"repeat-{repeat}",
                                    progress=lambda stage, *_: stage == "separating"
                                    and marks.append(time.perf_counter()))
            runs.append(dict(separate=marks[-1] - marks[0], write=time.perf_counter() - marks[-1]))
    gpu = ({"device": torch.cuda.get_device_name(),
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
           if path.startswith("torch") else {})
    return {"load_s": load_s, "runs": runs, **gpu,
            "shared_memory": getattr(backend, "shared_memory", None)}


def reference(job: dict) -> dict:
    """Child: the family's separate.py steps (reading with soundfile, not ffmpeg): normalise,
    ``apply_model``, de-normalise, "rescale" clipping, 16-bit WAV (demucs 4 rounds it). For a
    RoFormer: audio-separator's network and MSST's ``demix`` (tests/msst_demix.py, batch 1),
    the instrumental as mix - vocals, written the same way."""
    import torch

    v2, began = job["family"] == "v2", time.perf_counter()
    torch.set_num_threads(job["threads"])
    package = torch.load(Path(job["export"]) / "weights.th", map_location="cpu",
                         weights_only=False)
    if job["family"] in ("v2", "htdemucs"):
        names, sources_of, version = _demucs_reference(job, package, v2)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from oracle_roformer import msst_reference  # the oracle as the tests load it

        with torch.device("meta"):
            split = models.build(job["family"], job["size"])
        separate = msst_reference(job["family"], package["config"], package["state"],
                                  split.chunk_size, split.num_overlap)
        names, version = split.sources, "audio-separator 0.47.1, MSST demix ccc011a"

        def sources_of(wav: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.stack(separate(wav.numpy())))
    load_s, runs = time.perf_counter() - began, []
    for repeat in range(job["repeats"]):
        marks = [time.perf_counter()]
        data, rate = sf.read(job["track"], dtype="float32", always_2d=True)
        wav = torch.from_numpy(np.ascontiguousarray(data.T))
        marks.append(time.perf_counter())
        sources = sources_of(wav)
        marks.append(time.perf_counter())
        folder = Path(job["out"]) / f"repeat-{repeat}" / Path(job["track"]).stem
        folder.mkdir(parents=True, exist_ok=True)
        for source, name in zip(sources, names):
            scaled = source / max(1.01 * source.abs().max(), 1) * 2**15
            pcm = (scaled if v2 else scaled.round()).clamp(-2**15, 2**15 - 1).short()
            sf.write(str(folder / f"{name}.wav"), pcm.numpy().T, rate, subtype="PCM_16")
        marks.append(time.perf_counter())
        runs.append(dict(zip(("decode", "separate", "write"), np.diff(marks).tolist())))
    return {"load_s": load_s, "runs": runs, "reference": version,
            "torch_threads": torch.get_num_threads()}


def _demucs_reference(job: dict, package: dict, v2: bool) -> tuple[list[str], Callable, str]:
    """The official demucs model of ``package``: its sources, its separate.py steps on a
    track, its version."""
    import demucs
    import torch

    from stemserve.defaults import SOURCES

    if v2:
        from demucs.model import Demucs as Model
        from demucs.utils import apply_model
    else:
        from demucs.apply import BagOfModels, apply_model
        from demucs.htdemucs import HTDemucs as Model
    model = Model(**({"sources": list(SOURCES)} if v2 else {}), **package["config"])
    model.load_state_dict(package["state"], strict=True)
    model = model.eval() if v2 else BagOfModels([model.eval()]).eval()  # as get_model's

    def sources_of(wav: torch.Tensor) -> torch.Tensor:
        ref = wav.mean(0)
        wav = (wav - ref.mean()) / ref.std()
        random.seed(SEED)
        with torch.no_grad():
            sources = (apply_model(model, wav, split=True, overlap=OVERLAP) if v2 else
                       apply_model(model, wav[None], shifts=job["shifts"], split=True,
                                   overlap=OVERLAP, progress=False)[0])
        return sources * ref.std() + ref.mean()

    return model.sources, sources_of, f"demucs {demucs.__version__}"


def stems(row: dict, path: str | None = None) -> Path:
    """Where the row's path (or ``path``, on the row's track and window) wrote its first stems."""
    name = f"{row['family']}-{path or row['path']}-{row['track_s']:g}s-{row['window']}"
    return OUT / name / "repeat-0" / f"track-{row['track_s']:g}s"


def max_difference(ours: Path, baseline: Path) -> int:
    """Largest difference of two folders' 16-bit stems, in steps (2**16: lengths differ)."""
    worst = 0
    for stem in baseline.glob("*.wav"):
        a, b = (sf.read(str(folder / stem.name), dtype="int16")[0].astype(np.int32)
                for folder in (baseline, ours))
        worst = max(worst, int(np.abs(a - b).max()) if a.shape == b.shape else 2**16)
    return worst


def run_path(path: str, family: str, size: str, seconds: float, repeats: int,
             window: int = DEFAULT_IN_FLIGHT) -> dict:
    """One path's row on a track: measured in a child (on Triton, against a fresh server)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: paths are {', '.join(PATHS)}")
    row = {"family": family, "path": path, "series": f"{family}: {path}", "track_s": seconds,
           "window": window, "loadavg_before": loadavg(), "status": unavailable(path, family)}
    if row["status"]:
        return row
    out, graph = stems(row).parents[1], precision(path)
    try:
        graphs = {graph} if path.startswith(("onnx", "triton")) else set()  # int8, bf16: made once
        export = models.exported(family, size, weights=True, precisions=graphs)
        job = {"path": path, "family": family, "size": size, "track": str(write_track(seconds)),
               "out": str(out), "repeats": repeats, "export": str(export), "window": window,
               "precision": graph, "shifts": FAMILIES[family]["shifts"], "threads": usable_cpus()}
        if path.startswith("triton"):
            began = time.perf_counter()
            with tritonservers(export, CACHE / "tracks", precision=graph) as (server,):
                row["server_start_s"] = time.perf_counter() - began
                with GroupMemory(server.pid) as memory:
                    result = run_isolated("benchmarks.tracks.runs:stemserve",
                                          {**job, "url": server.grpc_url}, timeout=TIMEOUT)
            row.update(server_peak_mib=memory.peak_mib, server_peak_pss_mib=memory.peak_pss_mib)
        else:
            child = "reference" if path == "reference" else "stemserve"
            result = run_isolated(f"benchmarks.tracks.runs:{child}", job, timeout=TIMEOUT,
                                  pythonpath=FAMILIES[family]["oracle"] if child == path else None)
    except Exception as err:  # noqa: BLE001 - recorded in the row; the next path goes on
        return {**row, "status": f"failed: {type(err).__name__}: {err}"}
    runs = result.pop("runs")
    walls = Stats.of([sum(run.values()) for run in runs])
    median = sorted(runs, key=lambda run: sum(run.values()))[(walls.n - 1) // 2]
    return {**row, "status": "ok", "repeats": walls.n, "wall_s": walls.median,
            "spread": walls.spread, "wall": walls.to_dict(), "rtf": walls.median / seconds,
            "total_s": result["load_s"] + walls.median, "client_cpu_s": result.pop("cpu_s"),
            "client_peak_mib": result.pop("peak_rss_mib"),
            "stages_s": {"load": result["load_s"], **median}, **result}
