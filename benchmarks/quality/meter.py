"""The SDR meter: what each fast path costs in separation quality, as small v2, HT Demucs and
BS-RoFormer models trained on synthetic stems (:mod:`.synthetic`) separate held-out mixes on
each path."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stemserve.defaults import SOURCES

from ..machine import usable_cpus
from ..scenario import CACHE, Column, Scenario, option
from .synthetic import SAMPLE_RATE, TEST_SEED_OFFSET, song, trained_model

#: Path name -> (backend, precision, the int8 graph's reduce_range, PyTorch's oneDNN on).
PATHS = {"torch fp32": ("torch", "fp32", None, True), "torch bf16": ("torch", "bf16", None, True),
         "torch bf16 no oneDNN": ("torch", "bf16", None, False),
         "onnx fp32": ("onnx", "fp32", None, True), "onnx fp16": ("onnx", "fp16", None, True),
         "onnx int8": ("onnx", "int8", False, True),
         "onnx int8 reduce_range": ("onnx", "int8", True, True),
         "openvino bf16": ("onnx", "bf16", None, True)}
REFERENCE, MIXTURE, NO_MODEL = "onnx fp32", "mixture", "(none)"
#: Models (full, tiny): quick to train on 2 cores; channels clear of decision 0004's bf16 fault.
MODELS = {"demucs": (dict(channels=20, depth=4, resample=False, segment_length=2 * SAMPLE_RATE),
                     dict(channels=5, depth=4, resample=False, segment_length=SAMPLE_RATE)),
          "htdemucs": (dict(channels=10, bottom_channels=32, t_layers=2, t_heads=4, segment="1"),
                       dict(channels=10, bottom_channels=16, t_layers=1, t_heads=4, segment="1")),
          "bs_roformer": tuple(dict(dim=dim, depth=depth, stereo=True, num_stems=4, heads=4,
                                    dim_head=16, stft_hop_length=441, chunk_size=2 * SAMPLE_RATE)
                               for dim, depth in ((64, 2), (16, 1)))}


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = option(("demucs", "htdemucs", "bs_roformer"),
                                     "families: demucs (v2), htdemucs, bs_roformer")
    tiny: bool = option(False, "tiny models: a check that it runs, no measurement", quick=True)
    train_minutes: float = option(4.0, "training budget per model, minutes")
    max_steps: int = option(0, "stop training after this many steps (0: no cap)", quick=3)
    batch: int = option(4, "training batch", quick=2)
    lr: float = option(2e-3, "Adam learning rate")
    pool_songs: int = option(24, "training songs that the remixes are cut from", quick=2)
    pool_seconds: float = option(8.0, "length of each training song, s", quick=3.0)
    mixes: int = option(6, "held-out test mixes", quick=1)
    mix_seconds: float = option(8.0, "length of each test mix, s", quick=3.0)
    seed: int = option(0, f"training seed; the test songs are seed + {TEST_SEED_OFFSET}..")
    threads: int | None = option(None, "torch and ONNX Runtime threads (none: usable CPUs)")


def sdr_db(references: np.ndarray, estimates: np.ndarray) -> np.ndarray:
    """BSS Eval SDR in dB per source, channels averaged: [sources, channels, time] each ->
    [sources]. In float64: the float32 solve moves an SDR by more than the paths do."""
    import fast_bss_eval

    sources, channels, length = references.shape
    values = fast_bss_eval.sdr(*(signal[..., :length].reshape(-1, 1, length).astype(np.float64)
                                 for signal in (references, estimates)), filter_length=512)
    return np.asarray(values).reshape(sources, channels).mean(axis=1)


def scored(tests: np.ndarray, estimates: np.ndarray) -> dict:
    """Row fields of per-source and mean SDR over the mixes: [mixes, sources, 2, time] each."""
    scores = np.stack([sdr_db(stems, estimate) for stems, estimate in zip(tests, estimates)])
    return {"status": "ok", "sdr_db": dict(zip(SOURCES, scores.mean(axis=0).tolist())),
            "sdr_mean_db": float(scores.mean()), "sdr_per_mix_db": scores.tolist()}


def separate(path: str, model: Any, info: Any, export: Path,
             mixes: np.ndarray) -> tuple[np.ndarray, float]:
    """Every mix through stemserve's pipeline on ``path`` (ONNX on torch's threads): stems
    [mixes, 4, 2, time] and seconds. int8 (re)quantizes ``export``; bf16 writes its sidecar."""
    import torch

    from stemserve.client import separate_array
    from stemserve.client.backends.onnx import OnnxBackend
    from stemserve.client.backends.pytorch import TorchBackend
    from stemserve.export.bf16 import bf16_export
    from stemserve.export.quantize import quantize_int8

    kind, precision, reduce_range, onednn = PATHS[path]
    if kind == "onnx" and precision == "int8":
        quantize_int8(export, reduce_range=reduce_range)
    elif kind == "onnx" and precision == "bf16":
        bf16_export(export)
    backend = (TorchBackend(model, info, autocast=None if precision == "fp32" else precision)
               if kind == "torch" else
               OnnxBackend(export, precision=precision, threads=torch.get_num_threads()))
    began = time.perf_counter()  # oneDNN's switch is global: the backend's thread follows it
    with backend, torch.backends.mkldnn.flags(enabled=onednn):
        stems = [separate_array(mix, SAMPLE_RATE, backend=backend) for mix in mixes]
    return np.array([[got[name] for name in SOURCES] for got in stems]), time.perf_counter() - began


def measure_model(family: str, config: Config, training: dict, tests: np.ndarray) -> list[dict]:
    """One row per path for ``family``'s trained model, with its deltas from ONNX fp32."""
    from stemserve.export.to_onnx import export_onnx
    from stemserve.models.registry import of_model
    from stemserve.runtime.openvino_session import cpu_has_bf16

    model, info, record = trained_model(family, MODELS[family][config.tiny], training,
                                        CACHE / "quality")
    no_fp16 = of_model(model).unsupported.get("fp16")
    scales = [p.abs().mean().item() for name, p in model.named_parameters()
              if name.startswith("crosstransformer") and "gamma" in name]
    common = {"model": family, "parameters": sum(p.numel() for p in model.parameters()),
              "layer_scale": float(np.mean(scales)) if scales else None, "training": record}
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory(prefix="stemserve-quality-") as export:
        began = time.perf_counter()
        export_onnx(model, info, Path(export), fp16=not no_fp16)
        common["export_s"] = time.perf_counter() - began
        for path, way in PATHS.items():
            row = dict(common, path=path, **dict(zip(("backend", "precision", "reduce_range",
                                                      "onednn"), way)))
            rows.append(row)
            if path == "onnx fp16" and no_fp16:
                row["status"] = f"skipped: no fp16 graph: {no_fp16}"
            elif path == "openvino bf16" and not cpu_has_bf16():
                row["status"] = "skipped: this CPU has no bf16 arithmetic for OpenVINO"
            else:
                try:
                    outputs[path], row["separate_s"] = separate(path, model, info, Path(export),
                                                                tests.sum(axis=1))
                    row.update(scored(tests, outputs[path]))
                except Exception as err:  # noqa: BLE001 - one path failing must not hide the rest
                    row["status"] = f"failed: {type(err).__name__}: {err}"
            print(f"quality {family} {path}: {row.get('sdr_mean_db', row['status'])}", flush=True)
    base = next(row for row in rows if row["path"] == REFERENCE)
    for row in (row for row in rows if row["status"] == base["status"] == "ok"):
        delta = {name: row["sdr_db"][name] - base["sdr_db"][name] for name in SOURCES}
        worst = max(SOURCES, key=lambda name: abs(delta[name]))
        ours, served = outputs[row["path"]], outputs[REFERENCE]
        row.update(delta_db=delta, delta_mean_db=row["sdr_mean_db"] - base["sdr_mean_db"],
                   delta_worst_db=delta[worst], delta_worst_source=worst,
                   stems_rel_diff=float(np.linalg.norm(ours - served) / np.linalg.norm(served)))
    return rows


