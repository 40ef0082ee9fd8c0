"""The PyTorch backend on a GPU: forward per batch and precision, and a 600 s track.

    python -m benchmarks.gpu_torch                       # on a host with CUDA torch
    python -m benchmarks.gpu_torch --quick               # tiny models, 20 s track

What a GPU host gives the models without Triton (no tritonserver, TensorRT or
onnxruntime-gpu was available where this ran): ``stemserve.client.backends.pytorch.
TorchBackend`` with ``device="cuda"`` and ``precision`` fp32, fp16 or bf16 (autocast), on
random weights of the full-size Demucs v2 (the ``demucs`` configuration, 40 s segments as
exported) and HT Demucs (``htdemucs``, its 7.8 s training segment).

1. Forward per batch: seconds per segment and GPU peak memory at batch 1 to 16, per
   precision (CUDA-synchronised, warm-up excluded, median of ``--repeats``).
2. End to end: a 600 s stereo track through the stemserve pipeline (split, overlap 0.25,
   overlap-add) with the backend batching up to 8 segments, per precision; wall time,
   real-time factor, and the largest difference of the fp16/bf16 stems from fp32's.

Without a GPU every row is "skipped". Results: ``benchmarks/results/<machine>.json``/``.md``
(the machine name carries the GPU's).
"""
from __future__ import annotations

import argparse
import hashlib
import time
from fractions import Fraction

import numpy as np

from .machine import describe
from .results import add_output_arguments, new_section, save_section
from .timing import Stats

SCRIPT = "gpu_torch"
TITLE = "PyTorch backend on a GPU: precision and batch (issue 14)"
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST = {"fp32": None, "fp16": "fp16", "bf16": "bf16"}
"""The TorchBackend ``autocast`` of each precision measured (fp32: none)."""
SEED = 0


def _models(quick: bool) -> dict:
    """{name: (model, info)} with random weights from ``SEED``."""
    import torch

    from stemserve.checkpoints import CheckpointInfo
    from stemserve.defaults import SOURCES
    from stemserve.model import Demucs
    from stemserve.models import HTDemucs
    from stemserve.models.configs import HTDEMUCS

    built = {}
    for name, factory in (("demucs", lambda: Demucs(SOURCES, **({"channels": 8} if quick
                                                                    else {}))),
                          ("htdemucs", lambda: HTDemucs(**dict(
                              HTDEMUCS, **({"channels": 8, "bottom_channels": 32,
                                            "segment": Fraction(2)} if quick else {}))))):
        torch.manual_seed(SEED)
        model = factory().eval()
        digest = hashlib.sha256(f"{name}-{SEED}-{quick}".encode()).hexdigest()
        built[name] = (model, CheckpointInfo(f"random-{name}", None, digest, {}))
    return built


def _forward_rows(models: dict, batches: list[int], repeats: int) -> list[dict]:
    import torch

    from stemserve.client.backends.pytorch import TorchBackend

    rows = []
    for name, (model, info) in models.items():
        for precision in PRECISIONS:
            backend = TorchBackend(model, info, device="cuda", autocast=AUTOCAST[precision],
                                   max_batch=max(batches))
            spec = backend.spec
            backend.close()  # only its spec and run function are used here
            run = backend._run_batch
            for batch in batches:
                mix = np.random.default_rng(batch).standard_normal(
                    (batch, spec.audio_channels, spec.padded_length)).astype(np.float32)
                torch.cuda.reset_peak_memory_stats()
                try:
                    run(mix)  # warm-up (cuDNN picks its algorithms)
                    times = []
                    for _ in range(repeats):
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        run(mix)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                except torch.cuda.OutOfMemoryError:
                    rows.append(dict(model=name, precision=precision, batch=batch,
                                     status="failed: out of GPU memory"))
                    torch.cuda.empty_cache()
                    continue
                stats = Stats.of(times)
                per_item = stats.median / batch
                rows.append(dict(
                    model=name, precision=precision, batch=batch, status="ok",
                    segment_s=round(spec.padded_length / spec.sample_rate, 2),
                    s_per_batch=stats.median, s_per_item=per_item,
                    audio_s_per_s=spec.segment_seconds / per_item,
                    gpu_peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30))
            torch.cuda.empty_cache()
    return rows


