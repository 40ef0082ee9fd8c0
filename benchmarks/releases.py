"""Issue 13: HT Demucs (v4) through stemserve against demucs 4.0.1, and what it costs.

    python -m benchmarks.releases                          # full-size htdemucs; 60 and 600 s
    python -m benchmarks.releases --parts forward,cost     # the model alone
    python -m benchmarks.releases --tracks 60 --paths triton,demucs4
    python -m benchmarks.releases --quick                  # tiny HT Demucs, 3 s: checks it runs

The released ``htdemucs`` configuration (:data:`stemserve.models.configs.HTDEMUCS`, 42 M
parameters) with random weights from a seed (timing does not depend on the weights), exported
once by :func:`stemserve.export.to_onnx.export_onnx` into ``--work-dir`` and reused while the
configuration, the seed and the export code are unchanged. Every measurement runs in a process
of its own, one after another, so that its peak memory and thread pools are its own.

Section ``releases_forward``, the model alone, on one training segment (343,980 stereo
samples, 7.8 s) of seeded noise:

- ``forward``: PyTorch eager (stemserve's ``HTDemucs`` under ``torch.no_grad``) at batch 1
  and 2, ONNX Runtime (CPU provider, ``ORT_ENABLE_ALL``) on the exported graph at batch 1, 2
  and 4, and the bf16 fast path (OpenVINO's bf16 arithmetic on the same graph, the session
  ``--bf16`` serves with) at batch 1 and 2; ``--threads`` intra-op threads each. Median seconds per call after ``--warmup``
  untimed calls, per item, per audio second (RTF), and ORT's largest difference from eager.
- ``cost`` (a second table): seconds per audio second of htdemucs against demucs_quantized,
  the v2 model (``benchmarks.models`` ``default`` configuration, 265 M parameters: the
  quantized release's weights are dequantized to float32 at load, so it computes exactly
  this network), both through ONNX Runtime at batch 2, measured back to back.

Section ``releases_end_to_end``, whole 16-bit WAV tracks (``--tracks``, 60 and 600 s),
the same weights on every path, ``shifts=1`` with a fixed seed and 25% overlap:

- ``triton``: :class:`stemserve.client.Separator` ``separate_file`` through
  ``open_backend("triton")`` against a fresh ``tritonserver`` serving the export (the CPU
  repository as shipped: ONNX Runtime in the python backend, dynamic batching); the server's
  process group is sampled for its memory.
- ``onnx``: the same with ``open_backend("onnx")`` in-process.
- ``triton_int8``, ``triton_bf16``: the Triton path serving the CPU fast paths, the int8
  graph (``serve --int8``) and the fp32 graph on OpenVINO in bf16 (``serve --bf16``).
- ``demucs4``: the reference, demucs 4.0.1's own way, run from ``.oracle/demucs4``
  (``.ci/oracle-v4.sh`` installs it; skipped without it): the official
  ``demucs.htdemucs.HTDemucs`` loads the same state dict with ``strict=True`` into a
  ``BagOfModels`` of one (what ``get_model("htdemucs")`` returns), and separate.py's steps
  follow: normalise by the mix's mean and std, ``random.seed(SEED)``,
  ``apply_model(shifts=1, split=True, overlap=0.25)``, de-normalise, ``prevent_clip`` with
  its default ``rescale``, 16-bit WAV. The oracle's torchaudio is a stub without audio I/O,
  so the track is read with soundfile and the stems are written with soundfile after
  torchaudio's float-to-16-bit conversion (round to nearest at 2**15, saturating).

stemserve replays demucs 4's random shift draws from the seed, so every path's stems are
compared with the reference's (largest difference in 16-bit steps) and each speed-up is for
the same output (the fast paths' within their rounding). The issue's target: htdemucs through
Triton at least 2x faster than demucs 4.0.1 on both tracks; the notes say which Triton paths
met it in this run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

from .end_to_end import (compare_with_reference, path_precision, served_run,
                         timed_separations, track_row, write_track)
from .machine import describe, machine_name, now, usable_cpus
from .memory import peak_rss_mib
from .plots import save_and_plot
from .results import add_output_arguments, new_section
from .timing import loadavg, measure

SCRIPT = "releases"
FORWARD = "releases_forward"
END_TO_END = "releases_end_to_end"
TITLES = {FORWARD: "HT Demucs: model forward and cost per audio second (issue 13)",
          END_TO_END: "HT Demucs: whole tracks, stemserve vs demucs 4.0.1 (issue 13)"}
PARTS = ("forward", "cost", "end_to_end")
SEED = 0
ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = Path(__file__).resolve().parent / ".cache" / SCRIPT
ORACLE_DIR = ROOT / ".oracle" / "demucs4"
ORACLE_INSTALL = ".ci/oracle-v4.sh"
PATHS = {"triton": "stemserve, Triton server",
         "onnx": "stemserve, ONNX Runtime in-process",
         "triton_int8": "stemserve, Triton server, int8 graph (--int8)",
         "triton_bf16": "stemserve, Triton server, bf16 on OpenVINO (--bf16)",
         "demucs4": "demucs 4.0.1 apply_model (reference)"}
BACKENDS = {"torch_eager": "PyTorch eager, torch.no_grad()",
            "ort": "ONNX Runtime, CPU provider, ORT_ENABLE_ALL",
            "openvino_bf16": "OpenVINO, bf16 arithmetic (the --bf16 session)"}
QUICK_HT = dict(channels=8, bottom_channels=32, segment=Fraction(1))
"""The tiny HT Demucs of --quick (the model tests' small configuration)."""
V2_SEGMENT_S = 8.0
SHIFTS, OVERLAP = 1, 0.25
TARGET = 2.0
REQUEST_TIMEOUT = 3600.0
"""Per-request client timeout on the Triton path: a request may queue behind a batch of
full-size segments on a CPU server; the benchmark must not retry those."""
EXPORT_SOURCES = ("export/to_onnx.py", "stemserve/models/htdemucs.py",
                  "stemserve/models/transformer.py", "export/exportable.py",
                  "stemserve/models/stft.py", "stemserve/models/blocks.py", "stemserve/spec.py")
"""Files whose change makes a cached htdemucs export stale."""


# ---------------------------------------------------------------------------------------------
# The model

def ht_kwargs(quick: bool) -> dict:
    """Constructor arguments of the measured HT Demucs: the htdemucs release's, or tiny."""
    from stemserve.models.configs import HTDEMUCS

    return dict(HTDEMUCS, **QUICK_HT) if quick else dict(HTDEMUCS)


def _jsonable(value):
    if isinstance(value, Fraction):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _checkpoint_info(kwargs: dict, quick: bool):
    """The ``CheckpointInfo`` of the random-weight model: its digest comes from the seed."""
    from stemserve.checkpoints import CheckpointInfo

    size = "quick" if quick else "full"
    digest = hashlib.sha256(f"htdemucs-random {size} seed {SEED}".encode()).hexdigest()
    return CheckpointInfo(name="htdemucs-random", path=Path(f"htdemucs-random-{size}.th"),
                          sha256=digest, config=dict(kwargs), family="htdemucs")


def _export_stamp(quick: bool) -> dict:
    from .machine import versions

    found = versions()
    sources = hashlib.sha256()
    for name in EXPORT_SOURCES:
        path = ROOT / name
        sources.update(path.read_bytes() if path.is_file() else b"missing")
    return {"model": "htdemucs", "kwargs": _jsonable(ht_kwargs(quick)), "seed": SEED,
            "torch": found.get("torch"), "onnx": found.get("onnx"),
            "sources_sha256": sources.hexdigest()}


def export_htdemucs(folder: Path, quick: bool, threads: int, timeout: float, log) -> dict:
    """The htdemucs export (``model.onnx``, ``model.json``, ``weights.th``) in ``folder``,
    made by a child process unless the folder already holds this stamp's. Returns what the
    export child reported (parameters, export seconds) and whether it was reused."""
    stamp, stamp_file = _export_stamp(quick), folder / "benchmark-stamp.json"
    if stamp_file.is_file():
        saved = json.loads(stamp_file.read_text())
        if saved.get("stamp") == stamp and all((folder / name).is_file() for name in
                                               ("model.onnx", "model.json", "weights.th")):
            log(f"reusing the htdemucs export in {folder}")
            return {**saved["info"], "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    log(f"exporting the {'tiny' if quick else 'full-size'} htdemucs to {folder}")
    _, info = _run_child({"kind": "export_htdemucs", "quick": quick, "folder": str(folder),
                          "threads": threads}, timeout=timeout)
    stamp_file.write_text(json.dumps({"stamp": stamp, "info": info}))
    return {**info, "reused": False}


def export_v2(folder: Path, config: str, threads: int, timeout: float, log) -> dict:
    """The v2 (demucs_quantized) export through :func:`benchmarks.models.export_random`,
    ``V2_SEGMENT_S`` segments, in a child process (which reuses a cached one)."""
    log(f"v2 '{config}' export in {folder} (reused when cached)")
    _, info = _run_child({"kind": "export_v2", "config": config, "folder": str(folder),
                          "threads": threads}, timeout=timeout)
    return info


def _spec(folder: Path) -> dict:
    return json.loads((Path(folder) / "model.json").read_text())


# ---------------------------------------------------------------------------------------------
# Child side

def _emit(kind: str, payload: dict) -> None:
    print(f"{kind} " + json.dumps(payload), flush=True)


def _export_htdemucs_child(job: dict) -> dict:
    import torch

    from stemserve.export.to_onnx import export_onnx
    from stemserve.models import HTDemucs

    torch.set_num_threads(job["threads"])
    kwargs = ht_kwargs(job["quick"])
    torch.manual_seed(SEED)
    model = HTDemucs(**kwargs).eval()
    folder = Path(job["folder"])
    start = time.perf_counter()
    spec = export_onnx(model, _checkpoint_info(kwargs, job["quick"]), folder)
    export_s = time.perf_counter() - start
    torch.save({"kwargs": kwargs, "state": model.state_dict()}, folder / "weights.th")
    return {"parameters": sum(p.numel() for p in model.parameters()), "export_s": export_s,
            "segment_length": spec.segment_length, "padded_length": spec.padded_length,
            "graph_mib": (folder / spec.onnx_file).stat().st_size / 2**20}


def _export_v2_child(job: dict) -> dict:
    import torch

    from stemserve.defaults import SOURCES

    from stemserve.model import Demucs

    from .models import CONFIGS, export_random

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    folder = export_random(job["config"], SEED, Path(job["folder"]),
                           segment_length=int(round(V2_SEGMENT_S * 44100)))
    export_s = time.perf_counter() - start
    with torch.device("meta"):
        model = Demucs(SOURCES, **CONFIGS[job["config"]])
    spec = _spec(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), "export_s": export_s,
            "segment_length": spec["segment_length"], "padded_length": spec["padded_length"],
            "graph_mib": (folder / spec["onnx_file"]).stat().st_size / 2**20}


def _inputs(batch: int, channels: int, length: int):
    """Seeded noise; item 0 is the same array at every batch size."""
    import numpy as np

    return np.random.default_rng(SEED).standard_normal((batch, channels, length),
                                                       dtype=np.float32)


def _forward_child(job: dict) -> dict:
    """One runtime at each batch size: a ``ROW`` line per batch, as each ends."""
    import numpy as np

    began = time.perf_counter()
    folder = Path(job["export"])
    spec = _spec(folder)
    channels, length = spec["audio_channels"], spec["padded_length"]
    info: dict = {}
    if job["backend"] in ("ort", "openvino_bf16"):
        if job["backend"] == "ort":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = job["threads"]
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            session = ort.InferenceSession(str(folder / spec["onnx_file"]), options,
                                           providers=["CPUExecutionProvider"])
            info["providers"] = session.get_providers()
        else:
            from stemserve.runtime.ort_session import cpu_session

            session = cpu_session(folder / spec["onnx_file"], job["threads"], "bf16")
            info["openvino"] = session.version

        def run(x):
            return session.run([spec["output_name"]], {spec["input_name"]: x})[0]
    else:
        import torch

        from stemserve.models import HTDemucs

        torch.set_num_threads(job["threads"])
        package = torch.load(folder / "weights.th", map_location="cpu", weights_only=False)
        model = HTDemucs(**package["kwargs"]).eval()
        model.load_state_dict(package["state"], strict=True)
        info["torch_threads"] = torch.get_num_threads()

        def run(x):
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
    info["load_s"] = time.perf_counter() - began

    reference = Path(job["reference"]) if job.get("reference") else None
    last: dict = {}
    for index, batch in enumerate(job["batches"]):
        x = _inputs(batch, channels, length)

        def call():
            last["out"] = run(x)

        measured = measure(call, repeats=job["repeats"], warmup=job["warmup"],
                           budget_s=job.get("budget_s"), min_repeats=job["min_repeats"])
        row = {"model": job["model"], "backend": job["backend"], "batch": batch,
               "status": "ok", "measurement": measured.to_dict(),
               "peak_rss_mib": peak_rss_mib()}
        if index == 0 and reference is not None:
            first = np.asarray(last["out"][0], dtype=np.float32)
            if job["backend"] == "torch_eager":
                reference.parent.mkdir(parents=True, exist_ok=True)
                np.save(reference, first)
                row["max_abs_diff_vs_eager"] = 0.0
            elif reference.is_file():
                expected = np.load(reference)
                if expected.shape == first.shape:
                    row["max_abs_diff_vs_eager"] = float(np.abs(expected - first).max())
        _emit("ROW", row)
    return info


def _stemserve_child(job: dict) -> dict:
    """``Separator.separate_file`` ``repeats`` times through Triton or in-process ORT."""
    from stemserve.client import Separator, open_backend
    from stemserve.connection import ConnectionOptions

    began = time.perf_counter()
    precision = path_precision(job["kind"])
    backend = (open_backend("triton", precision=precision,
                            connection=ConnectionOptions(job["url"], timeout=REQUEST_TIMEOUT))
               if job["kind"].startswith("triton")
               else open_backend("onnx", model=job["export"], precision=precision))
    load_s = time.perf_counter() - began
    try:
        separator = Separator(backend, shifts=job["shifts"], seed=job["seed"],
                              overlap=job["overlap"])
        runs = timed_separations(separator, job["track"], job["out"], job["repeats"])
    finally:
        backend.close()
    extra = ({"shared_memory": getattr(backend, "shared_memory", None)}
             if job["kind"].startswith("triton") else {})
    return {"load_s": load_s, "runs": runs, **extra}


def _demucs4_child(job: dict) -> dict:
    """demucs 4.0.1's separate.py on one WAV, with the official package from the oracle."""
    import random

    import demucs
    import numpy as np
    import soundfile as sf
    import torch

    oracle = Path(job["oracle"]).resolve()
    if demucs.__version__ != "4.0.1" or not Path(demucs.__file__).resolve().is_relative_to(
            oracle):
        raise RuntimeError(f"wrong demucs {demucs.__version__} at {demucs.__file__}; "
                           f"expected 4.0.1 from {oracle}")
    from demucs.apply import BagOfModels, apply_model
    from demucs.audio import prevent_clip
    from demucs.htdemucs import HTDemucs

    torch.set_num_threads(job["threads"])
    began = time.perf_counter()
    package = torch.load(job["weights"], map_location="cpu", weights_only=False)
    official = HTDemucs(**package["kwargs"])
    official.load_state_dict(package["state"], strict=True)
    model = BagOfModels([official.eval()])  # get_model("htdemucs"): a bag of one
    model.eval()
    load_s = time.perf_counter() - began
    runs = []
    for repeat in range(job["repeats"]):
        folder = Path(job["out"]) / f"repeat-{repeat}" / Path(job["track"]).stem
        start = time.perf_counter()
        data, rate = sf.read(job["track"], dtype="float32", always_2d=True)
        wav = torch.from_numpy(np.ascontiguousarray(data.T))
        decoded = time.perf_counter()
        ref = wav.mean(0)
        wav = (wav - ref.mean()) / ref.std()
        random.seed(job["seed"])
        with torch.no_grad():
            sources = apply_model(model, wav[None], shifts=job["shifts"], split=True,
                                  overlap=job["overlap"], progress=False)[0]
        sources = sources * ref.std() + ref.mean()
        separated = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        for source, name in zip(sources, model.sources):
            source = prevent_clip(source, mode="rescale")
            # torchaudio.save(encoding="PCM_S", bits_per_sample=16): nearest, saturating
            pcm = torch.clamp(torch.round(source * 2**15), -2**15, 2**15 - 1).short()
            sf.write(str(folder / f"{name}.wav"), pcm.numpy().T, rate, subtype="PCM_16")
        end = time.perf_counter()
        runs.append({"wall_s": end - start,
                     "stages_s": {"decode": decoded - start, "separate": separated - decoded,
                                  "write": end - separated}})
    return {"load_s": load_s, "runs": runs, "torch_threads": torch.get_num_threads(),
            "demucs": demucs.__version__}


CHILDREN = {"export_htdemucs": _export_htdemucs_child, "export_v2": _export_v2_child,
            "forward": _forward_child, "triton": _stemserve_child, "onnx": _stemserve_child,
            "triton_int8": _stemserve_child, "triton_bf16": _stemserve_child,
            "demucs4": _demucs4_child}


def child(job: dict) -> None:
    """Run one job; ``ROW`` lines as it goes, its result as the last ``RESULT`` line."""
    cpu = time.process_time()
    result = CHILDREN[job["kind"]](job)
    result.update(cpu_s=time.process_time() - cpu, peak_rss_mib=peak_rss_mib())
    _emit("RESULT", result)


# ---------------------------------------------------------------------------------------------
# Parent side

class ChildFailed(RuntimeError):
    """A child exited without its result; ``rows`` holds what it reported before."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


def _run_child(job: dict, *, timeout: float, oracle: Path | None = None
               ) -> tuple[list[dict], dict]:
    """Run ``job`` in ``python -m benchmarks.releases --child``; returns (rows, result).

    ``oracle``: put that folder first on the child's PYTHONPATH (demucs 4.0.1)."""
    env = dict(os.environ)
    if oracle is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(oracle)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{SCRIPT}", "--child",
                               json.dumps(job)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
        raise ChildFailed(f"timed out after {timeout:g} s", rows) from None
    if done.stderr.strip():
        sys.stderr.write(done.stderr)
        sys.stderr.flush()
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not results:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = tail[-1][:300] if tail else "no output"
        raise ChildFailed(f"{job['kind']} child exited {done.returncode}: {reason}", rows)
    return rows, json.loads(results[-1][len("RESULT "):])


def oracle_skip(oracle: Path) -> str | None:
    """Why the demucs 4.0.1 reference cannot run, or None."""
    if (oracle / ".installed").is_file() and (oracle / "demucs").is_dir():
        return None
    return (f"skipped: the demucs 4.0.1 reference is not installed in {oracle} "
            f"(run {ORACLE_INSTALL})")


def bf16_skip() -> str | None:
    """Why the bf16 fast path cannot run here, or None."""
    from stemserve.runtime.openvino_session import cpu_has_bf16

    if cpu_has_bf16():
        return None
    return ("skipped: this CPU has no bf16 arithmetic (AMX or AVX512_BF16), or OpenVINO is "
            "not installed")


def _forward_row(row: dict, segment_s: float) -> dict:
    """A child's measurement with the summary fields the table and the plots read."""
    wall = row["measurement"]["wall_s"]
    cpu = row["measurement"]["cpu_s"]
    batch = row["batch"]
    row.update(series=BACKENDS[row["backend"]], repeats=wall["n"], forward_s=wall["median"],
               forward_min_s=wall["min"], forward_max_s=wall["max"],
               spread=(wall["max"] - wall["min"]) / wall["median"],
               per_item_s=wall["median"] / batch, cpu_per_item_s=cpu["median"] / batch,
               rtf=wall["median"] / batch / segment_s,
               cpu_util=row["measurement"]["cpu_util"],
               first_call_s=(row["measurement"]["warmup_s"] or [None])[0])
    return row


def _measure_forward(model: str, backend: str, export: Path, batches: list[int], args,
                     segment_s: float, reference: Path | None, log) -> tuple[list[dict], dict]:
    """One child: ``backend`` on ``model`` at each batch; failed rows for what it missed."""
    job = {"kind": "forward", "model": model, "backend": backend, "export": str(export),
           "batches": batches, "repeats": args.forward_repeats, "warmup": args.warmup,
           "budget_s": args.budget, "min_repeats": min(args.min_repeats, args.forward_repeats),
           "threads": args.threads, "reference": str(reference) if reference else None}
    log(f"{model} forward, {backend}, batches {','.join(map(str, batches))}")
    try:
        rows, info = _run_child(job, timeout=args.timeout)
        status = None
    except ChildFailed as err:
        rows, info, status = err.rows, {}, f"failed: {err}"
        log(f"  {status}")
    rows = [_forward_row(row, segment_s) for row in rows]
    for row in rows:
        log(f"  batch {row['batch']}: {row['per_item_s']:.3f} s/item, RTF {row['rtf']:.3f}")
    done = {row["batch"] for row in rows}
    rows += [{"model": model, "backend": backend, "series": BACKENDS[backend], "batch": batch,
              "status": status or "failed: no result"} for batch in batches if batch not in done]
    return rows, info


def forward_part(args, ht: Path, ht_info: dict, log) -> tuple[list[dict], list[dict]]:
    """Rows of the forward table: eager at ``--torch-batches``, ORT at ``--ort-batches``,
    OpenVINO bf16 at ``--bf16-batches``."""
    segment_s = ht_info["segment_length"] / 44100
    reference = args.work_dir / "forward" / "eager-batch1-item0.npy"
    reference.unlink(missing_ok=True)
    rows, backends = [], []
    for backend, batches in (("torch_eager", args.torch_batches), ("ort", args.ort_batches),
                             ("openvino_bf16", args.bf16_batches)):
        if not batches:
            continue
        if backend == "openvino_bf16" and (skip := bf16_skip()):
            rows += [{"model": "htdemucs", "backend": backend, "series": BACKENDS[backend],
                      "batch": batch, "status": skip} for batch in batches]
            continue
        measured, info = _measure_forward("htdemucs", backend, ht, batches, args, segment_s,
                                          reference, log)
        rows += measured
        backends.append({"backend": backend, **info})
    eager = next((row for row in rows if row["backend"] == "torch_eager" and row["batch"] == 1
                  and row["status"] == "ok"), None)
    for row in rows:
        if eager and row["status"] == "ok":
            row["speedup_vs_eager_b1"] = eager["per_item_s"] / row["per_item_s"]
    return rows, backends


def cost_part(args, ht: Path, ht_info: dict, v2: Path, v2_info: dict, log) -> list[dict]:
    """htdemucs and demucs_quantized (v2) through ORT at ``--cost-batch``, back to back."""
    rows = []
    for model, folder, info, release in (
            ("htdemucs", ht, ht_info, "htdemucs (v4)"),
            ("demucs_quantized", v2, v2_info, f"demucs_quantized (v2, '{args.v2_config}' size)")):
        segment_s = info["segment_length"] / 44100
        measured, _ = _measure_forward(model, "ort", folder, [args.cost_batch], args,
                                       segment_s, None, log)
        row = measured[0]
        row.update(release=release, parameters_m=info["parameters"] / 1e6, segment_s=segment_s,
                   input_samples=info["padded_length"])
        if row["status"] == "ok":
            row["s_per_audio_s"] = row["per_item_s"] / segment_s
            row["cpu_s_per_audio_s"] = row["cpu_per_item_s"] / segment_s
            row["s_per_track_s"] = row["s_per_audio_s"] / (1 - OVERLAP)
        rows.append(row)
    base = rows[0]
    for row in rows:
        if row["status"] == "ok" and base["status"] == "ok":
            row["vs_htdemucs"] = row["s_per_audio_s"] / base["s_per_audio_s"]
            row["cpu_vs_htdemucs"] = row["cpu_s_per_audio_s"] / base["cpu_s_per_audio_s"]
    return rows


def _measure_track(kind: str, export: Path, track: Path, seconds: float, repeats: int, args,
                   log) -> dict:
    out = args.work_dir / "out" / f"{kind}-{track.stem}"
    shutil.rmtree(out, ignore_errors=True)
    job = {"kind": kind, "track": str(track), "out": str(out), "repeats": repeats,
           "export": str(export), "weights": str(export / "weights.th"), "seed": SEED,
           "shifts": SHIFTS, "overlap": OVERLAP, "threads": args.threads,
           "oracle": str(args.oracle_dir)}
    load = loadavg()
    try:
        if kind.startswith("triton"):
            result, server = served_run(
                export, args.work_dir, job,
                lambda job: _run_child(job, timeout=args.timeout)[1], log)
        else:
            _, result = _run_child(job, timeout=args.timeout,
                                   oracle=args.oracle_dir if kind == "demucs4" else None)
            server = None
    except Exception as err:  # noqa: BLE001 - recorded in the row
        log(f"  failed: {err}")
        return {"series": PATHS[kind], "path": kind, "model": "htdemucs", "track_s": seconds,
                "status": f"failed: {type(err).__name__}: {err}"}
    row = track_row(PATHS[kind], kind, "htdemucs", seconds, result, server,
                    carried=("shared_memory", "torch_threads", "demucs"))
    row["loadavg_before"] = load
    log(f"  {row['wall_s']:.1f} s (RTF {row['rtf']:.3f}), client peak "
        f"{row['client_peak_mib']:.0f} MiB")
    return row


def end_to_end_part(args, ht: Path, log) -> list[dict]:
    rows = []
    skip = oracle_skip(args.oracle_dir)
    from stemserve.client.models import export_dir_for

    for precision in sorted({path_precision(kind) for kind in args.paths} - {"fp32"}):
        log(f"the htdemucs export's {precision} variant (made once)")
        export_dir_for(ht, precision=precision)
    for seconds in args.tracks:
        track = write_track(args.work_dir / "tracks" / f"track-{seconds:g}s.wav", seconds)
        repeats = args.repeats if seconds <= args.repeat_limit else 1
        for kind in args.paths:
            why = skip if kind == "demucs4" else bf16_skip() if kind.endswith("_bf16") else None
            if why:
                rows.append({"series": PATHS[kind], "path": kind, "model": "htdemucs",
                             "track_s": seconds, "status": why})
                continue
            log(f"{kind}: {seconds:g} s track, {repeats} repetition(s)")
            rows.append(_measure_track(kind, ht, track, seconds, repeats, args, log))
    compare_with_reference(rows, "demucs4", lambda path, stem: (
        args.work_dir / "out" / f"{path}-{stem}" / "repeat-0" / stem))
    shutil.rmtree(args.work_dir / "out", ignore_errors=True)
    return rows


TRITON_PATHS = ("triton", "triton_bf16", "triton_int8")
"""The paths the target is judged on: the exact one and the CPU fast paths, each served."""


def _path_verdict(rows: list[dict], tracks: list[float], kind: str) -> dict:
    """``kind``'s speed-up over demucs 4.0.1 per track, and whether all reach ``TARGET``."""
    ratios = {}
    for seconds in tracks:
        served = next((row for row in rows if row["path"] == kind
                       and row["track_s"] == seconds and "speedup_vs_demucs4" in row), None)
        ratios[f"{seconds:g}"] = served["speedup_vs_demucs4"] if served else None
    known = [ratio for ratio in ratios.values() if ratio is not None]
    met = None if len(known) < len(ratios) or not ratios else all(r >= TARGET for r in known)
    return {"speedups": ratios, "met": met}


def target_verdict(rows: list[dict], tracks: list[float]) -> dict:
    """Whether each Triton path was at least ``TARGET`` x faster than demucs 4.0.1 on every
    track: ``speedups`` and ``met`` are the exact path's, ``paths`` every measured one's."""
    measured = {row["path"] for row in rows}
    paths = {kind: _path_verdict(rows, tracks, kind) for kind in TRITON_PATHS
             if kind in measured}
    exact = paths.get("triton") or _path_verdict(rows, tracks, "triton")
    return {"target_x": TARGET, "tracks_s": tracks, **exact, "paths": paths}


# ---------------------------------------------------------------------------------------------
# Sections

FORWARD_COLUMNS = [
    {"key": "series", "title": "backend"},
    {"key": "batch", "title": "batch"},
    {"key": "repeats", "title": "n"},
    {"key": "forward_s", "title": "s/forward (median)", "format": ".3f"},
    {"key": "spread", "title": "spread", "format": ".0%"},
    {"key": "per_item_s", "title": "s/item", "format": ".3f"},
    {"key": "cpu_per_item_s", "title": "CPU s/item", "format": ".2f"},
    {"key": "rtf", "title": "RTF (s per audio s)", "format": ".3f"},
    {"key": "speedup_vs_eager_b1", "title": "x eager batch 1", "format": ".2f"},
    {"key": "cpu_util", "title": "cpu util", "format": ".2f"},
    {"key": "first_call_s", "title": "first call s", "format": ".2f"},
    {"key": "max_abs_diff_vs_eager", "title": "max abs diff vs eager", "format": ".1e"},
    {"key": "peak_rss_mib", "title": "peak RSS MiB", "format": ".0f"},
    {"key": "status", "title": "status"},
]
COST_COLUMNS = [
    {"key": "release", "title": "model"},
    {"key": "parameters_m", "title": "params (M)", "format": ".1f"},
    {"key": "segment_s", "title": "segment s", "format": "g"},
    {"key": "batch", "title": "batch"},
    {"key": "repeats", "title": "n"},
    {"key": "per_item_s", "title": "s/segment", "format": ".3f"},
    {"key": "s_per_audio_s", "title": "s per audio s", "format": ".3f"},
    {"key": "cpu_s_per_audio_s", "title": "CPU s per audio s", "format": ".3f"},
    {"key": "s_per_track_s", "title": "s per track s (25% overlap)", "format": ".3f"},
    {"key": "vs_htdemucs", "title": "cost vs htdemucs", "format": ".2f"},
    {"key": "peak_rss_mib", "title": "peak RSS MiB", "format": ".0f"},
    {"key": "status", "title": "status"},
]
END_TO_END_COLUMNS = [
    {"key": "series", "title": "path"},
    {"key": "track_s", "title": "track s", "format": "g"},
    {"key": "repeats", "title": "n"},
    {"key": "wall_s", "title": "wall s (median)", "format": ".1f"},
    {"key": "spread", "title": "spread", "format": ".0%"},
    {"key": "rtf", "title": "RTF (s per audio s)", "format": ".3f"},
    {"key": "speedup_vs_demucs4", "title": "x demucs 4.0.1", "format": ".2f"},
    {"key": "load_s", "title": "load s", "format": ".1f"},
    {"key": "speedup_vs_demucs4_with_load", "title": "x demucs 4.0.1 incl. load",
     "format": ".2f"},
    {"key": "client_peak_mib", "title": "client peak MiB", "format": ".0f"},
    {"key": "server_peak_mib", "title": "server peak MiB", "format": ".0f"},
    {"key": "server_start_s", "title": "server start s", "format": ".1f"},
    {"key": "max_diff_lsb_vs_demucs4", "title": "max diff vs demucs 4.0.1 (16-bit steps)"},
    {"key": "status", "title": "status"},
]


def _model_note(args, info: dict) -> str:
    size = ("a tiny HT Demucs (htdemucs' configuration with channels=8, bottom_channels=32, "
            "1 s segments)" if args.quick else "the htdemucs release's configuration")
    return (f"Model: {size}, {info['parameters'] / 1e6:.1f} M parameters, random weights "
            f"(seed {SEED}; timing does not depend on the weights); one segment is "
            f"{info['segment_length']} samples ({info['segment_length'] / 44100:g} s), the "
            "graph's fixed time axis (dynamic batch). Export "
            + ("reused from the cache" if info.get("reused")
               else f"made in {info['export_s']:.0f} s") + ".")


def forward_notes(rows: list[dict], cost: list[dict], args, ht_info: dict,
                  v2_info: dict | None) -> list[str]:
    notes = [_model_note(args, ht_info),
             f"{args.threads} intra-op threads (torch.set_num_threads; ORT intra_op_num_threads, "
             "inter-op 1, sequential). Input: seeded standard-normal stereo noise; item 0 is "
             "the same at every batch size, and ORT's output for it is compared with eager's. "
             f"{args.forward_repeats} timed call(s) after {args.warmup} untimed per batch"
             + (f" (fewer once {args.budget:g} s are spent, at least "
                f"{min(args.min_repeats, args.forward_repeats)})" if args.budget else "")
             + "; each backend in its own process.",
             "RTF: s/item divided by the segment's audio seconds; below 1 is faster than real "
             "time. A track costs 1 / (1 - overlap) = 4/3 of that with apply_model's 25% "
             "overlap."]
    ok = {(row["backend"], row["batch"]): row for row in rows if row["status"] == "ok"}
    if ("torch_eager", 1) in ok and ("ort", 1) in ok:
        best = min((row for row in rows if row["backend"] == "ort" and row["status"] == "ok"),
                   key=lambda row: row["per_item_s"])
        notes.append(f"ONNX Runtime vs PyTorch eager per item: batch 1 "
                     f"{ok['ort', 1]['speedup_vs_eager_b1']:.2f}x; ORT's best, batch "
                     f"{best['batch']}, {best['speedup_vs_eager_b1']:.2f}x eager batch 1.")
    if ("torch_eager", 1) in ok and ("openvino_bf16", 1) in ok:
        bf16 = ok["openvino_bf16", 1]
        notes.append(f"The bf16 fast path (OpenVINO, bf16 arithmetic on the fp32 graph, the "
                     f"session `--bf16` serves with) at batch 1: {bf16['per_item_s']:.2f} s, "
                     f"{bf16['speedup_vs_eager_b1']:.2f}x eager batch 1; its output differs "
                     f"from eager's by {bf16.get('max_abs_diff_vs_eager', float('nan')):.1e} "
                     "at most (bf16 rounding; the quality meter measures what it costs).")
    if cost:
        ht, v2 = cost
        notes.append(
            "Cost table: demucs_quantized is the v2 network (stemserve.model.Demucs, "
            f"'{args.v2_config}' configuration of benchmarks/models.py, random weights): the "
            "release stores diffq-quantized weights that load as float32, so its compute is "
            f"this network's. v2 segments are {V2_SEGMENT_S:g} s (fed at the valid length "
            f"{v2_info['padded_length'] if v2_info else '?'}, its per-second cost hardly "
            "depends on the segment), htdemucs its fixed training segment; both through ONNX "
            f"Runtime at batch {args.cost_batch}, one right after the other.")
        if ht["status"] == "ok" and v2["status"] == "ok":
            notes.append(
                f"Per audio second: htdemucs {ht['s_per_audio_s']:.3f} s, demucs_quantized "
                f"{v2['s_per_audio_s']:.3f} s of wall time: htdemucs costs "
                f"{1 / v2['vs_htdemucs']:.2f}x as much as demucs_quantized "
                f"({1 / v2['cpu_vs_htdemucs']:.2f}x in CPU time; below 1 is cheaper).")
    if args.quick:
        notes.append("--quick: tiny models and one repetition; a check that the script runs, "
                     "not a measurement.")
    return notes


def end_to_end_notes(rows: list[dict], args, ht_info: dict, verdict: dict) -> list[str]:
    notes = [
        _model_note(args, ht_info),
        f"Every path: shifts={SHIFTS} with seed {SEED} (stemserve replays demucs 4's random "
        f"shift draws), overlap {OVERLAP}, split by the model's segment, 16-bit WAV stems with "
        "demucs' rescale clipping. Wall time covers reading the track, separating and writing "
        "the stems; 'load' (model or session load, server connection) is apart, and the "
        "server's own start (loading the graph) is in neither.",
        "demucs 4.0.1: the official package from .oracle/demucs4 in its own process, "
        "separate.py's steps with a BagOfModels of the one model, torch "
        f"{args.threads} threads; the track is read with soundfile and stems written with "
        "soundfile after torchaudio's float-to-16-bit rounding (the oracle's torchaudio is a "
        "stub without audio I/O; ffmpeg decoding would cost it a little more). stemserve's "
        "writer truncates toward zero as demucs 2 did, so up to 1 step of the difference is "
        "the encoders' rounding.",
        "Triton: the CPU repository as shipped (ONNX Runtime in the python backend, dynamic "
        "batching), gRPC with system shared memory, the client's default window; client and "
        "server share this machine's cores. Server peak: its process group's summed RSS "
        "sampled every 0.2 s. Client peak: the client process's VmHWM.",
        f"Tracks up to {args.repeat_limit:g} s run {args.repeats} time(s) (median and spread), "
        "longer ones once; each path in a fresh process.",
    ]
    for seconds in args.tracks:
        same = {row["path"]: row for row in rows if row["track_s"] == seconds
                and row["status"] == "ok"}
        if "demucs4" not in same:
            continue
        parts = [f"{PATHS[kind]} {same[kind]['wall_s']:.1f} s = "
                 f"{same[kind]['speedup_vs_demucs4']:.2f}x"
                 for kind in ("triton", "onnx", "triton_int8", "triton_bf16")
                 if kind in same]
        if parts:
            notes.append(f"{seconds:g} s track: demucs 4.0.1 {same['demucs4']['wall_s']:.1f} s; "
                         + "; ".join(parts) + ".")
    target = (f"Target (issue 13): htdemucs through Triton at least {TARGET:g}x faster than "
              "demucs 4.0.1 on every track")
    for kind, path in verdict["paths"].items():
        ratios = ", ".join(f"{track} s: " + ("–" if ratio is None else f"{ratio:.2f}x")
                           for track, ratio in path["speedups"].items())
        if args.quick:
            judged = f"not judged by --quick (the tiny model's ratios: {ratios})"
        else:
            judged = {True: f"MET ({ratios})", False: f"NOT MET ({ratios})",
                      None: f"not decided, a row is missing ({ratios})"}[path["met"]]
        notes.append(f"{target}, {PATHS[kind]}: {judged}.")
    if args.quick:
        notes.append("--quick: tiny model and tracks; a check that every path runs, not a "
                     "measurement (the target applies to the full configuration).")
    return notes


# ---------------------------------------------------------------------------------------------
# Command line

def _numbers(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated numbers expected: {text!r}")
    return parse


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [item.strip() for item in text.split(",") if item.strip()]
        unknown = sorted(set(names) - set(choices))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT}",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=_names(PARTS), default=list(PARTS),
                        help="what to measure: forward, cost, end_to_end (all); forward and "
                             f"cost make the {FORWARD} section, end_to_end {END_TO_END}")
    parser.add_argument("--torch-batches", type=_numbers(int), default=[1, 2],
                        help="PyTorch eager batch sizes (1,2)")
    parser.add_argument("--ort-batches", type=_numbers(int), default=[1, 2, 4],
                        help="ONNX Runtime batch sizes (1,2,4)")
    parser.add_argument("--bf16-batches", type=_numbers(int), default=[1, 2],
                        help="OpenVINO bf16 batch sizes (1,2; none: leave it out)")
    parser.add_argument("--forward-repeats", type=int, default=3,
                        help="timed forward calls per batch (3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed forward calls before them (1)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of one batch's timed calls after which no more start "
                             "(60; at least --min-repeats run)")
    parser.add_argument("--min-repeats", type=int, default=2)
    parser.add_argument("--cost-batch", type=int, default=2,
                        help="batch of the htdemucs vs demucs_quantized cost table (2)")
    parser.add_argument("--v2-config", default="default",
                        help="benchmarks/models.py configuration of demucs_quantized "
                             "(default: the release's size)")
    parser.add_argument("--tracks", type=_numbers(float), default=[60.0, 600.0],
                        help="track seconds (60,600)")
    parser.add_argument("--paths", type=_names(PATHS), default=list(PATHS),
                        help="end-to-end paths (triton,onnx,demucs4)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="repetitions of tracks up to --repeat-limit seconds (2)")
    parser.add_argument("--repeat-limit", type=float, default=120.0,
                        help="longer tracks run once (120)")
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="torch and ONNX Runtime intra-op threads (default: usable CPUs)")
    parser.add_argument("--timeout", type=float, default=7200.0,
                        help="seconds one child process may take before it is killed (7200)")
    parser.add_argument("--oracle-dir", type=Path, default=ORACLE_DIR,
                        help=f"where demucs 4.0.1 is installed (default: {ORACLE_DIR})")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help=f"exports, tracks and stems (default: {WORK_DIR})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny check: a tiny HT Demucs, the small v2, 3 s tracks, "
                             "one repetition")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.tracks, args.repeats, args.forward_repeats, args.warmup = [3.0], 1, 1, 1
        args.budget, args.v2_config = None, "small"
    from .models import CONFIGS

    if args.v2_config not in CONFIGS:
        build_parser().error(f"--v2-config: choose from {sorted(CONFIGS)}")

    def log(message: str) -> None:
        print(f"[{SCRIPT}] {message}", flush=True)

    machine = describe()
    name = args.machine or machine_name(machine)
    began = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    size = "quick" if args.quick else "full"
    ht = args.work_dir / f"export-htdemucs-{size}"
    ht_info = export_htdemucs(ht, args.quick, args.threads, args.timeout, log)
    spec = _spec(ht)
    config = {"model": "htdemucs (tiny)" if args.quick else "htdemucs",
              "model_args": _jsonable(QUICK_HT) if args.quick else "the release's",
              "parameters": ht_info["parameters"], "segment_samples": spec["segment_length"],
              "segment_s": spec["segment_length"] / spec["sample_rate"], "seed": SEED,
              "threads": args.threads, "usable_cpus": usable_cpus(), "quick": args.quick}
    any_ok = False

    if {"forward", "cost"} & set(args.parts):
        section = new_section(FORWARD, TITLES[FORWARD], machine=machine, config=dict(
            config, parts=[part for part in args.parts if part != "end_to_end"],
            torch_batches=args.torch_batches, ort_batches=args.ort_batches,
            repeats=args.forward_repeats, warmup=args.warmup, budget_s=args.budget,
            cost_batch=args.cost_batch, v2_config=args.v2_config, v2_segment_s=V2_SEGMENT_S))
        started = time.perf_counter()
        rows, backends = (forward_part(args, ht, ht_info, log) if "forward" in args.parts
                          else ([], []))
        cost, v2_info = [], None
        if "cost" in args.parts:
            v2 = args.work_dir / f"export-v2-{args.v2_config}-{V2_SEGMENT_S:g}s"
            v2_info = export_v2(v2, args.v2_config, args.threads, args.timeout, log)
            cost = cost_part(args, ht, ht_info, v2, v2_info, log)
        section["rows"], section["columns"] = rows, FORWARD_COLUMNS
        section["tables"] = [{"title": "Cost per audio second: htdemucs vs demucs_quantized "
                                       "(ONNX Runtime)",
                              "columns": COST_COLUMNS, "rows": cost}] if cost else []
        section["extra"] = {"export": str(ht), "htdemucs_export": ht_info,
                            "model_kwargs": _jsonable(ht_kwargs(args.quick)), "backends": backends,
                            "v2_export": v2_info, "cost_rows": cost}
        section["notes"] = forward_notes(rows, cost, args, ht_info, v2_info)
        section["duration_s"] = time.perf_counter() - started
        section["finished"] = now()
        save_and_plot(section, results_dir=args.results_dir, machine=name,
                      plots=("per_item", "cpu_per_item"), log=log)
        any_ok |= any(row["status"] == "ok" for row in rows + cost)

    if "end_to_end" in args.parts:
        section = new_section(END_TO_END, TITLES[END_TO_END], machine=describe(), config=dict(
            config, tracks_s=args.tracks, paths=args.paths, repeats=args.repeats,
            repeat_limit_s=args.repeat_limit, shifts=SHIFTS, overlap=OVERLAP,
            output="16-bit WAV at 44.1 kHz, demucs' rescale clipping",
            reference="demucs 4.0.1 from " + str(args.oracle_dir)))
        started = time.perf_counter()
        rows = end_to_end_part(args, ht, log)
        verdict = dict(target_verdict(rows, args.tracks), quick=args.quick)
        section["rows"], section["columns"] = rows, END_TO_END_COLUMNS
        section["extra"] = {"export": str(ht), "target": verdict,
                            "segment_length": spec["segment_length"]}
        section["notes"] = end_to_end_notes(rows, args, ht_info, verdict)
        section["duration_s"] = time.perf_counter() - started
        section["finished"] = now()
        save_and_plot(section, results_dir=args.results_dir, machine=name, plots=("stages",),
                      log=log)
        any_ok |= any(row["status"] == "ok" for row in rows)
    log(f"done in {time.perf_counter() - began:.0f} s")
    return 0 if any_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
