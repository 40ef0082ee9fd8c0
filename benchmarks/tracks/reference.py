"""Whole tracks through stemserve's paths and the family's reference: wall time, RTF, stages,
peak memory, and each path's speed-up over a baseline path and its stems' difference from it."""
from __future__ import annotations

import dataclasses
import shutil

from stemserve.defaults import DEFAULT_IN_FLIGHT

from ..scenario import Column, Scenario, option
from .runs import FAMILIES, MAX_BATCH, OUT, PATHS, SIZES, max_difference, run_path, stems


@dataclasses.dataclass(frozen=True)
class Config:
    families: tuple[str, ...] = option(("v2", "htdemucs"), f"model families "
                                       f"({', '.join(FAMILIES)})", quick=("v2", "bs_roformer"))
    size: str = option("default", f"model size ({', '.join(SIZES)}; RoFormers also wide1; "
                       "default: the release's configuration, random weights)", quick="small")
    tracks: tuple[float, ...] = option((60.0, 600.0), "track lengths in seconds", quick=(3.0,))
    paths: tuple[str, ...] = option(
        ("triton", "onnx", "triton_int8", "onnx_int8", "triton_bf16", "torch_cuda",
         "torch_cuda_fp16", "torch_cuda_bf16", "reference"), f"from {', '.join(PATHS)}",
        quick=("triton", "onnx", "onnx_int8", "torch_cuda", "reference"))
    baseline: str = option("reference", "the path the others are compared with")
    windows: tuple[int, ...] = option((DEFAULT_IN_FLIGHT,), "segment requests in flight")
    repeats: int = option(2, "runs of each track up to repeat_limit seconds", quick=1)
    repeat_limit: float = option(120.0, "longer tracks run once")


def compare(rows: list[dict], baseline: str, difference=max_difference) -> None:
    """Each row's speed-up over ``baseline`` on its family and track (with load too), its stems'
    largest difference from the baseline's, its client peak over its shortest track's."""
    ok = {(row["family"], row["path"], row["window"], row["track_s"]): row for row in rows
          if row["status"] == "ok"}
    for (family, path, window, seconds), row in ok.items():
        shortest = min(key for key in ok if key[:3] == (family, path, window))
        row["client_peak_vs_shortest"] = row["client_peak_mib"] / ok[shortest]["client_peak_mib"]
        if base := ok.get((family, baseline, window, seconds)):
            row["speedup_vs_baseline"] = base["wall_s"] / row["wall_s"]
            row["speedup_vs_baseline_with_load"] = base["total_s"] / row["total_s"]
            row["max_diff_lsb_vs_baseline"] = difference(stems(row), stems(row, baseline))


def run(config: Config) -> list[dict]:
    rows = [run_path(path, family, config.size, seconds,
                     config.repeats if seconds <= config.repeat_limit else 1, window)
            for family in config.families for seconds in config.tracks
            for window in config.windows for path in config.paths]
    compare(rows, config.baseline)
    shutil.rmtree(OUT, ignore_errors=True)
    return rows


SCENARIO = Scenario(
    name="tracks.reference", config=Config, run=run, plots=("stages",),
    title="Whole tracks: stemserve's paths against the family's reference",
    columns=tuple(Column(*column) for column in (
        ("series", "path"), ("track_s", "track s", "g"), ("window", "window"), ("repeats", "n"),
        ("wall_s", "wall s (median)", ".1f"), ("spread", "spread", ".0%"), ("rtf", "RTF", ".3f"),
        ("speedup_vs_baseline", "x baseline", ".2f"), ("load_s", "load s", ".1f"),
        ("speedup_vs_baseline_with_load", "x baseline incl. load", ".2f"),
        ("client_peak_mib", "client MiB", ".0f"),
        ("client_peak_vs_shortest", "x shortest track", ".2f"),
        ("server_peak_mib", "server MiB", ".0f"), ("gpu_peak_gib", "GPU GiB", ".2f"),
        ("max_diff_lsb_vs_baseline", "max diff (16-bit steps)"), ("status", "status"))),
    notes=(
        "Random weights, the same on every path; reference: the official demucs (2.0.3 for v2; "
        "4.0.1, a bag of one model, for htdemucs) in separate.py's steps, reading with "
        "soundfile; 4.0.1 rounds to 16 bits where stemserve (and demucs 2) truncates. "
        "RoFormers (viperx's BS-RoFormer 1297, Kim's Mel-Band RoFormer; wide1: one layer of "
        "it): audio-separator 0.47.1's network in MSST's demix (chunks of 8 s, num_overlap 2).",
        "Every path: the model's segment, 25% overlap, separate.py's shifts (v2 0, htdemucs 1: "
        "stemserve replays demucs 4's draws; RoFormers: their config's split), rescale "
        "clipping, a fresh process (its first run pays first-call costs). Wall: reading, "
        "separating, writing; load apart.",
        "triton*: a fresh tritonserver (the CPU repository as shipped, gRPC, shared memory) on "
        "the client's cores; onnx*: in-process; onnx_pair*: two one-thread sessions in turn; "
        f"_int8: the int8 graph; _bf16: OpenVINO; torch_cuda*: PyTorch, batches of {MAX_BATCH} "
        "at most, autocast. Server peak: its process group's RSS.",
    ),
)