def _end_to_end_rows(models: dict, seconds: float) -> list[dict]:
    import torch

    from stemserve.client.backends.pytorch import TorchBackend
    from stemserve.client.separator import separate_array

    rate = 44100
    rng = np.random.default_rng(SEED)
    t = np.arange(int(seconds * rate)) / rate
    mix = (0.3 * np.sin(2 * np.pi * 220 * t)
           + 0.1 * rng.standard_normal((2, t.size))).astype(np.float32)
    rows = []
    for name, (model, info) in models.items():
        reference = None
        for precision in PRECISIONS:
            torch.cuda.reset_peak_memory_stats()
            with TorchBackend(model, info, device="cuda", autocast=AUTOCAST[precision],
                              max_batch=8) as backend:
                start = time.perf_counter()
                stems = separate_array(mix, rate, backend=backend, in_flight=16)
                wall = time.perf_counter() - start
            got = np.stack([stems[source] for source in backend.spec.sources])
            if precision == "fp32":
                reference = got
            rows.append(dict(
                model=name, precision=precision, track_s=seconds, status="ok",
                wall_s=wall, rtf=wall / seconds, audio_s_per_s=seconds / wall,
                gpu_peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                max_diff_vs_fp32=float(np.abs(got - reference).max()),
                rms_diff_vs_fp32=float(np.sqrt(np.mean((got - reference) ** 2)))))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 20 s track")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--track", type=float, default=600.0, help="seconds of audio")
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    batches = [int(b) for b in args.batches.split(",")]
    track = 20.0 if args.quick else args.track
    machine = describe()
    forward = new_section(f"{SCRIPT}_forward", f"{TITLE}: forward per batch",
                          config=dict(batches=batches, repeats=args.repeats, quick=args.quick),
                          machine=machine)
    end_to_end = new_section(f"{SCRIPT}_end_to_end", f"{TITLE}: {track:g} s track",
                             config=dict(track_s=track, max_batch=8, in_flight=16,
                                         quick=args.quick), machine=machine)
    if not torch.cuda.is_available():
        forward["rows"] = [dict(status="skipped: no CUDA device")]
        end_to_end["rows"] = [dict(status="skipped: no CUDA device")]
    else:
        torch.backends.cudnn.benchmark = True
        models = _models(args.quick)
        forward["rows"] = _forward_rows(models, batches, args.repeats)
        end_to_end["rows"] = _end_to_end_rows(models, track)
        device = torch.cuda.get_device_name()
        for section in (forward, end_to_end):
            section["notes"].append(f"device: {device}, torch {torch.__version__}")
    forward["columns"] = [
        dict(key="model", title="model"), dict(key="precision", title="precision"),
        dict(key="batch", title="batch"), dict(key="segment_s", title="request (s)"),
        dict(key="s_per_item", title="s per segment", format=".4f"),
        dict(key="audio_s_per_s", title="audio s per s", format=".0f"),
        dict(key="gpu_peak_gib", title="GPU peak (GiB)", format=".2f"),
        dict(key="status", title="status")]
    end_to_end["columns"] = [
        dict(key="model", title="model"), dict(key="precision", title="precision"),
        dict(key="wall_s", title="wall (s)", format=".1f"),
        dict(key="audio_s_per_s", title="x real time", format=".0f"),
        dict(key="gpu_peak_gib", title="GPU peak (GiB)", format=".2f"),
        dict(key="max_diff_vs_fp32", title="max diff vs fp32", format=".2e"),
        dict(key="rms_diff_vs_fp32", title="rms diff vs fp32", format=".2e"),
        dict(key="status", title="status")]
    for section in (forward, end_to_end):
        save_section(section, results_dir=args.results_dir, machine=args.machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