def run(config: Config) -> list[dict]:
    import torch

    torch.set_num_threads(config.threads or usable_cpus())
    training = {key: getattr(config, key) for key in ("seed", "train_minutes", "max_steps",
                                                      "batch", "lr", "pool_songs", "pool_seconds")}
    tests = np.stack([song(config.seed + TEST_SEED_OFFSET + index, config.mix_seconds)
                      for index in range(config.mixes)])
    mixture = np.broadcast_to(tests.sum(axis=1, keepdims=True), tests.shape)
    rows = [dict(model=NO_MODEL, path=MIXTURE, **scored(tests, mixture))]
    for family in config.models:
        rows += measure_model(family, config, training, tests)
    return rows


SCENARIO = Scenario(
    name="quality.meter", config=Config, run=run,
    title="Separation quality of the fast paths: SDR on synthetic stems",
    columns=(Column("model", "model"), Column("path", "path"),
             *(Column(f"sdr_db.{name}", f"{name} dB", ".2f") for name in SOURCES),
             Column("sdr_mean_db", "mean dB", ".3f"), Column("delta_mean_db", "Δ mean dB", "+.3f"),
             Column("delta_worst_db", "worst Δ dB", "+.3f"), Column("delta_worst_source", "worst"),
             Column("stems_rel_diff", "stems rel diff", ".1e"),
             Column("separate_s", "separate s", ".1f"), Column("training.steps", "train steps"),
             Column("training.final_loss", "final L1", ".4f"), Column("status", "status")),
    notes=(
        "Synthetic songs, one seed each. Small models train (Adam, L1) for minutes on random "
        "remixes of training songs (their steps depend on the load; cached in benchmarks/.cache, "
        "so reruns measure the same weights), then separate other songs' summed stems: absolute "
        "SDRs say nothing about real music, only the deltas between one model's paths count.",
        "SDR: fast_bss_eval.sdr (512-tap filter) per source and channel over the whole clip "
        "(museval takes the median of 1 s frames), float64, averaged over channels and mixes. "
        "Δ: minus ONNX Runtime fp32's SDR (the served graph) for the same model; 'worst': the "
        "source that moved most. Issue 14's target: int8 within 0.2 dB of fp32 on the mean SDR.",
        "Paths: stemserve's pipeline (separate_array, 25% overlap, no shifts) on TorchBackend "
        "(bf16: autocast) or OnnxBackend (export_onnx's fp32 and fp16 graphs, quantize_int8's, "
        "the fp32 graph on OpenVINO in bf16 as --bf16 serves it). 'stems rel diff': ||stems - "
        "ONNX fp32's|| / ||ONNX fp32's||. fp16 and bf16 times are a CPU's, not a GPU's.",
        "int8 quantizes activations per batch and OnnxBackend batches queued segments, so int8 "
        "stems vary a little between runs. In HT Demucs int8 reaches only the transformer, "
        "through its layer scales ('layer_scale', 1e-4 at init).",
    ),
)
